"""
### tuneloop_reconcile: the vLLM servers serve what the registry says, every 10 minutes

For every endpoint of `vllm.endpoints`: if the stable served name already serves the
registry's production adapter, check that it answers; else (a vLLM restarted and forgot its
runtime adapters, a failed deploy left another adapter) load production in place and check.
A server that is down fails the task with one line naming it; the next run, once the server
answers again, brings production back. While a deploy or rollback holds the fleet it does
nothing (that deploy ends in a reconcile of its own). The same as `tuneloop reconcile --if-idle`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from tuneloop_airflow import tasks


@dag(
    dag_id="tuneloop_reconcile",
    schedule=timedelta(minutes=10),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=9),
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["tuneloop", "llm", "serving"],
    doc_md=__doc__,
)
def tuneloop_reconcile() -> None:
    task(task_id="reconcile")(tasks.reconcile_if_idle)()


tuneloop_reconcile()
