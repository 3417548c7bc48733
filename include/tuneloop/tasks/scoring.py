"""The task's scorer: one number in [0, 1] per example, the gate's paired statistic.

``task.metric`` picks one:

* ``exact_match``: the answer equals the gold after whitespace collapsing (and casefolding,
  unless ``task.case_sensitive``);
* ``label``: a closed label set (``task.labels``); reports per-label accuracy and macro-F1;
* ``json``: per-field match of a JSON object (strings normalised, numbers by value, ISO dates
  as dates), with schema validity (``task.json_schema``) and grounding (the share of the
  answer's string values found in the input) beside it;
* ``text``: chrF (sacrebleu), for free text such as a persona's replies;
* ``judge``: an LLM judge behind any OpenAI-compatible endpoint (see :mod:`tuneloop.tasks.judge`);
* ``python``: the user's own ``module:function``.

Every scorer also gives :meth:`Scorer.normalise` (the canonical form two answers are compared
in: the consistency suite, deploy-time answer agreement) and :meth:`Scorer.check_gold`
(why a gold answer cannot be scored: intake quarantines such rows).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from tuneloop.config import TaskSettings
    from tuneloop.tasks.spec import Example


class ScoringError(ValueError):
    """A score cannot be computed (bad scorer, unreachable judge...); the message says why."""


@dataclass(frozen=True)
class Scored:
    """One example's score and what the metric reports beside it."""

    score: float
    details: dict[str, Any] = field(default_factory=dict)


def collapse(text: str, *, casefold: bool = True) -> str:
    """Whitespace runs to one space, stripped; casefolded unless told otherwise."""
    collapsed = " ".join(text.split())
    return collapsed.casefold() if casefold else collapsed


class Scorer:
    """Base: exact text equality. Subclasses override what differs."""

    name = "exact_match"

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings

    def normalise(self, text: str) -> str:
        return collapse(text, casefold=not self.settings.case_sensitive)

    def check_gold(self, gold: str) -> list[str]:
        return [] if gold.strip() else ["empty_target"]

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        same = self.normalise(prediction) == self.normalise(gold)
        return Scored(1.0 if same else 0.0, {"exact_match": same})

    def score_batch(self, predictions: Sequence[str], golds: Sequence[str], examples: Sequence[Example | None]) -> list[Scored]:
        return [self.score(p, g, e) for p, g, e in zip(predictions, golds, examples, strict=True)]

    def valid(self, answer: str) -> bool:
        """Whether an answer has the task's form (a JSON object, a label of the set...)."""
        return True

    def agreement(self, answer: str, expected: str) -> float:
        """How far a served answer agrees with the one evaluation measured (deploy checks)."""
        return 1.0 if self.normalise(answer) == self.normalise(expected) else 0.0

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Summary metrics beyond the mean score, from the rows' details."""
        return {}


# --- label ---------------------------------------------------------------------------------

_EDGE_PUNCT = "\"'`.,;:!?()[]{}<> \n\t*"


