"""tuneloop_refresh end to end with `dag.test()` against real local servers: an S3 API on
loopback (moto's HTTP server), the real vLLM OpenAI server (CPU build), Great Expectations,
and training/evaluation in the isolated ML env, on a model small enough for CI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TUNELOOP = Path(sys.executable).parent / "tuneloop"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(*command: str, env: dict[str, str], timeout: float = 900) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, s3_server: str, s3_client: Any) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("refresh")
    bucket = "tuneloop-it"
    s3_client.create_bucket(Bucket=bucket)
    port = _free_port()
    env = {
        "TUNELOOP_HOME": str(root),
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "HF_HUB_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TUNELOOP__STORE__URI": f"s3://{bucket}/tl",
        "TUNELOOP__STORE__ENDPOINT_URL": s3_server,
        "TUNELOOP__MODEL__BASE_MODEL": str(root / "model"),
        "TUNELOOP__VLLM__ENDPOINTS": f"[http://127.0.0.1:{port}]",
        "TUNELOOP__VLLM__ADAPTER_DIR": str(root / "served-adapters"),
        "TUNELOOP__TRAINING__MAX_STEPS": "60",
        "TUNELOOP__TRAINING__BATCH_SIZE": "8",
        "TUNELOOP__TRAINING__LEARNING_RATE": "0.005",
        "TUNELOOP__EVAL__MAX_NEW_TOKENS": "80",
        "TUNELOOP__GATE__MIN_EXAMPLES": "10",
        "TUNELOOP__GATE__BOOTSTRAP_SAMPLES": "1000",
        "TUNELOOP__DATA__MIN_ACCEPTED_ROWS": "20",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        full_env = dict(os.environ)
        _run("airflow", "db", "migrate", env={**full_env, "PATH": f"{Path(sys.executable).parent}:{full_env['PATH']}"}, timeout=300)
        _run(str(TUNELOOP), "build-model", "--preset", "tiny", "--out", str(root / "model"), "-q", env=full_env)
        _run(str(TUNELOOP), "demo-world", "--days", "8", "--labelled-per-day", "60", "--traffic-per-day", "80", "--heldout-per-domain", "16", "--bad-row-rate", "0.02", "-q", env=full_env)
        serve = ["bash", "scripts/serve.sh"]
        server_args = ["--port", str(port), "--model", str(root / "model"), "--run-dir", str(root / "vllm")]
        _run(*serve, "start", *server_args, env=full_env, timeout=400)
        try:
            yield {"root": root, "port": port, "env": full_env, "bucket": bucket}
        finally:
            subprocess.run([*serve, "stop", *server_args], env=full_env, cwd=ROOT, timeout=120, check=False)


def _dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[dag_id]


def _task_states(run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_refresh_bootstraps_and_hot_swaps_v1(world: dict[str, Any]) -> None:
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store
    from tuneloop.vllm_client import VllmClient

    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 1, 9, tzinfo=UTC), run_conf={"force": True})
    states = _task_states(run)
    assert str(run.state) == "success", states
    assert all(state in ("success", "TaskInstanceState.SUCCESS") for state in states.values()), states

    store = open_store(os.environ["TUNELOOP__STORE__URI"], endpoint_url=os.environ["TUNELOOP__STORE__ENDPOINT_URL"])
    registry = Registry(store)
    assert registry.aliases()["production"] == "v1"
    record = registry.get("v1")
    assert record["metrics"]["train"]["final_loss"] < record["metrics"]["train"]["first_loss"]
    gate = store.get_json("reports/v1/gate.json")
    assert gate["promote"] is True and set(gate["slices"]) == {"original", "drifted"}
    assert store.exists("reports/v1/gate.png") and "| original |" in store.get_text("reports/v1/gate.md").replace("`", "")

    client = VllmClient(f"http://127.0.0.1:{world['port']}")
    models = {m["id"]: m for m in client.models()}
    assert Path(models["tuneloop"]["root"]).name == "v1"
    assert client.chat("tuneloop", "Invoice INV-1 from Acme Ltd, total $10.00", max_tokens=8) is not None


def test_batch_failing_quality_thresholds_stops_before_training(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNELOOP__DATA__MAX_QUARANTINE_RATE", "0.001")
    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 1, 10, tzinfo=UTC), run_conf={"force": True, "dry_run": True})
    states = _task_states(run)
    assert str(run.state) == "failed"
    assert "failed" in states["validate"].lower()
    assert "success" not in states.get("train", "none").lower()
    captured = capfd.readouterr()
    log_text = caplog.text + captured.out + captured.err
    assert "data quality gate failed" in log_text and "exceeds data.max_quarantine_rate" in log_text
