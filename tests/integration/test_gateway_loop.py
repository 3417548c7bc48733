"""A loop with ``serving.rollout: canary`` on two REAL vLLM CPU replicas behind the REAL nginx
gateway: reconcile, a replica restarted (it rejoins only once it holds the registry's
versions), a canary deploy, verify, record and a rollback by alias flip, while clients call
the stable name through the gateway the whole time and never see a failure or an answer that
is not the reference answer of the version that served it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from fixtures_vllm import (
    MAX_TOKENS,
    PROMPTS,
    SERVED,
    GatewayLoad,
    build_lora_adapter,
    build_tiny_llama,
    free_port,
    serve_sh,
    staged_answers,
)
from processes import needs_nginx

from tuneloop.ml.vllm_backend import eval_lora_name
from tuneloop.provenance import dir_digest
from tuneloop.serving.deploy import DeployError
from tuneloop.serving.gateway import NginxGateway
from tuneloop.serving.rollout import RolloutError, versions_on
from tuneloop.serving.vllm_client import VllmClient
from tuneloop.steps.loop import open_loop
from tuneloop.steps.serve import (
    deploy_step,
    reconcile_step,
    record_step,
    rollback_step,
    verify_step,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.ml,
    pytest.mark.integration,
    pytest.mark.slow,
    needs_nginx(),
]

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _start(base: Path, port: int, run_dir: Path) -> None:
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gateway-loop")
    base = build_tiny_llama(root / "base")
    adapters = {"v1": build_lora_adapter(base, root / "built" / "v1", seed=1), "v2": build_lora_adapter(base, root / "built" / "v2", seed=2)}
    ports = [free_port(), free_port()]
    runs = [root / "run0", root / "run1"]
    for port, run in zip(ports, runs, strict=True):
        _start(base, port, run)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    gw_dir = root / "gateway"
    gateway = NginxGateway(gw_dir, port=free_port(), routes_file=gw_dir / "routes.json", access_log=gw_dir / "access.log")
    try:
        answers = staged_answers(urls[0], adapters)
        for url in urls:
            with VllmClient(url) as client:
                if f"{SERVED}-staging" in client.adapters():
                    client.unload_adapter(f"{SERVED}-staging")
        config = root / "tuneloop.yaml"
        config.write_text(yaml.safe_dump({
            "store": {"uri": str(root / "store")},
            "model": {"base_model": str(base), "served_model_name": SERVED},
            "vllm": {"endpoints": urls, "adapter_dir": str(root / "served"), "max_lora_rank": 16},
            "eval": {"max_new_tokens": MAX_TOKENS},
            "serving": {
                "rollout": "canary", "canary_steps": [50, 100], "bake_s": 2, "grace_s": 0.2, "min_requests": 3,
                "routes_file": str(gw_dir / "routes.json"), "access_log": str(gw_dir / "access.log"), "gateway_url": gateway.url,
            },
        }))  # fmt: skip
        gateway.start()
        yield {"root": root, "base": base, "adapters": adapters, "answers": answers, "urls": urls, "ports": ports, "runs": runs, "config": config, "gateway": gateway}
    finally:
        gateway.stop()
        for run in runs:
            serve_sh("stop", "--run-dir", str(run), timeout=60)


def test_canary_loop_survives_a_replica_restart_and_rolls_back_by_flip(world: dict[str, Any]) -> None:
    loop = open_loop(str(world["config"]), run_id="gateway-loop", progress=print)
    gateway: NginxGateway = world["gateway"]
    urls: list[str] = world["urls"]
    for version, files in world["adapters"].items():
        loop.store.put_dir(f"adapters/{version}", files)
        loop.registry.register(version, adapter_key=f"adapters/{version}", snapshot=None, base_model="tiny", adapter_hash=dir_digest(files, suffixes=FILES))
    loop.registry.promote("v1", reason="bootstrap", run_id="setup")
    # recent production traffic, replayed to the candidate before any shift (one row is broken)
    loop.store.put_jsonl("traffic/dt=2026-12-01/part-0.jsonl", [{"prompt": p} for p in PROMPTS] + [{"no_prompt": 1}, {"prompt": PROMPTS[0]}])

    done = reconcile_step(loop)
    assert done["upstreams"] == urls and done["routes"] == {f"{SERVED}-v1": 100.0}

    def reference(served: str, p: int) -> str | None:
        said = world["answers"].get(served.removeprefix(f"{SERVED}-"))
        return said[p] if said else None

    with GatewayLoad(gateway.url, reference) as load:
        # replica 1 goes down: requests routed there are retried on replica 0; reconcile drops it
        serve_sh("stop", "--run-dir", str(world["runs"][1]), timeout=60)
        with pytest.raises(DeployError, match="get no traffic from the gateway"):
            reconcile_step(loop)
        assert gateway.routes.upstreams() == [urls[0].removeprefix("http://")]
        # it comes back empty (a restarted vLLM forgets runtime adapters): still no traffic ...
        _start(world["base"], world["ports"][1], world["runs"][1])
        assert gateway.routes.upstreams() == [urls[0].removeprefix("http://")]
        with VllmClient(urls[1]) as fresh:
            assert versions_on(fresh, SERVED) == {}
        # ... until reconcile has loaded the registry's version on it; it also sweeps the name a
        # killed evaluation left (dated long ago), not the one of an evaluation still running
        ancient, running = eval_lora_name(SERVED, now=1_000_000), eval_lora_name(SERVED)
        with VllmClient(urls[0]) as first:
            for name in (ancient, running):
                first.load_adapter(name, str(world["adapters"]["v2"].resolve()), inplace=False)
        assert reconcile_step(loop)["upstreams"] == urls
        with VllmClient(urls[0]) as first:
            assert running in first.adapters() and ancient not in first.adapters()
            first.unload_adapter(running)
        with VllmClient(urls[1]) as fresh:
            assert list(versions_on(fresh, SERVED)) == [f"{SERVED}-v1"]

        # replica 1 restarts in the middle of a canary: requests routed to it while it is down or
        # empty are retried on replica 0; verify then finds it lacks v2, and reconcile brings it
        # back to the registry's production (v1) before it takes traffic again
        # (a restarting vLLM takes the CPU for ~25 s: latency is no signal here, 2 cores are shared)
        loop.settings.serving.bake_s, loop.settings.serving.max_p99_ratio = 20, 50
        outcome: dict[str, Any] = {}

        def canary() -> None:
            try:
                outcome.update(deploy_step(loop, "v2"))
            except Exception as err:
                outcome["error"] = err

        rollout = threading.Thread(target=canary, daemon=True)
        rollout.start()
        while gateway.routes.alias(SERVED).routes.get(f"{SERVED}-v2", 0) == 0:
            time.sleep(0.2)
        serve_sh("stop", "--run-dir", str(world["runs"][1]), timeout=60)
        _start(world["base"], world["ports"][1], world["runs"][1])
        rollout.join(timeout=300)
        loop.settings.serving.bake_s, loop.settings.serving.max_p99_ratio = 2, 1.5
        error = outcome.get("error")
        if error is not None:  # the restart can also trip the bake (the CPU it takes): then it rolled back
            print(f"the mid-canary restart tripped the bake: {error}")
            assert isinstance(error, RolloutError) and error.step == "bake" and error.rollout.rolled_back, error
        else:
            assert outcome.get("ok"), outcome
        with pytest.raises(RuntimeError, match=f"{SERVED}-v2 is not loaded|expected all of it to {SERVED}-v2"):
            verify_step(loop, "v2")
        assert reconcile_step(loop)["routes"] == {f"{SERVED}-v1": 100.0}
        for url in urls:
            with VllmClient(url) as client:
                assert f"{SERVED}-v1" in versions_on(client, SERVED)

        deployed = deploy_step(loop, "v2")
        shadow = deployed["shadow"]
        v1, v2 = world["answers"]["v1"], world["answers"]["v2"]
        assert shadow["n"] == len(PROMPTS) and shadow["production"] == f"{SERVED}-v1" and shadow["candidate"] == f"{SERVED}-v2"
        assert shadow["identical"] == sum(a.strip() == b.strip() for a, b in zip(v1, v2, strict=True))
        assert shadow["latency_ms"]["candidate"]["p99"] > 0
        assert [b["weight"] for b in deployed["bakes"]] == [50.0, 100.0]
        assert "## Shadow replay (before any traffic)" in loop.store.get_text("reports/v2/rollout.md")  # beside v2's gate report
        assert all(b["verdict"] in ("pass", "not_judged") for b in deployed["bakes"])
        verify_step(loop, "v2")
        record_step(loop, "v2", deployed_over=deployed["previous"])
        assert gateway.routes.alias(SERVED).last_known_good == f"{SERVED}-v1"

        rolled = rollback_step(loop)  # v1 is still loaded: a flip, no load
        assert rolled["version"] == "v1" and rolled["deploy"]["bakes"] == []
        assert gateway.routes.alias(SERVED).routes == {f"{SERVED}-v1": 100.0}
        time.sleep(1.0)
    assert load.failures == []
    assert load.wrong == []
    assert load.answers[f"{SERVED}-v1"] > 0 and load.answers[f"{SERVED}-v2"] > 0
    for url in urls:
        with VllmClient(url) as client:
            assert sorted(versions_on(client, SERVED)) == [f"{SERVED}-v1", f"{SERVED}-v2"]
