"""Optional human approval between the gate and the deploy: what the approver reads, and the
record of what they decided.

Airflow's human-in-the-loop ``ApprovalOperator`` asks (``approve`` in
``dags/tuneloop_refresh.py``); this module decides whether to ask, writes the question from
the gate's decision, and stores the answer next to the gate report as
``reports/<version>/approval.json``. Nothing here imports Airflow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tuneloop import layout
from tuneloop.gate_report import slice_table_markdown

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tuneloop.storage import Store

APPROVE = "Approve"
REJECT = "Reject"


def approval_required(configured: bool, requested: bool | None) -> bool:
    """Ask when ``gate.require_approval`` is set or the run's ``require_approval`` param asks:
    a run may add the question, never waive what the config requires."""
    return bool(configured) or bool(requested)


def approval_subject(decision: Mapping[str, Any]) -> str:
    """One line: which candidate would replace what."""
    return f"Deploy candidate {decision['version']} to production (now: {decision['baseline']})?"


def approval_body(
    decision: Mapping[str, Any],
    *,
    report_links: Mapping[str, list[str]] | None = None,
    timeout_hours: float | None = None,
) -> str:
    """Markdown for the approver: the gate's verdict, every slice's delta with its interval,
    the reasons, where the full report is, and what each answer does."""
    version, baseline = decision["version"], decision["baseline"]
    level = f"{decision['ci_level'] * 100:g}%"
    lines = [
        f"The eval gate **promotes** candidate **{version}** over **{baseline}** "
        f"(paired bootstrap, {level} intervals, alpha {decision['alpha']}, "
        f"non-inferiority margin {decision['margin']}, {decision['n_pairs']} paired examples).",
        "",
        *slice_table_markdown(
            decision["slices"], decision.get("improve_slices", []), decision["ci_level"]
        ),
        "",
        "**Reasons**",
        "",
        *(f"- {reason}" for reason in decision["reasons"]),
        "",
        "**Report**",
        "",
    ]
    links = dict(report_links or {})
    report_key = decision.get("report_key")
    if not links and report_key:
        links = {"markdown": [str(report_key)]}
    labels = {"markdown": "Markdown, a plot per slice", "html": "HTML, plots inside"}
    for kind, urls in links.items():
        for position, url in enumerate(urls):
            label = labels.get(kind, kind) + (" (presigned link)" if position else "")
            lines.append(f"- {label}: <{url}>")
    if not links:
        lines.append("- (no report location recorded)")
    wait = (
        f"No answer within {timeout_hours:g} h counts as **Reject**."
        if timeout_hours
        else "This request waits for an answer without a time limit."
    )
    lines += [
        "",
        f"**Approve**: deploy {version} to every vLLM endpoint, verify it, make it production. "
        f"**Reject**: deploy nothing; {baseline} keeps serving and {version} is recorded as "
        f"rejected by you. {wait}",
    ]
    return "\n".join(lines)


def review_key(version: str) -> str:
    """Where the answer is stored: next to the candidate's gate report."""
    return f"{layout.report(version)}/approval.json"


def record_review(
    store: Store,
    decision: Mapping[str, Any],
    *,
    chosen: str,
    responded_by: Mapping[str, Any] | None,
    responded_at: datetime | str | None,
    timed_out: bool,
    run_id: str,
) -> dict[str, Any]:
    """Store the human's answer (or the timeout's default) as ``reports/<version>/approval.json``
    and return it with a one-line ``message`` for the task log."""
    if chosen not in (APPROVE, REJECT):
        raise ValueError(f"an approval answer is {APPROVE!r} or {REJECT!r}, got {chosen!r}")
    version = str(decision["version"])
    approved = chosen == APPROVE
    at = responded_at.isoformat() if isinstance(responded_at, datetime) else responded_at
    who = (responded_by or {}).get("name") or (responded_by or {}).get("id")
    record = {
        "version": version,
        "decision": "approved" if approved else "rejected",
        "by": None if timed_out else who,
        "by_id": None if timed_out else (responded_by or {}).get("id"),
        "timed_out": bool(timed_out),
        "at": at or datetime.now(UTC).isoformat(timespec="seconds"),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "baseline": decision.get("baseline"),
        "gate_report": decision.get("report_key"),
    }
    key = review_key(version)
    store.put_json(key, record)
    location = store.links(key)[0]
    if approved:
        message = f"approval: candidate {version} APPROVED by {who or 'an unnamed user'}; deploying (recorded at {location})"
    elif timed_out:
        message = (
            f"approval: candidate {version} REJECTED: nobody answered before the approval timeout, "
            f"whose default is Reject; nothing is deployed (recorded at {location})"
        )
    else:
        message = (
            f"approval: candidate {version} REJECTED by a human ({who or 'an unnamed user'}); "
            f"nothing is deployed, {decision.get('baseline')} keeps serving (recorded at {location})"
        )
    return {**record, "message": message}
