"""LoRA training throughput of `tuneloop.train.train_lora` on a model of realistic shape.

Builds a Llama of the chosen shape with random weights (throughput does not depend on the
weights) and a BPE tokenizer trained on demo text, then trains LoRA adapters on demo-world
records twice in the same run: with the auto dtype (bfloat16 autocast on CUDA) and with a
float32 baseline, and prints tokens/s, model FLOPs utilisation and the ratio.

    python bench/train_throughput.py --shape 1b --steps 30          # on a GPU
    python bench/train_throughput.py --shape demo --steps 10        # on the CPU here

MFU counts 4 x params FLOPs per token for frozen-base LoRA (forward 2N, backward through
the frozen weights 2N; no weight gradients for them) and ignores attention's quadratic term.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    # name: hidden, layers, heads, kv_heads, intermediate, vocab
    "demo": (256, 4, 4, 4, 704, 2000),
    "1b": (2048, 16, 16, 8, 5632, 32000),
    "3b": (3072, 28, 24, 8, 8192, 32000),
}
PEAK_TFLOPS = {"bfloat16": {"H100": 989.0, "H200": 989.0}, "float32": {"H100": 67.0, "H200": 67.0}}


def build_model(out_dir: Path, shape: str) -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tuneloop import world
    from tuneloop.basemodel import train_tokenizer, wrap_tokenizer

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    corpus = world.pretraining_corpus(0, 1500)
    tokenizer = wrap_tokenizer(train_tokenizer(corpus, min(vocab, 4000)), 2048)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return n_params


def records(n: int) -> list[dict]:
    from tuneloop import world

    rng = random.Random(7)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return [world.make_labelled_record(rng, "original" if i % 2 else "drifted", f"b-{i}", now) for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json-out", help="write the results here too")
    args = parser.parse_args()

    import torch

    from tuneloop.config import TrainingSettings
    from tuneloop.train import train_lora

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak_key = "H200" if "H200" in gpu else "H100"
    data = records(args.batch_size * (args.steps + 2))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        n_params = build_model(base, args.shape)
        print(f"{args.shape}: {n_params / 1e6:.0f}M parameters on {gpu}", flush=True)
        for label, dtype in (("auto", "auto"), ("float32 baseline", "float32")):
            settings = TrainingSettings(max_steps=args.steps, batch_size=args.batch_size, lora_rank=args.rank, lora_alpha=2 * args.rank, dtype=dtype, log_every=max(1, args.steps // 4), max_seq_len=512)
            start = time.perf_counter()
            result = train_lora(base, data, Path(tmp) / f"adapter-{dtype}", settings, progress=lambda m: print("   ", m, flush=True))
            wall = time.perf_counter() - start
            tflops = 4 * n_params * result.tokens_per_second / 1e12
            peak = PEAK_TFLOPS.get(result.dtype, {}).get(peak_key) if gpu != "cpu" else None
            results[label] = {
                "dtype": result.dtype,
                "device": result.device,
                "tokens_per_second": result.tokens_per_second,
                "model_tflops": tflops,
                "mfu": (tflops / peak) if peak else None,
                "final_loss": result.final_loss,
                "wall_seconds": wall,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu != "cpu" else None,
            }
            if gpu != "cpu":
                torch.cuda.reset_peak_memory_stats()
    fast, slow = results["auto"], results["float32 baseline"]
    print(f"\n{'run':<18} {'dtype':<9} {'tok/s':>10} {'TFLOP/s':>9} {'MFU':>6}")
    for label, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{label:<18} {r['dtype']:<9} {r['tokens_per_second']:>10,.0f} {r['model_tflops']:>9.1f} {mfu:>6}")
    print(f"ratio auto/float32: {fast['tokens_per_second'] / slow['tokens_per_second']:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"shape": args.shape, "params": n_params, "device": gpu, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
