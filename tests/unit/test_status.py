"""`tuneloop status`: the story table (every gate's two models and every performance check, per
slice) and the held-out row shown field by field, read from what the loop stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.config import Settings
from tuneloop.status import collect_story, format_example, format_story, pick_example
from tuneloop.storage import open_store

pytestmark = pytest.mark.unit

FIELDS = ("vendor", "total")


def _answer(vendor: str, total: float) -> str:
    return json.dumps({"vendor": vendor, "total": total}, separators=(",", ":"))


def _eval(store, prefix: str, slices: dict[str, tuple[float, float]], answers: dict[str, tuple[str, str, float]]) -> str:
    """Write summary/scores/predictions of one evaluated model; answers: id -> (slice, vendor, total)."""
    store.put_json(f"{prefix}/summary.json", {"slices": {name: {"n": 2, "score": s, "exact_match": e, "valid_json": 1.0} for name, (s, e) in slices.items()}})
    gold = {"h-d-0": ("Acme GmbH", 10.0), "h-d-1": ("Beta SA", 20.0), "h-o-0": ("Gamma Inc.", 30.0)}
    scores, predictions = [], []
    for row_id, (slice_, vendor, total) in answers.items():
        correct = {"vendor": vendor == gold[row_id][0], "total": total == gold[row_id][1]}
        scores.append({"id": row_id, "slice": slice_, "score": sum(correct.values()) / 2, "field_correct": correct, "exact_match": all(correct.values())})
        predictions.append({"id": row_id, "prediction": _answer(vendor, total)})
    store.put_jsonl(f"{prefix}/scores.jsonl", scores)
    store.put_jsonl(f"{prefix}/predictions.jsonl", predictions)
    return f"{prefix}/scores.jsonl"


@pytest.fixture
def loop_store(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    heldout = {
        "drifted": [("h-d-0", "Acme GmbH", 10.0), ("h-d-1", "Beta SA", 20.0)],
        "original": [("h-o-0", "Gamma Inc.", 30.0)],
    }
    for name, rows in heldout.items():
        store.put_jsonl(f"heldout/{name}.jsonl", [{"id": i, "prompt": f"doc {i}", "completion": _answer(v, t), "domain": name} for i, v, t in rows])
    v1_base = _eval(store, "evals/v1/r1/production", {"original": (0.0, 0.0), "drifted": (0.0, 0.0)}, {})
    v1 = _eval(store, "evals/v1/r1/candidate", {"original": (0.96, 0.9), "drifted": (0.5, 0.1)}, {})
    store.put_json("drift/checks/2026-03-04__r.json", {"as_of": "2026-03-04", "performance": {"checked": True, "production": "v1", "drift": True, "current_scores": _eval(store, "drift/performance/2026-03-04__r", {"original": (0.95, 0.88), "drifted": (0.55, 0.05)}, {})}})
    v2_prod = _eval(store, "evals/v2/r2/production", {"original": (0.96, 0.9), "drifted": (0.5, 0.0)}, {
        "h-d-0": ("drifted", "Acme", 10.0), "h-d-1": ("drifted", "Gamma Inc.", 99.0), "h-o-0": ("original", "Gamma Inc.", 30.0)})
    v2 = _eval(store, "evals/v2/r2/candidate", {"original": (0.97, 0.92), "drifted": (0.98, 0.9)}, {
        "h-d-0": ("drifted", "Acme GmbH", 10.0), "h-d-1": ("drifted", "Beta SA", 20.0), "h-o-0": ("original", "Gamma Inc.", 30.0)})
    gates = {
        "v1": {"version": "v1", "promote": True, "production": {"version": None, "scores_key": v1_base}, "candidate": {"scores_key": v1}},
        "v2": {"version": "v2", "promote": True, "production": {"version": "v1", "scores_key": v2_prod}, "candidate": {"scores_key": v2}},
    }
    from tuneloop import layout

    for version, gate in gates.items():
        store.put_json(layout.gate_decision(version), gate)
    return store, gates


def test_the_story_orders_gates_and_checks_and_reads_each_slice(loop_store) -> None:
    store, _ = loop_store
    story = collect_story(store, ["v1", "v2"])
    assert [(row["stage"], row["model"], row["role"]) for row in story] == [
        ("v1's gate", "base model (zero-shot)", "production"),
        ("v1's gate", "v1", "candidate"),
        ("drift check 2026-03-04", "v1", "fresh labels"),
        ("v2's gate", "v1", "production"),
        ("v2's gate", "v2", "candidate"),
    ]
    assert story[2]["slices"]["drifted"] == {"score": 0.55, "exact_match": 0.05}
    text = "\n".join(format_story(story))
    assert "v1 on fresh labels (fell)" in text
    assert "0.980 (0.90)" in text and "base model (zero-shot)" in text
    assert text.index("drifted") < text.index("original")  # slices as columns, sorted


def test_a_missing_gate_or_summary_leaves_a_gap_not_an_error(loop_store, tmp_path: Path) -> None:
    store, _ = loop_store
    (tmp_path / "store/evals/v1/r1/candidate/summary.json").unlink()
    story = collect_story(store, ["v1", "v2", "v3"])  # v3 was never gated
    assert len(story) == 5 and story[1]["slices"] == {}
    assert "v1                              -" in "\n".join(format_story(story))
    assert format_story([]) == []


def test_the_example_is_a_drifted_row_the_candidate_gets_right_and_production_wrong(loop_store) -> None:
    store, gates = loop_store
    settings = Settings.model_validate({"task": {"format": "prompt_completion", "slice_field": "domain", "metric": "json"}})
    picked = pick_example(settings, store, gates["v2"], ["drifted"])
    assert picked is not None
    assert picked["example"].id == "h-d-1"  # both rows are right for v2; production got h-d-1 more wrong
    example = {"id": "h-d-1", "slice": "drifted", "expected": picked["example"].target, "answers": picked["answers"]}
    text = "\n".join(format_example(example, {"name": "tuneloop", "version": "v2", "answer": _answer("Beta SA", 20.0)}))
    vendor_line = next(line for line in text.splitlines() if line.strip().startswith("vendor"))
    assert '"Gamma Inc." WRONG' in vendor_line and '"Beta SA" ok' in vendor_line
    assert "scores: v1 0.000, v2 1.000" in text
    assert "answers the same row" in text


def test_without_a_gate_the_example_is_the_first_held_out_row(loop_store) -> None:
    store, _ = loop_store
    settings = Settings.model_validate({"task": {"format": "prompt_completion", "slice_field": "domain", "metric": "json"}})
    picked = pick_example(settings, store, None, ["original"])
    assert picked is not None and picked["example"].id == "h-o-0" and picked["answers"] == []
    assert format_example({"id": "h-o-0", "slice": "original", "expected": "x", "answers": []}, None) == []
