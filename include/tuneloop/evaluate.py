"""Score a model (the base, or base + LoRA adapter) on labelled records.

Generation goes through the chat template exactly as vLLM's ``/v1/chat/completions`` would
apply it, greedy, stopping at eos/``<|end|>``. Each answer is scored with
``task.score_completion``; the per-example rows (``scores.jsonl``) feed the statistical gate,
the per-slice summary (``summary.json``) is for people. The generation backend is a plain
callable, so an HTTP client for vLLM can replace :func:`generate_hf` without touching scoring.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import collect_provenance, dir_digest

if TYPE_CHECKING:
    import os

    from tuneloop.config import EvalSettings

logger = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[str]], Sequence[str]]
"""Prompts (user messages) in, completions (assistant text) out, same order."""

METRICS = ("field_accuracy", "exact_match", "valid_json", "schema_ok")
STOP_TOKENS = ("<|end|>",)


class EvaluationError(ValueError):
    """Records or predictions cannot be scored; the message says which and why."""


def _device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_for_generation(base_model: str | os.PathLike[str], adapter_dir: str | os.PathLike[str] | None) -> tuple[Any, Any, str]:
    """Tokenizer (left padding) and eval-mode model, the adapter merged in for speed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = _device()
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to(device)
    model.eval()
    return tokenizer, model, device


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    return sorted(ids)


def generate_hf(
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    prompts: Sequence[str],
    settings: EvalSettings,
    *,
    progress: ProgressSink | None = None,
) -> list[str]:
    """Greedy completions for ``prompts`` with transformers, batched with left padding.

    Prompts are sorted by length so each batch pads little; answers come back in input order.
    """
    import torch

    if not prompts:
        return []
    tokenizer, model, device = load_for_generation(base_model, adapter_dir)
    stop_ids = _stop_ids(tokenizer, model)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        for prompt in prompts
    ]
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
    outputs: list[str] = [""] * len(texts)
    tracker = Progress(label="generate", every_s=10.0, sink=progress, unit="new tok")
    n_batches = (len(order) + settings.batch_size - 1) // settings.batch_size
    tracker.start(n_batches, step_name="batch")
    for number, start in enumerate(range(0, len(order), settings.batch_size), 1):
        indices = order[start : start + settings.batch_size]
        encoded = tokenizer([texts[i] for i in indices], add_special_tokens=False, padding=True, return_tensors="pt")
        encoded = {key: value.to(device) for key, value in encoded.items()}
        with torch.inference_mode():
            generated = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        n_new = 0
        for row, index in enumerate(indices):
            tokens = new_tokens[row].tolist()
            cut = next((pos for pos, token in enumerate(tokens) if token in stop_ids), len(tokens))
            n_new += cut
            outputs[index] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
        tracker.update(number, items=n_new)
    tracker.finish()
    return outputs


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise EvaluationError("no records to evaluate")
    bad = [
        str(record.get("id", f"row {index}"))
        for index, record in enumerate(records)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str)
    ]
    if bad:
        raise EvaluationError(f"{len(bad)} records lack a prompt or gold completion: {bad[:5]}")


def _summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {
        "n": n,
        "field_accuracy": sum(row["score"] for row in rows) / n if n else 0.0,
        "exact_match": sum(row["exact_match"] for row in rows) / n if n else 0.0,
        "valid_json": sum(row["valid_json"] for row in rows) / n if n else 0.0,
        "schema_ok": sum(row["schema_ok"] for row in rows) / n if n else 0.0,
    }


def evaluate_records(
    records: Sequence[Mapping[str, Any]], completions: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score each completion against its record's gold; returns (rows, summary).

    A row is ``{"id", "slice", "score", "exact_match", "valid_json", "schema_ok"}`` with
    ``slice`` = the record's domain and ``score`` = field accuracy in [0, 1]. The summary holds
    ``n``, per-slice means under ``slices`` and the means over all rows under ``overall``.
    """
    from tuneloop.task import score_completion

    _check_records(records)
    if len(completions) != len(records):
        raise EvaluationError(f"{len(completions)} completions for {len(records)} records")
    rows: list[dict[str, Any]] = []
    for record, completion in zip(records, completions, strict=True):
        try:
            scored = score_completion(completion, record["completion"])
        except ValueError as err:
            raise EvaluationError(f"record {record.get('id')}: {err}") from err
        rows.append(
            {
                "id": record.get("id"),
                "slice": str(record.get("domain") or "unknown"),
                "score": scored.field_accuracy,
                "exact_match": scored.exact_match,
                "valid_json": scored.valid_json,
                "schema_ok": scored.schema_ok,
            }
        )
    slices: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        slices.setdefault(row["slice"], []).append(row)
    summary = {
        "n": len(rows),
        "slices": {name: _summarise(members) for name, members in sorted(slices.items())},
        "overall": _summarise(rows),
    }
    return rows, summary


def _count_tokens(base_model: str | os.PathLike[str], texts: Sequence[str]) -> int | None:
    """Generated tokens, re-counted with the base tokenizer (works for any backend)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    except (ImportError, OSError, ValueError) as err:
        logger.warning("cannot load the tokenizer of %s to count tokens: %s", base_model, err)
        return None
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


def evaluate_adapter(
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    records: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    settings: EvalSettings,
    *,
    backend: str = "hf",
    generate: GenerateFn | None = None,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """Generate, score, and write ``scores.jsonl``, ``predictions.jsonl`` and ``summary.json``.

    ``generate`` overrides the backend (e.g. a vLLM HTTP client bound to an adapter name);
    without it ``backend`` must be ``"hf"`` (``"auto"`` falls back to it). Returns the summary,
    which adds throughput (examples/s, generated tokens/s), the backend and provenance.
    """
    _check_records(records)
    if generate is None:
        if backend not in ("hf", "auto"):
            raise EvaluationError(f"backend {backend!r} needs a generate callable (e.g. the vLLM client)")
        backend = "hf"

        def generate(prompts: Sequence[str]) -> list[str]:
            return generate_hf(base_model, adapter_dir, prompts, settings, progress=progress)

    out_dir = Path(out_dir)
    started = time.monotonic()
    completions = list(generate([record["prompt"] for record in records]))
    seconds = time.monotonic() - started
    rows, summary = evaluate_records(records, completions)
    generated_tokens = _count_tokens(base_model, completions)
    summary["throughput"] = {
        "backend": backend,
        "seconds": round(seconds, 2),
        "examples_per_second": round(len(records) / seconds, 2) if seconds > 0 else None,
        "generated_tokens": generated_tokens,
        "generated_tokens_per_second": (
            round(generated_tokens / seconds, 1) if generated_tokens is not None and seconds > 0 else None
        ),
    }
    summary["backend"] = backend
    summary["provenance"] = collect_provenance(
        kind="eval_report",
        base_model=str(base_model),
        adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
        adapter_hash=dir_digest(adapter_dir, suffixes=("adapter_model.safetensors", "adapter_config.json")) if adapter_dir is not None else None,
        eval_settings=settings.model_dump(mode="json"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for record, completion in zip(records, completions, strict=True):
            handle.write(json.dumps({"id": record.get("id"), "prediction": completion}, ensure_ascii=False) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    overall = summary["overall"]
    logger.info(
        "evaluated %d examples with %s in %.1f s: field_accuracy %.3f exact_match %.3f",
        summary["n"], backend, seconds, overall["field_accuracy"], overall["exact_match"],
    )
    return summary
