"""
### tuneloop_drift_monitor: is production traffic still what the adapter was trained on?

Daily. Compares the last `drift.current_days` of production traffic with the training data
of the adapter in production, using a calibrated two-sample test (`include/tuneloop/drift.py`),
and, when labelled rows newer than production's data exist, production's score on them against
its score at promotion (performance drift). Every check is stored in the store under
`drift/checks/` with a history plot (`drift/history.png`). When drift persists over
`drift.consecutive_checks` checks, or the score fell beyond `drift.performance_margin`, and the
last refresh's data is older than `drift.cooldown_days`, it records an event on the asset
`tuneloop://loop/drift`, which triggers `tuneloop_refresh`; the event carries the report.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, task

from tuneloop import assets
from tuneloop_airflow import tasks

DRIFT = Asset(name=assets.DRIFT[0], uri=assets.DRIFT[1])
ML_QUEUE = {"queue": os.environ["TUNELOOP__ML_QUEUE"]} if os.environ.get("TUNELOOP__ML_QUEUE") else {}  # the performance check evaluates


@dag(
    dag_id="tuneloop_drift_monitor",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True},
    tags=["tuneloop", "llm", "drift", "monitoring"],
    doc_md=__doc__,
    params={
        "as_of": Param(None, type=["null", "string"], format="date", description="Check the window ending on this day (YYYY-MM-DD); default: the newest traffic partition."),
    },
)
def tuneloop_drift_monitor() -> None:
    check = task(**ML_QUEUE)(tasks.check_drift)()
    task.short_circuit(tasks.drift_persists)(check) >> task(outlets=[DRIFT])(tasks.emit_drift_event)(check)


tuneloop_drift_monitor()
