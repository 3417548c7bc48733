"""What the loop did last: drift, intake, training, gate, registry and what vLLM serves now.

``tuneloop status`` prints this; ``make demo`` ends with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tuneloop.config import Settings
    from tuneloop.storage import Store
    from tuneloop.tasks import Example


def _latest(store: Store, prefix: str) -> dict[str, Any] | None:
    keys = [k for k in store.list(prefix) if k.endswith(".json")]
    return store.get_json(keys[-1]) if keys else None


def collect_status(settings: Settings, store: Store, *, ask_vllm: bool = True) -> dict[str, Any]:
    from tuneloop.intake.pull import latest_snapshot
    from tuneloop.registry import Registry
    from tuneloop.storage import StoreKeyError, read_snapshot_manifest

    registry = Registry(store)
    aliases = registry.aliases()
    status: dict[str, Any] = {"store": store.uri, "aliases": aliases, "versions": [v["version"] for v in registry.versions()]}
    status["drift"] = _latest(store, f"{layout.DRIFT_CHECKS}/")
    snapshot = latest_snapshot(store)
    if snapshot:
        manifest = read_snapshot_manifest(store, layout.SNAPSHOTS, snapshot)
        status["snapshot"] = {"hash": snapshot, **{k: manifest.get(k) for k in ("partitions", "counts", "reasons", "slices")}}
    newest = status["versions"][-1] if status["versions"] else None
    if newest:
        status["newest_version"] = registry.get(newest)
        try:
            status["gate"] = store.get_json(layout.gate_decision(newest))
            status["gate_report"] = f"{store.uri}/reports/{newest}/gate.md"
        except StoreKeyError:
            status["gate"] = None
    status["story"] = collect_story(store, status["versions"])
    picked = pick_example(settings, store, status.get("gate"), (status["drift"] or {}).get("drift_slices") or [])
    if picked is not None:
        example = picked["example"]
        status["example"] = {"id": example.id, "slice": example.slice, "expected": example.target, "answers": picked["answers"]}
    if ask_vllm:
        status["served"] = _ask_vllm(settings, picked["example"] if picked else None)
    return status


def _slice_figures(store: Store, scores_key: str) -> dict[str, dict[str, float]]:
    """Per slice: the task's score and, where the metric has one, exact match (from the summary
    written beside ``scores_key``)."""
    from tuneloop.storage import StoreKeyError

    try:
        summary = store.get_json(f"{scores_key.rsplit('/', 1)[0]}/summary.json")
    except StoreKeyError:
        return {}
    return {
        name: {k: float(v) for k, v in figures.items() if k in ("score", "exact_match") and isinstance(v, int | float)}
        for name, figures in (summary.get("slices") or {}).items()
    }


def collect_story(store: Store, versions: list[str]) -> list[dict[str, Any]]:
    """The loop's history in numbers, oldest first: for each gate, production's and the
    candidate's held-out scores per slice (the gate's own evaluation), and for each drift check
    that measured it, production's score on fresh labels per slice.

    The first gate's production is the bare base model with the task's prompt (zero-shot).
    """
    from tuneloop.storage import StoreKeyError

    def rank(version: Any) -> int:
        match = layout.VERSION_RE.match(str(version or ""))
        return int(match.group(1)) if match else 0

    # a gate of vN comes after the checks that measured v(N-1), the checks of vN after its gate
    events: list[tuple[tuple[int, int, str], dict[str, Any]]] = []
    for version in versions:
        try:
            gate = store.get_json(layout.gate_decision(version))
        except StoreKeyError:
            continue
        production = gate.get("production") or {}
        baseline = production.get("version") or "base model (zero-shot)"
        for role, model in (("production", baseline), ("candidate", version)):
            key = (gate.get(role) or {}).get("scores_key")
            if key:
                events.append(((rank(version), 0, ""), {"stage": f"{version}'s gate", "model": model, "role": role, "promote": gate.get("promote"), "slices": _slice_figures(store, key)}))
    for key in sorted(k for k in store.list(f"{layout.DRIFT_CHECKS}/") if k.endswith(".json")):
        check = store.get_json(key)
        performance = check.get("performance") or {}
        if not performance.get("checked") or not performance.get("current_scores"):
            continue
        figures = _slice_figures(store, performance["current_scores"])
        events.append(((rank(performance.get("production")), 1, key), {
            "stage": f"drift check {check.get('as_of')}", "model": performance.get("production"), "role": "fresh labels",
            "fell": performance.get("drift"), "slices": figures,
        }))
    events.sort(key=lambda event: event[0])
    return [row for _, row in events]


def _ask_vllm(settings: Settings, example: Example | None) -> dict[str, Any]:
    """What the stable name resolves to on the first endpoint, and its live answer to ``example``."""
    from tuneloop.serving.vllm_client import VllmClient, VllmError

    endpoint = settings.vllm.endpoints[0]
    api_key = settings.vllm.key
    client = VllmClient(endpoint, api_key=api_key, timeout_s=settings.vllm.timeout_s)
    name = settings.model.served_model_name
    try:
        models = {m["id"]: m for m in client.models()}
    except VllmError as err:
        return {"endpoint": endpoint, "error": str(err)}
    root = models.get(name, {}).get("root")
    served_version = Path(root).name if root else None
    result: dict[str, Any] = {"endpoint": endpoint, "name": name, "root": root, "version": served_version}
    if example is not None and root:
        result["slice"] = example.slice
        result["prompt"] = example.input_text
        result["expected"] = example.target
        try:
            result["answer"] = client.chat(name, example.context, max_tokens=settings.eval.max_new_tokens)
        except VllmError as err:
            result["answer_error"] = str(err)
    return result


def _jsonl_by_id(store: Store, key: str) -> dict[str, dict[str, Any]]:
    from tuneloop.storage import StoreKeyError

    try:
        return {str(row["id"]): row for row in store.iter_jsonl(key) if isinstance(row, dict) and "id" in row}
    except StoreKeyError:
        return {}


def _heldout_rows(settings: Settings, store: Store, prefer: list[str]) -> Iterator[Example]:
    """The rows of the held-out sets; only those of the ``prefer`` slices (by the row's slice or
    its file's name) when there are any."""
    from tuneloop.tasks import TaskRowError, TaskSpec

    spec = TaskSpec(settings.task)
    keys = sorted(k for k in store.list(f"{layout.HELDOUT}/") if k.endswith(".jsonl"))
    keys.sort(key=lambda k: Path(k).stem not in prefer)
    preferred_seen = False
    for key in keys:
        for record in store.iter_jsonl(key):
            try:
                example = spec.example(record)
            except TaskRowError:
                continue
            preferred = example.slice in prefer or Path(key).stem in prefer
            if preferred_seen and not preferred:
                return
            preferred_seen = preferred_seen or preferred
            yield example


def pick_example(settings: Settings, store: Store, gate: dict[str, Any] | None, prefer: list[str], *, scan: int = 400) -> dict[str, Any] | None:
    """One held-out row to show, with production's and the candidate's answers from the newest
    gate's evaluation: the row of a ``prefer`` slice (where drift was found) that the candidate
    answers best and better than production, among the first ``scan`` rows. Without a gate,
    the first held-out row."""
    rows = _heldout_rows(settings, store, prefer)
    if not gate or not (gate.get("candidate") or {}).get("scores_key"):
        first = next(rows, None)
        return None if first is None else {"example": first, "answers": []}
    roles = []
    for role, label in (("production", (gate.get("production") or {}).get("version") or "base model"), ("candidate", gate.get("version"))):
        key = (gate.get(role) or {}).get("scores_key")
        if key:
            folder = key.rsplit("/", 1)[0]
            roles.append((label, _jsonl_by_id(store, key), _jsonl_by_id(store, f"{folder}/predictions.jsonl")))
    best: tuple[tuple[float, float], Example] | None = None
    for index, example in enumerate(rows):
        if index >= scan or (best is not None and best[0][0] >= 1.0 and best[0][1] >= 1.0):
            break
        scores = [float((by_id.get(example.id) or {}).get("score", -1.0)) for _, by_id, _ in roles]
        if min(scores) < 0:
            continue
        rank = (scores[-1], scores[-1] - scores[0])
        if best is None or rank > best[0]:
            best = (rank, example)
    if best is None:
        return None
    example = best[1]
    answers = [
        {"model": label, "answer": (predictions.get(example.id) or {}).get("prediction"), **{k: v for k, v in (scores.get(example.id) or {}).items() if k in ("score", "field_correct", "exact_match")}}
        for label, scores, predictions in roles
    ]
    return {"example": example, "answers": answers}


def format_status(status: dict[str, Any]) -> str:
    lines = [f"tuneloop status ({status['store']})"]
    drift = status.get("drift")
    if drift:
        lines.append(
            f"  drift     as of {drift['as_of']}: AUC {drift['statistic']:.3f}, p={drift['p_value']:.3g}, "
            f"drift={drift['drift']} -> {drift['decision']}"
        )
        terms = [t["term"] for t in (drift.get("report") or {}).get("top_terms", []) if t.get("direction") == "current"][:6]
        if terms:
            lines.append(f"            terms of the new traffic: {', '.join(terms)}")
    snap = status.get("snapshot")
    if snap:
        counts = snap["counts"]
        lines.append(
            f"  intake    snapshot {snap['hash'][:12]} ({snap['partitions'][0]} .. {snap['partitions'][-1]}): "
            f"{counts['accepted']} accepted, {counts['quarantined']} quarantined of {counts['total']}"
        )
        for reason, count in sorted((snap.get("reasons") or {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"            {count:>4}  {reason}")
    newest = status.get("newest_version")
    if newest:
        train = (newest.get("metrics") or {}).get("train") or {}
        if train:
            lines.append(
                f"  training  {newest['version']}: loss {train.get('first_loss') or float('nan'):.3f} -> {train.get('final_loss') or float('nan'):.3f} "
                f"in {train.get('steps')} steps, {train.get('seconds') or 0:.0f}s on {train.get('device')}"
            )
    gate = status.get("gate")
    if gate:
        lines.append(f"  gate      {'PROMOTE' if gate['promote'] else 'REJECT'} (report: {status.get('gate_report')})")
        for name, s in sorted(gate["slices"].items()):
            lines.append(
                f"            {name:<9} production {s['baseline_mean']:.3f}  candidate {s['candidate_mean']:.3f}  "
                f"delta {s['delta']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]  n={s['n']}  {s['rule']}: {'pass' if s['passed'] else 'FAIL'}"
            )
    lines += format_story(status.get("story") or [])
    aliases = status["aliases"]
    lines.append(f"  registry  production={aliases.get('production')} previous={aliases.get('previous')} candidate={aliases.get('candidate')}")
    served = status.get("served")
    if served:
        if served.get("error"):
            lines.append(f"  vLLM      {served['endpoint']}: {served['error']}")
        else:
            lines.append(f"  vLLM      {served['endpoint']} serves {served['name']!r} from {served.get('version')} ({served.get('root')})")
    lines += format_example(status.get("example"), served)
    return "\n".join(lines)


def _figure(figures: dict[str, float] | None) -> str:
    if not figures or "score" not in figures:
        return "-"
    exact = f" ({figures['exact_match']:.2f})" if "exact_match" in figures else ""
    return f"{figures['score']:.3f}{exact}"


def format_story(story: list[dict[str, Any]]) -> list[str]:
    """The story table: every gate's two models and every performance check, per slice."""
    if not story:
        return []
    slices = sorted({name for row in story for name in row["slices"]})
    exact = any("exact_match" in figures for row in story for figures in row["slices"].values())
    header = "score (exact match)" if exact else "score"
    lines = [f"  story     held-out {header} per slice, from each gate's evaluation and each performance check"]
    lines.append(("            " + f"{'':<24}{'model':<32}" + "".join(f"{name:<17}" for name in slices)).rstrip())
    for row in story:
        model = str(row["model"])
        if row["role"] == "fresh labels":
            model += " on fresh labels" + (" (fell)" if row.get("fell") else "")
        lines.append(("            " + f"{row['stage']:<24}{model:<32}" + "".join(f"{_figure(row['slices'].get(name)):<17}" for name in slices)).rstrip())
    return lines


def _json_object(text: Any) -> dict[str, Any] | None:
    from tuneloop.tasks.scoring import parse_json_answer

    return parse_json_answer(text) if isinstance(text, str) else None


def format_example(example: dict[str, Any] | None, served: dict[str, Any] | None) -> list[str]:
    """A held-out row answered by production and the candidate (field by field for a JSON
    task), then the live answer of the served name to the same row."""
    lines: list[str] = []
    if example and example.get("answers"):
        answers = example["answers"]
        lines.append(f"  example   held-out {example['slice']!r} row {example['id']} in the newest gate's evaluation:")
        expected = _json_object(example.get("expected"))
        parsed = [_json_object(a.get("answer")) for a in answers]
        if expected is not None and all(p is not None for p in parsed):
            width = max(8, *(len(k) for k in expected))
            lines.append(("            " + f"{'field':<{width}}  {'expected':<30}" + "".join(f"{a['model']:<34}" for a in answers)).rstrip())
            for key, value in expected.items():
                cells = []
                for answer, fields in zip(answers, parsed, strict=True):
                    correct = (answer.get("field_correct") or {}).get(key)
                    mark = "" if correct is None else (" ok" if correct else " WRONG")
                    cells.append(f"{_clip(json.dumps((fields or {}).get(key), ensure_ascii=False), 26) + mark:<34}")
                lines.append(("            " + f"{key:<{width}}  {_clip(json.dumps(value, ensure_ascii=False), 28):<30}" + "".join(cells)).rstrip())
        else:
            lines.append(f"              expected: {example.get('expected')}")
            for answer in answers:
                lines.append(f"              {answer['model']}: {str(answer.get('answer') or '').strip()}")
        scores = ", ".join(f"{a['model']} {a['score']:.3f}" for a in answers if isinstance(a.get("score"), int | float))
        if scores:
            lines.append(f"            scores: {scores}")
    if served and not served.get("error"):
        if served.get("answer") is not None:
            lines.append(f"            live: {served['name']!r} on vLLM ({served.get('version')}) answers the same row: {served['answer'].strip()}")
        elif served.get("answer_error"):
            lines.append(f"            live: asking {served['name']!r} failed: {served['answer_error']}")
    return lines


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
