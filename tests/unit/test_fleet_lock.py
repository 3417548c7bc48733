"""One deploy at a time per vLLM fleet: the store lease every swap takes (fleet_lock)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import TYPE_CHECKING

import pytest

from tuneloop.serving.fleet_lock import FleetBusyError, fleet_lock, lock_key
from tuneloop.storage import LocalStore, S3Store, Store

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit

FLEET = ["http://vllm-a:8000", "http://vllm-b:8000/"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("s3_bucket"), "tl", endpoint_url=request.getfixturevalue("s3_server"))


def test_the_second_deploy_waits_for_the_first(store: Store) -> None:
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with fleet_lock(store, FLEET, owner="refresh-run", action="deploy v2", poll_s=0.05):
            first_in.set()
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    waits: list[str] = []
    with fleet_lock(store, FLEET, owner="rollback-run", action="rollback", poll_s=0.05, say=waits.append):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]
    assert waits and "deploy v2 by refresh-run" in waits[0]
    assert not store.exists(lock_key(FLEET)), "the lease is released"


def test_the_loser_fails_naming_the_holder(store: Store) -> None:
    with fleet_lock(store, FLEET, owner="refresh-run", action="deploy v2"):
        with pytest.raises(FleetBusyError) as caught:
            with fleet_lock(store, list(reversed(FLEET)), owner="cli", action="rollback", wait_s=0.2, poll_s=0.05):
                pass
    assert "deploy v2 by refresh-run" in str(caught.value) and lock_key(FLEET) in str(caught.value)


def test_an_expired_lease_or_the_same_runs_lease_is_taken_over(store: Store) -> None:
    key = lock_key(FLEET)
    dead = {"owner": "killed-run", "action": "deploy v1", "taken_at": "2026-01-01T00:00:00+00:00", "expires_at": "2026-01-01T00:15:00+00:00"}
    store.put_bytes(key, json.dumps(dead).encode())
    with fleet_lock(store, FLEET, owner="next-run", action="deploy v2", wait_s=0.1) as lease:
        assert lease["owner"] == "next-run"
        # a retry of the task holding the lease (the first attempt was killed) takes it back;
        # nested takes in one process (rollback -> deploy) are no-ops
        with fleet_lock(store, FLEET, owner="next-run", action="deploy v2 (nested)", wait_s=0.1) as inner:
            assert inner is lease
    assert not store.exists(key)
    fresh = {**dead, "owner": "retried-run", "expires_at": "2999-01-01T00:00:00+00:00"}
    store.put_bytes(key, json.dumps(fresh).encode())
    with fleet_lock(store, FLEET, owner="retried-run", action="deploy v2", wait_s=0.1) as lease:
        assert json.loads(store.get_bytes(key))["taken_at"] == lease["taken_at"]
    assert not store.exists(key)


def test_reconcile_if_idle_steps_aside_for_a_deploy_and_names_a_dead_server(tmp_path: Path) -> None:
    """The tuneloop_reconcile DAG's step: while a deploy holds the fleet it touches nothing (no
    request to any server); when idle, a dead server fails it with one line naming the server."""
    from tuneloop.serving.deploy import DeployError
    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.serve import reconcile_step

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = tmp_path / "tuneloop.yaml"
    config.write_text(f"store:\n  uri: {tmp_path / 'store'}\nvllm:\n  endpoints: ['{down}']\n  timeout_s: 2\n")
    said: list[str] = []
    loop = open_loop(str(config), run_id="scheduled__reconcile", progress=said.append)
    with fleet_lock(loop.store, [down], owner="refresh-run", action="deploy v2"):
        result = reconcile_step(loop, if_idle=True)
    assert result["skipped"] and "deploy v2 by refresh-run" in result["skipped"] and result["endpoints"] == []
    assert said == [f"reconcile skipped: {result['skipped']}"]
    with pytest.raises(DeployError) as caught:
        reconcile_step(loop, if_idle=True)
    message = str(caught.value)
    assert "\n" not in message and f"vLLM at {down} is down" in message and "run `tuneloop reconcile` again" in message
    assert not loop.store.exists(lock_key([down])), "the lease is released after the failure"