class LabelScorer(Scorer):
    """A closed label set: the answer (quotes, punctuation and case aside) must be the gold label."""

    name = "label"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.labels = list(settings.labels)
        self._by_key = {self._key(label): label for label in self.labels}

    def _key(self, text: str) -> str:
        return collapse(text.strip(_EDGE_PUNCT), casefold=not self.settings.case_sensitive)

    def parse(self, text: str) -> str | None:
        """The label an answer names, or None when it names none of the set."""
        return self._by_key.get(self._key(text))

    def normalise(self, text: str) -> str:
        return self.parse(text) or self._key(text)

    def check_gold(self, gold: str) -> list[str]:
        return [] if self.parse(gold) is not None else ["label_not_in_set"]

    def valid(self, answer: str) -> bool:
        return self.parse(answer) is not None

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        predicted, expected = self.parse(prediction), self.parse(gold)
        if expected is None:
            raise ScoringError(f"gold answer {gold[:60]!r} is not one of task.labels {self.labels}")
        return Scored(1.0 if predicted == expected else 0.0, {"predicted": predicted, "gold": expected, "valid_label": predicted is not None})

    def agreement(self, answer: str, expected: str) -> float:
        return 1.0 if self.normalise(answer) == self.normalise(expected) else 0.0

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {}
        gold = Counter(str(r.get("gold")) for r in rows)
        predicted = Counter(str(r.get("predicted")) for r in rows if r.get("predicted") is not None)
        hits = Counter(str(r.get("gold")) for r in rows if r.get("predicted") == r.get("gold"))
        per_label, f1s = {}, []
        for label in self.labels:
            recall = hits[label] / gold[label] if gold[label] else None
            precision = hits[label] / predicted[label] if predicted[label] else None
            if gold[label] or predicted[label]:
                p, r = precision or 0.0, recall or 0.0
                f1s.append(2 * p * r / (p + r) if p + r else 0.0)
            per_label[label] = {"n": gold[label], "accuracy": recall}
        return {
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "valid_label": sum(bool(r.get("valid_label")) for r in rows) / len(rows),
            "per_label": per_label,
        }


