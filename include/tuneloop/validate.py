"""Row-level checks for labelled JSONL: every line ends up accepted or quarantined with reasons.

This module holds the per-row rules that need no batch context (encoding, JSON, required
fields, the completion's schema, the optional ``labels`` list) and the batch rule for
duplicate ids. The LLM-specific checks (``intake_checks``) and the Great Expectations suite
(``quality``) build on top of it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneloop import task
from tuneloop.progress import Progress

if TYPE_CHECKING:
    from collections.abc import Iterable

    from tuneloop.progress import ProgressSink

MAX_LINE_BYTES = 64 * 1024
REQUIRED_FIELDS = ("id", "prompt", "completion")
OPTIONAL_STR_FIELDS = ("domain", "labelled_at")


@dataclass
class QuarantinedRow:
    """A rejected input line, kept verbatim with where it came from and why."""

    source: str
    line: int
    raw: str
    reasons: list[str]
    matched_id: str | None = None  # the row this one duplicates or leaks (near_duplicate, eval_leakage)
    details: dict[str, Any] = field(default_factory=dict)  # per-reason detail: token count, template error

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source, "line": self.line, "reasons": self.reasons, "raw": self.raw}
        if self.matched_id is not None:
            data["matched_id"] = self.matched_id
        if self.details:
            data["details"] = self.details
        return data


@dataclass
class CheckedBatch:
    """The outcome of checking a batch: ``len(accepted) + len(quarantined) == total``."""

    accepted: list[dict[str, Any]] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (source, line) per accepted row
    quarantined: list[QuarantinedRow] = field(default_factory=list)
    total: int = 0

    @property
    def reasons(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for row in self.quarantined:
            counts.update(row.reasons)
        return dict(sorted(counts.items()))


def check_line(raw: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse one raw JSONL line; return the record or None with the reasons it was rejected."""
    if len(raw) > MAX_LINE_BYTES:
        return None, ["line_too_large"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, ["not_utf8"]
    if not text.strip():
        return None, ["empty_line"]
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, ["not_json"]
    if not isinstance(record, dict):
        return None, ["not_an_object"]
    reasons = []
    for name in REQUIRED_FIELDS:
        value = record.get(name)
        if value is None:
            reasons.append(f"missing_field:{name}")
        elif not isinstance(value, str) or not value.strip():
            reasons.append(f"bad_type_or_empty:{name}")
    for name in OPTIONAL_STR_FIELDS:
        if name in record and record[name] is not None and not isinstance(record[name], str):
            reasons.append(f"bad_type_or_empty:{name}")
    labels = record.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels)):
        reasons.append("bad_type_or_empty:labels")
    if isinstance(record.get("completion"), str) and record["completion"].strip():
        parsed = task.parse_completion(record["completion"])
        if parsed is None:
            reasons.append("completion_not_json")
        elif task.schema_errors(parsed):
            reasons.append("completion_schema")
    return (None, reasons) if reasons else (record, [])


def check_lines(
    lines: Iterable[tuple[str, int, bytes]], *, progress: ProgressSink | None = None, expected: int | None = None
) -> CheckedBatch:
    """Check ``(source, line_number, raw_bytes)`` triples; later duplicates of an id are quarantined.

    With ``progress``, prints rows/s and an ETA (``expected`` lines) every 10 s on long inputs.
    """
    batch = CheckedBatch()
    seen_ids: set[str] = set()
    meter = Progress("row checks", sink=progress, enabled=progress is not None, unit="rows")
    meter.start(expected, step_name="line")
    for source, number, raw in lines:
        batch.total += 1
        if progress is not None and batch.total % 20_000 == 0:
            meter.update(batch.total, items=20_000)
        record, reasons = check_line(raw)
        if record is not None and record["id"] in seen_ids:
            record, reasons = None, ["duplicate_id"]
        if record is None:
            batch.quarantined.append(QuarantinedRow(source, number, raw.decode("utf-8", "replace"), reasons))
            continue
        seen_ids.add(record["id"])
        batch.accepted.append(record)
        batch.origins.append((source, number))
    if progress is not None and batch.total >= 20_000:
        meter.update(batch.total, items=batch.total % 20_000)
        meter.finish()
    return batch
