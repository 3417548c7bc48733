"""The label step (``data.label_source: teacher``): the teacher model labels a sample of the
traffic window, and the labels land as a labelled partition that intake then checks like any
other (see ``intake/teacher.py``). A re-run of the same window is free (the answer cache) and
writes the same files."""

from __future__ import annotations

import hashlib
import json
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.steps.loop import parse_day

if TYPE_CHECKING:
    from tuneloop.steps.loop import Loop


def _window(loop: Loop, as_of: str | date | None) -> tuple[list[date], list[str]]:
    """The traffic days of the drift monitor's current window (``drift.current_days``) up to
    ``as_of`` (default: the newest traffic day) and their files."""
    store = loop.store
    days = store.list_partitions(layout.TRAFFIC)
    if not days:
        raise LookupError(f"no traffic partitions under {store.uri}/{layout.TRAFFIC}/: nothing to label")
    end = parse_day(as_of) if as_of is not None else days[-1]
    assert end is not None
    first = end - timedelta(days=loop.settings.drift.current_days - 1)
    window = [d for d in days if first <= d <= end]
    if not window:
        raise LookupError(f"no traffic partitions between {first} and {end}: nothing to label")
    keys = [k for d in window for k in store.list(f"{layout.TRAFFIC}/dt={d.isoformat()}/") if k.endswith(".jsonl")]
    return window, keys


def _novelty(loop: Loop, days: list[date]) -> tuple[str | None, dict[str, float] | None]:
    """The newest drift check's novelty ranks whose day lies in the labelling window, and its key."""
    first, last = days[0].isoformat(), days[-1].isoformat()
    keys = sorted(
        (k for k in loop.store.list(f"{layout.DRIFT_NOVELTY}/") if k.endswith(".json") and first <= k.rsplit("/", 1)[-1][:10] <= last),
        key=lambda k: k.rsplit("/", 1)[-1],
    )
    if not keys:
        return None, None
    data = loop.store.get_json(keys[-1])
    novelty = data.get("novelty") if isinstance(data, dict) else None
    if not isinstance(novelty, dict):
        return None, None
    return keys[-1], {str(k): float(v) for k, v in novelty.items() if isinstance(v, int | float)}


def label_step(loop: Loop, *, as_of: str | date | None = None) -> dict[str, Any]:
    """Label the traffic window with the teacher; write ``labelled/dt=<last day>/teacher-*.jsonl``
    and ``labelling/<day>__<digest>/`` (summary with the account and checks, quarantine)."""
    from tuneloop.intake.teacher import check_residency, label_rows

    settings = loop.settings
    cfg = settings.teacher
    check_residency(cfg)  # before reading anything: a refused endpoint fails fast, naming the setting
    days, keys = _window(loop, as_of)
    rows = [row for key in keys for row in loop.store.iter_jsonl(key) if isinstance(row, dict)]
    human = [
        row for d in days for key in loop.store.list(f"{layout.LABELLED}/dt={d.isoformat()}/")
        if key.endswith(".jsonl") and not key.rsplit("/", 1)[-1].startswith("teacher-")
        for row in loop.store.iter_jsonl(key) if isinstance(row, dict)
    ]
    # ids labelled by earlier runs on other days (an overlapping window): not paid for or stored twice
    day_key = f"/dt={days[-1].isoformat()}/"
    already = {
        str(loop.spec.row_id(row)) for key in loop.store.list(f"{layout.LABELLED}/")
        if key.rsplit("/", 1)[-1].startswith("teacher-") and day_key not in key
        for row in loop.store.iter_jsonl(key) if isinstance(row, dict)
    }
    loop.progress(
        f"label: {len(rows)} traffic rows from {days[0]} .. {days[-1]} ({len(human)} human-labelled rows to compare with, "
        f"{len(already)} labelled by earlier runs)"
    )
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(settings.work_dir) / "teacher-cache"
    novelty_source, novelty = _novelty(loop, days) if cfg.prefer_novel else (None, None)
    if novelty_source:
        loop.progress(f"label: the sample leans toward what the drift check {novelty_source} found new ({len(novelty or {})} prompts ranked)")
    run = label_rows(
        rows, loop.spec, cfg, cache_dir=cache, human=human, seed=settings.training.seed,
        near_duplicate_jaccard=settings.data.near_duplicate_jaccard, progress=loop.progress, already=already,
        novelty=novelty,
    )
    ids = [str(loop.spec.row_id(row)) for row in run.labelled] + [json.dumps(row, sort_keys=True) for row, _ in run.quarantined]
    identity = {"model": cfg.model, "system_prompt": cfg.system_prompt, "temperature": cfg.temperature, "ids": sorted(ids)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    day = days[-1].isoformat()
    labels_key = layout.teacher_labels(day, digest)
    prefix = layout.labelling(day, digest)
    summary = {"window": [days[0].isoformat(), day], "traffic_rows": len(rows), "labels": labels_key, **run.summary(),
               "novelty_source": novelty_source,
               "teacher": {"endpoint": cfg.endpoint, "model": cfg.model}}
    loop.store.put_jsonl(f"{prefix}/quarantine.jsonl", [{"row": row, "reason": reason} for row, reason in run.quarantined])
    loop.store.put_json(f"{prefix}/summary.json", summary)
    if run.labelled:
        loop.store.put_jsonl(labels_key, run.labelled)  # written last: pull sees the partition only when complete
    account = run.account
    loop.progress(
        f"label: {len(run.labelled)} labelled, {len(run.quarantined)} quarantined ({summary['quarantine_reasons']}); "
        f"{account.requests} requests, {account.cache_hits} from the cache, {account.retries} retries, "
        f"{account.prompt_tokens + account.completion_tokens} tokens, cost {account.cost:.4f}"
        + (f"; budget used up ({account.budget_exhausted}): {run.unlabelled_budget} rows left for the next run" if account.budget_exhausted else "")
    )
    return {**summary, "summary_key": f"{prefix}/summary.json"}
