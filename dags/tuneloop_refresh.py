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

Logic lives in `include/tuneloop/steps/`; this file is wiring.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
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
from tuneloop.kubernetes import settings_at_parse_time

DRIFT = Asset(name=assets.DRIFT[0], uri=assets.DRIFT[1])
SNAPSHOT = Asset(name=assets.SNAPSHOT[0], uri=assets.SNAPSHOT[1])
ADAPTER = Asset(name=assets.ADAPTER[0], uri=assets.ADAPTER[1])
EVAL_REPORT = Asset(name=assets.EVAL_REPORT[0], uri=assets.EVAL_REPORT[1])
PRODUCTION = Asset(name=assets.PRODUCTION[0], uri=assets.PRODUCTION[1])

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
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
        vllm_connection=_vllm_connection,
    )


def _vllm_connection() -> Any:
    """The `tuneloop_vllm` connection (vLLM endpoints and API key), or None if not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get("tuneloop_vllm")
    except AirflowNotFoundException:
        return None


def _fail_without_retry(err: Exception) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(str(err)) from err


class HumanApproval(ApprovalOperator):
    """Asks a human to approve the gate's promotion (Approve/Reject in Airflow's Required
    Actions) when ``gate.require_approval`` or the run's ``require_approval`` param asks for
    it; otherwise passes at once. A Reject skips the deploy and is recorded with the report."""

    def execute(self, context: Any) -> Any:
        from tuneloop.approval import approval_body, approval_required, approval_subject
        from tuneloop.notify import store_links

        decision = context["ti"].xcom_pull(task_ids="gate")
        loop = _loop()
        cfg = loop.settings.gate
        requested = context["params"].get("require_approval", (context["dag_run"].conf or {}).get("require_approval"))
        if not approval_required(cfg.require_approval, requested):
            self.log.info("approval: not required (gate.require_approval=%s, param require_approval=%s): deploying %s", cfg.require_approval, requested, decision["version"])
            return {"version": decision["version"], "required": False, "decision": "approved"}
        links = {kind: store_links(loop, key) for kind, key in (decision.get("report") or {}).items() if kind in ("markdown", "html")}
        self.subject = approval_subject(decision)
        self.body = approval_body(decision, report_links=links, timeout_hours=cfg.approval_timeout_hours)
        self.response_timeout = timedelta(hours=cfg.approval_timeout_hours) if cfg.approval_timeout_hours else None
        wait = f"no answer in {cfg.approval_timeout_hours:g} h counts as Reject" if cfg.approval_timeout_hours else "no time limit"
        self.log.info("approval: waiting for a human to approve or reject %s (%s)", decision["version"], wait)
        try:
            self.log.info("approval: answer at %s", self.generate_link_to_ui_from_context(context=context))
        except ValueError:
            self.log.info("approval: answer in the Airflow UI under Required Actions")
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from tuneloop.approval import record_review

        if "error" not in event:  # recorded first: on Reject, the parent skips by raising
            loop = _loop()
            review = record_review(
                loop.store,
                context["ti"].xcom_pull(task_ids="gate"),
                chosen=event["chosen_options"][0],
                responded_by=event.get("responded_by_user"),
                responded_at=event.get("responded_at"),
                timed_out=bool(event.get("timedout")),
                run_id=loop.run_id,
            )
            self.log.info("%s", review["message"])
            from tuneloop.notify import approval_reject_message, notify_task_event, review_links

            # the message is None for an approval: the deploy message follows instead
            notify_task_event(lambda: loop, lambda lp: approval_reject_message(review, links=review_links(lp, review)), context=context)
        return super().execute_complete(context, event)


@dag(
    dag_id="tuneloop_refresh",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 1 1,4,7,10 *", timezone="UTC"), assets=DRIFT),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
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
    parse_time_settings = settings_at_parse_time()  # training_runner and the pod spec; never the Variable

    @task
    def pull(params: dict[str, Any] | None = None) -> dict[str, Any]:
        from tuneloop.intake.pull import NoNewDataError
        from tuneloop.steps.intake import pull_step

        params = params or {}
        try:
            return pull_step(_loop(), since=params.get("since"), until=params.get("until"), force=bool(params.get("force")))
        except NoNewDataError as err:
            _fail_without_retry(err)
            raise

    @task(outlets=[SNAPSHOT])
    def validate(plan: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        from tuneloop.intake.expectations import DataQualityError
        from tuneloop.steps.intake import validate_step

        try:
            result = validate_step(_loop(), plan)
        except DataQualityError as err:
            _fail_without_retry(err)
            raise
        if outlet_events is not None:
            outlet_events[SNAPSHOT].extra = {"snapshot": result["snapshot"], "counts": result["counts"]}
        return result

    @task(pool="gpu", outlets=[ADAPTER], execution_timeout=timedelta(hours=12))
    def train(snapshot: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        from tuneloop.steps.train import train_step

        result = train_step(_loop(), snapshot["snapshot"])
        if outlet_events is not None:
            outlet_events[ADAPTER].extra = {"version": result["version"], "snapshot": result["snapshot"]}
        return result

    def train_in_pod(validated: Any) -> Any:
        """`train` as one pod per run (training_runner: kubernetes; see include/tuneloop/kubernetes.py):
        `tuneloop train --register` in the trainer image; its result comes back through the XCom sidecar."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        from tuneloop.kubernetes import pod_operator_kwargs

        def record_adapter_event(context: Any, result: Any) -> None:
            context["outlet_events"][ADAPTER].extra = {"version": result["version"], "snapshot": result["snapshot"]}

        pod = KubernetesPodOperator(
            task_id="train",
            pool="gpu",
            outlets=[ADAPTER],
            execution_timeout=timedelta(hours=12),
            post_execute=record_adapter_event,
            **pod_operator_kwargs(parse_time_settings),
        )
        validated >> pod
        return pod.output

    @task(execution_timeout=timedelta(hours=6))
    def evaluate(candidate: dict[str, Any]) -> dict[str, Any]:
        from tuneloop.steps.evaluate import evaluate_step

        return evaluate_step(_loop(), candidate)

    @task(outlets=[EVAL_REPORT])
    def gate(evaluation: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        from tuneloop.notify import gate_reject_message, notify_task_event
        from tuneloop.steps.gate import gate_step

        loop = _loop()
        decision = gate_step(loop, evaluation)
        decision["scores_key"] = evaluation["candidate_eval"]["scores_key"]
        if outlet_events is not None:
            outlet_events[EVAL_REPORT].extra = {"version": decision["version"], "promote": decision["promote"], "report": decision["report_key"]}
        if not decision["promote"]:
            notify_task_event(lambda: loop, lambda _: gate_reject_message(decision))
        return decision

    @task.short_circuit
    def should_deploy(decision: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
        """Continue to deploy only when the gate promotes and this is not a dry run."""
        import logging

        logger = logging.getLogger("airflow.task")
        if (params or {}).get("dry_run"):
            logger.info("dry run: stopping after the gate (promote=%s)", decision["promote"])
            return False
        if not decision["promote"]:
            logger.info("gate rejected %s: %s", decision["version"], "; ".join(decision["reasons"]))
        return bool(decision["promote"])

    @task(retries=1)
    def deploy(decision: dict[str, Any]) -> dict[str, Any]:
        from tuneloop.notify import deploy_rollback_message, notify_task_event
        from tuneloop.serving.deploy import DeployError
        from tuneloop.steps.serve import deploy_step

        loop = _loop()
        try:
            return deploy_step(loop, decision["version"], scores_key=decision["scores_key"])
        except DeployError as err:  # it restored the previous adapter where it had swapped: say so
            report = err.report.to_dict() if err.report is not None else {}
            notify_task_event(lambda: loop, lambda _: deploy_rollback_message(report, version=decision["version"]))
            raise

    @task
    def verify(deployed: dict[str, Any]) -> dict[str, Any]:
        from tuneloop.steps.serve import verify_step

        return verify_step(_loop(), deployed["version"])

    @task(outlets=[PRODUCTION])
    def record(verified: dict[str, Any], decision: dict[str, Any], outlet_events: Any = None) -> dict[str, Any]:
        from tuneloop.notify import deploy_message, notify_task_event
        from tuneloop.steps.serve import record_step

        loop = _loop()
        gate_summary = {k: decision[k] for k in ("promote", "reasons", "slices", "report_key") if k in decision}
        summary = record_step(loop, verified["version"], gate_summary)
        if outlet_events is not None:
            outlet_events[PRODUCTION].extra = {"version": verified["version"]}
        links = {"gate report": (decision.get("report_links") or {}).get("html")}
        notify_task_event(lambda: loop, lambda _: deploy_message(summary, endpoints=loop.settings.vllm.endpoints, links=links))
        return summary

    @setup
    def reconcile_before() -> dict[str, Any]:
        """Every vLLM endpoint serves the registry's production before the swap (a restarted
        server has forgotten it), so a failed deploy restores what really served."""
        from tuneloop.steps.serve import reconcile_step

        return reconcile_step(_loop())

    @teardown
    def reconcile_after() -> dict[str, Any]:
        """Runs whatever happened to deploy, verify and record: a failure after the swap (the
        verify, the registry write) puts the registry's production back on every endpoint.
        As a teardown it does not decide the run's state: a failed `record` still fails the run."""
        from tuneloop.steps.serve import reconcile_step

        return reconcile_step(_loop())

    validated = validate(pull())
    trained = train_in_pod(validated) if parse_time_settings.training_runner == "kubernetes" else train(validated)
    decision = gate(evaluate(trained))
    approve = HumanApproval(task_id="approve", subject="Deploy the gate's candidate?", defaults=HumanApproval.REJECT, ignore_downstream_trigger_rules=True)
    before = reconcile_before()
    deployed = deploy(decision)
    should_deploy(decision) >> approve >> before >> deployed
    recorded = record(verify(deployed), decision)
    after = reconcile_after()
    recorded >> after
    before >> after


tuneloop_refresh()
