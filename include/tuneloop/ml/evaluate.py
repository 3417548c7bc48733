"""Score a model (the base, or base + LoRA adapter) on labelled records, and run the eval suites.

Generation goes through a *backend*:

* :class:`HFBackend`: transformers ``generate`` in batches, the chat template applied exactly as
  vLLM's ``/v1/chat/completions`` applies it, stopping at eos and the template's end of turn;
* :class:`VllmBackend`: the running vLLM servers. The adapter is validated, loaded under a
  temporary LoRA name (``<served>-eval-<hex>``, never the stable served name), asked in
  concurrent requests, and unloaded afterwards, also when anything fails;
* :class:`CallableBackend`: any ``prompts -> completions`` function (tests, oracles).

:func:`select_backend` picks one for ``eval.backend``: ``auto`` uses vLLM when an endpoint
answers its health check and serves the configured base model, else HF (saying why).

Every record is read through the task (:class:`tuneloop.tasks.TaskSpec`: the conversation
production sends, system prompt included, the gold answer, the slice) and each answer is scored
with the task's scorer; the per-example rows (``scores.jsonl``) feed the statistical gate, the
per-slice summary (``summary.json``) is for people. The suites
(prompt injection, consistency, golden regressions, latency; see :mod:`tuneloop.ml.suites`) add
one block each to the summary and write ``injection.jsonl`` and ``consistency.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.ml.backends import (
    ADAPTER_FILES,
    CallableBackend,
    EvaluationError,
    GenerateFn,
    Generation,
    GenerationBackend,
    HFBackend,
)
from tuneloop.ml.vllm_backend import VllmBackend
from tuneloop.provenance import collect_provenance, dir_digest

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from tuneloop.config import EvalSettings
    from tuneloop.progress import ProgressSink
    from tuneloop.tasks import Example, TaskSpec

logger = logging.getLogger(__name__)


# --- scoring -------------------------------------------------------------------------------


def read_examples(spec: TaskSpec, records: Sequence[Mapping[str, Any]]) -> list[Example]:
    """The records as the task reads them; raises :class:`EvaluationError` naming bad rows."""
    if not records:
        raise EvaluationError("no records to evaluate")
    examples, bad = spec.examples(records)
    if bad:
        raise EvaluationError(f"{len(bad)} records do not fit task.format={spec.format}: {bad[:5]} (check them with `tuneloop validate`)")
    return examples


def _summarise(rows: Sequence[Mapping[str, Any]], spec: TaskSpec) -> dict[str, Any]:
    n = len(rows)
    return {"n": n, "score": sum(row["score"] for row in rows) / n if n else 0.0, **spec.scorer.aggregate(rows)}


def evaluate_records(
    spec: TaskSpec, examples: Sequence[Example], completions: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score each completion against its example's gold; returns (rows, summary).

    A row is ``{"id", "slice", "score", **details}``: ``score`` in [0, 1] from the task's
    metric, ``details`` what the metric reports beside it (``exact_match``, ``valid_json``,
    ``predicted`` label...). The summary holds ``n``, the metric, per-slice means with the
    metric's aggregates under ``slices`` and the same over all rows under ``overall``.
    """
    from tuneloop.tasks.scoring import ScoringError

    if len(completions) != len(examples):
        raise EvaluationError(f"{len(completions)} completions for {len(examples)} records")
    try:
        scored = spec.scorer.score_batch(list(completions), [e.target or "" for e in examples], list(examples))
    except ScoringError as err:
        raise EvaluationError(str(err)) from err
    rows = [{"id": e.id, "slice": e.slice, "score": s.score, **s.details} for e, s in zip(examples, scored, strict=True)]
    slices: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        slices.setdefault(row["slice"], []).append(row)
    summary = {
        "n": len(rows),
        "metric": spec.settings.metric,
        "slices": {name: _summarise(members, spec) for name, members in sorted(slices.items())},
        "overall": _summarise(rows, spec),
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
    if not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])


# --- the suites around the accuracy pass ---------------------------------------------------


@dataclass


