"""
### tuneloop_refresh: pull, validate, train, gate and hot-swap a fresh LoRA adapter

Runs quarterly (03:00 UTC on the 1st of Jan/Apr/Jul/Oct) **or** whenever the drift asset
`tuneloop://loop/drift` gets an event (from `tuneloop_drift_monitor`, an Alertmanager/Grafana
webhook, or the REST API), **or** by hand with the params below.

`pull` -> `validate` (row checks + Great Expectations; bad rows quarantined with a reason;
the run fails with the counts when the batch fails its thresholds) -> content-addressed
snapshot -> `train` (LoRA in the isolated ML env, pool `gpu`) -> `evaluate` (candidate and
production on the held-out data of every slice) -> `gate` (paired bootstrap: better on the
improve slices, non-inferior elsewhere; report with a plot per slice, its location in the
log) -> `approve` (a human approves or rejects in Required Actions, only when
`gate.require_approval` or the `require_approval` param asks; otherwise it passes at once)
-> `deploy` (validate adapter, stage, verify, swap the stable name in place, roll back on
failure) -> `verify` -> `record` (registry aliases).
`reconcile_before` (setup) and `reconcile_after` (teardown, runs even when a step between
them failed) make every vLLM endpoint serve the registry's production version: after a
failed verify or registry write, the servers serve what the registry says again.
The vLLM endpoints and API key come from the config, or from the `tuneloop_vllm`
connection when it exists (host, or extra `{"endpoints": [...]}`; password = API key).
`train` runs on a worker of the `gpu` pool, and `train` and `evaluate` as one Kubernetes pod
each per run when the Airflow environment sets `TUNELOOP__TRAINING_RUNNER=kubernetes`; `TUNELOOP__ML_QUEUE=<queue>`
sends `train` and `evaluate` to the Celery/edge workers of that queue (the only settings read
while the file is parsed: the DAG's shape never depends on a config file or a Variable).

Logic lives in `include/tuneloop/steps/`; the task bodies in `include/tuneloop_airflow/tasks.py`;
this file is wiring.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    setup,
    task,
    teardown,
)

from tuneloop import assets
from tuneloop_airflow import tasks
from tuneloop_airflow.approval import HumanApproval

DRIFT, SNAPSHOT, ADAPTER, EVAL_REPORT, PRODUCTION = (Asset(name=name, uri=uri) for name, uri in (assets.DRIFT, assets.SNAPSHOT, assets.ADAPTER, assets.EVAL_REPORT, assets.PRODUCTION))
IN_A_POD = os.environ.get("TUNELOOP__TRAINING_RUNNER") == "kubernetes"  # an explicit Airflow-level choice
ML_QUEUE = {"queue": os.environ["TUNELOOP__ML_QUEUE"]} if os.environ.get("TUNELOOP__ML_QUEUE") else {}  # Celery/edge workers with the ML env


@dag(
    dag_id="tuneloop_refresh",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 1 1,4,7,10 *", timezone="UTC"), assets=DRIFT),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=10)},
    tags=["tuneloop", "llm", "lora", "refresh"],
    doc_md=__doc__,
    params={
        "force": Param(False, type="boolean", description="Use all partitions when none are new since the last snapshot."),
        "since": Param(None, type=["null", "string"], format="date", description="First labelled partition (YYYY-MM-DD); default: the day after the last snapshot."),
        "until": Param(None, type=["null", "string"], format="date", description="Last labelled partition (YYYY-MM-DD); default: the newest."),
        "dry_run": Param(False, type="boolean", description="Stop after the gate: train, evaluate and report, but do not deploy."),
        "require_approval": Param(False, type="boolean", description="A human approves a promoted candidate before the deploy (Required Actions in the UI). Always asked when the config sets gate.require_approval."),
    },
)
def tuneloop_refresh() -> None:
    validated = task(outlets=[SNAPSHOT])(tasks.validate)(task(tasks.pull)())
    if IN_A_POD:
        from tuneloop.kubernetes import settings_at_parse_time

        settings = settings_at_parse_time()
        evaluated = tasks.evaluate_in_pod(tasks.train_in_pod(validated, settings=settings), settings=settings)
    else:
        trained = task(pool="gpu", outlets=[ADAPTER], execution_timeout=timedelta(hours=12), **ML_QUEUE)(tasks.train)(validated)
        evaluated = task(execution_timeout=timedelta(hours=6), **ML_QUEUE)(tasks.evaluate)(trained)
    decision = task(outlets=[EVAL_REPORT])(tasks.gate)(evaluated)
    approve = HumanApproval(task_id="approve", subject="Deploy the gate's candidate?", defaults=HumanApproval.REJECT, ignore_downstream_trigger_rules=True)
    before = setup(task(task_id="reconcile_before")(tasks.reconcile))()
    deployed = task(retries=1)(tasks.deploy)(decision)
    task.short_circuit(tasks.should_deploy)(decision) >> approve >> before >> deployed
    recorded = task(outlets=[PRODUCTION])(tasks.record)(task(tasks.verify)(deployed), decision)
    after = teardown(task(task_id="reconcile_after")(tasks.reconcile))()
    recorded >> after
    before >> after


tuneloop_refresh()
