"""The refresh DAG's human approval: Airflow's ``ApprovalOperator`` (Required Actions), asked
only when ``gate.require_approval`` or the run's ``require_approval`` param wants it. The
decision is recorded beside the gate report; a Reject (or a timeout) deploys nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator

from tuneloop_airflow import notify, task_loop
from tuneloop_airflow.loops import CURRENT, SINGLE, LoopRef


class HumanApproval(ApprovalOperator):
    """Asks a human to approve the gate's promotion (Approve/Reject in Airflow's Required
    Actions) when ``gate.require_approval`` or the run's ``require_approval`` param asks for
    it; otherwise passes at once. A Reject skips the deploy and is recorded with the report."""

    def __init__(self, *, loop_ref: LoopRef = SINGLE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loop_ref = loop_ref

    def execute(self, context: Any) -> Any:
        token = CURRENT.set(self.loop_ref)
        try:
            return self._execute(context)
        finally:
            CURRENT.reset(token)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        token = CURRENT.set(self.loop_ref)
        try:
            return self._execute_complete(context, event)
        finally:
            CURRENT.reset(token)

    def _execute(self, context: Any) -> Any:
        from tuneloop.approval import approval_body, approval_required, approval_subject
        from tuneloop.notify import store_links

        decision = context["ti"].xcom_pull(task_ids="gate")
        loop = task_loop()
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

    def _execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from tuneloop.approval import record_review
        from tuneloop.notify import approval_reject_message, review_links

        if "error" not in event:  # recorded first: on Reject, the parent skips by raising
            loop = task_loop()
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
            # the message is None for an approval: the deploy message follows instead
            notify(lambda lp: approval_reject_message(review, links=review_links(lp, review)), loop=loop, context=context)
        return super().execute_complete(context, event)
