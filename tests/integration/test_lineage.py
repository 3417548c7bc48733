"""OpenLineage sees the loop: a tuneloop_refresh run under ``dag.test()`` with the OpenLineage
provider's file transport emits events whose inputs and outputs are the loop's assets, converted
by tuneloop's own provider entry (``tuneloop_airflow/provider.py``), so that a lineage tool
draws labelled data -> snapshot -> adapter -> eval report -> production. The ML and vLLM steps
are stand-ins (as in test_notify_sinks.py): this module is about what the tasks declare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import stand_ins

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUN_REFRESH = """
import importlib
import sys
from datetime import UTC, datetime

import stand_ins

for target, stand_in in stand_ins.refresh_steps(1 / 6, intake=True).items():
    module, name = target.rsplit(".", 1)
    setattr(importlib.import_module(module), name, stand_in)
from airflow.dag_processing.dagbag import DagBag

run = DagBag(dag_folder=sys.argv[1]).dags["tuneloop_refresh"].test(logical_date=datetime(2026, 5, 7, tzinfo=UTC), run_conf={"force": True})
print("STATE", str(run.state).rsplit(".", 1)[-1].lower())
"""


def test_a_refresh_run_emits_openlineage_events_naming_the_loops_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: str) -> None:
    events_file = tmp_path / "openlineage.jsonl"
    for name, value in {
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file), "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "tuneloop-test",
        "AIRFLOW__OPENLINEAGE__DISABLED": "false",
        **stand_ins.refresh_env(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    from tuneloop.config import load_settings
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    registry = Registry(open_store_from_settings(load_settings()))
    registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    registry.move_aliases({"production": "v1"}, reason="test setup")
    # A process of its own: the OpenLineage listener is set up when Airflow's plugins first load,
    # which an earlier test of this session may have done without a transport.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RUN_REFRESH, str(ROOT / "dags")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "STATE success" in done.stdout, (done.stdout[-2000:], done.stderr[-4000:])

    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    completed = {e["job"]["name"].rsplit(".", 1)[-1]: e for e in events if e.get("eventType") == "COMPLETE" and "." in e["job"]["name"]}

    def names(event: dict[str, Any], side: str) -> set[tuple[str, str]]:
        return {(d["namespace"], d["name"]) for d in event.get(side) or []}

    loop = "tuneloop://loop"
    assert names(completed["validate"], "inputs") == {(loop, "labelled")}
    assert names(completed["validate"], "outputs") == {(loop, "dataset-snapshot")}
    assert names(completed["train"], "inputs") == {(loop, "dataset-snapshot"), (loop, "production-adapter")}
    assert names(completed["train"], "outputs") == {(loop, "candidate-adapter")}
    assert names(completed["gate"], "outputs") == {(loop, "eval-report")}
    assert names(completed["record"], "inputs") == {(loop, "eval-report"), (loop, "candidate-adapter")}
    assert names(completed["record"], "outputs") == {(loop, "production-adapter")}