class SuitePlan:
    """What :func:`evaluate_adapter` runs besides the accuracy pass (see :mod:`tuneloop.ml.suites`)."""

    injection: list[dict[str, Any]] | None = None
    """Rows of the task's format, each with ``injection: {"value", "field"?}``; None: no
    injection suite (``injection_skipped`` says why)."""
    injection_source: str | None = None
    injection_skipped: str | None = None
    consistency_prompts: int = 0
    """Records of the accuracy set to sample ``eval.consistency_samples`` times; 0: off."""
    golden_ids: frozenset[str] = frozenset()
    """Ids that came from the fixed held-out sets."""
    golden_sets: list[str] = field(default_factory=list)
    compare: list[dict[str, Any]] | None = None
    """Score rows of an earlier evaluation to find golden regressions against."""
    compare_source: str | None = None


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _run_injection(
    backend: GenerationBackend, plan: SuitePlan, spec: TaskSpec, settings: EvalSettings, out_dir: Path, say: ProgressSink
) -> dict[str, Any]:
    from tuneloop.ml.suites import score_injection

    if not plan.injection:
        return {"skipped": plan.injection_skipped or "no injection rows"}
    say(f"injection suite: {len(plan.injection)} rows from {plan.injection_source}")
    examples = read_examples(spec, plan.injection)
    generation = backend.generate([e.context for e in examples], temperature=settings.temperature, seed=settings.seed)
    rows, block = score_injection(examples, [row.get("injection") or {} for row in plan.injection], generation.texts, spec.scorer)
    for row, text in zip(rows, generation.texts, strict=True):
        row["prediction"] = text
    _write_jsonl(out_dir / "injection.jsonl", rows)
    say(f"injection suite: {block['successes']} of {block['n']} injections followed (bar: 0), {block['derailed']} answers derailed from the task's form")
    return {"source": plan.injection_source, **block, "seconds": round(generation.seconds, 2)}


def _run_consistency(
    backend: GenerationBackend, examples: Sequence[Example], plan: SuitePlan, spec: TaskSpec, settings: EvalSettings, out_dir: Path, say: ProgressSink
) -> dict[str, Any]:
    from tuneloop.ml.suites import pick_by_slice, score_consistency

    picked = pick_by_slice(examples, plan.consistency_prompts)
    if not picked:
        return {"skipped": "eval.consistency_prompts is 0" if plan.consistency_prompts <= 0 else "no records"}
    k, temperature = settings.consistency_samples, settings.consistency_temperature
    say(f"consistency suite: {len(picked)} prompts x {k} samples at temperature {temperature:g}")
    prompts = [example.context for example in picked]
    started = time.monotonic()
    passes = [backend.generate(prompts, temperature=temperature, seed=settings.seed + 1 + sample).texts for sample in range(k)]
    samples = [[answers[index] for answers in passes] for index in range(len(picked))]
    rows, block = score_consistency([example.id for example in picked], samples, spec.scorer, temperature=temperature)
    _write_jsonl(out_dir / "consistency.jsonl", rows)
    if getattr(backend, "name", "") not in ("hf", "vllm"):
        block["note"] = f"backend {backend.name!r} cannot sample: every pass gives what the function returns"
    say(
        f"consistency suite: {block['consistent_rate']:.2f} of prompts give one answer in all {k} samples, "
        f"mean pairwise field agreement {block['mean_pairwise_agreement']:.3f}"
    )
    return {**block, "seconds": round(time.monotonic() - started, 2)}


def _latency(
    engine: GenerationBackend,
    generation: Generation,
    examples: Sequence[Example],
    settings: EvalSettings,
    *,
    probe: bool,
    say: ProgressSink,
) -> dict[str, Any]:
    """The latency block: ``eval.latency_requests`` requests sent one at a time (what a lone
    client waits), with the accuracy pass's per-request times under its concurrency as
    ``under_load``; nulls with the reason for a backend that measures none (HF)."""
    from tuneloop.ml.suites import latency_summary, pick_by_slice

    if not generation.latencies_s:
        return latency_summary(None, reason=engine.latency_reason)
    under_load = latency_summary(generation.latencies_s, concurrency=getattr(engine, "concurrency", None))
    under_load["measured_on"] = f"the accuracy pass ({len(examples)} requests, temperature {settings.temperature:g})"
    picked = pick_by_slice(examples, settings.latency_requests) if probe else []
    if not picked or not isinstance(engine, VllmBackend):
        return under_load
    say(f"latency: {len(picked)} requests one at a time")
    alone = engine.generate([e.context for e in picked], temperature=settings.temperature, seed=settings.seed, concurrency=1)
    block = latency_summary(alone.latencies_s, concurrency=1)
    block["measured_on"] = f"{len(picked)} requests sent one at a time (temperature {settings.temperature:g})"
    block["under_load"] = under_load
    say(f"latency: p50 {block['p50_s'] * 1000:.0f} ms, p95 {block['p95_s'] * 1000:.0f} ms one at a time; "
        f"p50 {under_load['p50_s'] * 1000:.0f} ms at {under_load['concurrency']} concurrent")
    return block