# --- json ----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_json_answer(text: str) -> dict[str, Any] | None:
    """The JSON object a model answered, or None.

    Tolerant of what small models do (whitespace, a code fence or a few words before the
    object, junk after it); only the first ``{`` is tried, so a truncated object never yields a
    nested fragment. NaN and Infinity are rejected.
    """
    if not isinstance(text, str):
        return None
    start = text.find("{")
    if start == -1:
        return None
    try:
        obj, _ = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_json_strict(text: str) -> dict[str, Any] | None:
    """The JSON object that is the whole text (whitespace and one code fence aside), or None:
    a gold answer with chatter around it would teach the chatter."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _as_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return Decimal(str(value))
    if isinstance(value, str) and _NUMERIC.match(value.strip()):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _as_date(value: Any) -> date | datetime | None:
    if not isinstance(value, str) or not _ISO_DATE.match(value.strip()):
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    except ValueError:
        return None


def values_match(predicted: Any, gold: Any, *, casefold: bool = True) -> bool:
    """One field's value against the gold: numbers by value (``12.5`` == ``"12.50"``), ISO dates
    as dates, strings after whitespace collapsing and casefolding, objects and lists member by
    member, null only equals null."""
    if gold is None or predicted is None:
        return gold is None and predicted is None
    if isinstance(gold, bool) or isinstance(predicted, bool):
        return predicted is gold
    gold_number, predicted_number = _as_decimal(gold), _as_decimal(predicted)
    if gold_number is not None and predicted_number is not None and (not isinstance(gold, str) or not isinstance(predicted, str)):
        return abs(gold_number - predicted_number) <= Decimal("1e-9") * max(Decimal(1), abs(gold_number))
    gold_date, predicted_date = _as_date(gold), _as_date(predicted)
    if gold_date is not None and predicted_date is not None:
        return gold_date == predicted_date
    if isinstance(gold, str) and isinstance(predicted, str):
        return collapse(gold, casefold=casefold) == collapse(predicted, casefold=casefold)
    if isinstance(gold, dict) and isinstance(predicted, dict):
        return gold.keys() == predicted.keys() and all(values_match(predicted[k], gold[k], casefold=casefold) for k in gold)
    if isinstance(gold, list) and isinstance(predicted, list):
        return len(gold) == len(predicted) and all(values_match(p, g, casefold=casefold) for p, g in zip(predicted, gold, strict=True))
    return False


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


class JsonScorer(Scorer):
    """Per-field match of a JSON object; schema validity and grounding reported beside it."""

    name = "json"

    def __init__(self, settings: TaskSettings, *, base_dir: str | None = None) -> None:
        super().__init__(settings)
        self.schema = load_json_schema(settings.json_schema, base_dir=base_dir)
        self._validator: Any = None
        if self.schema is not None:
            import jsonschema

            validator_class = jsonschema.validators.validator_for(self.schema)
            try:
                validator_class.check_schema(self.schema)
            except jsonschema.SchemaError as err:
                raise ScoringError(f"task.json_schema is not a valid JSON Schema: {err.message}") from None
            exact = jsonschema.validators.extend(validator_class, {"multipleOf": _decimal_multiple_of})
            self._validator = exact(self.schema, format_checker=jsonschema.FormatChecker())
        properties = (self.schema or {}).get("properties")
        self.fields: list[str] | None = list(settings.json_fields or (properties.keys() if isinstance(properties, dict) else [])) or None

    def schema_errors(self, obj: Any) -> list[str]:
        """Why ``obj`` violates the schema, one line per problem ([] without a schema)."""
        if self._validator is None:
            return []
        errors = sorted(self._validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"[:200] for e in errors[:10]]

    def normalise(self, text: str) -> str:
        obj = parse_json_answer(text)
        if obj is None:
            return collapse(text)
        return json.dumps(_canonical(obj), sort_keys=True, ensure_ascii=False)

    def valid(self, answer: str) -> bool:
        return parse_json_answer(answer) is not None

    def check_gold(self, gold: str) -> list[str]:
        obj = parse_json_strict(gold)
        if obj is None:
            return ["completion_not_json"]
        return ["completion_schema"] if self.schema_errors(obj) else []

    def _fields(self, gold: Mapping[str, Any]) -> list[str]:
        return self.fields or list(gold.keys())

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        gold_obj = parse_json_answer(gold)
        if gold_obj is None:
            raise ScoringError(f"gold answer is not a JSON object: {gold[:80]!r}")
        names = self._fields(gold_obj)
        predicted = parse_json_answer(prediction)
        if predicted is None:
            return Scored(0.0, {"valid_json": False, "schema_ok": False, "exact_match": False, "field_correct": dict.fromkeys(names, False), "grounded": None})
        correct = {name: name in predicted and values_match(predicted[name], gold_obj.get(name)) for name in names}
        hits = sum(correct.values())
        grounded = None
        if example is not None:
            source = collapse(example.input_text)
            values = [collapse(s) for s in _strings(predicted) if len(s.strip()) >= 2 and _as_date(s) is None and _as_decimal(s) is None]
            grounded = sum(value in source for value in values) / len(values) if values else None
        return Scored(
            hits / len(names) if names else float(values_match(predicted, gold_obj)),
            {"valid_json": True, "schema_ok": not self.schema_errors(predicted), "exact_match": hits == len(names), "field_correct": correct, "grounded": grounded},
        )

    def agreement(self, answer: str, expected: str) -> float:
        if parse_json_answer(expected) is not None and parse_json_answer(answer) is not None:
            return self.score(answer, expected).score
        return super().agreement(answer, expected)

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            return {}
        n = len(rows)
        fields: dict[str, list[bool]] = {}
        for row in rows:
            for name, ok in (row.get("field_correct") or {}).items():
                fields.setdefault(name, []).append(bool(ok))
        grounded = [float(row["grounded"]) for row in rows if row.get("grounded") is not None]
        return {
            "exact_match": sum(bool(r.get("exact_match")) for r in rows) / n,
            "valid_json": sum(bool(r.get("valid_json")) for r in rows) / n,
            "schema_ok": sum(bool(r.get("schema_ok")) for r in rows) / n,
            "field_accuracy": {name: sum(oks) / len(oks) for name, oks in sorted(fields.items())},
            "hallucination_rate": 1 - sum(grounded) / len(grounded) if grounded else None,
        }


def _decimal_multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    """``multipleOf`` in decimal arithmetic: 0.07 is a multiple of 0.01 (in binary floating
    point ``0.07 / 0.01`` is 7.000000000000001, and jsonschema's float check refuses it)."""
    import jsonschema

    if not validator.is_type(instance, "number"):
        return
    try:
        remainder = Decimal(str(instance)) % Decimal(str(divisor))
    except InvalidOperation:
        return
    if remainder != 0:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor}")


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    number = _as_decimal(value)
    if number is not None and not isinstance(value, str):
        return format(number.normalize(), "f")
    if isinstance(value, str):
        return collapse(value)
    return value


