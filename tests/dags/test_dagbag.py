"""The DAG files: they import cleanly, parse without heavy libraries, and wire the loop right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.dags

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
HEAVY = ("torch", "transformers", "peft", "vllm", "great_expectations", "pandas", "sklearn", "matplotlib")  # boto3: Airflow's amazon provider loads it itself
EXPECTED = {"tuneloop_drift_monitor", "tuneloop_reconcile", "tuneloop_refresh", "tuneloop_rollback"}


@pytest.fixture(scope="module")
def dagbag() -> Any:
    # tests/conftest.py has pointed AIRFLOW_HOME at a throwaway directory for the session.
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors_and_all_dags_present(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == EXPECTED


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_house_rules(dagbag: Any, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert "tuneloop" in dag.tags
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and dag_id in dag.doc_md
    for task in dag.tasks:
        assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_dag_files_parse_without_heavy_imports() -> None:
    """Parse each DAG file in a fresh interpreter and list what it imported."""
    script = (
        "import importlib.util, json, sys, time\n"
        "times = {}\n"
        "for path in sys.argv[1:]:\n"
        "    start = time.perf_counter()\n"
        "    spec = importlib.util.spec_from_file_location(path.rsplit('/', 1)[-1][:-3], path)\n"
        "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "    times[path] = time.perf_counter() - start\n"
        f"print(json.dumps({{'times': times, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    files = sorted(str(p) for p in DAGS.glob("*.py"))
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"DAG files imported heavy modules at parse time: {result['heavy']}"
    print("parse seconds per DAG file (first includes airflow.sdk import):", result["times"])


def test_refresh_schedule_is_quarterly_or_drift_and_wires_the_loop(dagbag: Any) -> None:
    from airflow.sdk import AssetOrTimeSchedule

    dag = dagbag.dags["tuneloop_refresh"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.asset_condition.uri == "tuneloop://loop/drift"
    assert dag.timetable.timetable.expression == "0 3 1 1,4,7,10 *"
    order = ["label", "pull", "validate", "train", "evaluate", "gate", "deploy", "verify", "record"]
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    assert dag.get_task("should_deploy").downstream_task_ids == {"approve"}
    assert dag.get_task("approve").downstream_task_ids == {"reconcile_before"}
    assert "deploy" in dag.get_task("reconcile_before").downstream_task_ids
    # the teardown reconciles whatever happened between the setup and it (verify, record)
    before, after = dag.get_task("reconcile_before"), dag.get_task("reconcile_after")
    # a teardown that does not decide the run state: a failed `record` still fails the run
    assert before.is_setup and after.is_teardown and not after.on_failure_fail_dagrun
    assert {"record", "reconcile_before"} <= after.upstream_task_ids
    assert dag.get_task("train").pool == "gpu"
    assert set(dag.params.keys()) == {"force", "since", "until", "dry_run", "require_approval"}
    outlets = {t.task_id: [o.uri for o in t.outlets] for t in dag.tasks if t.outlets}
    assert outlets["validate"] == ["tuneloop://loop/dataset-snapshot"]
    assert outlets["train"] == ["tuneloop://loop/candidate-adapter"]
    assert outlets["gate"] == ["tuneloop://loop/eval-report"]


def test_refresh_asks_a_human_only_between_the_gate_and_the_deploy(dagbag: Any) -> None:
    """`approve` is Airflow's ApprovalOperator: Approve/Reject, Reject when nobody answers in
    time, a Reject skips everything downstream; off unless the config or the run asks."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    dag = dagbag.dags["tuneloop_refresh"]
    approve = dag.get_task("approve")
    assert isinstance(approve, ApprovalOperator)
    assert approve.options == ["Approve", "Reject"] and approve.defaults == ["Reject"]
    assert approve.ignore_downstream_trigger_rules is True and approve.fail_on_reject is False
    assert approve.upstream_task_ids == {"should_deploy"}
    assert {"reconcile_before", "deploy", "verify", "record"} <= {t.task_id for t in approve.get_flat_relatives(upstream=False)}
    assert {"gate", "evaluate", "train"} <= {t.task_id for t in approve.get_flat_relatives(upstream=True)}
    assert dag.params["require_approval"] is False


def test_monitor_emits_drift_asset_only_behind_the_policy(dagbag: Any) -> None:
    dag = dagbag.dags["tuneloop_drift_monitor"]
    emit = dag.get_task("emit_drift_event")
    assert [o.uri for o in emit.outlets] == ["tuneloop://loop/drift"]
    assert "drift_persists" in emit.upstream_task_ids
    assert dag.get_task("check_drift").outlets == []


def test_the_ml_tasks_go_to_the_queue_the_airflow_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """TUNELOOP__ML_QUEUE (read at parse time, like TUNELOOP__TRAINING_RUNNER) puts train,
    evaluate and the drift check, the tasks that need the ML env or evaluate, on that queue."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("TUNELOOP__ML_QUEUE", "ml-gpu")
    queued = DagBag(dag_folder=str(DAGS)).dags
    refresh, monitor = queued["tuneloop_refresh"], queued["tuneloop_drift_monitor"]
    on_queue = {t.task_id for dag in (refresh, monitor) for t in dag.tasks if t.queue == "ml-gpu"}
    assert on_queue == {"train", "evaluate", "check_drift"}
    monkeypatch.delenv("TUNELOOP__ML_QUEUE")
    plain = DagBag(dag_folder=str(DAGS)).dags["tuneloop_refresh"]
    assert plain.get_task("train").queue == plain.get_task("gate").queue != "ml-gpu"


def test_reconcile_runs_every_ten_minutes_and_never_waits_for_a_deploy(dagbag: Any) -> None:
    from tuneloop_airflow import tasks

    dag = dagbag.dags["tuneloop_reconcile"]
    assert type(dag.timetable).__name__ == "DeltaTriggerTimetable" and dag.timetable.delta.total_seconds() == 600
    assert [t.task_id for t in dag.tasks] == ["reconcile"]
    assert dag.get_task("reconcile").python_callable is tasks.reconcile_if_idle


def test_rollback_is_manual_with_a_version_param(dagbag: Any) -> None:
    dag = dagbag.dags["tuneloop_rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert dag.params["version"] == "previous"
