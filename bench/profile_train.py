"""Where a LoRA training step spends its time: torch.profiler over a few steps of
`tuneloop.ml.train.fit` (and, for a ceiling, the same batches through the model with no LoRA
bookkeeping), top kernels by self device time.

    python bench/profile_train.py --shape 1b --steps 6      # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))

from train_throughput import build_random_llama, records  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tuneloop.config import TrainingSettings
    from tuneloop.ml.model import load_lora_model, resolve_device
    from tuneloop.ml.train import fit
    from tuneloop.ml.training_data import tokenize_records

    device, dtype = resolve_device("auto", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        build_random_llama(base, args.shape)
        for packing in (True, False):
            settings = TrainingSettings(max_steps=args.steps, batch_size=args.batch_size, learning_rate=2e-4, max_seq_len=args.max_seq_len, packing=packing, checkpoint_every=0, log_every=args.steps)
            model, tokenizer = load_lora_model(base, settings, device, dtype)
            print("attention implementation:", model.get_base_model().config._attn_implementation, "packing:", packing, flush=True)
            examples, _ = tokenize_records(tokenizer, records(args.batch_size * args.steps * 2, 7), settings.max_seq_len)
            fit(model, examples[: args.batch_size * 2], settings.model_copy(update={"max_steps": 2}), pad_id=tokenizer.pad_token_id, device=device, dtype=dtype, progress=lambda _: None)
            torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                stats = fit(model, examples, settings, pad_id=tokenizer.pad_token_id, device=device, dtype=dtype, progress=print)
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            print(f"packing={packing}: {stats.tokens / wall:,.0f} tok/s under the profiler ({wall:.1f}s)")
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
