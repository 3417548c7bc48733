"""The bodies of the DAGs' tasks. Each calls one ``tuneloop.steps`` function (the same one the
CLI calls) on the task's loop, then does only what is Airflow's business: the asset event's
``extra``, a notification, a failure without retry for errors a retry cannot fix.

The DAG files wire these with ``task(...)(tasks.NAME)``; the task id is the function's name.
"""

from __future__ import annotations

import logging
from typing import Any

from tuneloop_airflow import no_retry_on, notify, task_loop
from tuneloop_airflow.loops import current_assets

log = logging.getLogger("airflow.task")


def _extra(outlet_events: Any, stage: str, extra: dict[str, Any]) -> None:
    """The ``extra`` of this task's asset event (``stage``: DRIFT, SNAPSHOT...), on the running
    loop's asset (``tuneloop://loop/...``, or ``tuneloop://<id>/...`` in a loops folder)."""
    if outlet_events is not None:
        from airflow.sdk import Asset

        name, uri = current_assets()[stage]
        outlet_events[Asset(name=name, uri=uri)].extra = extra


# --- the drift monitor -----------------------------------------------------------------


def check_drift(params: dict[str, Any] | None = None) -> dict[str, Any]:
    from tuneloop.steps.monitor import check_drift as run_check

    return run_check(task_loop(), as_of=(params or {}).get("as_of"))


def drift_persists(check: dict[str, Any]) -> bool:
    """Go on to record the drift event only when the monitor's policy says so."""
    return bool(check["emit"])


