"""`tuneloop init` and `tuneloop check-task`: a user's first two commands on their own data."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.cli import main
from tuneloop.config import load_settings
from tuneloop.demo.tickets import write_ticket_files
from tuneloop.tasks.onboarding import guess_task, minimum_detectable_difference

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def _rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_guess_task_reads_format_metric_labels_and_slices() -> None:
    labels = ["spam", "ham"]
    rows = [{"id": str(i), "prompt": f"mail {i}", "completion": labels[i % 2], "lang": ["en", "de"][i % 2]} for i in range(40)]
    assert guess_task(rows) == {"name": "my-task", "format": "prompt_completion", "metric": "label", "labels": ["ham", "spam"], "slice_field": "lang"}
    extraction = [{"id": str(i), "prompt": f"doc {i}", "completion": json.dumps({"n": i})} for i in range(20)]
    assert guess_task(extraction)["metric"] == "json"
    prose = [{"id": str(i), "prompt": "say hi", "completion": " ".join(["word"] * 30) + str(i)} for i in range(20)]
    assert guess_task(prose)["metric"] == "text"
    chats = [{"id": str(i), "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": f"answer number {i}"}]} for i in range(20)]
    guessed = guess_task(chats)
    assert guessed["format"] == "messages" and guessed["metric"] == "exact_match" and guessed["slice_field"] is None


def test_init_writes_a_config_that_loads_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_ticket_files(tmp_path / "data", n_train=120, n_eval=10)
    assert files["files"]["train.jsonl"] == 120
    out = tmp_path / "loop.yaml"
    assert main(["init", "--data", str(tmp_path / "data/train.jsonl"), "--out", str(out), "--system-prompt", "Triage.", "-q"]) == 0
    settings = load_settings(str(out))
    assert settings.task.format == "messages"
    assert settings.task.metric == "label"
    assert set(settings.task.labels) == {"billing", "bug", "account_access", "feature_request", "shipping", "cancellation"}
    assert settings.task.slice_field == "product"
    assert settings.task.system_prompt == "Triage."
    assert main(["init", "--out", str(out), "-q"]) == 2
    assert "exists" in capsys.readouterr().err


def test_check_task_shows_quarantine_gold_vs_gold_and_eval_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_ticket_files(tmp_path / "data", n_train=300, n_eval=10, bad_rows=14)
    data = tmp_path / "rows.jsonl"
    data.write_bytes((tmp_path / "data/train.jsonl").read_bytes() + (tmp_path / "data/bad.jsonl").read_bytes())
    config = tmp_path / "loop.yaml"
    assert main(["init", "--data", str(tmp_path / "data/train.jsonl"), "--out", str(config), "-q"]) == 0
    capsys.readouterr()
    assert main(["check-task", "--config", str(config), "--data", str(data), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lines"] == 314 and report["accepted"] + report["quarantined"] == 314
    assert {"label_not_in_set", "no_final_assistant", "not_json", "bad_role"} <= set(report["reasons"])
    assert report["gold_vs_gold"]["imperfect"] == 0 and report["gold_vs_gold"]["rows"] == report["accepted"]
    assert set(report["slices"]) == {"nimbus", "beacon", "orbit"}
    for stats in report["slices"].values():
        assert stats["min_detectable_difference"] == pytest.approx(minimum_detectable_difference(stats["eval_rows"], 0.05))


def test_check_task_fails_when_the_metric_does_not_fit_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Plain-text answers under a json metric: intake refuses them all, and check-task says so."""
    data = _rows(tmp_path / "rows.jsonl", [{"id": str(i), "prompt": f"q{i}", "completion": f"answer {i}"} for i in range(30)])
    config = tmp_path / "loop.yaml"
    config.write_text("task: {metric: json}\n", encoding="utf-8")
    assert main(["check-task", "--config", str(config), "--data", str(data), "-q"]) == 1
    out = capsys.readouterr().out
    assert "completion_not_json" in out and "0 of 30 lines accepted" in out


def test_minimum_detectable_difference_shrinks_with_the_eval_set() -> None:
    small, large = minimum_detectable_difference(30, 0.05), minimum_detectable_difference(300, 0.05)
    assert small is not None and large is not None
    assert large < small < 1.0
    assert large == pytest.approx(small / 10**0.5)
    assert minimum_detectable_difference(1, 0.05) is None
