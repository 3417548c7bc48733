"""Which config an Airflow task's loop uses: $TUNELOOP_CONFIG, else the Variable, else defaults;
a path that does not exist on this worker is skipped with a message, never an error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tuneloop.steps.loop import open_task_loop

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def _config(tmp_path: Path, name: str, store: str) -> str:
    path = tmp_path / name
    path.write_text(f"store:\n  uri: {tmp_path / store}\n")
    return str(path)


def test_env_config_wins_over_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_CONFIG", _config(tmp_path, "env.yaml", "env-store"))
    loop = open_task_loop("r", config_variable=lambda: _config(tmp_path, "var.yaml", "var-store"), progress=print)
    assert loop.store.uri.endswith("env-store")


def test_missing_env_config_falls_back_to_the_variable_then_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_CONFIG", str(tmp_path / "not-here.yaml"))
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    lines: list[str] = []
    loop = open_task_loop("r", config_variable=lambda: _config(tmp_path, "var.yaml", "var-store"), progress=lines.append)
    assert loop.store.uri.endswith("var-store")
    assert lines == [f"config file {tmp_path / 'not-here.yaml'} does not exist on this worker: using {tmp_path / 'var.yaml'}"]
    lines.clear()
    loop = open_task_loop("r", config_variable=lambda: None, progress=lines.append)  # raised ConfigError before
    assert loop.settings.store.uri.endswith(".tuneloop/store")
    assert "using the embedded defaults" in lines[0]
