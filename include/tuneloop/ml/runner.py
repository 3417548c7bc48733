"""Run an ML step (train, evaluate) in the isolated training/serving environment.

The orchestration env (Airflow, GX) and the ML env (torch, transformers, peft, vLLM) pin
different libraries, so ML steps run as ``<ml python> -m tuneloop.cli <step> --json``: the
same CLI a user runs by hand and the same entry point the GPU/Kubernetes trainer image uses.
Progress lines stream into the caller's log as they happen; the JSON result comes back.

The parent hands over its resolved settings as a job file (``--job``, mode 0600, deleted
afterwards): the child never works its settings out again from ``$TUNELOOP_CONFIG`` and the
environment, so what an Airflow task resolved (the Variable, the ``tuneloop_vllm`` connection's
endpoints and API key) is what the ML step uses, and no secret is on a command line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from tuneloop.config import Settings

log = logging.getLogger(__name__)


class StepFailedError(RuntimeError):
    """The ML step exited non-zero; the message carries its last stderr lines."""


def _candidates() -> list[Path]:
    explicit = os.environ.get("TUNELOOP_ML_PYTHON")
    if explicit:
        return [Path(explicit)]
    return [Path(sys.prefix).parent / ".venv-ml/bin/python", Path(__file__).resolve().parents[3] / ".venv-ml/bin/python"]


def find_ml_python() -> Path | None:
    """$TUNELOOP_ML_PYTHON, else ``.venv-ml/bin/python`` beside the running env or the repo."""
    return next((candidate for candidate in _candidates() if candidate.exists()), None)


def ml_python() -> Path:
    """Like :func:`find_ml_python`, but a missing env is an error that says what to do."""
    python = find_ml_python()
    if python is None:
        raise StepFailedError(
            "no training environment found: run `make setup` (builds .venv-ml in a checkout), or install "
            "`tuneloop[ml]` into a venv of its own, and set TUNELOOP_ML_PYTHON "
            f"to a Python with torch, transformers and peft (looked at {', '.join(map(str, _candidates()))})"
        )
    return python


def run_ml_step(
    args: Sequence[str],
    *,
    settings: Settings | None = None,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run ``tuneloop <args> --json`` in the ML env; return its JSON result. With ``settings``
    the child runs on exactly those (a job file); else on ``config`` and the environment.
    ``train`` with ``training.processes`` > 1 runs under ``accelerate launch`` (``launch.py``).

    ``evaluate`` with no ML env runs in this interpreter instead: through vLLM it needs no
    torch (an Airflow image without the ML env evaluates against the servers)."""
    python = find_ml_python() or (Path(sys.executable) if args and args[0] == "evaluate" else None) or ml_python()
    command = [str(python), "-m", "tuneloop.cli", *args, "--json"]
    job_dir = None
    if settings is not None:
        import tempfile

        from tuneloop.config import settings_job

        job_dir = tempfile.mkdtemp(prefix="tuneloop-job-")  # 0700: the job holds secrets
        job_file = Path(job_dir) / "job.json"
        job_file.write_text(json.dumps(settings_job(settings), default=str), encoding="utf-8")
        job_file.chmod(0o600)
        command += ["--job", str(job_file)]
        if args and args[0] == "train" and settings.training.processes > 1:
            from tuneloop.ml.launch import launch_command, write_config

            launch_file = str(Path(job_dir) / "accelerate.yaml")
            write_config(settings.training, launch_file, cpu=settings.training.device == "cpu")
            command = launch_command(str(python), launch_file, command[3:])
    elif config:
        command += ["--config", config]
    try:
        return _run(command, args, env=env, on_line=on_line, timeout_s=timeout_s)
    finally:
        if job_dir is not None:
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)


def _run(
    command: list[str], args: Sequence[str], *, env: Mapping[str, str] | None, on_line: Callable[[str], None] | None, timeout_s: float | None
) -> dict[str, Any]:
    child_env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log.info("running ML step: %s", " ".join(command))
    emit = on_line or (lambda line: log.info("%s", line))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
    tail: list[str] = []
    stdout_parts: list[str] = []

    def pump_stderr() -> None:  # progress lines, relayed one by one as they come
        assert process.stderr is not None
        for line in process.stderr:
            line = line.rstrip()
            tail.append(line)
            del tail[:-40]
            emit(line)

    def read_stdout() -> None:  # the JSON result
        assert process.stdout is not None
        stdout_parts.append(process.stdout.read())

    # One reader per pipe (communicate() would read stderr too and tear lines from the relay).
    readers = [threading.Thread(target=pump_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise StepFailedError(f"`tuneloop {args[0]}` timed out after {timeout_s:.0f}s") from None
    finally:
        for reader in readers:
            reader.join(timeout=5)
    stdout = "".join(stdout_parts)
    if process.returncode != 0:
        last = "\n".join(tail[-15:])
        raise StepFailedError(f"`tuneloop {' '.join(args)}` failed with exit code {process.returncode}:\n{last}")
    try:
        return dict(json.loads(stdout))
    except json.JSONDecodeError as err:
        raise StepFailedError(f"`tuneloop {args[0]}` printed no JSON result: {stdout[-500:]!r}") from err
