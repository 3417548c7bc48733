"""Many loops on one Airflow: two loop configs in $TUNELOOP_LOOPS_DIR become two independent sets
of DAGs (ids, assets, registries), which run with `dag.test()` against ONE real vLLM CPU server
(the base model listed under each loop's base name) and ONE S3 bucket (moto over HTTP), each
loop under its own prefix: a rollback of one loop never touches the other's served name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from processes import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ML_PYTHON = ROOT / ".venv-ml" / "bin" / "python"
LOOPS = ("alpha", "beta")
PROMPTS = ["Total: 5", "Hello there", "Invoice 42 from ACME"]
BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, "tests/integration")
from fixtures_vllm import build_lora_adapter, build_tiny_llama
root = Path(sys.argv[1])
base = build_tiny_llama(root / "base")
for name, seed in (("alpha-1", 1), ("alpha-2", 2), ("beta-1", 3)):
    build_lora_adapter(base, root / "adapters" / name, seed=seed)
"""


@dataclass
class Fleet:
    root: Path
    url: str
    loops_dir: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, airflow_db: str, s3_server: str, s3_client: Any) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("two-loops")
    subprocess.run([str(ML_PYTHON), "-c", BUILD, str(root)], cwd=ROOT, check=True, capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    s3_client.create_bucket(Bucket="loops")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loops_dir = root / "loops"
    loops_dir.mkdir()
    for loop in LOOPS:
        (loops_dir / f"{loop}.yaml").write_text(yaml.safe_dump({
            "store": {"uri": f"s3://loops/{loop}", "endpoint_url": s3_server},
            "model": {"base_model": str(root / "base"), "served_model_name": loop},
            "vllm": {"endpoints": [url], "adapter_dir": str(root / f"{loop}-served"), "max_lora_rank": 16},
            "eval": {"max_new_tokens": 8},
        }))  # fmt: skip
    serve = ["bash", "scripts/serve.sh"]
    args = ["--port", str(port), "--model", str(root / "base"), "--name", ",".join(LOOPS), "--run-dir", str(root / "vllm")]
    started = subprocess.run([*serve, "start", *args], cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert started.returncode == 0, started.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELOOP_LOOPS_DIR", str(loops_dir))
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        for name in [k for k in os.environ if k.startswith("TUNELOOP__") or k == "TUNELOOP_CONFIG"]:
            patch.delenv(name)
        try:
            yield Fleet(root, url, loops_dir)
        finally:
            subprocess.run([*serve, "stop", *args], cwd=ROOT, timeout=120, check=False)


def _dags() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return dict(bag.dags)


def _loop(fleet: Fleet, loop: str) -> Any:
    from tuneloop.steps.loop import open_loop

    return open_loop(str(fleet.loops_dir / f"{loop}.yaml"), run_id="setup", progress=lambda _m: None)


def _served(fleet: Fleet) -> dict[str, str]:
    from tuneloop.serving.vllm_client import VllmClient

    with VllmClient(fleet.url) as client:
        return client.adapters()


def _answers(fleet: Fleet, name: str) -> list[str]:
    from tuneloop.serving.vllm_client import VllmClient

    with VllmClient(fleet.url) as client:
        return client.chat_many(name, PROMPTS, max_tokens=8)


def test_two_loop_configs_make_two_independent_sets_of_dags(fleet: Fleet) -> None:
    dags = _dags()
    expected = {f"tuneloop_{loop}_{stage}" for loop in LOOPS for stage in ("drift_monitor", "refresh", "rollback", "reconcile")}
    assert set(dags) == expected, "a loops folder replaces the single loop's DAGs"
    for loop in LOOPS:
        refresh = dags[f"tuneloop_{loop}_refresh"]
        assert refresh.timetable.asset_condition.uri == f"tuneloop://{loop}/drift"
        assert f"loop:{loop}" in refresh.tags and f"tuneloop_{loop}_refresh" in refresh.doc_md
        assert [o.uri for o in dags[f"tuneloop_{loop}_rollback"].get_task("rollback").outlets] == [f"tuneloop://{loop}/production-adapter"]
        emit = dags[f"tuneloop_{loop}_drift_monitor"].get_task("emit_drift_event")
        assert [o.uri for o in emit.outlets] == [f"tuneloop://{loop}/drift"]


def test_both_loops_serve_from_one_vllm_with_their_own_registries(fleet: Fleet) -> None:
    from tuneloop.provenance import dir_digest

    files = ("adapter_config.json", "adapter_model.safetensors")
    adapters = fleet.root / "adapters"
    for loop, versions in (("alpha", ("alpha-1", "alpha-2")), ("beta", ("beta-1",))):
        opened = _loop(fleet, loop)
        for number, name in enumerate(versions, 1):
            opened.store.put_dir(f"adapters/v{number}", adapters / name)
            opened.registry.register(f"v{number}", adapter_key=f"adapters/v{number}", snapshot=None, base_model="tiny",
                                     adapter_hash=dir_digest(adapters / name, suffixes=files))  # fmt: skip
            opened.registry.promote(f"v{number}", reason="test setup", run_id=f"setup-{number}")
    dags = _dags()
    for loop in LOOPS:
        run = dags[f"tuneloop_{loop}_reconcile"].test()
        assert str(run.state).endswith("success"), {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    served = _served(fleet)
    assert served["alpha"] == str(fleet.root / "alpha-served" / "v2") and served["beta"] == str(fleet.root / "beta-served" / "v1")
    beta_answers = _answers(fleet, "beta")

    run = dags["tuneloop_alpha_rollback"].test(run_conf={"version": "previous"})
    assert str(run.state).endswith("success"), {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    after = _served(fleet)
    assert after["alpha"] == str(fleet.root / "alpha-served" / "v1")
    assert after["beta"] == served["beta"] and _answers(fleet, "beta") == beta_answers, "the other loop was touched"
    alpha, beta = _loop(fleet, "alpha"), _loop(fleet, "beta")
    assert alpha.registry.aliases() == {"production": "v1", "previous": "v2", "candidate": None}
    assert beta.registry.aliases() == {"production": "v1", "previous": None, "candidate": None}
    assert [r["version"] for r in beta.registry.versions()] == ["v1"] and len(beta.registry.history()) == 1
    assert alpha.store.uri == "s3://loops/alpha" and beta.store.uri == "s3://loops/beta"
    print(f"\n[two-loops] one vLLM at {fleet.url} serves {sorted(after)} for two loops; python {sys.executable}")
