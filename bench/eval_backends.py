"""Evaluation throughput: HF ``generate`` on this machine vs the REAL vLLM CPU server.

The same adapter and the same prompts go through both backends of ``tuneloop evaluate``
(:class:`tuneloop.ml.evaluate.HFBackend`, batches of ``--batch-size`` with left padding, and
:class:`tuneloop.ml.vllm_backend.VllmBackend`, the adapter loaded under a temporary LoRA name and
asked ``--concurrency`` requests at a time, then unloaded), greedy, ``--max-new-tokens``.

By default: the demo base model (``tuneloop build-model``, cached in .tuneloop/models), the
adapter ``.tuneloop/adapters/v1`` when the demo has trained one (else ``--train-steps`` of LoRA
on demo data here), and 200 prompts from the fixed held-out sets (100 per domain). The server
is started with ``scripts/serve.sh`` on a free port and stopped afterwards (``--url`` uses a
running one that serves the same base model as ``--name``-base).

It prints progress, then per backend the examples/s, generated tokens/s (tokens re-counted
with the same tokenizer for both) and vLLM's per-request p50/p95 under that concurrency, the
vLLM/HF ratio of both rates, and how far the answers agree (identical text, and mean field
agreement of the parsed JSON). Each backend runs a short warm-up first (untimed).

    .venv-ml/bin/python bench/eval_backends.py
    .venv-ml/bin/python bench/eval_backends.py --prompts 400 --concurrency 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
sys.path.insert(0, str(REPO / "tests" / "integration"))  # serve.sh runner, free port
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def find_adapter(args: argparse.Namespace, base: str, work: Path) -> Path:
    """The adapter to compare with: --adapter, the demo's v1, or one trained here."""
    if args.adapter:
        return Path(args.adapter)
    demo = REPO / ".tuneloop" / "adapters" / "v1"
    if (demo / "adapter_model.safetensors").is_file() and not args.train_steps_forced:
        return demo
    from tuneloop.config import TrainingSettings
    from tuneloop.demo.invoices import heldout_sets
    from tuneloop.ml.train import train_lora

    records = [r for rows in heldout_sets(1, 64).values() for r in rows]  # seed 1: not the bench prompts
    say(f"training a LoRA adapter for {args.train_steps} steps on {len(records)} demo rows (no adapter given)")
    out = work / "adapter"
    train_lora(base, records, out, TrainingSettings(max_steps=args.train_steps, batch_size=8), progress=lambda m: say(m))
    return out


