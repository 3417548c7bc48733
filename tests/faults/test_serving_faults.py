"""Faults around a deploy on two REAL vLLM CPU servers, each ending with the servers and the
registry agreeing: a server restarted between load and verify, the worker killed in the middle
of a swap and the task retried, a restore that fails and leaves the replicas on different
versions, a refresh and a rollback at once. Faults come from a forwarding proxy in front of a
real server (tests/integration/fixtures_vllm.FaultProxy) or from restarting the server itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from fixtures_vllm import (
    MAX_TOKENS,
    SERVED,
    FaultProxy,
    build_lora_adapter,
    build_tiny_llama,
    free_port,
    serve_sh,
    serves,
    stable_answers,
    staged_answers,
)

from tuneloop.provenance import dir_digest
from tuneloop.serving.deploy import DeployError
from tuneloop.serving.fleet_lock import lock_key
from tuneloop.steps.loop import Loop, open_loop
from tuneloop.steps.serve import (
    deploy_step,
    reconcile_step,
    record_step,
    rollback_step,
    verify_step,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.ml, pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Fleet:
    """Two real vLLM servers on one tiny base model, and three adapters that answer differently."""

    base: Path
    adapters: dict[str, Path]
    answers: dict[str, list[str]]
    urls: list[str]
    ports: list[int]
    run_dirs: list[Path]

    def start(self, i: int) -> None:
        result = serve_sh("start", "--port", str(self.ports[i]), "--model", str(self.base), "--name", SERVED, "--run-dir", str(self.run_dirs[i]))
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr[-3000:]}"

    def restart(self, i: int) -> None:
        stopped = serve_sh("stop", "--run-dir", str(self.run_dirs[i]), timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        self.start(i)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("faults")
    base = build_tiny_llama(root / "base")
    adapters = {f"v{i}": build_lora_adapter(base, root / "adapters" / f"v{i}", seed=i) for i in (1, 2, 3)}
    ports = [free_port(), free_port()]
    fleet = Fleet(base, adapters, {}, [f"http://127.0.0.1:{p}" for p in ports], ports, [root / "run-a", root / "run-b"])
    started = time.monotonic()
    try:
        fleet.start(0)
        fleet.start(1)
        print(f"\n[faults] two vLLM servers up in {time.monotonic() - started:.1f} s")
        fleet.answers = staged_answers(fleet.urls[0], adapters)
        assert len({tuple(a) for a in fleet.answers.values()}) == 4, "the adapters must answer differently"
        yield fleet
    finally:
        dead = []
        for run_dir in fleet.run_dirs:
            log = run_dir / "vllm.log"
            dead += [line for line in (log.read_text(errors="replace") if log.exists() else "").splitlines() if "EngineDeadError" in line]
            serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert not dead, "a vLLM engine died during the fault tests:\n" + "\n".join(dead[:5])


def _loop(fleet: Fleet, tmp_path: Path, endpoints: list[str], run_id: str = "faults") -> Loop:
    config = tmp_path / f"tuneloop-{abs(hash(tuple(endpoints)))}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"uri": str(tmp_path / "store")},
                "model": {"base_model": str(fleet.base), "served_model_name": SERVED},
                "vllm": {"endpoints": endpoints, "adapter_dir": str(tmp_path / "served"), "max_lora_rank": 16, "timeout_s": 20},
                "eval": {"max_new_tokens": MAX_TOKENS},
            }
        )
    )
    return open_loop(str(config), run_id=run_id, progress=lambda message: None)


def _register(loop: Loop, fleet: Fleet, production: list[str], also: tuple[str, ...] = ()) -> None:
    """Register adapters (pinned by hash); promote ``production`` in order; put it on the servers."""
    for version in (*production, *also):
        loop.store.put_dir(f"adapters/{version}", fleet.adapters[version])
        loop.registry.register(
            version, adapter_key=f"adapters/{version}", snapshot=None, base_model=str(fleet.base),
            adapter_hash=dir_digest(fleet.adapters[version], suffixes=FILES),
        )  # fmt: skip
    for version in production:
        loop.registry.promote(version, reason="test setup", run_id=f"setup-{version}")
    reconcile_step(loop)




def _agree(loop: Loop, fleet: Fleet, tmp_path: Path, urls: list[str]) -> str:
    """Every server serves the registry's production, from its pinned directory, with its answers;
    no fleet lease is left behind. Returns the production version."""
    production = loop.registry.aliases()["production"]
    assert production is not None
    for url in urls:
        assert serves(url) == str((tmp_path / "served" / production).resolve()), url
        assert stable_answers(url) == fleet.answers[production], url
    assert not loop.store.list("locks/"), "a fleet lease was left behind"
    return production


def _fault(match: Callable[[str, dict[str, Any]], bool], action: tuple[str, float], armed: dict[str, bool]) -> Callable[[str, str, dict[str, Any]], tuple[str, float] | None]:
    def fault(method: str, path: str, body: dict[str, Any]) -> tuple[str, float] | None:
        if armed["on"] and path == "/v1/load_lora_adapter" and match(body.get("lora_name", ""), body):
            return action
        return None

    return fault


def _stable_load_of(version: str) -> Callable[[str, dict[str, Any]], bool]:
    return lambda name, body: name == SERVED and Path(str(body.get("lora_path", ""))).name == version


def test_a_server_restarted_between_load_and_verify_gets_production_back(fleet: Fleet, tmp_path: Path) -> None:
    """deploy v2 succeeds, the server restarts (forgetting its runtime adapters), verify fails
    naming the cause, and the teardown's reconcile puts the registry's production (v1) back."""
    url = fleet.urls[0]
    loop = _loop(fleet, tmp_path, [url])
    _register(loop, fleet, ["v1"], also=("v2",))
    deployed = deploy_step(loop, "v2")
    assert deployed["previous"] == "v1" and stable_answers(url) == fleet.answers["v2"]
    fleet.restart(0)
    assert serves(url) is None
    with pytest.raises(RuntimeError, match="is not loaded at all .*restarted.*reconcile puts the registry's production back"):
        verify_step(loop, "v2")
    assert reconcile_step(loop)["endpoints"][0]["action"] == "loaded"
    assert _agree(loop, fleet, tmp_path, [url]) == "v1"


def test_a_worker_killed_in_the_middle_of_a_swap_is_retried_to_the_same_end(fleet: Fleet, tmp_path: Path) -> None:
    """The deploy task's process is SIGKILLed while the server swaps v2 into the stable name (its
    reply held back). The retry (the same Airflow run id) takes over its own lease, deploys,
    verifies and records: the end state is an uninterrupted run's."""
    url = fleet.urls[1]
    armed = {"on": False}
    with FaultProxy(url, _fault(_stable_load_of("v2"), ("hang", 60), armed)) as proxy:
        loop = _loop(fleet, tmp_path, [proxy.url], run_id="scheduled__2026-06-01")
        _register(loop, fleet, ["v1"], also=("v2",))
        armed["on"] = True
        script = (
            "import sys; from tuneloop.steps.loop import open_loop; from tuneloop.steps.serve import deploy_step\n"
            f"deploy_step(open_loop({str(loop.config_path)!r}, run_id='scheduled__2026-06-01'), 'v2')\n"
        )
        worker = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 120
        while not any(outcome.endswith("held 60 s") for *_, outcome in proxy.seen):
            assert worker.poll() is None, f"the deploy ended before the swap: {worker.stderr.read().decode()[-2000:] if worker.stderr else ''}"
            assert time.monotonic() < deadline, "the stable swap never came"
            time.sleep(0.1)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
        armed["on"] = False
        assert serves(url) == str((tmp_path / "served" / "v2").resolve()), "the swap happened on the server"
        assert loop.store.list("locks/") == [lock_key([proxy.url])], "the killed worker's lease is still there"
        assert loop.registry.aliases()["production"] == "v1"

        retried = deploy_step(loop, "v2")  # Airflow's retry: same run id, same endpoints
        verified = verify_step(loop, "v2")
        record_step(loop, "v2", deployed_over=retried["previous"])
    assert retried["previous"] == "v1" and verified["version"] == "v2"
    assert loop.registry.aliases() == {"production": "v2", "previous": "v1", "candidate": None}
    assert _agree(loop, fleet, tmp_path, [url]) == "v2"


