"""The four DAGs of one loop, built for the plain DAG files (the single loop) and for the DAG
factory of a loops folder (``dags/tuneloop_loops.py``, one set per ``$TUNELOOP_LOOPS_DIR/<id>.yaml``).

Wiring only, as the DAG files were: the task bodies are :mod:`tuneloop_airflow.tasks`, each
wrapped by :func:`tuneloop_airflow.loops.bound` so that it opens its own loop. What a DAG's
shape depends on is read while the file is parsed, from the Airflow environment only:
``TUNELOOP__TRAINING_RUNNER=kubernetes`` (train and evaluate as pods) and
``TUNELOOP__ML_QUEUE`` (the queue of the ML tasks).
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

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
from tuneloop_airflow.loops import CURRENT, SINGLE, LoopRef, bound

if TYPE_CHECKING:
    from collections.abc import Iterator

START = datetime(2026, 1, 1)


def _in_pods() -> bool:
    return os.environ.get("TUNELOOP__TRAINING_RUNNER") == "kubernetes"  # an explicit Airflow-level choice


def _ml_queue() -> dict[str, str]:
    queue = os.environ.get("TUNELOOP__ML_QUEUE")
    return {"queue": queue} if queue else {}  # Celery/edge workers with the ML env


@contextlib.contextmanager
def _building(ref: LoopRef) -> Iterator[dict[str, Asset]]:
    """The loop's assets, with :data:`CURRENT` set while its DAG is built (the pod tasks read it)."""
    token = CURRENT.set(ref)
    try:
        yield {stage: Asset(name=name, uri=uri) for stage, (name, uri) in assets.for_loop(ref.id).items()}
    finally:
        CURRENT.reset(token)


def _doc(ref: LoopRef, stage: str, doc: str | None) -> str:
    if ref == SINGLE:
        return doc or ""
    return f"### {ref.dag_id(stage)}\n\nLoop `{ref.id}` of the loops folder (config `{ref.config}`).\n\n{doc or ''}"


def _alerts(ref: LoopRef) -> dict[str, Any]:
    """Every task's failure alert (after its last retry) through the loop's notifiers."""
    from tuneloop_airflow import on_task_failure

    return {"on_failure_callback": bound(on_task_failure, ref)}


def _tags(ref: LoopRef, *more: str) -> list[str]:
    return ["tuneloop", "llm", *more, *([f"loop:{ref.id}"] if ref.id else [])]


