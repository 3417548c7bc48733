"""Local servers for the integration tests: a free port, and stopping a server's whole tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

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
