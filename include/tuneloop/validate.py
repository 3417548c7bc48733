"""Row-level checks for labelled JSONL: every line ends up accepted or quarantined with reasons.

This module holds the per-row rules that need no batch context (encoding, JSON, required
fields, the completion's schema) and the batch rule for duplicate ids. The Great Expectations
suite and the LLM-specific checks build on top of it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneloop import task

if TYPE_CHECKING:
    from collections.abc import Iterable

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

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reasons": self.reasons, "raw": self.raw}


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
    if isinstance(record.get("completion"), str) and record["completion"].strip():
        parsed = task.parse_completion(record["completion"])
        if parsed is None:
            reasons.append("completion_not_json")
        elif task.schema_errors(parsed):
            reasons.append("completion_schema")
    return (None, reasons) if reasons else (record, [])


def check_lines(lines: Iterable[tuple[str, int, bytes]]) -> CheckedBatch:
    """Check ``(source, line_number, raw_bytes)`` triples; later duplicates of an id are quarantined."""
    batch = CheckedBatch()
    seen_ids: set[str] = set()
    for source, number, raw in lines:
        batch.total += 1
        record, reasons = check_line(raw)
        if record is not None and record["id"] in seen_ids:
            record, reasons = None, ["duplicate_id"]
        if record is None:
            batch.quarantined.append(QuarantinedRow(source, number, raw.decode("utf-8", "replace"), reasons))
            continue
        seen_ids.add(record["id"])
        batch.accepted.append(record)
        batch.origins.append((source, number))
    return batch
