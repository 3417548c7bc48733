"""Pull labelled date partitions from the store into a content-addressed dataset snapshot.

Layout read: ``labelled/dt=YYYY-MM-DD/*.jsonl``. Layout written:
``snapshots/<sha256>/{train,eval,quarantine}.jsonl`` and ``manifest.json`` (written last),
plus ``gx_validation_result.json`` when the Great Expectations gate ran.
The hash covers the data files only, so pulling the same partitions twice gives the same
hash. The train/eval split is a stable function of each row's id. Every input line ends up
in exactly one of train, eval or quarantine.

:func:`intake_batch` runs every check in bounded memory (``intake/stream.py``: chunks of
``data.chunk_rows`` rows, accepted rows spilled to local disk); its eval-leakage check compares the batch's train-side rows with its eval-side rows (the split is known before the
snapshot, being a function of the id), the fixed held-out sets ``heldout/*.jsonl`` and the latest
snapshot's ``eval.jsonl``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.intake.rows import CheckedBatch, check_lines, iter_lines, json_objects
from tuneloop.intake.stream import DEFAULT_CHUNK_ROWS, IntakeRun, run_intake

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tuneloop.intake.checks import IntakeOptions
    from tuneloop.intake.expectations import QualityReport, QualitySuite
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


def _jsonl_line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


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


def sample_accepted(store: Store, plan: PullPlan, spec: TaskSpec, n: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[int, list[dict[str, Any]]]:
    """How many rows of the planned partitions pass the row checks, and the ``n`` of them whose
    ids hash lowest (SHA-256: a sample stable by id), in that order; one chunk in memory at a time."""
    from tuneloop.intake.stream import IdHashes, chunked

    ids = IdHashes()
    count = 0
    kept: list[tuple[str, dict[str, Any]]] = []
    for chunk in chunked(_partition_lines(store, plan.keys), chunk_rows):
        batch = check_lines(chunk, spec, seen_ids=ids)
        count += len(batch.accepted)
        hashed = ((hashlib.sha256(str(spec.row_id(r)).encode()).hexdigest(), r) for r in batch.accepted)
        kept = heapq.nsmallest(n, [*kept, *hashed], key=lambda item: item[0])
    return count, [record for _, record in kept]


def stored_eval_records(store: Store) -> Iterator[dict[str, Any]]:
    """Evaluation rows already in the store, streamed: the held-out sets and the latest
    snapshot's eval split."""
    keys = [key for key in store.list(f"{HELDOUT_PREFIX}/") if key.endswith(".jsonl")]
    latest = latest_snapshot(store)
    if latest and store.exists(f"{SNAPSHOT_PREFIX}/{latest}/eval.jsonl"):
        keys.append(f"{SNAPSHOT_PREFIX}/{latest}/eval.jsonl")
    for key in keys:
        with store.open_read(key) as handle:
            yield from json_objects(iter_lines(handle))


def spill_dir(settings_dir: str | None) -> tempfile.TemporaryDirectory[str]:
    """A fresh local directory for the intake's spill files (``data.spill_dir`` or the system's)."""
    if settings_dir:
        Path(settings_dir).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="tuneloop-intake-", dir=settings_dir or None)


def intake_batch(
    store: Store,
    plan: PullPlan,
    spec: TaskSpec,
    workdir: Path,
    *,
    eval_fraction: float,
    options: IntakeOptions | None = None,
    quality: QualitySuite | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[str], None] | None = None,
) -> IntakeRun:
    """Every check of the planned partitions, in bounded memory (see ``intake/stream.py``): the
    row checks; with ``options`` the intake checks (tokens, chat template, PII, labels,
    near-duplicates, eval leakage against this batch's eval side and the stored eval rows); with
    ``quality`` the GX suite."""
    return run_intake(
        _partition_lines(store, plan.keys),
        spec,
        workdir,
        options=options,
        eval_records=stored_eval_records(store) if options is not None else (),
        is_eval=lambda record_id: is_eval_id(record_id, eval_fraction),
        quality=quality,
        chunk_rows=chunk_rows,
        progress=progress,
    )