def test_a_failed_restore_leaves_the_replicas_apart_until_reconcile(fleet: Fleet, tmp_path: Path) -> None:
    """Replica B refuses v2 (500), so the deploy restores v1 on replica A, and that restore fails
    too: the error says ROLLBACK FAILED and which replica serves what. reconcile, once the
    servers accept loads again, puts v1 (the registry's production) on both."""
    armed = {"on": False}
    with (
        FaultProxy(fleet.urls[0], _fault(_stable_load_of("v1"), ("status", 500), armed)) as a,
        FaultProxy(fleet.urls[1], _fault(_stable_load_of("v2"), ("status", 500), armed)) as b,
    ):
        loop = _loop(fleet, tmp_path, [a.url, b.url])
        _register(loop, fleet, ["v1"], also=("v2",))
        armed["on"] = True
        with pytest.raises(DeployError) as caught:
            deploy_step(loop, "v2")
        message = str(caught.value)
        assert caught.value.endpoint == b.url and f"{a.url}: ROLLBACK FAILED" in message, message
        v1, v2 = (str((tmp_path / "served" / v).resolve()) for v in ("v1", "v2"))
        assert (serves(fleet.urls[0]), serves(fleet.urls[1])) == (v2, v1), "the replicas disagree, as reported"
        with pytest.raises(DeployError, match=f"reconcile to .*v1 failed on 1 of 2 endpoint.*{a.url}"):
            reconcile_step(loop)  # still refused: says so, and changes nothing else
        armed["on"] = False
        records = reconcile_step(loop)["endpoints"]
    assert [r["action"] for r in records] == ["loaded", "in_sync"]
    assert _agree(loop, fleet, tmp_path, fleet.urls) == "v1"


