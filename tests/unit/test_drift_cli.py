"""`tuneloop drift` on JSONL windows: the output contract, skipped lines, clear input errors."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tuneloop.cli import main
from tuneloop.demo.invoices import make_traffic_record

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _window(path: Path, n: int, drifted_share: float, seed: int) -> Path:
    rng = random.Random(seed)
    rows = [
        make_traffic_record(rng, "drifted" if rng.random() < drifted_share else "original", f"{seed}-{i}", NOW)
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_drifted_window_is_found_and_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _window(tmp_path / "ref.jsonl", 300, 0.0, 1)
    current = _window(tmp_path / "cur.jsonl", 300, 0.4, 2)
    assert main(["drift", "--reference", str(reference), "--current", str(current), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["drift"] is True and out["p_value"] < 1e-6 and out["statistic"] > 0.6
    assert out["method"] == "classifier" and (out["n_reference"], out["n_current"]) == (300, 300)
    assert any(term["direction"] == "current" for term in out["top_terms"]) and out["examples"]
    assert out["input"]["current"] == {"path": str(current), "lines": 300, "used": 300, "skipped": {}}


def test_same_distribution_exits_0_without_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _window(tmp_path / "ref.jsonl", 300, 0.1, 3)
    current = _window(tmp_path / "cur.jsonl", 300, 0.1, 4)
    assert main(["drift", "--reference", str(reference), "--current", str(current)]) == 0
    assert capsys.readouterr().out.startswith("no drift: AUC")


def test_bad_lines_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _window(tmp_path / "ref.jsonl", 200, 0.0, 5)
    current = _window(tmp_path / "cur.jsonl", 200, 0.0, 6)
    with current.open("a") as handle:
        handle.write('not json\n{"prompt": null}\n[1, 2]\n\n{"text": "other field"}\n')
    assert main(["drift", "--reference", str(reference), "--current", str(current), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    skipped = out["input"]["current"]["skipped"]
    assert out["input"]["current"]["used"] == 200 and sum(skipped.values()) == 5
    assert skipped["not_json"] == 1 and skipped["missing_field"] == 2 and skipped["not_object"] == 1
    assert "skipped 5 of 205 lines of the current window" in captured.err


def test_unreadable_or_empty_window_exits_2_saying_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _window(tmp_path / "ref.jsonl", 50, 0.0, 7)
    assert main(["drift", "--reference", str(reference), "--current", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read drift window" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": "x"}\n')
    assert main(["drift", "--reference", str(reference), "--current", str(empty), "--field", "prompt"]) == 2
    err = capsys.readouterr().err
    assert "yields no texts in field 'prompt'" in err and "missing_field" in err
