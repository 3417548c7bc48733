"""The generic task layer: reading rows (TaskSpec) and the scorers of ``task.metric``
(exact_match, label, json with a schema of the user's, python), independent of any demo task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.config import TaskSettings
from tuneloop.tasks import DEFAULT_SLICE, Example, TaskRowError, TaskSpec
from tuneloop.tasks.scoring import JsonScorer, ScoringError, parse_json_answer, values_match

pytestmark = pytest.mark.unit

CATALOG_SCHEMA = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "price": {"type": "number", "minimum": 0},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sku", "price", "in_stock", "tags"],
    "additionalProperties": False,
}
GOLD_OBJ = {"sku": "ABC-1234", "price": 12.5, "in_stock": True, "tags": ["garden", "tools"]}
GOLD = json.dumps(GOLD_OBJ)


def _spec(**settings: object) -> TaskSpec:
    return TaskSpec(TaskSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def catalog() -> TaskSpec:
    return _spec(metric="json", json_schema=CATALOG_SCHEMA)


def _answer(**changes: object) -> str:
    return json.dumps({**GOLD_OBJ, **changes})


# --- exact_match ---------------------------------------------------------------------------


def test_exact_match_collapses_whitespace_and_case_unless_told() -> None:
    scorer = _spec().scorer
    assert scorer.name == "exact_match"
    assert scorer.score("  Paris\n", "paris").score == 1.0
    assert scorer.score("New   York", "new york").details == {"exact_match": True}
    assert scorer.score("Paris, France", "Paris").score == 0.0
    assert scorer.normalise(" A  b\tC ") == "a b c"
    assert scorer.check_gold("answer") == [] and scorer.check_gold("  \n") == ["empty_target"]
    assert scorer.agreement("Yes", " yes ") == 1.0 and scorer.agreement("yes", "no") == 0.0
    strict = _spec(case_sensitive=True).scorer
    assert strict.score("paris", "Paris").score == 0.0 and strict.score(" Paris ", "Paris").score == 1.0


# --- label ---------------------------------------------------------------------------------


LABELS = ["billing", "bug report", "account"]


@pytest.fixture(scope="module")
def labels() -> TaskSpec:
    return _spec(metric="label", labels=LABELS)


@pytest.mark.parametrize("answer", ["billing", " Billing.", '"billing"', "BILLING!", "**billing**", "billing\n"])
def test_label_answers_are_normalised_to_the_label(labels: TaskSpec, answer: str) -> None:
    scored = labels.scorer.score(answer, "billing")
    assert scored.score == 1.0 and scored.details == {"predicted": "billing", "gold": "billing", "valid_label": True}
    assert labels.scorer.normalise(answer) == "billing" and labels.scorer.valid(answer)


def test_an_answer_outside_the_set_is_wrong_and_invalid(labels: TaskSpec) -> None:
    scored = labels.scorer.score("The answer is billing", "billing")
    assert scored.score == 0.0 and scored.details["predicted"] is None and not scored.details["valid_label"]
    assert labels.scorer.score("Bug   Report", "bug report").score == 1.0
    assert not labels.scorer.valid("refund")


def test_a_gold_label_outside_the_set_is_refused(labels: TaskSpec) -> None:
    assert labels.scorer.check_gold("Account") == []
    assert labels.scorer.check_gold("refund") == ["label_not_in_set"]
    assert labels.check_target("refund") == ["label_not_in_set"]
    with pytest.raises(ScoringError, match="not one of task.labels"):
        labels.scorer.score("billing", "refund")


def test_label_aggregate_gives_per_label_accuracy_and_macro_f1(labels: TaskSpec) -> None:
    pairs = [("billing", "billing"), ("billing", "billing"), ("account", "billing"), ("account", "account"), ("nonsense", "bug report")]
    rows = [labels.scorer.score(p, g).details for p, g in pairs]
    summary = labels.scorer.aggregate(rows)
    assert summary["per_label"] == {
        "billing": {"n": 3, "accuracy": pytest.approx(2 / 3)},
        "bug report": {"n": 1, "accuracy": 0.0},
        "account": {"n": 1, "accuracy": 1.0},
    }
    # F1: billing P=1 R=2/3 -> 0.8; bug report 0; account P=1/2 R=1 -> 2/3
    assert summary["macro_f1"] == pytest.approx((0.8 + 0.0 + 2 / 3) / 3)
    assert summary["valid_label"] == pytest.approx(4 / 5)
    assert labels.scorer.aggregate([]) == {}


def test_label_metric_needs_a_label_set() -> None:
    with pytest.raises(ValueError, match="task.labels"):
        TaskSettings(metric="label", labels=["only-one"])
    with pytest.raises(ValueError, match="distinct"):
        TaskSettings(metric="label", labels=["a", " a"])


# --- json ----------------------------------------------------------------------------------


def test_json_fields_come_from_the_schema(catalog: TaskSpec) -> None:
    scorer = catalog.scorer
    assert isinstance(scorer, JsonScorer) and scorer.fields == ["sku", "price", "in_stock", "tags"]


def test_a_perfect_answer_scores_one(catalog: TaskSpec) -> None:
    scored = catalog.scorer.score(GOLD, GOLD)
    assert scored.score == 1.0
    assert scored.details["exact_match"] and scored.details["valid_json"] and scored.details["schema_ok"]
    assert scored.details["field_correct"] == dict.fromkeys(CATALOG_SCHEMA["properties"], True)
    # key order, spacing and a price written "12.50" are formatting, not errors
    reordered = json.dumps(dict(reversed(list({**GOLD_OBJ, "price": "12.50"}.items()))), indent=2)
    assert catalog.scorer.score(reordered, GOLD).score == 1.0


def test_a_half_right_answer_scores_one_half(catalog: TaskSpec) -> None:
    scored = catalog.scorer.score(_answer(price=13.0, in_stock=False), GOLD)
    assert scored.score == 0.5
    assert scored.details["field_correct"] == {"sku": True, "price": False, "in_stock": False, "tags": True}
    assert not scored.details["exact_match"] and scored.details["schema_ok"]


@pytest.mark.parametrize("answer", ["", "In stock, 12.50 dollars.", "[1, 2]", GOLD[:-3], '{"price": NaN}', "{'sku': 'ABC-1234'}"])
def test_an_answer_that_is_no_json_object_scores_zero(catalog: TaskSpec, answer: str) -> None:
    scored = catalog.scorer.score(answer, GOLD)
    assert scored.score == 0.0
    assert not (scored.details["valid_json"] or scored.details["schema_ok"] or scored.details["exact_match"])
    assert not any(scored.details["field_correct"].values())
    assert not catalog.scorer.valid(answer)


def test_numbers_compare_by_value() -> None:
    assert values_match("12.50", 12.5) and values_match(12.5, "12.50") and values_match(12, 12.0)
    assert values_match(1e2, 100) and values_match("1e2", 100)
    assert not values_match(12.51, 12.5) and not values_match("about 12.5", 12.5)
    assert not values_match("12.50", "12.5")  # two strings compare as text
    assert not values_match(True, 1) and not values_match(1, True) and values_match(True, True)


def test_iso_dates_compare_as_dates() -> None:
    assert values_match("2026-03-05T10:00:00Z", "2026-03-05T10:00:00+00:00")
    assert values_match("2026-03-05T11:00:00+01:00", "2026-03-05T10:00:00Z")
    assert values_match("2026-03-05", "2026-03-05")
    assert not values_match("2026-03-05", "2026-05-03")
    assert not values_match("05.03.2026", "2026-03-05")


def test_strings_lists_objects_and_null() -> None:
    assert values_match("  Garden  TOOLS ", "garden tools")
    assert values_match(["a", "B"], ["A", "b"]) and not values_match(["b", "a"], ["a", "b"]) and not values_match(["a"], ["a", "b"])
    assert values_match({"x": 1, "y": "Z"}, {"y": "z", "x": "1.0"}) and not values_match({"x": 1}, {"x": 1, "y": 2})
    assert values_match(None, None) and not values_match("", None) and not values_match(None, "x")


def test_prediction_chatter_is_tolerated_gold_chatter_refused(catalog: TaskSpec) -> None:
    chatty = f"Sure! Here is the product:\n```json\n{GOLD}\n```\nAnything else?"
    assert parse_json_answer(chatty) == GOLD_OBJ
    assert catalog.scorer.score(chatty, GOLD).score == 1.0
    assert catalog.scorer.check_gold(chatty) == ["completion_not_json"]
    assert catalog.scorer.check_gold(f"{GOLD} Thanks") == ["completion_not_json"]
    assert catalog.scorer.check_gold(GOLD) == [] and catalog.scorer.check_gold(f"  ```json\n{GOLD}\n```  ") == []
    assert catalog.scorer.check_gold('["not", "an", "object"]') == ["completion_not_json"]
    assert catalog.scorer.check_gold('{"price": NaN}') == ["completion_not_json"]


def test_schema_violations_are_reported(catalog: TaskSpec) -> None:
    for bad in (_answer(sku="abc-1"), _answer(price=-1), _answer(in_stock="yes"), _answer(tags="garden"), _answer(colour="red")):
        scored = catalog.scorer.score(bad, GOLD)
        assert scored.details["valid_json"] and scored.details["schema_ok"] is False, bad
        assert catalog.scorer.check_gold(bad) == ["completion_schema"], bad
    missing = json.dumps({k: v for k, v in GOLD_OBJ.items() if k != "tags"})
    scored = catalog.scorer.score(missing, GOLD)
    assert scored.score == 0.75 and scored.details["schema_ok"] is False and scored.details["field_correct"]["tags"] is False
    assert catalog.scorer.schema_errors({**GOLD_OBJ, "price": "12.50"}) == ["price: '12.50' is not of type 'number'"]


def test_json_without_a_schema_scores_the_gold_keys() -> None:
    scorer = _spec(metric="json").scorer
    assert scorer.score('{"a": 1, "b": 2, "extra": 3}', '{"a": 1, "b": 3}').score == 0.5
    assert scorer.check_gold('{"anything": true}') == [] and scorer.score('{"a": 1}', '{"a": 1}').details["schema_ok"]
    assert scorer.agreement('{"a": "X"}', '{"a": "x"}') == 1.0 and scorer.agreement("junk", '{"a": 1}') == 0.0


def test_the_schema_may_be_a_file_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "catalog.json").write_text(json.dumps(CATALOG_SCHEMA))
    spec = TaskSpec(TaskSettings(metric="json", json_schema="catalog.json"), base_dir=str(tmp_path))
    assert spec.scorer.fields == ["sku", "price", "in_stock", "tags"]
    with pytest.raises(ScoringError, match="cannot read"):
        _ = TaskSpec(TaskSettings(metric="json", json_schema=str(tmp_path / "missing.json"))).scorer
    with pytest.raises(ScoringError, match="not a valid JSON Schema"):
        _ = _spec(metric="json", json_schema={"type": "no-such-type"}).scorer


def test_json_aggregate_and_grounding(catalog: TaskSpec) -> None:
    example = Example("p1", [{"role": "user", "content": "Garden tools, SKU ABC-1234, 12.50, tags: garden, tools"}], GOLD, "all")
    grounded = catalog.scorer.score(GOLD, GOLD, example)
    invented = catalog.scorer.score(_answer(tags=["garden", "kitchen"]), GOLD, example)
    assert grounded.details["grounded"] == 1.0 and invented.details["grounded"] == pytest.approx(2 / 3)
    rows = [grounded.details, invented.details, catalog.scorer.score("no", GOLD, example).details]
    summary = catalog.scorer.aggregate(rows)
    assert summary["exact_match"] == pytest.approx(1 / 3) and summary["valid_json"] == pytest.approx(2 / 3)
    assert summary["field_accuracy"] == {"in_stock": pytest.approx(2 / 3), "price": pytest.approx(2 / 3), "sku": pytest.approx(2 / 3), "tags": pytest.approx(1 / 3)}
    assert summary["hallucination_rate"] == pytest.approx(1 - (1 + 2 / 3) / 2)


# --- python --------------------------------------------------------------------------------


def test_python_scorer_imports_the_users_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_scoring.py").write_text(
        "def score(prediction, gold, example):\n"
        "    same = prediction.strip() == gold.strip()\n"
        "    return (1.0 if same else 0.25), {'same': same, 'slice': example.slice if example else None}\n"
        "def plain(prediction, gold, example):\n"
        "    return len(prediction) / 10\n"
        "def broken(prediction, gold, example):\n"
        "    raise KeyError('nope')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec(metric="python", scorer="my_scoring:score")
    example = Example("e", [{"role": "user", "content": "q"}], "yes", "eu")
    assert spec.scorer.score(" yes ", "yes", example).score == 1.0
    assert spec.scorer.score("no", "yes", example).details == {"same": False, "slice": "eu"}
    assert _spec(metric="python", scorer="my_scoring:plain").scorer.score("12345", "x").score == 0.5
    with pytest.raises(ScoringError, match="must return a number in"):
        _spec(metric="python", scorer="my_scoring:plain").scorer.score("x" * 11, "x")
    with pytest.raises(ScoringError, match="raised KeyError"):
        _spec(metric="python", scorer="my_scoring:broken").scorer.score("x", "x")
    with pytest.raises(ScoringError, match="has no function"):
        _ = _spec(metric="python", scorer="my_scoring:missing").scorer
    with pytest.raises(ScoringError, match="cannot import"):
        _ = _spec(metric="python", scorer="no_such_module_here:score").scorer
    with pytest.raises(ValueError, match="module:function"):
        TaskSettings(metric="python", scorer="not dotted")
    with pytest.raises(ValueError, match="task.scorer"):
        TaskSettings(metric="python")


# --- reading rows --------------------------------------------------------------------------


def test_prompt_completion_rows_with_and_without_a_system_prompt() -> None:
    row = {"id": 7, "prompt": "What is 2+2?", "completion": "4", "region": "eu"}
    plain = _spec().example(row)
    assert plain == Example("7", [{"role": "user", "content": "What is 2+2?"}], "4", DEFAULT_SLICE)
    with_system = _spec(system_prompt="Answer briefly.", slice_field="region").example(row)
    assert with_system.context == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    assert with_system.slice == "eu" and with_system.input_text == "What is 2+2?"
    renamed = _spec(prompt_field="question", completion_field="answer", id_field="key").example({"key": "k", "question": "q", "answer": "a"})
    assert (renamed.id, renamed.context[-1]["content"], renamed.target) == ("k", "q", "a")


def test_messages_rows_with_and_without_a_system_turn() -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "my bill?"}, {"role": "assistant", "content": "billing"}]
    chat = _spec(format="messages")
    example = chat.example({"id": "c1", "messages": turns})
    assert example.context == [{"role": t["role"], "content": t["content"]} for t in turns[:-1]] and example.target == "billing"
    assert example.input_text == "hi\nhello\nmy bill?"
    defaulted = _spec(format="messages", system_prompt="Be kind.").example({"id": "c1", "messages": turns})
    assert defaulted.context[0] == {"role": "system", "content": "Be kind."} and defaulted.context[1:] == example.context
    own = [{"role": "system", "content": "Row's own."}, *turns]
    kept = _spec(format="messages", system_prompt="Be kind.").example({"id": "c1", "messages": own})
    assert kept.context[0] == {"role": "system", "content": "Row's own."} and len(kept.context) == 4
    assert kept.input_text == example.input_text  # the system turn is no input


def test_traffic_rows_carry_the_context_only() -> None:
    chat = _spec(format="messages", system_prompt="S")
    traffic = chat.example({"id": "t", "messages": [{"role": "user", "content": "help"}]}, labelled=False)
    assert traffic.target is None and traffic.context == [{"role": "system", "content": "S"}, {"role": "user", "content": "help"}]
    answered = chat.example({"id": "t", "messages": [{"role": "user", "content": "help"}, {"role": "assistant", "content": "ok"}]}, labelled=False)
    assert answered.context[-1] == {"role": "user", "content": "help"}  # the answer given is dropped
    assert _spec().example({"id": "t", "prompt": "p"}, labelled=False).target is None
    assert _spec().input_text({"id": "t", "prompt": "p"}) == "p" and _spec().input_text({"id": "t"}) is None


@pytest.mark.parametrize(
    ("settings", "record", "reason"),
    [
        ({}, {"prompt": "p", "completion": "c"}, "missing_field:id"),
        ({}, {"id": True, "prompt": "p", "completion": "c"}, "bad_type_or_empty:id"),
        ({}, {"id": " ", "prompt": "p", "completion": "c"}, "bad_type_or_empty:id"),
        ({}, {"id": "a", "completion": "c"}, "missing_field:prompt"),
        ({}, {"id": "a", "prompt": "p"}, "missing_field:completion"),
        ({}, {"id": "a", "prompt": ["p"], "completion": "c"}, "bad_type_or_empty:prompt"),
        ({"format": "messages"}, {"id": "a"}, "missing_field:messages"),
        ({"format": "messages"}, {"id": "a", "messages": []}, "bad_type_or_empty:messages"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "user", "content": "x"}]}, "no_final_assistant"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "bad_role"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "bad_turn"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}, "bad_turn"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "empty_target"),
        ({"format": "messages"}, {"id": "a", "messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}, "no_user_turn"),
    ],
)
def test_rows_that_do_not_fit_the_format_name_the_reason(settings: dict[str, object], record: dict[str, object], reason: str) -> None:
    with pytest.raises(TaskRowError) as raised:
        _spec(**settings).example(record)
    assert raised.value.reason == reason


def test_slices_come_from_the_slice_field() -> None:
    spec = _spec(slice_field="customer")
    row = {"id": "a", "prompt": "p", "completion": "c"}
    assert spec.slice_of({**row, "customer": " acme "}) == "acme"
    assert spec.slice_of({**row, "customer": 42}) == "42"
    for missing in ({}, {"customer": None}, {"customer": ""}, {"customer": ["x"]}, {"customer": {"a": 1}}):
        assert spec.slice_of({**row, **missing}) == DEFAULT_SLICE
    assert len(spec.slice_of({**row, "customer": "x" * 500})) == 120
    assert _spec().slice_of({**row, "customer": "acme"}) == DEFAULT_SLICE  # no slice field: one slice


def test_writing_an_answer_back_keeps_the_format() -> None:
    chat = _spec(format="messages")
    row = {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "old"}]}
    assert chat.with_target(row, "new")["messages"][-1] == {"role": "assistant", "content": "new"}
    assert row["messages"][-1]["content"] == "old"  # a copy
    assert chat.with_target({"id": "a", "messages": [{"role": "user", "content": "x"}]}, "new")["messages"][-1]["content"] == "new"
    assert _spec().with_target({"id": "a", "prompt": "p"}, "c")["completion"] == "c"
    upper = chat.map_texts(row, str.upper, inputs_only=True)
    assert [t["content"] for t in upper["messages"]] == ["X", "old"]
    assert _spec().map_texts({"prompt": "p", "completion": "c"}, str.upper) == {"prompt": "P", "completion": "C"}