def load_json_schema(source: str | Mapping[str, Any] | None, *, base_dir: str | None = None) -> dict[str, Any] | None:
    """``task.json_schema``: an inline mapping, a JSON/YAML file, or None."""
    if source is None:
        return None
    if not isinstance(source, str):
        return dict(source)
    path = Path(source)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = Path(base_dir) / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ScoringError(f"task.json_schema: cannot read {path}: {err.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            from tuneloop.config import load_yaml

            loaded = load_yaml(text, str(path))
        else:
            loaded = json.loads(text)
    except ValueError as err:
        raise ScoringError(f"task.json_schema: {path} is not valid JSON/YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ScoringError(f"task.json_schema: {path} must hold a JSON Schema object")
    return loaded


# --- text ----------------------------------------------------------------------------------


class ChrfScorer(Scorer):
    """chrF (character n-gram F-score, sacrebleu), scaled to [0, 1]: for free-text answers."""

    name = "text"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        try:
            from sacrebleu.metrics import CHRF
        except ImportError as err:
            raise ScoringError(f"task.metric=text needs sacrebleu ({err}); it is in both of tuneloop's lock files: run `make setup`") from None
        self._chrf = CHRF()

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        value = self._chrf.sentence_score(prediction.strip(), [gold.strip()]).score / 100.0
        return Scored(min(1.0, max(0.0, value)), {"exact_match": self.normalise(prediction) == self.normalise(gold)})

    def agreement(self, answer: str, expected: str) -> float:
        return self.score(answer, expected).score

    def aggregate(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"exact_match": sum(bool(r.get("exact_match")) for r in rows) / len(rows)} if rows else {}


# --- the user's own ------------------------------------------------------------------------


class PythonScorer(Scorer):
    """``task.scorer: module:function``; the function gets ``(prediction, gold, example)`` and
    returns a float in [0, 1] or ``(float, details_dict)``."""

    name = "python"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        assert settings.scorer is not None
        module_name, function_name = settings.scorer.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ScoringError(f"task.scorer {settings.scorer}: cannot import {module_name} ({err}); is it on PYTHONPATH in both environments?") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ScoringError(f"task.scorer {settings.scorer}: {module_name} has no function {function_name}")
        self._function: Callable[..., Any] = function

    def score(self, prediction: str, gold: str, example: Example | None = None) -> Scored:
        try:
            result = self._function(prediction, gold, example)
        except Exception as err:
            raise ScoringError(f"task.scorer {self.settings.scorer} raised {type(err).__name__}: {err}") from err
        value, details = result if isinstance(result, tuple) else (result, {})
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise ScoringError(f"task.scorer {self.settings.scorer} returned {value!r}; it must return a number in [0, 1]")
        return Scored(float(value), dict(details or {}))


def make_scorer(settings: TaskSettings, *, base_dir: str | None = None) -> Scorer:
    """The scorer ``task.metric`` names."""
    if settings.metric == "exact_match":
        return Scorer(settings)
    if settings.metric == "label":
        return LabelScorer(settings)
    if settings.metric == "json":
        return JsonScorer(settings, base_dir=base_dir)
    if settings.metric == "text":
        return ChrfScorer(settings)
    if settings.metric == "python":
        return PythonScorer(settings)
    if settings.metric == "judge":
        from tuneloop.tasks.judge import JudgeScorer

        return JudgeScorer(settings)
    raise ScoringError(f"unknown task.metric {settings.metric!r}")
