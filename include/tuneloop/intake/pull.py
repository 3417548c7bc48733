"""Pull labelled date partitions from the store into a content-addressed dataset snapshot.

Layout read: ``labelled/dt=YYYY-MM-DD/*.jsonl``. Layout written:
``snapshots/<sha256>/{train,eval,quarantine}.jsonl`` and ``manifest.json`` (written last),
plus ``gx_validation_result.json`` when the Great Expectations gate ran.
The hash covers the data files only, so pulling the same partitions twice gives the same
hash. The train/eval split is a stable function of each row's id. Every input line ends up
in exactly one of train, eval or quarantine.

:func:`check_batch` adds the intake checks (``intake_checks``) to the row checks; its eval-leakage
check compares the batch's train-side rows with its eval-side rows (the split is known before the
snapshot, being a function of the id), the fixed held-out sets ``heldout/*.jsonl`` and the latest
snapshot's ``eval.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.intake.rows import CheckedBatch, check_lines, iter_lines

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tuneloop.intake.checks import IntakeOptions, IntakeReport
    from tuneloop.intake.expectations import QualityReport
    from tuneloop.storage import Store
    from tuneloop.tasks import TaskSpec

LABELLED_PREFIX = layout.LABELLED
SNAPSHOT_PREFIX = layout.SNAPSHOTS
LATEST_POINTER = layout.LATEST_SNAPSHOT
HELDOUT_PREFIX = layout.HELDOUT


class NoNewDataError(RuntimeError):
    """No labelled partitions in the requested range."""


@dataclass(frozen=True)
class PullPlan:
    """Which partitions (days and object keys) a pull reads."""

    days: list[date]
    keys: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"days": [d.isoformat() for d in self.days], "keys": self.keys}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PullPlan:
        return cls([date.fromisoformat(d) for d in data["days"]], list(data["keys"]))


def is_eval_id(record_id: str, eval_fraction: float) -> bool:
    """Stable split: the same id always lands on the same side, whatever else is in the batch."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


def snapshot_last_day(store: Store, snapshot: str | None) -> date | None:
    """The newest partition day a snapshot covers, or None (no snapshot, or not complete)."""
    if not snapshot:
        return None
    from tuneloop.storage import StoreKeyError, read_snapshot_manifest

    try:
        days = read_snapshot_manifest(store, SNAPSHOT_PREFIX, snapshot).get("partitions") or []
    except StoreKeyError:
        return None
    return date.fromisoformat(max(days)) if days else None


def last_snapshot_day(store: Store) -> date | None:
    """The newest partition day covered by the latest snapshot (for incremental pulls)."""
    return snapshot_last_day(store, latest_snapshot(store))


def plan_pull(store: Store, *, since: date | None = None, until: date | None = None, incremental: bool = False) -> PullPlan:
    """Pick the partitions in ``[since, until]``; ``incremental`` starts after the last snapshot."""
    if incremental and since is None:
        last = last_snapshot_day(store)
        since = last + timedelta(days=1) if last else None
    days = [d for d in store.list_partitions(LABELLED_PREFIX) if (since is None or d >= since) and (until is None or d <= until)]
    if not days:
        raise NoNewDataError(
            f"no labelled partitions in {store.uri}/{LABELLED_PREFIX}/ between {since or 'the start'} and {until or 'now'}"
        )
    keys = [key for day in days for key in store.list(f"{LABELLED_PREFIX}/dt={day.isoformat()}/") if key.endswith(".jsonl")]
    return PullPlan(days, keys)


