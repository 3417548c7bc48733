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
from typing import Any

from airflow.sdk import Asset, Param, dag, task

from tuneloop import assets

PRODUCTION = Asset(name=assets.PRODUCTION[0], uri=assets.PRODUCTION[1])


def _vllm_connection() -> Any:
    """The `tuneloop_vllm` connection (vLLM endpoints and API key), or None if not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get("tuneloop_vllm")
    except AirflowNotFoundException:
        return None


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
    @task(outlets=[PRODUCTION])
    def rollback(params: dict[str, Any] | None = None, outlet_events: Any = None) -> dict[str, Any]:
        import logging

        from airflow.sdk import Variable, get_current_context

        from tuneloop.notify import deploy_rollback_message, notify_task_event, rollback_message
        from tuneloop.serving.deploy import DeployError
        from tuneloop.steps.loop import open_task_loop
        from tuneloop.steps.serve import rollback_step

        loop = open_task_loop(
            get_current_context()["run_id"],
            config_variable=lambda: Variable.get("tuneloop_config", default=None),
            progress=logging.getLogger("airflow.task").info,
            vllm_connection=_vllm_connection,
        )
        requested = (params or {}).get("version") or "previous"
        try:
            result = rollback_step(loop, requested)
        except DeployError as err:  # the swap failed and restored what served before it
            report = err.report.to_dict() if err.report is not None else {}
            notify_task_event(lambda: loop, lambda _: deploy_rollback_message(report, version=requested))
            raise
        if outlet_events is not None:
            outlet_events[PRODUCTION].extra = {"version": result["version"], "rollback_from": result["from"]}
        context = get_current_context()
        who = getattr(context.get("dag_run"), "triggering_user_name", None) or "unknown user"
        reason = f"manual rollback (tuneloop_rollback run {context['run_id']}, triggered by {who})"
        notify_task_event(lambda: loop, lambda _: rollback_message(result, requested=requested, reason=reason), context=context)
        return result

    rollback()


tuneloop_rollback()
