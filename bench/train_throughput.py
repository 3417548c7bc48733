"""tuneloop's LoRA trainer (TRL's SFTTrainer) against the hand-written loop it replaced and a
plain Hugging Face Trainer + peft baseline, same run, same precision.

All three train the same LoRA (same model, same initial adapter, same records, same steps,
learning rate, warmup + cosine schedule, clipping, completion-only labels) for exactly one
epoch, so all see the same tokens:

- ``tuneloop``: ``tuneloop.ml.train.train_lora`` as the loop runs it (TRL SFTTrainer, the task's
  pre-tokenized prompt-completion rows, TRL's loss over supervised positions);
- ``legacy``: the hand-written loop of tuneloop <= 0.x (``bench/legacy_trainer.py``: random
  micro-batches, only the supervised positions projected through the LM head);
- ``hf-trainer``: what a team writes first: HF ``Trainer`` with ``DataCollatorForSeq2Seq``
  (dynamic padding) and the model's own loss over all positions' logits.

Every run trains at the precision ``--dtype`` resolves to (``auto``: bf16 on a GPU or a CPU
with native bf16, else float32); ``--baseline-precision hf-default`` gives the HF baseline
float32 on a CPU instead (HF's default there; how the README's old 1.55-1.83x was measured).

Printed: real (non-padding) tokens/s of each, the ratios to the library path, the eval losses
on the same held-out rows (one function measures all), and on a GPU the model FLOPs utilisation.

    python bench/train_throughput.py --shape demo --steps 40           # CPU here (~6 min)
    python bench/train_throughput.py --shape 1b --steps 40 --batch-size 32   # on a GPU
    python bench/train_throughput.py --shape 1b --quantization 4bit    # QLoRA, on a GPU

Models are Llama-shaped with random weights (throughput does not depend on the weights;
``--shape demo`` is the demo model itself). MFU counts 4 x params FLOPs per token for
frozen-base LoRA (6 x params minus the frozen weights' gradient), attention's quadratic term
ignored.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {
    # name: hidden, layers, heads, kv_heads, intermediate, vocab
    "1b": (2048, 16, 32, 8, 8192, 32000),  # Llama-3.2-1B's body (its 128k vocab would be 1.2B)
    "3b": (3072, 28, 24, 8, 8192, 32000),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def build_random_llama(out_dir: Path, shape: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tuneloop.demo import invoices as world
    from tuneloop.demo.basemodel import train_tokenizer, wrap_tokenizer

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    tokenizer = wrap_tokenizer(train_tokenizer(world.pretraining_corpus(0, 1500), 4000), 2048)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model


def records(n: int, seed: int) -> list[dict[str, Any]]:
    from tuneloop.demo import invoices as world

    rng = random.Random(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return [world.make_labelled_record(rng, "original" if i % 2 else "drifted", f"b{seed}-{i}", now) for i in range(n)]


def _held_loss(model: Any, tokenizer: Any, held_out: list[dict[str, Any]], settings: Any, device: str, dtype: str) -> float:
    from legacy_trainer import eval_loss
    from tuneloop.ml.training_data import tokenize_records

    held, _ = tokenize_records(tokenizer, held_out, settings.max_seq_len)
    return eval_loss(model, held, settings, pad_id=tokenizer.pad_token_id, device=device, dtype=dtype)


def run_tuneloop(base: Path, data: list[dict[str, Any]], held_out: list[dict[str, Any]], settings: Any, device: str, eval_dtype: str, out: Path) -> dict[str, Any]:
    """``train_lora`` as the loop runs it; the eval loss is measured on the written adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.ml.train import train_lora

    torch.manual_seed(settings.seed)
    result = train_lora(base, data, out, settings, progress=lambda m: print("   ", m, flush=True))
    load_dtype = getattr(torch, eval_dtype) if device == "cuda" else torch.float32
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=load_dtype), str(out)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    loss = _held_loss(model, tokenizer, held_out, settings, device, eval_dtype)
    return {"tokens_per_second": result.tokens_per_second, "eval_loss": loss, "train_loss_last10": result.final_loss, "dtype": result.dtype}