def _partition_lines(store: Store, keys: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """Every record of every file, streamed (a file is never read whole into memory)."""
    for key in keys:
        with store.open_read(key) as handle:
            for number, raw in enumerate(iter_lines(handle), 1):
                yield key, number, raw


def read_batch(store: Store, plan: PullPlan, spec: TaskSpec, *, progress: Callable[[str], None] | None = None) -> CheckedBatch:
    """Read and row-check every line of the planned partitions."""
    return check_lines(_partition_lines(store, plan.keys), spec, progress=progress)


def stored_eval_records(store: Store) -> list[dict[str, Any]]:
    """Evaluation rows already in the store: the held-out sets and the latest snapshot's eval split."""
    keys = [key for key in store.list(f"{HELDOUT_PREFIX}/") if key.endswith(".jsonl")]
    latest = latest_snapshot(store)
    if latest and store.exists(f"{SNAPSHOT_PREFIX}/{latest}/eval.jsonl"):
        keys.append(f"{SNAPSHOT_PREFIX}/{latest}/eval.jsonl")
    records: list[dict[str, Any]] = []
    for key in keys:
        for line in store.get_text(key).splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def check_batch(
    store: Store,
    plan: PullPlan,
    options: IntakeOptions,
    spec: TaskSpec,
    *,
    eval_fraction: float,
    progress: Callable[[str], None] | None = None,
) -> tuple[CheckedBatch, IntakeReport]:
    """Row checks, then the intake checks (tokens, chat template, PII, labels, near-duplicates,
    eval leakage against this batch's eval side and the stored eval rows)."""
    from tuneloop.intake.checks import run_intake_checks

    batch = read_batch(store, plan, spec, progress=progress)
    report = run_intake_checks(
        batch,
        options,
        spec,
        eval_records=stored_eval_records(store),
        is_eval=lambda record_id: is_eval_id(record_id, eval_fraction),
        progress=progress,
    )
    return batch, report


def write_dataset_snapshot(
    store: Store,
    batch: CheckedBatch,
    plan: PullPlan,
    spec: TaskSpec,
    *,
    eval_fraction: float,
    quality: QualityReport | None = None,
) -> dict[str, Any]:
    """Split accepted rows by id hash and write the snapshot; returns its summary."""
    from tuneloop.storage import write_snapshot

    accepted = sorted(batch.accepted, key=lambda r: str(spec.row_id(r)))
    train = [r for r in accepted if not is_eval_id(str(spec.row_id(r)), eval_fraction)]
    heldout = [r for r in accepted if is_eval_id(str(spec.row_id(r)), eval_fraction)]
    quarantine = sorted((row.to_json() for row in batch.quarantined), key=lambda r: (r["source"], r["line"]))
    if len(accepted) + len(quarantine) != batch.total:
        raise RuntimeError(f"intake lost rows: {batch.total} lines but {len(accepted)} accepted + {len(quarantine)} quarantined")
    files = {"train.jsonl": _jsonl(train), "eval.jsonl": _jsonl(heldout), "quarantine.jsonl": _jsonl(quarantine)}
    counts = {"total": batch.total, "accepted": len(accepted), "train": len(train), "eval": len(heldout), "quarantined": len(quarantine)}
    manifest: dict[str, Any] = {
        "kind": "tuneloop.dataset_snapshot",
        "partitions": [d.isoformat() for d in plan.days],
        "source_keys": plan.keys,
        "counts": counts,
        "reasons": batch.reasons,
        "eval_fraction": eval_fraction,
        "task": spec.describe(),
        "slices": {"train": _slice_counts(train, spec), "eval": _slice_counts(heldout, spec)},
    }
    if quality is not None:
        manifest["validation"] = quality.summary()
    snapshot = write_snapshot(store, SNAPSHOT_PREFIX, files, manifest)
    if quality is not None:
        store.put_json(f"{SNAPSHOT_PREFIX}/{snapshot}/gx_validation_result.json", quality.validation_result)
    store.put_text(LATEST_POINTER, snapshot)
    return {
        "snapshot": snapshot,
        "partitions": manifest["partitions"],
        "counts": counts,
        "reasons": batch.reasons,
        "slices": manifest["slices"],
    }


def pull_snapshot(
    store: Store,
    *,
    since: date | None = None,
    until: date | None = None,
    spec: TaskSpec,
    eval_fraction: float = 0.2,
    incremental: bool = False,
    checks: IntakeOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan, read, check and snapshot (the quality gate runs in the refresh DAG).

    ``checks`` adds the intake checks to the row checks (see :func:`check_batch`)."""
    plan = plan_pull(store, since=since, until=until, incremental=incremental)
    if progress:
        progress(f"pulling {len(plan.keys)} files from {len(plan.days)} partitions ({plan.days[0]} .. {plan.days[-1]})")
    if checks is not None:
        batch, _ = check_batch(store, plan, checks, spec, eval_fraction=eval_fraction, progress=progress)
    else:
        batch = read_batch(store, plan, spec, progress=progress)
    result = write_dataset_snapshot(store, batch, plan, spec, eval_fraction=eval_fraction)
    if progress:
        progress(f"snapshot {result['snapshot'][:12]}: {result['counts']}")
    return result


def _slice_counts(records: list[dict[str, Any]], spec: TaskSpec) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        name = spec.slice_of(record)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def latest_snapshot(store: Store) -> str | None:
    """The hash of the most recently written snapshot, or None."""
    if not store.exists(LATEST_POINTER):
        return None
    return store.get_text(LATEST_POINTER).strip() or None
