"""Where a LoRA training step spends its time: torch.profiler over a few steps of
`tuneloop.ml.train.train_lora` (TRL's SFTTrainer), packed and not, top kernels by self device time.

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
    from tuneloop.ml.model import resolve_device
    from tuneloop.ml.train import train_lora

    device, _ = resolve_device("auto", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        build_random_llama(base, args.shape)
        rows = records(args.batch_size * args.steps * 2, 7)
        for packing in (True, False):
            settings = TrainingSettings(max_steps=args.steps, batch_size=args.batch_size, learning_rate=2e-4, max_seq_len=args.max_seq_len, packing=packing, checkpoint_every=0, log_every=args.steps)
            train_lora(base, rows[: args.batch_size * 2], Path(tmp) / "warmup", settings.model_copy(update={"max_steps": 2}), progress=lambda _: None)
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                result = train_lora(base, rows, Path(tmp) / f"packed-{packing}", settings, progress=print)
                if device == "cuda":
                    torch.cuda.synchronize()
            wall = time.perf_counter() - start
            print(f"packing={packing}: {result.tokens_per_second:,.0f} tok/s in training under the profiler ({wall:.1f}s with loading)")
            key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))
            if device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
