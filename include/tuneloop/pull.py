"""Pull labelled date partitions from the store into a content-addressed dataset snapshot.

Layout read: ``labelled/dt=YYYY-MM-DD/*.jsonl``. Layout written:
``snapshots/<sha256>/{train,eval,quarantine}.jsonl`` and ``manifest.json`` (written last).
The hash covers the snapshot's files only, so pulling the same partitions twice gives the
same hash. The train/eval split is a stable function of each row's id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from tuneloop.validate import check_lines

if TYPE_CHECKING:
    from tuneloop.storage import Store

LABELLED_PREFIX = "labelled"
SNAPSHOT_PREFIX = "snapshots"
LATEST_POINTER = f"{SNAPSHOT_PREFIX}/LATEST"


def is_eval_id(record_id: str, eval_fraction: float) -> bool:
    """Stable split: the same id always lands on the same side, whatever else is in the batch."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")


def _partition_lines(store: Store, keys: list[str]) -> Iterator[tuple[str, int, bytes]]:
    for key in keys:
        for number, raw in enumerate(store.get_bytes(key).split(b"\n"), 1):
            if raw == b"" :
                continue  # the newline that ends the file (or a blank line: checked below)
            yield key, number, raw.rstrip(b"\r")


def pull_snapshot(
    store: Store,
    *,
    since: date | None = None,
    until: date | None = None,
    eval_fraction: float = 0.2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read partitions in ``[since, until]``, check rows, split, and write a snapshot."""
    from tuneloop.storage import write_snapshot

    days = [d for d in store.list_partitions(LABELLED_PREFIX) if (since is None or d >= since) and (until is None or d <= until)]
    if not days:
        raise ValueError(f"no labelled partitions in {store.uri}/{LABELLED_PREFIX}/ between {since or 'the start'} and {until or 'now'}")
    keys = [key for day in days for key in store.list(f"{LABELLED_PREFIX}/dt={day.isoformat()}/") if key.endswith(".jsonl")]
    if progress:
        progress(f"pulling {len(keys)} files from {len(days)} partitions ({days[0]} .. {days[-1]})")
    batch = check_lines(_partition_lines(store, keys))
    accepted = sorted(batch.accepted, key=lambda r: r["id"])
    train = [r for r in accepted if not is_eval_id(r["id"], eval_fraction)]
    heldout = [r for r in accepted if is_eval_id(r["id"], eval_fraction)]
    quarantine = sorted((row.to_json() for row in batch.quarantined), key=lambda r: (r["source"], r["line"]))
    files = {"train.jsonl": _jsonl(train), "eval.jsonl": _jsonl(heldout), "quarantine.jsonl": _jsonl(quarantine)}
    counts = {"total": batch.total, "accepted": len(accepted), "train": len(train), "eval": len(heldout), "quarantined": len(quarantine)}
    manifest = {
        "kind": "tuneloop.dataset_snapshot",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "partitions": [d.isoformat() for d in days],
        "source_keys": keys,
        "counts": counts,
        "reasons": batch.reasons,
        "eval_fraction": eval_fraction,
        "domains": _domain_counts(accepted),
    }
    snapshot = write_snapshot(store, SNAPSHOT_PREFIX, files, manifest)
    store.put_text(LATEST_POINTER, snapshot)
    if progress:
        progress(f"snapshot {snapshot[:12]}: {counts}")
    return {"snapshot": snapshot, "partitions": manifest["partitions"], "counts": counts, "reasons": batch.reasons, "domains": manifest["domains"]}


def _domain_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        domain = str(record.get("domain") or "unknown")
        counts[domain] = counts.get(domain, 0) + 1
    return dict(sorted(counts.items()))


def latest_snapshot(store: Store) -> str | None:
    """The hash of the most recently written snapshot, or None."""
    if not store.exists(LATEST_POINTER):
        return None
    return store.get_text(LATEST_POINTER).strip() or None