def write_dataset_snapshot(
    store: Store,
    run: IntakeRun,
    plan: PullPlan,
    spec: TaskSpec,
    *,
    eval_fraction: float,
    quality: QualityReport | None = None,
) -> dict[str, Any]:
    """Split the accepted rows by id hash and write the snapshot, streamed from the run's
    spill files; returns its summary. Rows are sorted by id, quarantined rows by (source, line)."""
    from tuneloop.storage import write_snapshot_files

    folder = run.workdir / "snapshot"
    folder.mkdir(exist_ok=True)
    paths = {name: folder / name for name in ("train.jsonl", "eval.jsonl", "quarantine.jsonl")}
    slices: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    counts = {"total": run.total, "accepted": 0, "train": 0, "eval": 0, "quarantined": 0}
    with open(paths["train.jsonl"], "wb") as train, open(paths["eval.jsonl"], "wb") as heldout:
        for record, _, _ in run.iter_accepted():
            side = "eval" if is_eval_id(str(spec.row_id(record)), eval_fraction) else "train"
            (heldout if side == "eval" else train).write(_jsonl_line(record))
            counts[side] += 1
            name = spec.slice_of(record)
            slices[side][name] = slices[side].get(name, 0) + 1
    with open(paths["quarantine.jsonl"], "wb") as out:
        for row in run.iter_quarantined():
            out.write(_jsonl_line(row))
            counts["quarantined"] += 1
    counts["accepted"] = counts["train"] + counts["eval"]
    if counts["accepted"] + counts["quarantined"] != run.total:
        raise RuntimeError(f"intake lost rows: {run.total} lines but {counts['accepted']} accepted + {counts['quarantined']} quarantined")
    reasons = dict(sorted(run.reasons.items()))
    manifest: dict[str, Any] = {
        "kind": "tuneloop.dataset_snapshot",
        "partitions": [d.isoformat() for d in plan.days],
        "source_keys": plan.keys,
        "counts": counts,
        "reasons": reasons,
        "eval_fraction": eval_fraction,
        "task": spec.describe(),
        "slices": {side: dict(sorted(found.items())) for side, found in slices.items()},
    }
    if quality is not None:
        manifest["validation"] = quality.summary()
    snapshot = write_snapshot_files(store, SNAPSHOT_PREFIX, paths, manifest)
    if quality is not None:
        store.put_json(f"{SNAPSHOT_PREFIX}/{snapshot}/gx_validation_result.json", quality.validation_result)
    store.put_text(LATEST_POINTER, snapshot)
    return {"snapshot": snapshot, "partitions": manifest["partitions"], "counts": counts, "reasons": reasons, "slices": manifest["slices"]}


def pull_snapshot(
    store: Store,
    *,
    since: date | None = None,
    until: date | None = None,
    spec: TaskSpec,
    eval_fraction: float = 0.2,
    incremental: bool = False,
    checks: IntakeOptions | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plan, read, check and snapshot (the quality gate runs in the refresh DAG).

    ``checks`` adds the intake checks to the row checks (see :func:`intake_batch`)."""
    plan = plan_pull(store, since=since, until=until, incremental=incremental)
    if progress:
        progress(f"pulling {len(plan.keys)} files from {len(plan.days)} partitions ({plan.days[0]} .. {plan.days[-1]})")
    with spill_dir(None) as workdir:
        run = intake_batch(store, plan, spec, Path(workdir), eval_fraction=eval_fraction, options=checks, chunk_rows=chunk_rows, progress=progress)
        result = write_dataset_snapshot(store, run, plan, spec, eval_fraction=eval_fraction)
    if progress:
        progress(f"snapshot {result['snapshot'][:12]}: {result['counts']}")
    return result


def latest_snapshot(store: Store) -> str | None:
    """The hash of the most recently written snapshot, or None."""
    if not store.exists(LATEST_POINTER):
        return None
    return store.get_text(LATEST_POINTER).strip() or None