def evaluate_adapter(
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    records: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    settings: EvalSettings,
    spec: TaskSpec,
    *,
    backend: str | GenerationBackend = "hf",
    generate: GenerateFn | None = None,
    suites: SuitePlan | None = None,
    progress: ProgressSink | None = None,
) -> dict[str, Any]:
    """Generate, score, run the suites, and write the outputs to ``out_dir``.

    ``backend`` is a :class:`GenerationBackend` (opened here and closed before this returns,
    also on error) or a name: ``"hf"`` (``"auto"`` falls back to it here; the CLI resolves
    ``auto`` with :func:`select_backend`). ``generate`` overrides it with a plain function
    named ``backend``. ``suites`` adds the injection, consistency and golden suites.

    Files: ``scores.jsonl`` and ``predictions.jsonl`` (accuracy pass), ``summary.json``, and
    ``injection.jsonl`` / ``consistency.jsonl`` when those suites ran. Returns the summary:
    per-slice metrics, throughput (examples/s, generated tokens/s), ``latency``,
    ``injection``, ``consistency``, ``golden``, the backend and provenance.
    """
    examples = read_examples(spec, records)
    if generate is not None:
        engine: GenerationBackend = CallableBackend(str(backend), generate)
    elif isinstance(backend, str):
        if backend not in ("hf", "auto"):
            raise EvaluationError(
                f"backend {backend!r} needs a generate callable or a backend object (e.g. evaluate.VllmBackend)"
            )
        engine = HFBackend(base_model, adapter_dir, settings, progress=progress)
    else:
        engine = backend

    def say(message: str) -> None:
        if progress is not None:
            progress(message)
        else:
            logger.info("%s", message)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("injection.jsonl", "consistency.jsonl"):
        (out_dir / stale).unlink(missing_ok=True)
    plan = suites
    try:
        engine.open()
        generation = engine.generate([e.context for e in examples], temperature=settings.temperature, seed=settings.seed)
        completions = generation.texts
        rows, summary = evaluate_records(spec, examples, completions)
        if plan is None:
            summary["injection"] = {"skipped": "no suites requested"}
            summary["consistency"] = {"skipped": "no suites requested"}
        else:
            summary["injection"] = _run_injection(engine, plan, spec, settings, out_dir, say)
            summary["consistency"] = (
                _run_consistency(engine, examples, plan, spec, settings, out_dir, say)
                if plan.consistency_prompts > 0
                else {"skipped": "consistency suite turned off (eval.consistency_prompts = 0)"}
            )
        summary["latency"] = _latency(engine, generation, examples, settings, probe=plan is not None, say=say)
    finally:
        engine.close()
    from tuneloop.ml.suites import golden_report

    seconds = generation.seconds
    generated_tokens = generation.tokens if generation.tokens is not None else _count_tokens(base_model, completions)
    summary["throughput"] = {
        "backend": engine.name,
        "seconds": round(seconds, 2),
        "examples_per_second": round(len(records) / seconds, 2) if seconds > 0 else None,
        "generated_tokens": generated_tokens,
        "generated_tokens_per_second": (
            round(generated_tokens / seconds, 1) if generated_tokens is not None and seconds > 0 else None
        ),
    }
    summary["golden"] = (
        golden_report(rows, plan.golden_ids, sets=plan.golden_sets, previous=plan.compare, previous_source=plan.compare_source)
        if plan is not None
        else {"skipped": "no suites requested"}
    )
    summary["backend"] = engine.name
    summary["backend_detail"] = engine.describe()
    summary["provenance"] = collect_provenance(
        kind="eval_report",
        base_model=str(base_model),
        adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
        adapter_hash=dir_digest(adapter_dir, suffixes=ADAPTER_FILES) if adapter_dir is not None else None,
        eval_settings=settings.model_dump(mode="json"),
        task=spec.describe(),
    )
    _write_jsonl(out_dir / "scores.jsonl", rows)
    _write_jsonl(
        out_dir / "predictions.jsonl",
        [{"id": example.id, "prediction": completion} for example, completion in zip(examples, completions, strict=True)],
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    overall = summary["overall"]
    logger.info(
        "evaluated %d examples with %s in %.1f s: %s %.3f",
        summary["n"], engine.name, seconds, spec.settings.metric, overall["score"],
    )
    return summary
