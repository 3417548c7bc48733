"""What a human approver reads before a promoted candidate is deployed, and the record of the
answer (no Airflow here: the DAG's HITL task only calls these)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.approval import (
    APPROVE,
    REJECT,
    approval_body,
    approval_required,
    approval_subject,
    record_review,
    review_key,
)
from tuneloop.config import load_settings
from tuneloop.gate import decide
from tuneloop.storage import LocalStore

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


@pytest.fixture
def decision() -> dict[str, Any]:
    """The gate task's XCom for a promoted candidate v3 over production v2."""
    baseline, candidate = [], []
    for i in range(40):
        base = (i % 5) / 6
        baseline += [{"id": f"d{i}", "slice": "drifted", "score": base}, {"id": f"o{i}", "slice": "original", "score": base}]
        candidate += [{"id": f"d{i}", "slice": "drifted", "score": base + (1 / 6 if i % 3 else 0)}, {"id": f"o{i}", "slice": "original", "score": base}]
    gate = decide(baseline, candidate, improve_slices=["drifted"], min_examples=10, n_bootstrap=500)
    assert gate.promote
    return {"version": "v3", "baseline": "v2", "report_key": "reports/v3/gate.md", **gate.to_json()}


@pytest.mark.parametrize(
    ("configured", "requested", "asked"),
    [(False, None, False), (False, False, False), (False, True, True), (True, None, True), (True, False, True)],
)
def test_a_run_can_ask_for_approval_but_never_waive_the_config(configured: bool, requested: bool | None, asked: bool) -> None:
    assert approval_required(configured, requested) is asked


def test_approval_is_off_by_default_with_a_reject_timeout() -> None:
    gate = load_settings(env={}).gate
    assert gate.require_approval is False
    assert gate.approval_timeout_hours == 72
    assert load_settings(env={"TUNELOOP__GATE__APPROVAL_TIMEOUT_HOURS": "null"}).gate.approval_timeout_hours is None


def test_body_shows_every_slice_with_its_interval_the_reasons_and_the_report(decision: dict[str, Any]) -> None:
    links = {
        "markdown": ["s3://bucket/tl/reports/v3/gate.md"],
        "html": ["s3://bucket/tl/reports/v3/gate.html", "https://bucket.s3.amazonaws.com/tl/reports/v3/gate.html?X-Amz-Signature=abc"],
    }
    body = approval_body(decision, report_links=links, timeout_hours=72)
    for name, row in decision["slices"].items():
        line = next(line for line in body.splitlines() if line.startswith(f"| {name} |"))
        assert f"{row['delta']:+.3f}" in line and f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in line
        assert line.endswith("| pass |")
    assert "95% CI" in body and "**v3** over **v2**" in body
    for reason in decision["reasons"]:
        assert f"- {reason}" in body
    assert re.findall(r"<(\S+)>", body) == [*links["markdown"], *links["html"]]
    assert "(presigned link)" in body
    assert "No answer within 72 h counts as **Reject**" in body
    assert approval_subject(decision) == "Deploy candidate v3 to production (now: v2)?"


def test_body_without_links_or_timeout_still_says_where_and_how_long(decision: dict[str, Any]) -> None:
    body = approval_body(decision, timeout_hours=None)
    assert "<reports/v3/gate.md>" in body
    assert "without a time limit" in body


def test_a_human_reject_is_recorded_next_to_the_report(tmp_path: Path, decision: dict[str, Any]) -> None:
    store = LocalStore(tmp_path)
    at = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    review = record_review(store, decision, chosen=REJECT, responded_by={"id": "7", "name": "alice"}, responded_at=at, timed_out=False, run_id="manual__x")
    stored = store.get_json(review_key("v3"))
    assert review_key("v3") == "reports/v3/approval.json"
    assert stored["decision"] == "rejected" and stored["by"] == "alice" and stored["by_id"] == "7"
    assert stored["at"] == at.isoformat() and stored["timed_out"] is False and stored["run_id"] == "manual__x"
    assert stored["gate_report"] == "reports/v3/gate.md"
    assert review["message"].startswith("approval: candidate v3 REJECTED by a human (alice); nothing is deployed, v2 keeps serving")
    assert (tmp_path / "reports" / "v3" / "approval.json").as_uri() in review["message"]


def test_a_timeout_is_a_reject_by_nobody_and_approve_names_the_approver(tmp_path: Path, decision: dict[str, Any]) -> None:
    store = LocalStore(tmp_path)
    timed_out = record_review(store, decision, chosen=REJECT, responded_by=None, responded_at=None, timed_out=True, run_id="r")
    assert timed_out["decision"] == "rejected" and timed_out["by"] is None and timed_out["timed_out"] is True
    assert "nobody answered before the approval timeout" in timed_out["message"]
    approved = record_review(store, decision, chosen=APPROVE, responded_by={"id": "admin", "name": "admin"}, responded_at="2026-11-02T10:00:00+00:00", timed_out=False, run_id="r")
    assert store.get_json("reports/v3/approval.json")["decision"] == "approved"
    assert approved["message"].startswith("approval: candidate v3 APPROVED by admin; deploying")
    with pytest.raises(ValueError, match="'Approve' or 'Reject'"):
        record_review(store, decision, chosen="Maybe", responded_by=None, responded_at=None, timed_out=False, run_id="r")
