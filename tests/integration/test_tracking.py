"""MLflow tracking (tuneloop/tracking.py) through the refresh DAG under ``dag.test()``: the real
pull, validate (GX), gate and record against a generated world in a local store, training and
evaluation stand-ins (as in test_notify_sinks.py), MLflow's own SQLite tracking store. One MLflow
run per refresh holds the snapshot as a dataset input, the gate's per-slice statistics and its
report; the registered model's aliases follow the registry. A dead tracking server costs one
warning and the refresh still succeeds."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import stand_ins
from processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: str) -> dict[str, Any]:
    for name, value in {
        **stand_ins.refresh_env(tmp_path),
        "TUNELOOP__DATA__MIN_ACCEPTED_ROWS": "20",
        "TUNELOOP__TASK__NAME": "invoices it",
        "TUNELOOP__TRACKING__MLFLOW": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    from tuneloop.config import load_settings
    from tuneloop.demo.invoices import generate_world
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    store = open_store_from_settings(load_settings())
    generate_world(store, date(2026, 1, 5), 6, drift_start=None, traffic_per_day=30, labelled_per_day=30)
    registry = Registry(store)
    registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    registry.move_aliases({"production": "v1"}, reason="test setup")
    for target, stand_in in stand_ins.refresh_steps(1 / 6).items():
        monkeypatch.setattr(target, stand_in)
    return {"root": tmp_path, "store": store, "registry": registry}


def _refresh(day: int) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    return bag.dags["tuneloop_refresh"].test(logical_date=datetime(2026, 5, day, tzinfo=UTC), run_conf={"force": True})


def test_a_refresh_is_one_mlflow_run_with_its_dataset_gate_report_and_aliases(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{world['root'] / 'mlflow.db'}"
    monkeypatch.setenv("TUNELOOP__TRACKING__URI", uri)
    run = _refresh(8)
    assert str(run.state).endswith("success")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("tuneloop/invoices it")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.run_id and found.data.tags["tuneloop.gate"] == "promote"
    assert found.info.status == "FINISHED"  # ended by the record step
    snapshot = found.data.params["data.snapshot"]
    [dataset_input] = found.inputs.dataset_inputs
    assert dataset_input.dataset.digest == snapshot[:32] and snapshot in dataset_input.dataset.source
    metrics = found.data.metrics
    assert metrics["data.total"] == metrics["data.accepted"] + metrics["data.quarantined"] > 0
    assert metrics["gate.promote"] == 1.0 and metrics["gate.drifted.delta"] > 0 and metrics["gate.drifted.ci_low"] <= metrics["gate.drifted.delta"]
    assert found.info.artifact_uri.startswith((world["root"] / "mlflow-artifacts").as_uri())  # beside the database, not ./mlruns
    artifacts = {a.path.removeprefix("gate_report/") for a in client.list_artifacts(found.info.run_id, "gate_report")}
    assert artifacts == {"gate.md", "gate.html", "gate.png", "gate-drifted.png", "gate-original.png"}
    production = world["registry"].aliases()["production"]
    assert production == "v2"
    for alias, version in (("production", "v2"), ("previous", "v1")):
        model_version = client.get_model_version_by_alias("tuneloop-invoices-it", alias)
        assert model_version.tags["tuneloop.version"] == version
        assert model_version.source == f"{world['store'].uri}/adapters/{version}"


def test_a_dead_tracking_server_costs_one_warning_and_the_refresh_succeeds(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TUNELOOP__TRACKING__URI", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="tuneloop.tracking"):
        run = _refresh(9)
    assert str(run.state).endswith("success")
    warnings = [r.getMessage() for r in caplog.records if r.name == "tuneloop.tracking"]
    assert len(warnings) == 1, warnings
    assert "not logged to MLflow at http://127.0.0.1:" in warnings[0] and "tracking is off" in warnings[0]
    assert world["registry"].aliases()["production"] == "v2"


def test_training_curves_and_params_reach_the_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tuneloop.config import load_settings
    from tuneloop.storage import LocalStore
    from tuneloop.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = load_settings(env={
        "TUNELOOP__TRACKING__MLFLOW": "true", "TUNELOOP__TRACKING__URI": uri, "TUNELOOP__TASK__NAME": "curves", "TUNELOOP__VLLM__API_KEY": "sk-never-in-mlflow",
    })
    tracker = Tracker(settings, run_key="manual__1", run_name="manual 1", store=LocalStore(tmp_path / "store"))
    result = {"version": "v3", "final_loss": 0.4, "tokens_per_second": 5100.0, "seconds": 12.5, "steps": 5, "init_from": "v2", "adapter_uri": "file:///x/adapters/v3"}
    provenance = {"base_model_hash": "92c80ffa", "packages": {"torch": "2.13.0"}}
    tracker.log_training(result, loss_history=[1.0, 0.8, 0.6, 0.5, 0.4], eval_loss_history=[[2, 0.9], [4, 0.7]], provenance=provenance)
    client = MlflowClient(tracking_uri=uri)
    [found] = client.search_runs([client.get_experiment_by_name("tuneloop/curves").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train.loss")] == [(1, 1.0), (2, 0.8), (3, 0.6), (4, 0.5), (5, 0.4)]
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train.eval_loss")] == [(2, 0.9), (4, 0.7)]
    assert found.data.params["training.lora_rank"] == str(settings.training.lora_rank) and found.data.params["train.init_from"] == "v2"
    assert found.data.metrics["train.tokens_per_second"] == 5100.0 and found.data.params["model.base_model_hash"] == "92c80ffa"
    config_file = Path(client.download_artifacts(found.info.run_id, "config.json", str(tmp_path)))
    assert "sk-never-in-mlflow" not in config_file.read_text() and '"lora_rank"' in config_file.read_text()
    # a second task of the same refresh finds the same run
    again = Tracker(settings, run_key="manual__1", run_name="manual 1", store=LocalStore(tmp_path / "store"))
    again.log_gate({"promote": False, "reasons": ["slice drifted: no gain"], "slices": {}, "report": {}})
    assert len(client.search_runs([found.info.experiment_id])) == 1