def rates(n: int, tokens: int, seconds: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 2),
        "examples_per_second": round(n / seconds, 2),
        "generated_tokens": tokens,
        "generated_tokens_per_second": round(tokens / seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=200, help="prompts, half from each held-out domain (default 200)")
    parser.add_argument("--model", help="base model directory (default: the demo model, built if missing)")
    parser.add_argument("--adapter", help="LoRA adapter directory (default: .tuneloop/adapters/v1, else one trained here)")
    parser.add_argument("--train-steps", type=int, default=None, help="train an adapter for this many steps even if v1 exists (default 40 when one is needed)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="default 96, as eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="HF batch size (default 32, as eval.batch_size)")
    parser.add_argument("--concurrency", type=int, default=32, help="vLLM requests in flight (default 32, as eval.batch_size)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed prompts each backend answers first (default 8)")
    parser.add_argument("--url", help="use this running vLLM server instead of starting one")
    parser.add_argument("--name", default="tuneloop", help="served model name; the base is served as NAME-base")
    parser.add_argument("--vllm-base", action="store_true", help="also time vLLM on the base model alone (no LoRA), to see the adapter's cost")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    args.train_steps_forced = args.train_steps is not None
    args.train_steps = args.train_steps or 40

    from transformers import AutoTokenizer

    from tuneloop.config import EvalSettings, load_settings
    from tuneloop.demo.basemodel import build_demo_model
    from tuneloop.ml.backends import HFBackend
    from tuneloop.ml.suites import latency_summary
    from tuneloop.ml.vllm_backend import VllmBackend
    from tuneloop.tasks import TaskSpec
    from tuneloop.tasks.scoring import parse_json_answer as parse_completion

    answer_agreement = TaskSpec(load_settings(str(REPO / "examples/invoices/tuneloop.yaml")).task).scorer.agreement
    from tuneloop.demo.invoices import heldout_sets

    work = Path(tempfile.mkdtemp(prefix="tuneloop-eval-bench-"))
    if args.model:
        base = str(Path(args.model).resolve())
    else:
        say("demo base model (built on first use, a few minutes)")
        base = str(build_demo_model(REPO / load_settings().model.demo_model_dir, progress=say).resolve())
    adapter = find_adapter(args, base, work).resolve()
    sets = heldout_sets(0, (args.prompts + 1) // 2)
    prompts = [r["prompt"] for r in sets["original"] + sets["drifted"]][: args.prompts]
    warmup = [r["prompt"] for r in heldout_sets(2, max(1, args.warmup // 2))["original"]][: args.warmup]
    tokenizer = AutoTokenizer.from_pretrained(base)
    say(f"base {base}\n[bench] adapter {adapter}\n[bench] {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}")

    results: dict[str, Any] = {
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "base_model": base, "adapter": str(adapter),
        "hf_batch_size": args.batch_size, "vllm_concurrency": args.concurrency, "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip

    from fixtures_vllm import free_port, serve_sh

    run_dir, url, started_server = work / "run", args.url, False
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"starting the vLLM CPU server on {url} (serve.sh; ~20-60 s)")
        t0 = time.monotonic()
        result = serve_sh("start", "--port", str(port), "--model", base, "--name", args.name, "--run-dir", str(run_dir))
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        started_server = True
        say(f"vLLM up in {time.monotonic() - t0:.0f} s")
    try:
        settings = EvalSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        say("HF generate: loading the model and merging the adapter")
        hf = HFBackend(base, adapter, settings, progress=say)
        t0 = time.monotonic()
        hf.open()
        results["hf_load_seconds"] = round(time.monotonic() - t0, 2)
        if warmup:
            hf.generate(warmup)
        say(f"HF generate: {len(prompts)} prompts in batches of {args.batch_size}")
        hf_run = hf.generate(prompts)
        hf.close()
        results["hf"] = rates(len(prompts), count_tokens(tokenizer, hf_run.texts), hf_run.seconds)
        say(f"HF: {results['hf']['examples_per_second']} examples/s, {results['hf']['generated_tokens_per_second']} tok/s")

        vllm = VllmBackend(
            [url], served_name=args.name, base_model=base, adapter_dir=adapter, max_lora_rank=load_settings().vllm.max_lora_rank,
            adapter_root=work / "served-adapters", max_tokens=args.max_new_tokens, concurrency=args.concurrency, progress=say,
        )  # fmt: skip
        with vllm:
            if warmup:
                vllm.generate(warmup)
            say(f"vLLM: {len(prompts)} prompts, {args.concurrency} requests in flight")
            vllm_run = vllm.generate(prompts)
        results["vllm"] = rates(len(prompts), count_tokens(tokenizer, vllm_run.texts), vllm_run.seconds)
        results["vllm"]["latency"] = latency_summary(vllm_run.latencies_s, concurrency=args.concurrency)
        results["vllm"]["unloaded"] = vllm.describe()["unloaded"]
        say(f"vLLM: {results['vllm']['examples_per_second']} examples/s, {results['vllm']['generated_tokens_per_second']} tok/s")
        if args.vllm_base:
            with VllmBackend(
                [url], served_name=args.name, base_model=base, adapter_dir=None, max_lora_rank=16,
                adapter_root=work / "served-adapters", max_tokens=args.max_new_tokens, concurrency=args.concurrency, progress=say,
            ) as bare:  # fmt: skip
                say(f"vLLM, base model alone: {len(prompts)} prompts")
                base_run = bare.generate(prompts)
            results["vllm_base_no_lora"] = rates(len(prompts), count_tokens(tokenizer, base_run.texts), base_run.seconds)
    finally:
        if started_server:
            serve_sh("stop", "--run-dir", str(run_dir), timeout=90)

    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    pairs = list(zip(hf_run.texts, vllm_run.texts, strict=True))
    results["ratio_vllm_over_hf"] = {
        "examples_per_second": round(results["vllm"]["examples_per_second"] / results["hf"]["examples_per_second"], 2),
        "generated_tokens_per_second": round(
            results["vllm"]["generated_tokens_per_second"] / results["hf"]["generated_tokens_per_second"], 2
        ),
    }
    results["agreement"] = {
        "identical_answers": sum(a == b for a, b in pairs),
        "identical_rate": round(sum(a == b for a, b in pairs) / len(pairs), 4),
        "mean_field_agreement": round(sum(answer_agreement(a, b) for a, b in pairs) / len(pairs), 4),
        "hf_valid_json": round(sum(parse_completion(a) is not None for a, _ in pairs) / len(pairs), 4),
        "vllm_valid_json": round(sum(parse_completion(b) is not None for _, b in pairs) / len(pairs), 4),
        "differing_examples": [{"hf": a, "vllm": b} for a, b in pairs if a != b][:3],
    }
    latency = results["vllm"]["latency"]
    agreement = results["agreement"]
    print()
    print(f"{'backend':<8} {'examples/s':>11} {'gen tok/s':>10} {'seconds':>8}")
    for name in ("hf", "vllm"):
        row = results[name]
        print(f"{name:<8} {row['examples_per_second']:>11.2f} {row['generated_tokens_per_second']:>10.1f} {row['seconds']:>8.1f}")
    if "vllm_base_no_lora" in results:
        row = results["vllm_base_no_lora"]
        print(f"{'(vllm, base model, no LoRA)':<8} {row['examples_per_second']:.2f} examples/s, {row['generated_tokens_per_second']:.1f} gen tok/s")
    ratio = results["ratio_vllm_over_hf"]
    print(f"ratio vLLM/HF: {ratio['examples_per_second']:.2f}x examples/s, {ratio['generated_tokens_per_second']:.2f}x generated tokens/s")
    print(f"vLLM per-request latency at {args.concurrency} in flight: p50 {latency['p50_s']:.2f} s, p95 {latency['p95_s']:.2f} s")
    print(
        f"answers: {agreement['identical_answers']}/{len(pairs)} identical, mean field agreement "
        f"{agreement['mean_field_agreement']:.3f}; valid JSON HF {agreement['hf_valid_json']:.2f}, vLLM {agreement['vllm_valid_json']:.2f}"
    )
    print(f"load average (1, 5, 15 min) at start {results['load_average_at_start']}, at end {results['load_average_at_end']} "
          f"on {results['cpu_count']} CPUs: other work on the machine slows both backends")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        say(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
