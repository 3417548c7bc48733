"""run_ml_step: every progress line reaches the log intact, the JSON result comes back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tuneloop.ml.runner import StepFailedError, run_ml_step

pytestmark = pytest.mark.unit

FAKE_STEP = """\
import json, sys
for i in range(2000):
    print(f"[tuneloop] train step {i}/2000 loss 0.5", file=sys.stderr, flush=True)
    if i % 500 == 0:
        print(" " * 3000, end="", flush=True)  # stdout traffic while stderr streams
print(json.dumps({"ok": True, "args": sys.argv[1:]}))
sys.exit(int(sys.argv[sys.argv.index("--code") + 1]) if "--code" in sys.argv else 0)
"""


@pytest.fixture
def fake_ml_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 'python' that ignores ``-m tuneloop.cli`` and runs the fake step instead."""
    script = tmp_path / "step.py"
    script.write_text(FAKE_STEP)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("TUNELOOP_ML_PYTHON", str(python))
    return python


def test_every_progress_line_arrives_whole_and_the_result_parses(fake_ml_python: Path) -> None:
    lines: list[str] = []
    result = run_ml_step(["train", "--version", "v1"], on_line=lines.append)
    assert result == {"ok": True, "args": ["train", "--version", "v1", "--json"]}
    assert lines == [f"[tuneloop] train step {i}/2000 loss 0.5" for i in range(2000)]


def test_a_failed_step_raises_with_its_last_lines(fake_ml_python: Path) -> None:
    with pytest.raises(StepFailedError, match=r"exit code 3:\n(.|\n)*train step 1999/2000"):
        run_ml_step(["train", "--code", "3"], on_line=lambda _: None)


def test_the_ml_child_runs_on_the_parents_resolved_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an Airflow task resolved (here: the tuneloop_vllm connection's endpoints and API key,
    applied by open_task_loop) reaches the ML process, whose own environment names a config
    file that does not exist on this worker: the child re-reads neither."""
    import json
    import tempfile

    from tuneloop.config import load_settings
    from tuneloop.steps.loop import VllmConnection, apply_vllm_connection

    settings = apply_vllm_connection(
        load_settings(None, env={}),
        VllmConnection(password="sk-from-connection", extra={"endpoints": ["http://vllm-a:8000", "http://vllm-b:8000"]}),
    )
    monkeypatch.setenv("TUNELOOP_ML_PYTHON", sys.executable)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lines: list[str] = []
    result = run_ml_step(["config"], settings=settings, env={"TUNELOOP_CONFIG": str(tmp_path / "missing.yaml")}, on_line=lines.append)
    assert result["vllm"]["endpoints"] == ["http://vllm-a:8000", "http://vllm-b:8000"]
    assert result["vllm"]["api_key"] == "**********", "the key arrived (and is masked when printed)"
    assert not any("sk-from-connection" in line for line in lines)
    assert not list(tmp_path.glob("tuneloop-job-*")), "the job file (it holds the key) is removed"
    assert json.dumps(result).count("sk-from-connection") == 0


def test_without_an_ml_env_only_evaluate_runs_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No .venv-ml (an Airflow image): `evaluate` runs in this interpreter (through vLLM it needs no
    torch); `train` fails saying how to get the ML env."""
    import tuneloop.ml.runner as runner

    monkeypatch.setenv("TUNELOOP_ML_PYTHON", str(tmp_path / "missing" / "python"))
    ran: list[list[str]] = []
    monkeypatch.setattr(runner, "_run", lambda command, args, **_: ran.append(command) or {"ok": True})
    assert run_ml_step(["evaluate", "--adapter", "v1"]) == {"ok": True}
    assert ran[0][:4] == [sys.executable, "-m", "tuneloop.cli", "evaluate"]
    with pytest.raises(StepFailedError, match="make setup"):
        run_ml_step(["train", "--version", "v1"])
    assert len(ran) == 1


def test_the_ml_env_is_found_although_every_venv_python_is_a_link_to_one_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uv's venvs link bin/python to the same interpreter: the orchestration env must still re-execute
    `train` in the ML env (only a TUNELOOP_ML_PYTHON naming this very python is refused)."""
    import os

    from tuneloop.cli.common import CliError, _reexec_in_ml_env

    ml_python = tmp_path / "venv-ml" / "bin" / "python"
    ml_python.parent.mkdir(parents=True)
    ml_python.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setenv("TUNELOOP_ML_PYTHON", str(ml_python))
    monkeypatch.setattr("tuneloop.ml.backends.has_torch", lambda: False)
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv))
    _reexec_in_ml_env(["train", "--version", "v1"], "train")
    assert execs and execs[0][0] == str(ml_python)
    monkeypatch.setenv("TUNELOOP_ML_PYTHON", sys.executable)
    with pytest.raises(CliError, match="names this very Python"):
        _reexec_in_ml_env(["train", "--version", "v1"], "train")


def test_train_with_several_processes_runs_under_accelerate_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """training.processes > 1: the ML child is `accelerate launch` with the config tuneloop
    renders (accelerate itself reads it in test_train_scaling.py); other steps run plain."""
    import yaml

    from tuneloop.config import load_settings

    script = tmp_path / "launcher.py"
    script.write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "config = open(args[args.index('--config_file') + 1]).read() if '--config_file' in args else None\n"
        "print(json.dumps({'args': args, 'config': config}))\n"
    )
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv("TUNELOOP_ML_PYTHON", str(python))
    settings = load_settings(None, env={"TUNELOOP__TRAINING__PROCESSES": "4", "TUNELOOP__TRAINING__DISTRIBUTED": "fsdp"})
    result = run_ml_step(["train", "--version", "v3"], settings=settings, on_line=lambda _: None)
    args = result["args"]
    assert args[:3] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert args[4:9] == ["-m", "tuneloop.cli", "train", "--version", "v3"] and "--job" in args
    config = yaml.safe_load(result["config"])
    assert (config["num_processes"], config["distributed_type"]) == (4, "FSDP")
    assert config["fsdp_config"]["fsdp_version"] == 2
    plain = run_ml_step(["evaluate", "--version", "v3"], settings=settings, on_line=lambda _: None)
    assert plain["args"][:3] == ["-m", "tuneloop.cli", "evaluate"] and plain["config"] is None
