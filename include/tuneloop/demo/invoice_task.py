"""The task: invoice text in, one JSON object with fixed fields out.

This module is the single source of truth for the output schema, prompt rendering and
scoring; the trainer, the evaluator, the data validator and the gate all import it.

Record schemas (one JSON object per line, UTF-8, timestamps ISO-8601 UTC such as
``2026-03-15T14:05:09Z``):

* labelled rows (``labelled/dt=YYYY-MM-DD/part-*.jsonl``, held-out eval sets)::

    {"id": str, "prompt": str, "completion": str,
     "domain": "original" | "drifted", "labelled_at": str}

  ``prompt`` is :func:`make_prompt` applied to the document, ``completion`` is
  :func:`format_completion` of the gold fields.

* traffic rows (``traffic/dt=YYYY-MM-DD/part-*.jsonl``, production request logs)::

    {"id": str, "ts": str, "prompt": str, "model": str}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

FIELDS: tuple[str, ...] = ("vendor", "invoice_number", "date", "currency", "total", "vat_id")
"""Output keys, in the order :func:`format_completion` writes them."""

DOMAINS: tuple[str, ...] = ("original", "drifted")
LABELLED_RECORD_KEYS: tuple[str, ...] = ("id", "prompt", "completion", "domain", "labelled_at")
TRAFFIC_RECORD_KEYS: tuple[str, ...] = ("id", "ts", "prompt", "model")

INSTRUCTION = (
    "Extract vendor, invoice_number, date (YYYY-MM-DD), currency, total and vat_id "
    "from the invoice. Answer with JSON only."
)

_DATE_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_CURRENCY_PATTERN = r"^[A-Z]{3}$"
_VAT_ID_PATTERN = r"^[A-Z]{2}[0-9A-Z]{2,12}$"

OUTPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Invoice fields",
    "type": "object",
    "properties": {
        "vendor": {"type": "string", "minLength": 1, "description": "the issuing company"},
        "invoice_number": {"type": "string", "minLength": 1, "description": "as printed"},
        "date": {"type": "string", "format": "date", "pattern": _DATE_PATTERN},
        "currency": {"type": "string", "pattern": _CURRENCY_PATTERN, "description": "ISO 4217"},
        "total": {"type": "number", "minimum": 0, "multipleOf": 0.01},
        "vat_id": {
            "type": ["string", "null"],
            "pattern": _VAT_ID_PATTERN,
            "description": "the vendor's EU VAT identifier, e.g. DE123456789",
        },
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

_CENT = Decimal("0.01")


def make_prompt(document: str) -> str:
    """The user message for one document: the instruction, a blank line, the document."""
    return f"{INSTRUCTION}\n\n{document}"


def _to_cents(value: Any) -> int | None:
    """A total as whole cents (half-up), or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    if not amount.is_finite():
        return None
    return int((amount / _CENT).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_completion(fields: Mapping[str, Any]) -> str:
    """The canonical answer: compact JSON, keys in FIELDS order, ``total`` with 2 decimals."""
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise ValueError(f"cannot format a completion without {missing}")
    cents = _to_cents(fields["total"])
    if cents is None:
        raise ValueError(f"total must be a finite number, got {fields['total']!r}")
    parts = []
    for name in FIELDS:
        if name == "total":
            sign = "-" if cents < 0 else ""
            rendered = f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"
        else:
            rendered = json.dumps(fields[name], ensure_ascii=False)
        parts.append(f"{json.dumps(name)}:{rendered}")
    return "{" + ",".join(parts) + "}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_completion(text: str) -> dict[str, Any] | None:
    """The JSON object a model answered, or None.

    Tolerant of what small models do: surrounding whitespace, a code fence or a few words
    before the object, trailing junk after it. Only the first ``{`` is tried, so a truncated
    object never yields a nested fragment. NaN and Infinity are rejected.
    """
    if not isinstance(text, str):
        return None
    start = text.find("{")
    if start == -1:
        return None
    try:
        obj, _ = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nonempty_string_errors(name: str, value: Any) -> list[str]:
    if not isinstance(value, str):
        return [f"{name}: must be a string, got {type(value).__name__}"]
    if not value.strip():
        return [f"{name}: must not be empty"]
    return []


def _date_errors(value: Any) -> list[str]:
    if not isinstance(value, str):
        return [f"date: must be a string, got {type(value).__name__}"]
    if not re.fullmatch(_DATE_PATTERN, value):
        return [f"date: {value!r} is not YYYY-MM-DD"]
    try:
        date.fromisoformat(value)
    except ValueError:
        return [f"date: {value!r} is not a calendar date"]
    return []


def _total_errors(value: Any) -> list[str]:
    if not _is_number(value):
        return [f"total: must be a number, got {type(value).__name__}"]
    if not math.isfinite(value):
        return [f"total: {value!r} is not finite"]
    errors = []
    if value < 0:
        errors.append(f"total: {value!r} is negative")
    scaled = value * 100
    if abs(scaled - round(scaled)) > 1e-6 * max(1.0, abs(scaled)):
        errors.append(f"total: {value!r} has more than 2 decimals")
    return errors


def _vat_id_errors(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        return [f"vat_id: must be a string or null, got {type(value).__name__}"]
    if not re.fullmatch(_VAT_ID_PATTERN, value):
        return [f"vat_id: {value!r} is not a VAT id like DE123456789"]
    return []


def schema_errors(obj: Any) -> list[str]:
    """Why ``obj`` violates OUTPUT_SCHEMA, one readable reason per problem; [] when valid."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    errors = [f"missing field {name!r}" for name in FIELDS if name not in obj]
    errors += [f"unexpected field {key!r}" for key in obj if key not in FIELDS]
    checks = {
        "vendor": lambda value: _nonempty_string_errors("vendor", value),
        "invoice_number": lambda value: _nonempty_string_errors("invoice_number", value),
        "date": _date_errors,
        "currency": lambda value: (
            []
            if isinstance(value, str) and re.fullmatch(_CURRENCY_PATTERN, value)
            else [f"currency: {value!r} is not a 3-letter uppercase ISO 4217 code"]
        ),
        "total": _total_errors,
        "vat_id": _vat_id_errors,
    }
    for name in FIELDS:
        if name in obj:
            errors += checks[name](obj[name])
    return errors


@dataclass(frozen=True)


class ExampleScore:
    """How one predicted completion compares with the gold one."""

    field_accuracy: float
    """Fraction of FIELDS that match after normalisation; 0 when not valid JSON."""
    exact_match: bool
    """Every field matches (the whole record is right)."""
    valid_json: bool
    """:func:`parse_completion` found a JSON object."""
    schema_ok: bool
    """That object passes :func:`schema_errors`."""
    field_correct: dict[str, bool]


def _normalise_text(value: str) -> str:
    return " ".join(value.split()).casefold()


def field_matches(name: str, predicted: Any, gold: Any) -> bool:
    """Whether one predicted field value counts as right.

    Strings compare after strip, casefold and whitespace collapsing; totals compare to the
    cent whether written as a number or a numeric string; null only equals null.
    """
    if name == "total":
        predicted_cents, gold_cents = _to_cents(predicted), _to_cents(gold)
        return predicted_cents is not None and predicted_cents == gold_cents
    if predicted is None or gold is None:
        return predicted is None and gold is None
    if isinstance(predicted, str) and isinstance(gold, str):
        return _normalise_text(predicted) == _normalise_text(gold)
    return False


def score_completion(predicted: str, gold: str) -> ExampleScore:
    """Score a model's answer against the gold completion (which must itself parse)."""
    gold_obj = parse_completion(gold)
    if gold_obj is None:
        raise ValueError(f"gold completion is not a JSON object: {gold[:80]!r}")
    predicted_obj = parse_completion(predicted)
    if predicted_obj is None:
        return ExampleScore(
            field_accuracy=0.0,
            exact_match=False,
            valid_json=False,
            schema_ok=False,
            field_correct=dict.fromkeys(FIELDS, False),
        )
    correct = {
        name: name in predicted_obj and field_matches(name, predicted_obj[name], gold_obj.get(name))
        for name in FIELDS
    }
    hits = sum(correct.values())
    return ExampleScore(
        field_accuracy=hits / len(FIELDS),
        exact_match=hits == len(FIELDS),
        valid_json=True,
        schema_ok=not schema_errors(predicted_obj),
        field_correct=correct,
    )
