"""
### tuneloop_rollback: serve an earlier adapter version again

Manual only. Validates the chosen version's adapter, hot-swaps it into every vLLM endpoint
(staged, verified, with automatic restore on failure), checks the stable name answers from
it, and moves the registry aliases (`production` <- the version, `previous` <- what was
production). Param `version`: a version (`v3`) or an alias (`previous`, the default).
If the check or the registry write fails after the swap, every endpoint is reconciled back
to the registry's production version before the task fails.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, task

from tuneloop import assets
from tuneloop_airflow import tasks

PRODUCTION = Asset(name=assets.PRODUCTION[0], uri=assets.PRODUCTION[1])


@dag(
    dag_id="tuneloop_rollback",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": 2, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": True},
    tags=["tuneloop", "llm", "rollback"],
    doc_md=__doc__,
    params={
        "version": Param("previous", type="string", pattern=r"^(v\d+|previous|production|candidate)$", description="Adapter version (v3) or alias to serve again."),
    },
)
def tuneloop_rollback() -> None:
    task(outlets=[PRODUCTION])(tasks.rollback)()


tuneloop_rollback()
