"""The invoice demo's task helpers (tuneloop.demo.invoice_task): schema, prompt, canonical
completion, tolerant parsing and scoring; and that the invoice example's config (schema.json,
metric json) scores the way these helpers do. The generic scorers are tested in test_scoring.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.config import TaskSettings, load_settings
from tuneloop.demo.invoice_task import (
    FIELDS,
    INSTRUCTION,
    OUTPUT_SCHEMA,
    format_completion,
    make_prompt,
    parse_completion,
    schema_errors,
    score_completion,
)
from tuneloop.tasks import TaskSpec

pytestmark = pytest.mark.unit

INVOICES = Path(__file__).resolve().parents[2] / "examples" / "invoices"

GOLD_FIELDS = {
    "vendor": "Müller Maschinenbau GmbH",
    "invoice_number": "RE-2026-0412",
    "date": "2026-03-15",
    "currency": "EUR",
    "total": 1234.5,
    "vat_id": "DE123456789",
}
GOLD = format_completion(GOLD_FIELDS)


def _with(**changes: object) -> dict[str, object]:
    return {**GOLD_FIELDS, **changes}


def test_schema_requires_exactly_the_fields() -> None:
    assert OUTPUT_SCHEMA["required"] == list(FIELDS)
    assert list(OUTPUT_SCHEMA["properties"]) == list(FIELDS)
    assert OUTPUT_SCHEMA["additionalProperties"] is False
    assert OUTPUT_SCHEMA["properties"]["vat_id"]["type"] == ["string", "null"]


def test_prompt_is_instruction_blank_line_document() -> None:
    assert make_prompt("INVOICE\nTotal: $5.00") == f"{INSTRUCTION}\n\nINVOICE\nTotal: $5.00"


def test_completion_is_compact_ordered_with_two_decimal_total() -> None:
    assert GOLD == (
        '{"vendor":"Müller Maschinenbau GmbH","invoice_number":"RE-2026-0412",'
        '"date":"2026-03-15","currency":"EUR","total":1234.50,"vat_id":"DE123456789"}'
    )
    shuffled = dict(reversed(list(GOLD_FIELDS.items())))
    assert format_completion(shuffled) == GOLD
    assert '"total":7.00,' in format_completion(_with(total=7))
    assert '"total":0.10,' in format_completion(_with(total="0.1"))
    assert '"vat_id":null}' in format_completion(_with(vat_id=None))


def test_completion_round_trips_through_parse() -> None:
    for fields in (GOLD_FIELDS, _with(vat_id=None, total=980.0), _with(total=0.07)):
        text = format_completion(fields)
        parsed = parse_completion(text)
        assert parsed is not None and format_completion(parsed) == text
        assert schema_errors(parsed) == []


def test_format_completion_refuses_incomplete_fields() -> None:
    with pytest.raises(ValueError, match="vat_id"):
        format_completion({k: v for k, v in GOLD_FIELDS.items() if k != "vat_id"})
    with pytest.raises(ValueError, match="finite"):
        format_completion(_with(total="n/a"))


@pytest.mark.parametrize(
    "text",
    [
        f"  {GOLD}\n",
        f"{GOLD}<|eos|> and some trailing junk }}",
        f"```json\n{GOLD}\n```",
        f"Answer: {GOLD}",
    ],
)
def test_parse_tolerates_what_small_models_add(text: str) -> None:
    assert parse_completion(text) == json.loads(GOLD)


@pytest.mark.parametrize(
    "text",
    ["", "no json here", "[1, 2]", GOLD[:-5], '{"total": NaN}', '"vendor"', "{'vendor': 'x'}"],
)
def test_parse_returns_none_without_a_json_object(text: str) -> None:
    assert parse_completion(text) is None


def test_schema_errors_name_each_problem() -> None:
    assert schema_errors(json.loads(GOLD)) == []
    assert schema_errors([1]) == ["expected a JSON object, got list"]
    cases = {
        "missing field 'vat_id'": {k: v for k, v in GOLD_FIELDS.items() if k != "vat_id"},
        "unexpected field 'notes'": _with(notes="x"),
        "vendor: must not be empty": _with(vendor="  "),
        "invoice_number: must be a string": _with(invoice_number=412),
        "date: '15.03.2026' is not YYYY-MM-DD": _with(date="15.03.2026"),
        "date: '2026-02-30' is not a calendar date": _with(date="2026-02-30"),
        "currency: 'eur' is not": _with(currency="eur"),
        "currency: 'EURO' is not": _with(currency="EURO"),
        "total: must be a number, got str": _with(total="1234.50"),
        "total: must be a number, got bool": _with(total=True),
        "total: 12.345 has more than 2 decimals": _with(total=12.345),
        "total: -5.0 is negative": _with(total=-5.0),
        "vat_id: 'DE 123456789' is not a VAT id": _with(vat_id="DE 123456789"),
        "vat_id: must be a string or null, got int": _with(vat_id=123456789),
    }
    for expected, obj in cases.items():
        errors = schema_errors(obj)
        assert len(errors) == 1 and errors[0].startswith(expected), (expected, errors)


def test_exact_match_scores_one() -> None:
    score = score_completion(GOLD, GOLD)
    assert score.field_accuracy == 1.0
    assert score.exact_match and score.valid_json and score.schema_ok
    assert score.field_correct == dict.fromkeys(FIELDS, True)


def test_one_wrong_field_scores_five_sixths() -> None:
    score = score_completion(format_completion(_with(date="2026-15-03")), GOLD)
    assert score.field_accuracy == pytest.approx(5 / 6)
    assert not score.exact_match
    assert score.field_correct["date"] is False
    assert sum(score.field_correct.values()) == 5
    assert score.schema_ok is False  # month 15 is no calendar date


def test_garbage_scores_zero() -> None:
    score = score_completion("The vendor is Müller and the total is 1234.50 EUR.", GOLD)
    assert score.field_accuracy == 0.0
    assert not (score.valid_json or score.schema_ok or score.exact_match)
    assert not any(score.field_correct.values())


def test_trailing_junk_still_scores() -> None:
    score = score_completion(GOLD + "\n\nI hope this helps!", GOLD)
    assert score.field_accuracy == 1.0 and score.valid_json


def test_totals_compare_numerically_to_the_cent() -> None:
    predicted = GOLD.replace("1234.50", "1234.5")
    assert predicted != GOLD and score_completion(predicted, GOLD).exact_match
    as_string = score_completion(GOLD.replace("1234.50", '"1234.50"'), GOLD)
    assert as_string.field_correct["total"] and not as_string.schema_ok
    for wrong in ("1234.51", '"about 1234"', "null"):
        assert not score_completion(GOLD.replace("1234.50", wrong), GOLD).field_correct["total"]


def test_strings_compare_after_case_and_whitespace_normalisation() -> None:
    predicted = format_completion(_with(vendor="  müller   MASCHINENBAU gmbh "))
    assert score_completion(predicted, GOLD).field_correct["vendor"]
    predicted = format_completion(_with(vendor="Müller Maschinenbau"))
    assert not score_completion(predicted, GOLD).field_correct["vendor"]


def test_null_only_equals_null() -> None:
    gold = format_completion(_with(vat_id=None))
    assert score_completion(gold, gold).field_correct["vat_id"]
    assert not score_completion(format_completion(_with(vat_id="")), gold).field_correct["vat_id"]
    assert not score_completion(GOLD, gold).field_correct["vat_id"]
    assert not score_completion(gold, GOLD).field_correct["vat_id"]


def test_missing_and_extra_keys() -> None:
    obj = {k: v for k, v in json.loads(GOLD).items() if k != "currency"}
    score = score_completion(json.dumps(obj), GOLD)
    assert score.field_correct["currency"] is False
    assert score.field_accuracy == pytest.approx(5 / 6) and not score.schema_ok
    extra = score_completion(json.dumps({**json.loads(GOLD), "notes": "-"}), GOLD)
    assert extra.exact_match and not extra.schema_ok


def test_gold_must_parse() -> None:
    with pytest.raises(ValueError, match="gold completion"):
        score_completion(GOLD, "vendor=Müller")


# --- the invoice example's config: the generic json scorer with the invoice schema -----------


@pytest.fixture(scope="module")
def invoice_spec() -> TaskSpec:
    return TaskSpec(load_settings(INVOICES / "tuneloop.yaml", env={}).task)


def test_the_example_config_declares_the_invoice_task(invoice_spec: TaskSpec) -> None:
    settings = invoice_spec.settings
    assert (settings.format, settings.metric, settings.slice_field) == ("prompt_completion", "json", "domain")
    assert json.loads((INVOICES / "schema.json").read_text()) == OUTPUT_SCHEMA
    assert invoice_spec.scorer.fields == list(FIELDS)
    built = TaskSpec(TaskSettings(format="prompt_completion", slice_field="domain", metric="json", json_schema=str(INVOICES / "schema.json")))
    assert built.scorer.fields == list(FIELDS)


@pytest.mark.parametrize(
    "predicted",
    [
        GOLD,
        format_completion(_with(date="2026-15-03")),
        format_completion(_with(vendor="  müller   MASCHINENBAU gmbh ")),
        format_completion(_with(vendor="Müller Maschinenbau")),
        GOLD.replace("1234.50", "1234.5"),
        GOLD.replace("1234.50", '"1234.50"'),
        GOLD.replace("1234.50", "1234.51"),
        GOLD.replace('"DE123456789"', "null"),
        json.dumps({k: v for k, v in json.loads(GOLD).items() if k != "currency"}),
        json.dumps({**json.loads(GOLD), "notes": "-"}),
        GOLD + "\n\nI hope this helps!",
        "The vendor is Müller and the total is 1234.50 EUR.",
    ],
)
def test_the_generic_json_scorer_agrees_with_the_invoice_scorer(invoice_spec: TaskSpec, predicted: str) -> None:
    demo = score_completion(predicted, GOLD)
    generic = invoice_spec.scorer.score(predicted, GOLD)
    assert generic.score == pytest.approx(demo.field_accuracy)
    assert generic.details["field_correct"] == demo.field_correct
    assert generic.details["exact_match"] == demo.exact_match and generic.details["valid_json"] == demo.valid_json
    assert generic.details["schema_ok"] == demo.schema_ok


def test_the_invoice_schema_refuses_bad_gold_answers(invoice_spec: TaskSpec) -> None:
    assert invoice_spec.check_target(GOLD) == []
    assert invoice_spec.check_target(format_completion(_with(vat_id=None))) == []
    assert invoice_spec.check_target(format_completion(_with(currency="eur"))) == ["completion_schema"]
    assert invoice_spec.check_target(json.dumps({**json.loads(GOLD), "notes": "-"})) == ["completion_schema"]
    assert invoice_spec.check_target(f"Here it is: {GOLD}") == ["completion_not_json"]


@pytest.mark.parametrize("cents", [7, 29, 1234, 236124, 98765])
def test_every_canonical_total_passes_the_invoice_schema(invoice_spec: TaskSpec, cents: int) -> None:
    """format_completion writes totals to the cent; the schema's multipleOf 0.01 must accept
    every such total (schema_errors, the demo's own check, does)."""
    gold = format_completion(_with(total=cents / 100))
    assert schema_errors(json.loads(gold)) == []
    assert invoice_spec.check_target(gold) == [], gold
    assert invoice_spec.scorer.score(gold, gold).details["schema_ok"] is True
