"""Row-level checks for labelled JSONL: every line ends up accepted or quarantined with reasons.

This module holds the per-row rules that need no batch context (encoding, JSON, the task's
format and fields, the answer against the task's metric: a label in ``task.labels``, a JSON
object that fits ``task.json_schema``...; the optional ``labels`` list) and the batch rule
for duplicate ids. The LLM-specific checks (``intake_checks``) and the Great Expectations suite
(``quality``) build on top of it. A row that makes a check raise is quarantined as
``row_check_error:<Type>``: one hostile row never stops a batch.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.progress import Progress
from tuneloop.tasks import TaskRowError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from tuneloop.progress import ProgressSink
    from tuneloop.tasks import TaskSpec

MAX_LINE_BYTES = 64 * 1024
LINE_END = re.compile(rb"\r\n|\r|\n")
"""JSON escapes CR and LF inside strings, so any of the three ends a record (U+2028/2029 may
appear raw inside a JSON string and do not)."""


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


def split_lines(data: bytes) -> list[bytes]:
    """A file's records: split at LF, CRLF or a lone CR; a final empty piece is dropped."""
    lines = LINE_END.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def iter_lines(handle: Any, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The records of a binary stream, read ``chunk_bytes`` at a time (bounded memory)."""
    pending = b""
    while chunk := handle.read(chunk_bytes):
        pending += chunk
        hold_cr = pending.endswith(b"\r")  # maybe the first half of a CRLF split across reads
        pieces = LINE_END.split(pending[:-1] if hold_cr else pending)
        pending = pieces.pop() + (b"\r" if hold_cr else b"")
        yield from pieces
    if pending:  # the last record, with or without its line end
        yield from split_lines(pending)


def json_objects(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The lines that are JSON objects, parsed (evaluation rows read for the leakage check;
    anything else is skipped: those files are not intake's to quarantine)."""
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            yield record


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        raise _DuplicateKeyError(sorted({k for k, _ in pairs if sum(1 for key, _ in pairs if key == k) > 1})[:3])
    return record


class _DuplicateKeyError(ValueError):
    pass


def _parse(text: str) -> dict[str, Any] | str:
    """The record, or the quarantine reason."""
    try:
        record = json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError:
        return "duplicate_key"
    except (ValueError, RecursionError):
        return "not_json"
    if not isinstance(record, dict):
        return "not_an_object"
    try:  # lone surrogates ("\\ud800") parse, then break every encoder downstream
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "bad_unicode"
    return record


def check_line(raw: bytes, spec: TaskSpec) -> tuple[dict[str, Any] | None, list[str]]:
    """Parse one raw JSONL line; return the record or None with the reasons it was rejected.
    Never raises: a check that fails on a hostile row quarantines it (``row_check_error``)."""
    try:
        return _check_line(raw, spec)
    except Exception as err:  # noqa: BLE001 - one row must never stop the batch
        return None, [f"row_check_error:{type(err).__name__}"]


def _check_line(raw: bytes, spec: TaskSpec) -> tuple[dict[str, Any] | None, list[str]]:
    if len(raw) > MAX_LINE_BYTES:
        return None, ["line_too_large"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, ["not_utf8"]
    text = text.removeprefix("\ufeff")  # a byte-order mark from an editor
    if not text.strip():
        return None, ["empty_line"]
    parsed = _parse(text)
    if isinstance(parsed, str):
        return None, [parsed]
    record = parsed
    reasons = []
    try:
        example = spec.example(record)
    except TaskRowError as err:
        return None, [err.reason]
    if len(example.input_text) > spec.settings.max_prompt_chars:
        reasons.append("prompt_too_long")
    labels = record.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels)):
        reasons.append("bad_type_or_empty:labels")
    if example.target is not None:
        reasons += spec.check_target(example.target)
    return (None, reasons) if reasons else (record, [])


class IdSet(Protocol):
    def __contains__(self, row_id: object, /) -> bool: ...
    def add(self, row_id: str, /) -> None: ...


def check_lines(
    lines: Iterable[tuple[str, int, bytes]],
    spec: TaskSpec,
    *,
    progress: ProgressSink | None = None,
    expected: int | None = None,
    seen_ids: IdSet | None = None,
) -> CheckedBatch:
    """Check ``(source, line_number, raw_bytes)`` triples; later duplicates of an id are quarantined
    (``seen_ids`` carries the ids of earlier chunks of the same batch).

    With ``progress``, prints rows/s and an ETA (``expected`` lines) every 10 s on long inputs.
    """
    batch = CheckedBatch()
    if seen_ids is None:
        seen_ids = set()
    meter = Progress("row checks", sink=progress, enabled=progress is not None, unit="rows")
    meter.start(expected, step_name="line")
    for source, number, raw in lines:
        batch.total += 1
        if progress is not None and batch.total % 20_000 == 0:
            meter.update(batch.total, items=20_000)
        record, reasons = check_line(raw, spec)
        row_id = str(spec.row_id(record)) if record is not None else ""
        if record is not None and row_id in seen_ids:
            record, reasons = None, ["duplicate_id"]
        if record is None:
            batch.quarantined.append(QuarantinedRow(source, number, raw.decode("utf-8", "replace"), reasons))
            continue
        seen_ids.add(row_id)
        batch.accepted.append(record)
        batch.origins.append((source, number))
    if progress is not None and batch.total >= 20_000:
        meter.update(batch.total, items=batch.total % 20_000)
        meter.finish()
    return batch