def run_legacy(base: Path, data: list[dict[str, Any]], held_out: list[dict[str, Any]], settings: Any, device: str, dtype: str, train_dtype: str) -> dict[str, Any]:
    """``train_dtype`` trains; the eval loss is measured in ``dtype``."""
    import torch

    from legacy_trainer import fit
    from tuneloop.ml.model import load_lora_model
    from tuneloop.ml.training_data import tokenize_records

    torch.manual_seed(settings.seed)  # the same initial LoRA matrices as the others'
    model, tokenizer = load_lora_model(base, settings, device, dtype)
    examples, _ = tokenize_records(tokenizer, data, settings.max_seq_len)
    _sync(device)
    stats = fit(model, examples, settings, pad_id=tokenizer.pad_token_id, device=device, dtype=train_dtype, progress=lambda m: print("   ", m, flush=True))
    _sync(device)
    loss = _held_loss(model, tokenizer, held_out, settings, device, dtype)
    return {"tokens_per_second": stats.tokens / stats.seconds, "eval_loss": loss, "train_loss_last10": sum(stats.losses[-10:]) / len(stats.losses[-10:])}


def run_hf_trainer(base: Path, data: list[dict[str, Any]], held_out: list[dict[str, Any]], settings: Any, device: str, dtype: str, out: Path, sdpa: str = "default", eval_dtype: str = "float32") -> dict[str, Any]:
    """``dtype``: bfloat16 turns on HF's ``bf16=True``; the eval loss is measured in ``eval_dtype``."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuneloop.ml.model import load_lora_model
    from tuneloop.ml.training_data import tokenize_records

    torch.manual_seed(settings.seed)
    # HF's mixed-precision recipe: float32 weights, bf16 autocast (bf16=True). With the base
    # weights loaded in bf16 instead, this baseline's gradients became NaN on the 1B model.
    model, tokenizer = load_lora_model(base, settings, device, "float32")  # same initial LoRA matrices (same seed)
    examples, _ = tokenize_records(tokenizer, data, settings.max_seq_len)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    steps = settings.max_steps
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=settings.batch_size, max_steps=steps,
        learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, round(settings.warmup_ratio * steps)),
        weight_decay=settings.weight_decay, max_grad_norm=1.0, logging_steps=max(1, steps // 4), save_strategy="no",
        report_to="none", bf16=dtype == "bfloat16", use_cpu=device == "cpu", seed=settings.seed,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    _sync(device)
    with _baseline_attention(device, sdpa):
        output = trainer.train()
    _sync(device)
    loss = _held_loss(model, tokenizer, held_out, settings, device, eval_dtype)
    tokens = sum(len(e.input_ids) for e in examples)  # exactly one epoch: every row once
    return {"tokens_per_second": tokens / output.metrics["train_runtime"], "eval_loss": loss, "train_loss_last10": output.training_loss}


def _baseline_attention(device: str, sdpa: str) -> Any:
    """``no-cudnn``: the baseline gets tuneloop's attention kernels too (isolates the rest)."""
    import contextlib

    if device != "cuda" or sdpa == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["demo", *SHAPES], default="demo", help="demo: the demo model (CPU); 1b/3b: random Llama (GPU)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps; the data is exactly one epoch of them")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--order", choices=["baseline-first", "tuneloop-first"], default="baseline-first")
    parser.add_argument("--packing", choices=["on", "off"], default=None, help="override training.packing for tuneloop's run")
    parser.add_argument("--batching", choices=["length_grouped", "random"], default=None, help="override training.batching")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="training.dtype for tuneloop's run (bfloat16 autocast also runs on CPUs with avx512_bf16/AMX)")
    parser.add_argument(
        "--baseline-precision", choices=["hf-default", "same"], default="same",
        help="same (default): the HF baseline trains at tuneloop's precision; hf-default: bf16=True on a GPU, float32 on a CPU",
    )
    parser.add_argument("--quantization", choices=["none", "4bit"], default="none", help="training.quantization of tuneloop's run (4bit: QLoRA; the others stay unquantised)")
    parser.add_argument("--seed", type=int, default=0, help="training.seed (LoRA init, batch order) of both trainers")
    parser.add_argument("--skip-baseline", action="store_true", help="only tuneloop's run (to compare its own settings)")
    parser.add_argument("--only", nargs="+", choices=["hf-trainer", "legacy", "tuneloop"], help="run only these trainers")
    parser.add_argument("--baseline-sdpa", choices=["default", "no-cudnn"], default="default", help="no-cudnn: give the baseline tuneloop's attention kernels (GPU)")
    parser.add_argument("--json-out", help="write the results here too")
    args = parser.parse_args()

    import torch

    from tuneloop.config import TrainingSettings
    from tuneloop.ml.model import resolve_device

    device, _ = resolve_device("auto", "auto")
    dtype = "bfloat16" if device == "cuda" else "float32"  # tuneloop's base weights; both eval losses are measured in it
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    data = records(args.batch_size * args.steps, seed=7)
    held_out = records(128, seed=99)
    settings = TrainingSettings(
        max_steps=args.steps, batch_size=args.batch_size, lora_rank=args.rank, lora_alpha=2 * args.rank,
        learning_rate=args.lr, max_seq_len=512, log_every=max(1, args.steps // 4), checkpoint_every=0, seed=args.seed,
    )
    overrides = {"packing": args.packing == "on"} if args.packing else {}
    overrides.update({"batching": args.batching} if args.batching else {})
    if args.dtype != "auto":
        overrides["dtype"] = args.dtype
    overrides["quantization"] = args.quantization
    settings = settings.model_copy(update=overrides)
    train_dtype = resolve_device(device, settings.dtype)[1]
    baseline_dtype = dtype if args.baseline_precision == "hf-default" else train_dtype
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "demo":
            from tuneloop.demo.basemodel import build_demo_model

            # the demo's own cached model (`tuneloop build-model`), built here if missing
            base = Path(build_demo_model(Path(__file__).resolve().parents[1] / ".tuneloop" / "models" / "demo-base", preset="demo"))
        else:
            base = Path(tmp) / "base"
            build_random_llama(base, args.shape)
        from transformers import AutoConfig

        n_params = _count_params(AutoConfig.from_pretrained(base))
        print(
            f"{args.shape}: {n_params / 1e6:.0f}M parameters on {gpu}; tuneloop trains in {train_dtype}, the baseline in "
            f"{baseline_dtype}; {len(data)} rows, {args.steps} steps of {args.batch_size}", flush=True,
        )
        runs = {
            "hf-trainer": lambda: run_hf_trainer(base, data, held_out, settings, device, baseline_dtype, Path(tmp) / "hf", args.baseline_sdpa, dtype),
            "legacy": lambda: run_legacy(base, data, held_out, settings, device, dtype, train_dtype),
            "tuneloop": lambda: run_tuneloop(base, data, held_out, settings, device, dtype, Path(tmp) / "tuneloop"),
        }
        order = list(runs) if args.order == "baseline-first" else list(reversed(runs))
        if args.skip_baseline:
            order = ["tuneloop"]
        if args.only:
            order = [name for name in order if name in args.only]
        results: dict[str, Any] = {}
        for name in order:
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            results[name] = runs[name]()
            results[name]["wall_seconds"] = time.perf_counter() - start
            if device == "cuda":
                results[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None) if device == "cuda" and dtype == "bfloat16" else None
    print(f"\n{'trainer':<12} {'tok/s':>10} {'eval loss':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name in order:
        r = results[name]
        r["model_tflops"] = 4 * n_params * r["tokens_per_second"] / 1e12
        r["mfu"] = r["model_tflops"] / peak if peak else None
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(f"{name:<12} {r['tokens_per_second']:>10,.0f} {r['eval_loss']:>10.4f} {r['model_tflops']:>8.2f} {mfu:>6} {memory:>9}")
    print(
        f"tuneloop settings: packing={settings.packing} batching={settings.batching} "
        f"dtype={settings.dtype} ({train_dtype}); baseline {baseline_dtype}"
    )
    ratios = {}
    if "tuneloop" in results:
        for other in (name for name in order if name != "tuneloop"):
            ratio = results["tuneloop"]["tokens_per_second"] / results[other]["tokens_per_second"]
            delta = results["tuneloop"]["eval_loss"] - results[other]["eval_loss"]
            ratios[other] = ratio
            print(f"ratio tuneloop/{other}: {ratio:.2f}x tokens/s; eval loss {delta:+.4f} ({'equal or better' if delta <= 0 else 'worse'})")
    if "legacy" in results and "hf-trainer" in results:
        print(f"ratio legacy/hf-trainer: {results['legacy']['tokens_per_second'] / results['hf-trainer']['tokens_per_second']:.2f}x tokens/s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"baseline_sdpa": args.baseline_sdpa, "shape": args.shape, "params": n_params, "device": gpu, "dtype": train_dtype, "baseline_dtype": baseline_dtype, "steps": args.steps, "batch_size": args.batch_size, "ratios": ratios, "results": results}, indent=2))
    return 0


def _count_params(config: Any) -> int:
    """Parameters of a Llama-shaped model from its config (no weights loaded)."""
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h if not config.tie_word_embeddings else n * per_layer + v * h + h


if __name__ == "__main__":
    raise SystemExit(main())
