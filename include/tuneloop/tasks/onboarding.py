"""Helping a user start: ``tuneloop init`` (a loop config for a new task, guessed from a data
sample when given) and ``tuneloop check-task`` (what the loop will make of the user's rows before
anything trains).

``check-task`` reads a sample of the user's JSONL through the task config and reports:

* the row checks and intake checks, with each quarantine reason and an example line;
* what training sees: the chat template applied to a few rows (system prompt included), when
  the base model's tokenizer is on this machine;
* gold scored against gold, which must be 1.0 for every row (else the metric does not fit
  the data: a JSON scorer on plain-text answers, a label set missing a label...);
* per slice, the smallest score difference the gate could detect with the eval rows the
  data would give (one-sided test at ``gate.alpha``, power 0.8, the worst-case spread of a
  paired difference of [0, 1] scores), so the user knows before training whether the eval
  set is big enough.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from tuneloop.config import Settings

SAMPLE_ROWS = 2000
WORST_CASE_DIFF_SD = 0.5  # sd of a paired difference of [0, 1] scores is at most ~0.5 when answers flip
POWER_Z = 0.8416  # z of 80% power


def _load_sample(path: Path, limit: int) -> list[dict[str, Any]]:
    rows = []
    from tuneloop.intake.rows import split_lines

    for line in split_lines(path.read_bytes())[:limit]:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            rows.append(record)
    return rows


def guess_task(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A ``task:`` section guessed from sample rows: the format from the fields, the metric
    from the answers (JSON objects: json; a few short distinct answers: label; long
    free text: text; else exact_match), a slice field when a low-cardinality text field exists."""
    from tuneloop.tasks.scoring import parse_json_strict

    task: dict[str, Any] = {"name": "my-task"}
    messages = [r for r in rows if isinstance(r.get("messages"), list)]
    if len(messages) >= len(rows) / 2 and rows:
        task["format"] = "messages"
        answers = [str(r["messages"][-1].get("content", "")) for r in messages if r["messages"] and isinstance(r["messages"][-1], dict) and r["messages"][-1].get("role") == "assistant"]
        if messages and isinstance(messages[0]["messages"][0], dict) and messages[0]["messages"][0].get("role") == "system":
            task["system_prompt"] = None  # rows carry their own
    else:
        task["format"] = "prompt_completion"
        answers = [r["completion"] for r in rows if isinstance(r.get("completion"), str)]
    if answers and all(parse_json_strict(a) is not None for a in answers):
        task["metric"] = "json"
    else:
        distinct = Counter(a.strip() for a in answers)
        if answers and len(distinct) <= max(2, min(50, len(answers) // 5)) and all(len(a.split()) <= 4 for a in distinct):
            task["metric"] = "label"
            # an answer seen once in hundreds of rows is more likely a labelling slip than a class
            floor = max(2, round(0.002 * len(answers))) if len(answers) >= 100 else 1
            task["labels"] = sorted(label for label, count in distinct.items() if count >= floor)
        elif answers and sum(len(a.split()) for a in answers) / len(answers) > 12:
            task["metric"] = "text"
        else:
            task["metric"] = "exact_match"
    skip = {"id", "prompt", "completion", "messages", "labels", "ts", "labelled_at", "model"}
    candidates = []
    for name in sorted({k for r in rows for k, v in r.items() if isinstance(v, str) and k not in skip}):
        values = {r.get(name) for r in rows}
        if 2 <= len(values) <= 20 and len(rows) >= 10:
            candidates.append(name)
    task["slice_field"] = candidates[0] if candidates else None
    return task


def init_config(*, data: Path | None = None, base_model: str | None = None, store: str | None = None, **task_overrides: Any) -> str:
    """The YAML of a new loop config: the task section (guessed from ``data`` when given, then
    the explicit overrides), the base model and the store; every other key keeps its default."""
    task: dict[str, Any] = {"name": "my-task", "format": "prompt_completion", "metric": "exact_match", "slice_field": None}
    if data is not None:
        task.update(guess_task(_load_sample(data, SAMPLE_ROWS)))
    task.update({k: v for k, v in task_overrides.items() if v is not None})
    config: dict[str, Any] = {"task": task, "model": {"base_model": base_model or "demo"}}
    if store:
        config["store"] = {"uri": store}
    config["gate"] = {"improve_slices": ["auto"]}
    header = (
        "# tuneloop loop config: only what differs from the embedded defaults (`tuneloop config` prints them all).\n"
        "# Check it on your data before training: tuneloop check-task --config THIS_FILE --data rows.jsonl\n"
    )
    from tuneloop.config import Settings

    Settings.model_validate(config)  # the file we write must load
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def minimum_detectable_difference(n: int, alpha: float) -> float | None:
    """Smallest mean score difference a one-sided paired test at ``alpha`` detects with 80%
    power on ``n`` pairs, at the worst-case spread of a difference of [0, 1] scores."""
    if n < 2:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha) + POWER_Z
    return min(1.0, z * WORST_CASE_DIFF_SD / math.sqrt(n))


def check_task(settings: Settings, data: Path, *, show: int = 2, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """The report ``tuneloop check-task`` prints (see the module docstring)."""
    from tuneloop.intake.checks import ChatTemplate, IntakeOptions, run_intake_checks
    from tuneloop.intake.pull import is_eval_id
    from tuneloop.intake.rows import check_lines, split_lines
    from tuneloop.tasks import TaskSpec

    spec = TaskSpec(settings.task)
    raw = split_lines(data.read_bytes())
    batch = check_lines([(str(data), number, line) for number, line in enumerate(raw, 1)], spec)
    options = IntakeOptions.from_settings(settings)
    if tokenizer_dir is not None:
        options = IntakeOptions(**{**options.__dict__, "model_dir": tokenizer_dir})
    intake = run_intake_checks(batch, options, spec)
    reasons: dict[str, dict[str, Any]] = {}
    for row in batch.quarantined:
        for reason in row.reasons:
            entry = reasons.setdefault(reason, {"count": 0, "example": f"{row.source}:{row.line}: {row.raw[:160]}"})
            entry["count"] += 1
    examples = [spec.example(r) for r in batch.accepted]
    gold = spec.scorer.score_batch([e.target or "" for e in examples], [e.target or "" for e in examples], examples) if spec.settings.metric != "judge" else []
    imperfect = [(e.id, s.score) for e, s in zip(examples, gold, strict=True) if s.score < 1.0]
    template, template_note = ChatTemplate.load(options.model_dir)
    rendered = []
    for example in examples[:show]:
        text = template.render(example.context, example.target or "") if template is not None else None
        rendered.append({"id": example.id, "context": example.context, "target": example.target, "rendered": text})
    slices = Counter(e.slice for e in examples)
    eval_share = settings.data.eval_fraction
    per_slice = {}
    for name, count in sorted(slices.items()):
        n_eval = sum(is_eval_id(e.id, eval_share) for e in examples if e.slice == name)
        per_slice[name] = {
            "rows": count,
            "eval_rows": n_eval,
            "min_detectable_difference": minimum_detectable_difference(n_eval, settings.gate.alpha),
            "enough_for_gate": n_eval >= settings.gate.min_examples,
        }
    return {
        "data": str(data),
        "task": spec.describe(),
        "lines": batch.total,
        "accepted": len(batch.accepted),
        "quarantined": len(batch.quarantined),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"])),
        "tokens": intake.summary()["tokens"],
        "chat_template": template_note,
        "rendered": rendered,
        "gold_vs_gold": {"rows": len(gold), "imperfect": len(imperfect), "examples": imperfect[:5],
                         "skipped": "metric judge: gold is not scored against itself" if spec.settings.metric == "judge" else None},
        "slices": per_slice,
        "gate": {"alpha": settings.gate.alpha, "min_examples": settings.gate.min_examples, "improve_slices": list(settings.gate.improve_slices)},
    }


def format_check(report: dict[str, Any]) -> str:
    """``check-task``'s report for people."""
    task = report["task"]
    lines = [
        f"task {task['name']}: format {task['format']}, metric {task['metric']}, slices by {task['slice_field'] or '(none: one slice)'}",
        f"rows: {report['accepted']} of {report['lines']} lines accepted, {report['quarantined']} quarantined",
    ]
    for reason, entry in report["reasons"].items():
        lines.append(f"  {entry['count']:>5}  {reason}   e.g. {entry['example']}")
    near = report["reasons"].get("near_duplicate", {}).get("count", 0)
    if report["lines"] and near / report["lines"] > 0.05:
        lines.append(
            f"  hint: {near / report['lines']:.0%} of the rows are near-duplicates of an earlier one (word-shingle Jaccard >= "
            "data.near_duplicate_jaccard). Short inputs share most of their words: if these are distinct requests, raise "
            "data.near_duplicate_jaccard (e.g. 0.95) or set it to null"
        )
    gold = report["gold_vs_gold"]
    if gold["skipped"]:
        lines.append(f"gold vs gold: {gold['skipped']}")
    elif gold["imperfect"]:
        lines.append(
            f"gold vs gold: {gold['imperfect']} of {gold['rows']} rows score below 1.0 against themselves: the metric "
            f"does not fit this data (first: {gold['examples']}); check task.metric, task.labels, task.json_schema"
        )
    else:
        lines.append(f"gold vs gold: all {gold['rows']} rows score 1.0 (the metric fits the data)")
    lines.append(f"chat template: {report['chat_template']}; tokens: {report['tokens']['method']}, max {report['tokens']['max_tokens']}")
    for shown in report["rendered"]:
        if shown["rendered"] is not None:
            lines.append(f"what training sees for {shown['id']} (answer supervised, the rest masked):")
            lines += [f"    {line}" for line in shown["rendered"].splitlines()[:20]]
        else:
            lines.append(f"turns of {shown['id']}: {json.dumps(shown['context'], ensure_ascii=False)[:300]} -> {shown['target']!r}")
    lines.append(f"eval rows per slice (data.eval_fraction of accepted rows; gate.min_examples {report['gate']['min_examples']}):")
    for name, stats in report["slices"].items():
        mdd = stats["min_detectable_difference"]
        verdict = "ok" if stats["enough_for_gate"] else "TOO FEW: the gate rejects a slice with fewer rows"
        lines.append(
            f"  {name:<16} {stats['rows']:>6} rows, {stats['eval_rows']:>5} eval -> smallest detectable difference "
            f"{'n/a' if mdd is None else f'{mdd:.3f}'} ({verdict})"
        )
    return "\n".join(lines)