def test_a_refresh_and_a_rollback_at_once_end_on_one_version_everywhere(fleet: Fleet, tmp_path: Path) -> None:
    """The refresh deploys v3 while an operator rolls back to v1: the fleet lease serialises the
    swaps; whichever order they land in, the refresh either records v3 over what it replaced
    or refuses because the rollback moved production, and after its teardown reconcile both
    replicas serve the registry's production."""
    refresh = _loop(fleet, tmp_path, fleet.urls, run_id="scheduled__refresh")
    _register(refresh, fleet, ["v1", "v2"], also=("v3",))
    operator = _loop(fleet, tmp_path, fleet.urls, run_id="manual__rollback")
    outcome: dict[str, Any] = {}

    def run_refresh() -> None:
        try:
            deployed = deploy_step(refresh, "v3")
            verify_step(refresh, "v3")
            record_step(refresh, "v3", deployed_over=deployed["previous"])
            outcome["refresh"] = "recorded"
        except Exception as err:  # the DAG's teardown runs reconcile after any failure
            outcome["refresh"] = f"failed: {err}"
        finally:
            reconcile_step(refresh)

    def run_rollback() -> None:
        outcome["rollback"] = rollback_step(operator, "v1")["version"]

    threads = [threading.Thread(target=run_refresh), threading.Thread(target=run_rollback)]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(300)
    assert outcome["rollback"] == "v1", outcome
    production = _agree(refresh, fleet, tmp_path, fleet.urls)
    history = [(m["changed"].get("production", {}).get("to"), m["run_id"]) for m in refresh.registry.history()]
    if outcome["refresh"] == "recorded":  # the refresh landed first, then the rollback, or the reverse
        assert production in {"v1", "v3"} and ("v3", "scheduled__refresh") in history
    else:
        assert production == "v1" and ("moved" in outcome["refresh"] or "served from" in outcome["refresh"]), outcome
    print(f"\n[faults] refresh: {outcome['refresh'][:160]}; rollback: v1; production now {production}; history {history}")
