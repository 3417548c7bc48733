"""`tuneloop gate` on score files: the acceptance cases of the eval gate, through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneloop.cli import main

pytestmark = pytest.mark.unit


def _write(path: Path, scores: dict[str, list[float]]) -> Path:
    rows = [
        {"id": f"{name}-{i}", "slice": name, "score": score}
        for name, values in scores.items()
        for i, score in enumerate(values)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _scores(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def _gate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["gate", *args, "--json", "--bootstrap", "2000"])
    out = capsys.readouterr().out
    return code, json.loads(out) if code in (0, 1) else {}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return _write(tmp_path / "base.jsonl", {"new": _scores(300, 0.5, 1), "old": _scores(300, 0.8, 2)})


def test_identical_scores_do_not_promote(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _gate(capsys, "--baseline", str(base), "--candidate", str(base), "--improve", "new")
    assert code == 0 and out["promote"] is False
    assert out["slices"]["new"]["delta"] == 0 and out["slices"]["old"]["passed"] is True
    assert {"n", "baseline_mean", "candidate_mean", "delta", "ci_low", "ci_high", "p_value"} <= set(out["slices"]["new"])


def test_clear_gain_with_equal_scores_elsewhere_promotes(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.loads(line) for line in base.read_text().splitlines()]
    gained = [{**r, "score": 1.0} if r["slice"] == "new" and r["score"] == 0 and int(r["id"].split("-")[1]) % 2 else r for r in rows]
    cand = tmp_path / "cand.jsonl"
    cand.write_text("".join(json.dumps(r) + "\n" for r in gained))
    plot, report = tmp_path / "gate.png", tmp_path / "gate.md"
    code, out = _gate(
        capsys, "--baseline", str(base), "--candidate", str(cand), "--improve", "new",
        "--plot", str(plot), "--report", str(report), "--check",
    )
    assert code == 0 and out["promote"] is True, out["reasons"]
    assert out["slices"]["new"]["ci_low"] > 0 and out["slices"]["new"]["p_value"] < 0.05
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "PROMOTE" in report.read_text()


def test_gain_bought_with_a_clear_loss_elsewhere_does_not_promote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = _write(tmp_path / "b.jsonl", {"new": [0.0] * 200, "old": [1.0] * 200})
    candidate = _write(tmp_path / "c.jsonl", {"new": [1.0] * 200, "old": [1.0] * 150 + [0.0] * 50})
    code, out = _gate(capsys, "--baseline", str(baseline), "--candidate", str(candidate), "--improve", "new", "--check")
    assert code == 1 and out["promote"] is False
    assert out["slices"]["new"]["passed"] and not out["slices"]["old"]["passed"]
    assert any(reason.startswith("old:") for reason in out["reasons"])


def test_tiny_eval_set_and_small_gain_with_little_data_do_not_promote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_b = _write(tmp_path / "tb.jsonl", {"new": [0.0] * 5})
    tiny_c = _write(tmp_path / "tc.jsonl", {"new": [1.0] * 5})
    code, out = _gate(capsys, "--baseline", str(tiny_b), "--candidate", str(tiny_c), "--improve", "new")
    assert out["promote"] is False and "insufficient evidence" in out["reasons"][0]
    small_b = _write(tmp_path / "sb.jsonl", {"new": [0.5] * 40})
    small_c = _write(tmp_path / "sc.jsonl", {"new": [0.5] * 37 + [1.0] * 3})
    code, out = _gate(capsys, "--baseline", str(small_b), "--candidate", str(small_c), "--improve", "new")
    assert code == 0 and out["promote"] is False and out["slices"]["new"]["delta"] > 0


def test_ids_that_do_not_pair_exit_2_naming_them(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.loads(line) for line in base.read_text().splitlines()]
    rows[0]["id"] = "stranger-1"
    cand = tmp_path / "cand.jsonl"
    cand.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["gate", "--baseline", str(base), "--candidate", str(cand), "--improve", "new"]) == 2
    err = capsys.readouterr().err
    assert "stranger-1" in err and "new-0" in err


def test_malformed_score_file_exit_2_with_the_line(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "slice": "new", "score": 1}\nnot json\n')
    assert main(["gate", "--baseline", str(base), "--candidate", str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
