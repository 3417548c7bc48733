"""``tuneloop demo-world``: write one of the shipped example worlds into a store.

Each example is a generator (daily traffic and labelled partitions, held-out sets per slice,
optional suites) plus a task config in ``examples/<name>/tuneloop.yaml``. The product never
imports this module; the CLI reaches it only for the ``demo-world`` command.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from tuneloop.demo.invoices import PutStore

EXAMPLES = {
    "invoices": "documents -> one JSON object, drifting to European invoices",
    "tickets": "support chats -> one triage label, drifting to a new product",
}


def check_world_args(days: int, traffic_per_day: int, labelled_per_day: int, bad_row_rate: float) -> None:
    """The arguments every example's world generator takes, checked alike."""
    if days < 0:
        raise ValueError(f"days must be >= 0, got {days}")
    if traffic_per_day < 0 or labelled_per_day < 0:
        raise ValueError("traffic_per_day and labelled_per_day must be >= 0")
    if labelled_per_day > traffic_per_day:
        raise ValueError(
            f"labelled_per_day={labelled_per_day} exceeds traffic_per_day={traffic_per_day}: "
            "labelled rows are a sample of the day's traffic"
        )
    if not 0.0 <= bad_row_rate < 1.0:
        raise ValueError(f"bad_row_rate must be within [0, 1), got {bad_row_rate}")


def write_days(
    store: PutStore,
    start: date,
    days: int,
    slices: Sequence[str],
    bad_row_kinds: Sequence[str],
    day_partitions: Callable[[date], tuple[list[str], list[str], dict[str, Any]]],
    summary: dict[str, Any],
    progress_line: Callable[[date, list[str], list[str], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Write ``days`` daily traffic and labelled partitions from ``start`` on (one generator's
    ``day_partitions(day) -> (traffic lines, labelled lines, counts)``), adding the counts per
    slice and per bad-row kind to ``summary``: the loop both example worlds share."""
    summary.update({
        "drift_fraction": {},
        "traffic_rows": dict.fromkeys(slices, 0),
        "labelled_rows": dict.fromkeys(slices, 0),
        "bad_rows": dict.fromkeys(bad_row_kinds, 0),
        "keys": [],
    })  # fmt: skip
    for offset in range(days):
        day = start + timedelta(days=offset)
        traffic, labelled, counts = day_partitions(day)
        for prefix, lines in (("traffic", traffic), ("labelled", labelled)):
            key = f"{prefix}/dt={day.isoformat()}/part-00000.jsonl"
            store.put_bytes(key, ("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
            summary["keys"].append(key)
        summary["drift_fraction"][day.isoformat()] = counts["drift_fraction"]
        for name in slices:
            summary["traffic_rows"][name] += counts["traffic"][name]
            summary["labelled_rows"][name] += counts["labelled"][name]
        for kind, count in counts["bad_rows"].items():
            summary["bad_rows"][kind] += count
        if progress_line is not None:
            progress_line(day, traffic, labelled, counts)
    return summary


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_world(
    example: str,
    store: PutStore,
    start: date,
    days: int,
    *,
    seed: int = 0,
    drift_start: date | None = None,
    traffic_per_day: int | None = None,
    labelled_per_day: int | None = None,
    bad_row_rate: float = 0.0,
    heldout_per_slice: int | None = None,
    injection_rows: int = 48,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate ``example``'s world: partitions, ``heldout/<slice>.jsonl``, and (invoices) the
    prompt-injection suite. Counts left as None take the generator's defaults."""
    counts = {k: v for k, v in (("traffic_per_day", traffic_per_day), ("labelled_per_day", labelled_per_day)) if v is not None}
    if example == "invoices":
        from tuneloop.demo import invoices

        summary = invoices.generate_world(store, start, days, seed=seed, drift_start=drift_start, bad_row_rate=bad_row_rate, progress=progress, **counts)
        heldout = invoices.heldout_sets(seed, heldout_per_slice or 200)
        injection = invoices.injection_set(seed, injection_rows)
        store.put_bytes(invoices.INJECTION_SUITE_KEY, _jsonl(injection))
        summary["suites"] = {invoices.INJECTION_SUITE_KEY: len(injection)}
    elif example == "tickets":
        from tuneloop.demo import tickets

        summary = tickets.generate_ticket_world(store, start, days, seed=seed, drift_start=drift_start, bad_row_rate=bad_row_rate, progress=progress, **counts)
        heldout = tickets.heldout_sets(seed, heldout_per_slice or 60)
        summary["suites"] = {}
    else:
        raise ValueError(f"unknown example {example!r}; choose one of {', '.join(EXAMPLES)}")
    for name, rows in heldout.items():
        store.put_bytes(f"heldout/{name}.jsonl", _jsonl(rows))
    summary["heldout"] = {name: len(rows) for name, rows in heldout.items()}
    summary["example"] = example
    return summary
