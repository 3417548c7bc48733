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

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task

from tuneloop import assets

DRIFT = Asset(name=assets.DRIFT[0], uri=assets.DRIFT[1])

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
}


def _loop() -> Any:
    """Open the loop for this task: config from $TUNELOOP_CONFIG or the `tuneloop_config` Variable."""
    import logging

    from airflow.sdk import Variable, get_current_context

    from tuneloop.steps.loop import open_task_loop

    return open_task_loop(
        get_current_context()["run_id"],
        config_variable=lambda: Variable.get("tuneloop_config", default=None),
        progress=logging.getLogger("airflow.task").info,
    )


@dag(
    dag_id="tuneloop_drift_monitor",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["tuneloop", "llm", "drift", "monitoring"],
    doc_md=__doc__,
    params={
        "as_of": Param(None, type=["null", "string"], format="date", description="Check the window ending on this day (YYYY-MM-DD); default: the newest traffic partition."),
    },
)
def tuneloop_drift_monitor() -> None:
    @task
    def check_drift(params: dict[str, Any] | None = None) -> dict[str, Any]:
        from tuneloop.steps.monitor import check_drift as run_check

        return run_check(_loop(), as_of=(params or {}).get("as_of"))

    @task.short_circuit
    def drift_persists(check: dict[str, Any]) -> bool:
        """Go on to record the drift event only when the monitor's policy says so."""
        return bool(check["emit"])

    @task(outlets=[DRIFT])
    def emit_drift_event(check: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        report = check["report"]
        extra = {
            "source": "tuneloop_drift_monitor",
            "as_of": check["as_of"],
            "p_value": check["p_value"],
            "statistic": check["statistic"],
            "method": check["method"],
            "n_reference": check["n_reference"],
            "n_current": check["n_current"],
            "decision": check["decision"],
            "top_terms": report.get("top_terms", [])[:5],
            "performance": {k: check["performance"].get(k) for k in ("checked", "drift", "delta", "p_value", "reason")},
        }
        if outlet_events is not None:
            outlet_events[DRIFT].extra = extra
        from tuneloop.notify import drift_links, drift_message, notify_task_event

        notify_task_event(_loop, lambda loop: drift_message(check, links=drift_links(loop)))
        return extra

    check = check_drift()
    drift_persists(check) >> emit_drift_event(check)


tuneloop_drift_monitor()
