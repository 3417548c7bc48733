"""Adapters through object storage: a REAL vLLM CPU server with the tuneloop resolver fetches
each version from an S3 API (moto's server over HTTP, another process) onto its own disk; the
deploy, verify and reconcile steps run with ``vllm.adapter_source: store`` and no directory
shared with the server. A version whose stored bytes do not match its pinned hash is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from fixtures_vllm import (
    MAX_TOKENS,
    PROMPTS,
    REPO,
    SERVED,
    build_lora_adapter,
    build_tiny_llama,
    free_port,
    serve_sh,
    serves,
    stable_answers,
    staged_answers,
)

from tuneloop.provenance import dir_digest
from tuneloop.serving.store_resolver import AdapterFetchError, fetch_on_server, fetch_version
from tuneloop.serving.vllm_client import VllmClient
from tuneloop.steps.loop import Loop, open_loop
from tuneloop.steps.serve import deploy_step, reconcile_step, record_step, verify_step
from tuneloop.storage import S3Store

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.ml, pytest.mark.integration, pytest.mark.slow]

FILES = ("adapter_config.json", "adapter_model.safetensors")
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server as its own process (the orchestration env has it), on loopback."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(REPO / ".venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def world(s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("store-adapters")
    base = build_tiny_llama(root / "base")
    adapters = {f"v{i}": build_lora_adapter(base, root / "built" / f"v{i}", seed=i) for i in (1, 2)}
    bucket = f"adapters-{uuid.uuid4().hex[:8]}"
    env = {**AWS, "TUNELOOP__STORE__URI": f"s3://{bucket}/loop", "TUNELOOP__STORE__ENDPOINT_URL": s3}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    S3Store(bucket, endpoint_url=s3)._client.create_bucket(Bucket=bucket)
    cache = root / "server-cache"  # the server's own disk: nothing here is written by the test
    run_dir, port = root / "run", free_port()
    os.environ["TUNELOOP_ADAPTER_CACHE"] = str(cache)
    try:
        result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    finally:
        del os.environ["TUNELOOP_ADAPTER_CACHE"]
    try:
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr[-3000:]}"
        url = f"http://127.0.0.1:{port}"
        answers = staged_answers(url, adapters)
        config = root / "tuneloop.yaml"
        config.write_text(yaml.safe_dump({
            "store": {"uri": f"s3://{bucket}/loop", "endpoint_url": s3},
            "model": {"base_model": str(base), "served_model_name": SERVED},
            "vllm": {"endpoints": [url], "adapter_source": "store", "adapter_dir": str(root / "worker-local"), "max_lora_rank": 16},
            "eval": {"max_new_tokens": MAX_TOKENS},
        }))  # fmt: skip
        yield {"root": root, "base": base, "adapters": adapters, "answers": answers, "url": url, "cache": cache, "config": config, "log": run_dir / "vllm.log"}
    finally:
        serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _publish(loop: Loop, version: str, files: Path, pinned_from: Path | None = None) -> None:
    loop.store.put_dir(f"adapters/{version}", files)
    loop.registry.register(
        version, adapter_key=f"adapters/{version}", snapshot=None, base_model="tiny",
        adapter_hash=dir_digest(pinned_from or files, suffixes=FILES),
    )  # fmt: skip




def test_the_server_fetches_every_version_from_s3_and_the_swap_keeps_its_checks(world: dict[str, Any]) -> None:
    loop = open_loop(str(world["config"]), run_id="store-source", progress=print)
    url, cache = world["url"], world["cache"]
    for version in ("v1", "v2"):
        _publish(loop, version, world["adapters"][version])
    loop.registry.promote("v1", reason="bootstrap", run_id="setup")

    assert reconcile_step(loop)["endpoints"][0]["action"] == "loaded"
    v1_root = serves(url)
    assert v1_root is not None and Path(v1_root).parent == cache.resolve() and Path(v1_root).name.startswith("v1-")
    assert stable_answers(url) == world["answers"]["v1"]

    deployed = deploy_step(loop, "v2")
    verify_step(loop, "v2")
    record_step(loop, "v2", deployed_over=deployed["previous"])
    v2_root = serves(url)
    assert v2_root is not None and Path(v2_root).parent == cache.resolve() and Path(v2_root).name.startswith("v2-")
    assert stable_answers(url) == world["answers"]["v2"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([Path(v1_root).name, Path(v2_root).name]), "no partial directory is left"
    with VllmClient(url) as client:
        assert not [name for name in client.adapters() if "-fetch-" in name], "the fetch names are unloaded"
    assert not (world["root"] / "worker-local" / "v2").exists() or serves(url) != str(world["root"] / "worker-local" / "v2")

    # a vLLM restart forgets its runtime adapters: reconcile fetches production again (from its cache)
    with VllmClient(url) as client:
        client.unload_adapter(SERVED)
    assert reconcile_step(loop)["endpoints"][0]["action"] == "loaded" and serves(url) == v2_root


def test_a_version_whose_bytes_do_not_match_its_pin_is_refused_and_production_stays(world: dict[str, Any], tmp_path: Path) -> None:
    loop = open_loop(str(world["config"]), run_id="store-tampered", progress=print)
    production_root = serves(world["url"])
    _publish(loop, "v3", world["adapters"]["v2"], pinned_from=world["adapters"]["v1"])  # v2's bytes under v1's hash
    with pytest.raises(RuntimeError, match="does not match its registry record"):
        deploy_step(loop, "v3")  # the worker's own copy fails the check first: nothing reaches a server
    with VllmClient(world["url"]) as client, pytest.raises(AdapterFetchError) as caught:
        fetch_on_server(client, SERVED, "v3")  # and the server's resolver refuses it too
    assert "could not fetch v3 from the store" in str(caught.value) and "Its log says why" in str(caught.value)
    assert "does not match the hash its registry record pins" in world["log"].read_text(errors="replace")
    assert serves(world["url"]) == production_root
    assert not [p for p in world["cache"].iterdir() if p.name.startswith(("v3", ".v3"))], "nothing of v3 is kept"
    with pytest.raises(AdapterFetchError, match="does not match the hash"):  # the same check, off the server
        fetch_version(loop.store, "v3", tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_evaluation_through_vllm_loads_the_servers_own_copy(world: dict[str, Any], tmp_path: Path) -> None:
    """With adapter_source store, `evaluate --backend vllm --adapter v2` has the server fetch v2
    itself; the answers are v2's and the temporary name is gone afterwards."""
    import json
    import sys

    rows = [{"id": f"p{i}", "prompt": prompt, "completion": answer} for i, (prompt, answer) in enumerate(zip(PROMPTS, world["answers"]["v2"], strict=True))]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELOOP__EVAL__MAX_NEW_TOKENS": str(MAX_TOKENS)}
    command = [sys.executable, "-m", "tuneloop.cli", "evaluate", "--config", str(world["config"]), "--backend", "vllm", "--adapter", "v2",
               "--eval", str(eval_file), "--no-suites", "--out", str(tmp_path / "out"), "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=world["root"], timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["backend"] == "vllm" and summary["overall"]["score"] == 1.0, summary["overall"]
    served = Path(summary["backend_detail"]["adapter_path"])
    assert served.parent == world["cache"].resolve() and served.name.startswith("v2-")
    with VllmClient(world["url"]) as client:
        assert not [name for name in client.adapters() if "-eval-" in name or "-fetch-" in name]