def emit_drift_event(check: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
    """The drift asset event that starts ``tuneloop_refresh``, with what was found."""
    from tuneloop.notify import drift_links, drift_message
    from tuneloop.steps.monitor import drift_event_extra

    extra = drift_event_extra(check)
    _extra(outlet_events, "DRIFT", extra)
    notify(lambda loop: drift_message(check, links=drift_links(loop)))
    return extra


# --- the refresh -----------------------------------------------------------------------


def label(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data.label_source: teacher``: the teacher labels the traffic window before the pull;
    with labelled data (the default) there is nothing to do."""
    from tuneloop.intake.teacher import TeacherError
    from tuneloop.steps.label import label_step

    loop = task_loop()
    if loop.settings.data.label_source != "teacher":
        return {"label_source": loop.settings.data.label_source, "labelled": 0}
    with no_retry_on(TeacherError):  # residency, credentials, budget: a retry changes nothing
        return label_step(loop, as_of=(params or {}).get("until"))


def pull(params: dict[str, Any] | None = None) -> dict[str, Any]:
    from tuneloop.intake.pull import NoNewDataError
    from tuneloop.steps.intake import pull_step

    params = params or {}
    try:
        return pull_step(task_loop(), since=params.get("since"), until=params.get("until"), force=bool(params.get("force")))
    except NoNewDataError as err:
        # Nothing new to train on is a normal outcome of a scheduled or drift-triggered run: the
        # run ends skipped (green), not failed, and no failure alert goes out.
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"nothing to refresh: {err}. Trigger with force=true to retrain on every partition.") from None


def validate(plan: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
    from tuneloop.intake.expectations import DataQualityError
    from tuneloop.steps.intake import validate_step

    with no_retry_on(DataQualityError):
        result = validate_step(task_loop(), plan)
    _extra(outlet_events, "SNAPSHOT", {"snapshot": result["snapshot"], "counts": result["counts"]})
    return result


def train(snapshot: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
    from tuneloop.steps.train import train_step

    loop = task_loop()
    if loop.settings.training_runner == "kubernetes":
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            "the config says training_runner: kubernetes, but this DAG was parsed with the local runner: set "
            "TUNELOOP__TRAINING_RUNNER=kubernetes in the Airflow environment (scheduler, DAG processor, workers) so "
            "the refresh DAG's `train` task is a pod"
        )
    result = train_step(loop, snapshot["snapshot"])
    _extra(outlet_events, "ADAPTER", {"version": result["version"], "snapshot": result["snapshot"]})
    return result


def evaluate(candidate: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.steps.evaluate import evaluate_step

    return evaluate_step(task_loop(), candidate)


def gate(evaluation: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
    from tuneloop.notify import gate_reject_message, gate_report_links
    from tuneloop.steps.gate import gate_step

    loop = task_loop()
    decision = gate_step(loop, evaluation)
    _extra(outlet_events, "EVAL_REPORT", {"version": decision["version"], "promote": decision["promote"], "report": decision["report_key"]})
    if not decision["promote"]:
        notify(lambda lp: gate_reject_message(decision, links=gate_report_links(lp, decision)), loop=loop)
    return decision


def should_deploy(decision: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
    """Continue to deploy only when the gate promotes and this is not a dry run."""
    if (params or {}).get("dry_run"):
        log.info("dry run: stopping after the gate (promote=%s)", decision["promote"])
        return False
    if not decision["promote"]:
        log.info("gate rejected %s: %s", decision["version"], "; ".join(decision["reasons"]))
    return bool(decision["promote"])


def deploy(decision: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.notify import deploy_rollback_message
    from tuneloop.serving.deploy import DeployError
    from tuneloop.steps.serve import deploy_step

    loop = task_loop()
    try:
        return deploy_step(loop, decision["version"], scores_key=decision["scores_key"])
    except DeployError as err:  # it restored the previous adapter (or routes) where it had swapped: say so
        from tuneloop.serving.rollout import RolloutError

        report = err.rollout.to_dict() if isinstance(err, RolloutError) else err.report.to_dict() if err.report is not None else {}
        notify(lambda _: deploy_rollback_message(report, version=decision["version"]), loop=loop)
        raise


def verify(deployed: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.registry import UNCHECKED
    from tuneloop.steps.serve import verify_step

    # what the deploy replaced, for record's check that no rollback ran in between
    return {**verify_step(task_loop(), deployed["version"]), "deployed_over": deployed.get("previous", UNCHECKED)}


def record(verified: dict[str, Any], decision: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
    from tuneloop.notify import deploy_message, store_links
    from tuneloop.registry import UNCHECKED
    from tuneloop.steps.serve import record_step

    loop = task_loop()
    gate_summary: dict[str, Any] = {k: decision[k] for k in ("promote", "reasons", "slices", "report_key") if k in decision}
    summary = record_step(loop, verified["version"], gate_summary, deployed_over=verified.get("deployed_over", UNCHECKED))
    _extra(outlet_events, "PRODUCTION", {"version": verified["version"]})
    html = (decision.get("report") or {}).get("html")  # linked presigned when sent (never logged)
    notify(lambda lp: deploy_message(summary, endpoints=loop.settings.vllm.endpoints, links={"gate report": store_links(lp, html) if html else None}), loop=loop)
    return summary


def reconcile() -> dict[str, Any]:
    """Every vLLM endpoint serves the registry's production (see steps.serve.reconcile_step)."""
    from tuneloop.steps.serve import reconcile_step

    return reconcile_step(task_loop())


def reconcile_if_idle() -> dict[str, Any]:
    """The same, unless a deploy holds the fleet (``tuneloop reconcile --if-idle``)."""
    from tuneloop.steps.serve import reconcile_step

    return reconcile_step(task_loop(), if_idle=True)


# --- the rollback ----------------------------------------------------------------------


def rollback(params: dict[str, Any] | None = None, outlet_events: Any = None) -> dict[str, Any]:
    from airflow.sdk import get_current_context

    from tuneloop.notify import deploy_rollback_message, rollback_message
    from tuneloop.serving.deploy import DeployError
    from tuneloop.steps.serve import rollback_step

    loop = task_loop()
    requested = (params or {}).get("version") or "previous"
    try:
        result = rollback_step(loop, requested)
    except DeployError as err:  # the swap failed and restored what served before it
        report = err.report.to_dict() if err.report is not None else {}
        notify(lambda _: deploy_rollback_message(report, version=requested), loop=loop)
        raise
    _extra(outlet_events, "PRODUCTION", {"version": result["version"], "rollback_from": result["from"]})
    context = get_current_context()
    who = getattr(context.get("dag_run"), "triggering_user_name", None) or "unknown user"
    reason = f"manual rollback (tuneloop_rollback run {context['run_id']}, triggered by {who})"
    notify(lambda _: rollback_message(result, requested=requested, reason=reason), loop=loop, context=context)
    return result


# --- training in a pod -------------------------------------------------------------------


def train_in_pod(validated: Any, *, settings: Any) -> Any:
    """``train`` as one pod per run (``TUNELOOP_TRAINING_RUNNER=kubernetes``; see
    ``tuneloop.kubernetes``): ``tuneloop train --register`` in the trainer image; its result
    comes back through the XCom sidecar."""
    from datetime import timedelta

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import Asset

    from tuneloop.kubernetes import pod_operator_kwargs

    found = {stage: Asset(name=name, uri=uri) for stage, (name, uri) in current_assets().items()}
    adapter = found["ADAPTER"]

    def record_adapter_event(context: Any, result: Any) -> None:
        context["outlet_events"][adapter].extra = {"version": result["version"], "snapshot": result["snapshot"]}

    pod = KubernetesPodOperator(
        task_id="train",
        pool="gpu",
        inlets=[found["SNAPSHOT"], found["PRODUCTION"]],
        outlets=[adapter],
        execution_timeout=timedelta(hours=12),
        post_execute=record_adapter_event,
        **pod_operator_kwargs(settings),
    )
    validated >> pod
    return pod.output


def evaluate_in_pod(trained: Any, *, settings: Any) -> Any:
    """``evaluate`` as one pod per run, beside ``train_in_pod``: ``tuneloop evaluate --step`` in
    the same image (candidate and production scored, the result back through the XCom sidecar,
    the same dict the gate reads from the local task)."""
    from datetime import timedelta

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import Asset

    from tuneloop.kubernetes import pod_operator_kwargs

    found = {stage: Asset(name=name, uri=uri) for stage, (name, uri) in current_assets().items()}
    pod = KubernetesPodOperator(
        task_id="evaluate", inlets=[found["ADAPTER"], found["SNAPSHOT"]], execution_timeout=timedelta(hours=6),
        **pod_operator_kwargs(settings, component="evaluate"),
    )
    trained >> pod
    return pod.output
