"""Helpers of the integration tests: a free port, stopping a server's whole tree, running a
command that must succeed, and loading a DAG from the project's folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group and every descendant (Airflow's task processes start their
    own sessions), then SIGKILL whatever is left after 20 s."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        for proc in family:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=20)
        if not alive:
            break
    process.wait(timeout=10)


def run_checked(*command: str, env: dict[str, str], cwd: Path, timeout: float = 900) -> str:
    """Run ``command``; fail the test with the ends of its stdout and stderr unless it exits 0."""
    result = subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def load_dag(dags_folder: Path, dag_id: str) -> Any:
    """``dag_id`` from the project's DAG folder, which must import without errors."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_folder))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def needs_nginx() -> Any:
    """Skip a test module's tests where nginx and its JavaScript module are missing (the gateway
    of serving.rollout switch|canary; `make setup` installs them where it can)."""
    import pytest

    from tuneloop.serving.gateway import nginx_available

    return pytest.mark.skipif(not nginx_available(), reason="nginx with its JavaScript module is not installed (make setup installs it)")

