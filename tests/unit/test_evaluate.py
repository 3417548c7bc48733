"""Evaluation: per-example rows and per-slice summaries, files the gate reads, HF generation."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pathlib import Path  # noqa: E402

from tuneloop.config import EvalSettings, load_settings  # noqa: E402
from tuneloop.demo.basemodel import build_demo_model  # noqa: E402
from tuneloop.demo.invoices import heldout_sets  # noqa: E402
from tuneloop.ml.backends import generate_hf  # noqa: E402
from tuneloop.ml.evaluate import EvaluationError, evaluate_adapter, evaluate_records, read_examples  # noqa: E402
from tuneloop.tasks import TaskSpec  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

pytestmark = pytest.mark.ml

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"id", "slice", "score", "exact_match", "valid_json", "schema_ok", "field_correct", "grounded"}
SPEC = TaskSpec(load_settings(str(ROOT / "examples/invoices/tuneloop.yaml")).task)


def score(records: list[dict[str, Any]], answers: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return evaluate_records(SPEC, read_examples(SPEC, records), answers)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.getbasetemp() / "tiny-model", preset="tiny", progress=lambda _: None)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    sets = heldout_sets(0, 3)
    return sets["original"] + sets["drifted"]


def test_perfect_predictions_score_one(records: list[dict[str, Any]]) -> None:
    rows, summary = score(records, [record["completion"] for record in records])
    assert [row["id"] for row in rows] == [record["id"] for record in records]
    assert all(set(row) == ROW_KEYS for row in rows)
    assert all(row["score"] == 1.0 and row["exact_match"] and row["schema_ok"] for row in rows)
    assert summary["n"] == 6 and summary["metric"] == "json"
    assert set(summary["slices"]) == {"original", "drifted"}
    for stats in [*summary["slices"].values(), summary["overall"]]:
        assert stats["score"] == stats["exact_match"] == stats["valid_json"] == 1.0
        assert set(stats["field_accuracy"].values()) == {1.0}
    assert summary["slices"]["original"]["n"] == 3


def test_empty_predictions_score_zero(records: list[dict[str, Any]]) -> None:
    rows, summary = score(records, [""] * len(records))
    assert all(row["score"] == 0.0 and not row["valid_json"] for row in rows)
    overall = summary["overall"]
    assert (overall["n"], overall["score"], overall["exact_match"], overall["valid_json"], overall["schema_ok"]) == (6, 0.0, 0.0, 0.0, 0.0)
    assert overall["hallucination_rate"] is None, "no answer strings: nothing to ground"


def test_partial_answers_are_scored_per_slice(records: list[dict[str, Any]]) -> None:
    # Right on the original slice, a wrong total on the drifted one.
    def damage(completion: str) -> str:
        fields = json.loads(completion)
        fields["total"] = fields["total"] + 1
        return json.dumps(fields)

    answers = [r["completion"] if r["domain"] == "original" else damage(r["completion"]) for r in records]
    rows, summary = score(records, answers)
    assert {row["slice"] for row in rows} == {"original", "drifted"}
    assert summary["slices"]["original"]["score"] == 1.0
    assert summary["slices"]["drifted"]["score"] == pytest.approx(5 / 6)
    assert summary["slices"]["drifted"]["exact_match"] == 0.0
    assert summary["slices"]["drifted"]["field_accuracy"]["total"] == 0.0
    assert summary["overall"]["score"] == pytest.approx((1.0 + 5 / 6) / 2)


def test_mismatched_or_bad_input_is_refused(records: list[dict[str, Any]]) -> None:
    with pytest.raises(EvaluationError, match="2 completions for 6 records"):
        score(records, ["", ""])
    with pytest.raises(EvaluationError, match="no records"):
        score([], [])
    with pytest.raises(EvaluationError, match=r"do not fit task.format=prompt_completion: \['x: missing_field:completion'\]"):
        score([{"id": "x", "prompt": "p"}], ["{}"])


def test_evaluate_adapter_writes_scores_and_summary(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    gold = {record["prompt"]: record["completion"] for record in records}
    seen: list[Sequence[Any]] = []

    def oracle(prompts: Sequence[Any]) -> list[str]:
        seen.append(prompts)
        return [gold[prompt[-1]["content"]] for prompt in prompts]  # the conversation's user turn

    summary = evaluate_adapter(tiny_model, None, records, tmp_path, EvalSettings(), SPEC, backend="oracle", generate=oracle)
    assert len(seen) == 1 and len(seen[0]) == 6
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [record["id"] for record in records]
    assert all(set(line) == ROW_KEYS and line["score"] == 1.0 for line in lines)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["overall"]["score"] == summary["overall"]["score"] == 1.0
    assert on_disk["provenance"]["task"]["metric"] == "json"
    assert on_disk["throughput"]["backend"] == "oracle"
    assert on_disk["throughput"]["generated_tokens"] > 0
    assert on_disk["provenance"]["base_model"] == str(tiny_model)
    predictions = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert json.loads(predictions[0])["prediction"] == records[0]["completion"]


def test_a_non_hf_backend_needs_a_generate_callable(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="needs a generate callable"):
        evaluate_adapter(tiny_model, None, records, tmp_path, EvalSettings(), SPEC, backend="vllm")


def test_generate_hf_batches_with_left_padding(tiny_model: Path, records: list[dict[str, Any]]) -> None:
    settings = EvalSettings(max_new_tokens=12, batch_size=4)
    prompts = [records[0]["prompt"], "Total: 5", records[4]["prompt"]]
    batched = generate_hf(tiny_model, None, prompts, settings, progress=lambda _: None)
    assert len(batched) == 3 and all(isinstance(text, str) for text in batched)
    # Padding must not change answers: each prompt alone gives the same greedy text.
    alone = [generate_hf(tiny_model, None, [p], settings, progress=lambda _: None)[0] for p in prompts]
    assert batched == alone
    assert not any("<|eos|>" in text or "<|end|>" in text for text in batched)


def test_hf_backend_end_to_end_with_an_adapter(tiny_model: Path, records: list[dict[str, Any]], tmp_path: Path) -> None:
    from tuneloop.config import TrainingSettings
    from tuneloop.ml.train import train_lora

    adapter = tmp_path / "adapter"
    train_lora(tiny_model, records, adapter, TrainingSettings(max_steps=2, batch_size=4, max_seq_len=512), progress=lambda _: None)
    summary = evaluate_adapter(tiny_model, adapter, records, tmp_path / "eval", EvalSettings(max_new_tokens=8), SPEC, progress=lambda _: None)
    assert summary["n"] == 6 and summary["backend"] == "hf"
    assert 0.0 <= summary["overall"]["score"] <= 1.0
    assert summary["throughput"]["examples_per_second"] > 0
    assert len(summary["provenance"]["adapter_hash"]) == 64
