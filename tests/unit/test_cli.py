"""The command line a user meets first: help, settings errors, and the cheap subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tuneloop.cli import build_parser, main

pytestmark = pytest.mark.unit


def test_help_lists_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")}
    commands = {"init", "check-task", "demo-world", "label", "pull", "validate", "build-model", "train", "evaluate", "config",
                "drift", "gate", "status", "deploy", "rollback", "reconcile", "gateway", "adapter"}
    assert listed == commands, listed ^ commands  # each step its own entry, with its one-line help
    assert set(build_parser()._subparsers._group_actions[0].choices) == commands  # type: ignore[union-attr]
    assert "TUNELOOP__SECTION__KEY" in out


def test_every_subcommand_has_a_description_and_json_flag() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001
    for name, sub in subparsers.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        # a group of actions (`tuneloop adapter check`): every action is checked instead
        leaves = {f"{name} {n}": p for a in nested for n, p in a.choices.items()} if nested else {name: sub}
        for full_name, leaf in leaves.items():
            text = leaf.format_help()
            assert "--json" in text and "--config" in text and (leaf.description or leaf.format_usage()), full_name
    assert "adapter" in subparsers and "reconcile" in subparsers


def test_bad_setting_exits_2_naming_the_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNELOOP__TRAINING__BATCH_SIZE", "zero")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "training.batch_size = 'zero'" in err and "TUNELOOP__TRAINING__BATCH_SIZE" in err


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_demo_world_pull_and_status_on_a_local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    monkeypatch.setenv("TUNELOOP_CONFIG", str(EXAMPLES / "invoices" / "tuneloop.yaml"))
    assert main(["demo-world", "--days", "3", "--traffic-per-day", "30", "--labelled-per-day", "20", "--heldout-per-slice", "5", "--bad-row-rate", "0.1", "--json", "-q"]) == 0
    world = json.loads(capsys.readouterr().out)
    assert world["heldout"] == {"original": 5, "drifted": 5} and world["example"] == "invoices"
    store = tmp_path / ".tuneloop/store"
    assert sorted(p.name for p in (store / "labelled").iterdir()) == ["dt=2026-01-01", "dt=2026-01-02", "dt=2026-01-03"]
    assert (store / "suites" / "injection.jsonl").is_file()  # the invoice example's injection set

    assert main(["pull", "--json", "-q"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["counts"]["total"] == 60
    assert pulled["counts"]["quarantined"] >= 3 and pulled["reasons"]
    assert set(pulled["slices"]["train"]) <= {"original", "drifted"}

    assert main(["status", "--no-vllm"]) == 0
    out = capsys.readouterr().out
    assert pulled["snapshot"][:12] in out and "production=None" in out


def test_demo_world_tickets_writes_chat_rows_its_config_pulls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    config = str(EXAMPLES / "tickets" / "tuneloop.yaml")
    argv = ["demo-world", "--example", "tickets", "--config", config, "--days", "2", "--heldout-per-slice", "3", "--bad-row-rate", "0.1", "--json", "-q"]
    assert main(argv) == 0
    world = json.loads(capsys.readouterr().out)
    assert world["example"] == "tickets" and world["heldout"] == {"nimbus": 3, "beacon": 3, "orbit": 3}
    assert world["suites"] == {}
    labelled = sum(world["labelled_rows"].values())
    bad = sum(world["bad_rows"].values())
    assert bad > 0

    assert main(["pull", "--config", config, "--json", "-q"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["counts"]["total"] == labelled + bad
    assert pulled["counts"]["quarantined"] >= bad - world["bad_rows"].get("duplicate_id", 0)
    assert set(pulled["slices"]["train"]) <= {"nimbus", "beacon", "orbit"}
    assert set(pulled["reasons"]) <= {"not_json", "label_not_in_set", "no_final_assistant", "missing_field:messages", "empty_line", "duplicate_id", "bad_role"}


def test_pull_with_no_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    assert main(["pull"]) == 1
    assert "no labelled partitions" in capsys.readouterr().err