def drift_monitor_dag(ref: LoopRef = SINGLE, *, doc: str | None = None) -> Any:
    """Daily: the drift check; on persisting drift an event on the loop's drift asset."""
    with _building(ref) as asset:

        @dag(
            dag_id=ref.dag_id("drift_monitor"),
            schedule="@daily",
            start_date=START,
            catchup=False,
            max_active_runs=1,
            default_args={**_alerts(ref), "owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True},
            tags=_tags(ref, "drift", "monitoring"),
            doc_md=_doc(ref, "drift_monitor", doc),
            params={
                "as_of": Param(None, type=["null", "string"], format="date", description="Check the window ending on this day (YYYY-MM-DD); default: the newest traffic partition."),
            },
        )
        def monitor() -> None:
            queue: Any = _ml_queue()
            check = task(task_id="check_drift", inlets=[asset["TRAFFIC"], asset["PRODUCTION"]], **queue)(bound(tasks.check_drift, ref))()
            persists = task.short_circuit(task_id="drift_persists")(bound(tasks.drift_persists, ref))(check)
            persists >> task(task_id="emit_drift_event", outlets=[asset["DRIFT"]])(bound(tasks.emit_drift_event, ref))(check)

        return monitor()


def refresh_dag(ref: LoopRef = SINGLE, *, doc: str | None = None) -> Any:
    """Quarterly or on the drift asset: [label] -> pull -> validate -> train -> evaluate -> gate ->
    [approve] -> deploy -> verify -> record, between a reconcile setup and teardown."""
    from tuneloop_airflow.approval import HumanApproval

    with _building(ref) as asset:

        @dag(
            dag_id=ref.dag_id("refresh"),
            schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 1 1,4,7,10 *", timezone="UTC"), assets=asset["DRIFT"]),
            start_date=START,
            catchup=False,
            max_active_runs=1,
            default_args={**_alerts(ref), "owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=10)},
            tags=_tags(ref, "lora", "refresh"),
            doc_md=_doc(ref, "refresh", doc),
            params={
                "force": Param(False, type="boolean", description="Use all partitions when none are new since the last snapshot."),
                "since": Param(None, type=["null", "string"], format="date", description="First labelled partition (YYYY-MM-DD); default: the day after the last snapshot."),
                "until": Param(None, type=["null", "string"], format="date", description="Last labelled partition (YYYY-MM-DD); default: the newest."),
                "dry_run": Param(False, type="boolean", description="Stop after the gate: train, evaluate and report, but do not deploy."),
                "require_approval": Param(False, type="boolean", description="A human approves a promoted candidate before the deploy (Required Actions in the UI). Always asked when the config sets gate.require_approval."),
            },
        )
        def refresh() -> None:
            def step(fn: Any, task_id: str | None = None, **options: Any) -> Any:
                return task(task_id=task_id or fn.__name__, **options)(bound(fn, ref))

            plan = step(tasks.pull, inlets=[asset["LABELLED"]])()
            step(tasks.label, inlets=[asset["TRAFFIC"]])() >> plan
            validated = step(tasks.validate, inlets=[asset["LABELLED"]], outlets=[asset["SNAPSHOT"]])(plan)
            if _in_pods():
                from tuneloop.config import load_settings
                from tuneloop.kubernetes import settings_at_parse_time

                settings = settings_at_parse_time() if ref.config is None else load_settings(ref.config)
                evaluated = tasks.evaluate_in_pod(tasks.train_in_pod(validated, settings=settings), settings=settings)
            else:
                trained = step(
                    tasks.train, pool="gpu", inlets=[asset["SNAPSHOT"], asset["PRODUCTION"]], outlets=[asset["ADAPTER"]],
                    execution_timeout=timedelta(hours=12), **_ml_queue(),
                )(validated)
                evaluated = step(tasks.evaluate, inlets=[asset["ADAPTER"], asset["SNAPSHOT"]], execution_timeout=timedelta(hours=6), **_ml_queue())(trained)
            decision = step(tasks.gate, inlets=[asset["ADAPTER"]], outlets=[asset["EVAL_REPORT"]])(evaluated)
            approve = HumanApproval(
                task_id="approve", subject="Deploy the gate's candidate?", defaults=HumanApproval.REJECT,
                ignore_downstream_trigger_rules=True, loop_ref=ref,
            )  # fmt: skip
            before = setup(step(tasks.reconcile, "reconcile_before"))()
            deployed = step(tasks.deploy, retries=1)(decision)
            task.short_circuit(task_id="should_deploy")(bound(tasks.should_deploy, ref))(decision) >> approve >> before >> deployed
            recorded = step(tasks.record, inlets=[asset["EVAL_REPORT"], asset["ADAPTER"]], outlets=[asset["PRODUCTION"]])(step(tasks.verify)(deployed), decision)
            after = teardown(step(tasks.reconcile, "reconcile_after"))()
            recorded >> after
            before >> after

        return refresh()


def rollback_dag(ref: LoopRef = SINGLE, *, doc: str | None = None) -> Any:
    """Manual: serve an earlier version again and move the aliases."""
    with _building(ref) as asset:

        @dag(
            dag_id=ref.dag_id("rollback"),
            schedule=None,
            start_date=START,
            catchup=False,
            max_active_runs=1,
            default_args={**_alerts(ref), "owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True},
            tags=_tags(ref, "rollback"),
            doc_md=_doc(ref, "rollback", doc),
            params={
                "version": Param("previous", type="string", pattern=r"^(v\d+|previous|production|candidate)$", description="Adapter version (v3) or alias to serve again."),
            },
        )
        def rollback() -> None:
            task(task_id="rollback", outlets=[asset["PRODUCTION"]])(bound(tasks.rollback, ref))()

        return rollback()


def reconcile_dag(ref: LoopRef = SINGLE, *, doc: str | None = None) -> Any:
    """Every 10 minutes: every vLLM endpoint serves the registry's production (if idle)."""
    with _building(ref):

        @dag(
            dag_id=ref.dag_id("reconcile"),
            schedule=timedelta(minutes=10),
            start_date=START,
            catchup=False,
            max_active_runs=1,
            dagrun_timeout=timedelta(minutes=9),
            default_args={**_alerts(ref), "owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
            tags=_tags(ref, "serving"),
            doc_md=_doc(ref, "reconcile", doc),
        )
        def reconcile() -> None:
            task(task_id="reconcile")(bound(tasks.reconcile_if_idle, ref))()

        return reconcile()


BUILDERS = (drift_monitor_dag, refresh_dag, rollback_dag, reconcile_dag)
