"""Notification messages and their settings, without Airflow: what each event's message says,
which channels a config turns on, and that a failing channel is a warning, never an error.
The real notifiers against real sinks: tests/integration/test_notify_sinks.py."""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

from tuneloop.config import ConfigError, NotifySettings, load_settings
from tuneloop.notify import (
    Notification,
    approval_reject_message,
    channels,
    deploy_message,
    deploy_rollback_message,
    drift_message,
    gate_reject_message,
    notify_task_event,
    rollback_message,
    send_notification,
)

pytestmark = pytest.mark.unit

CHECK = {
    "as_of": "2026-02-08",
    "drift": True,
    "emit": True,
    "p_value": 0.000123,
    "statistic": 0.8123,
    "method": "classifier",
    "n_reference": 1000,
    "n_current": 120,
    "reference": "first 25 days of traffic",
    "current_window": ["2026-02-06", "2026-02-08"],
    "production": "v3",
    "streak": 2,
    "decision": "drift persisted over 2 check(s) (p=0.000123); refresh requested",
    "performance": {"checked": True, "drift": True, "delta": -0.0812, "p_value": 0.004},
    "report": {"top_terms": [{"term": "refund"}, {"term": "invoice"}]},
}
DECISION = {
    "version": "v4",
    "baseline": "v3",
    "promote": False,
    "reasons": ["drifted: CI low -0.012 <= 0: not better", "original: below the margin -0.05"],
    "slices": {
        "drifted": {"n": 40, "delta": 0.01, "ci_low": -0.012, "ci_high": 0.03, "p_value": 0.21, "rule": "improve", "passed": False},
        "original": {"n": 40, "delta": -0.08, "ci_low": -0.11, "ci_high": -0.05, "p_value": 0.9, "rule": "non_inferior", "passed": False},
    },
    "report_links": {
        "markdown": ["s3://bucket/tl/reports/v4/gate.md", "https://minio.example/reports/v4/gate.md?X-Amz-Signature=abc"],
        "html": ["s3://bucket/tl/reports/v4/gate.html", "https://minio.example/reports/v4/gate.html?X-Amz-Signature=abc&X-Amz-Expires=86400"],
    },
}


def test_drift_message_carries_statistic_p_value_window_and_performance() -> None:
    message = drift_message(CHECK, links={"drift history plot": ["file:///store/drift/history.png"]})
    assert message.event == "drift"
    assert message.title == "Drift detected as of 2026-02-08: refresh requested"
    text = message.plain_text()
    assert "statistic: 0.812 (classifier; 0.5 = no drift), p-value 0.000123" in text
    assert "1000 reference (first 25 days of traffic) vs 120 current" in text
    assert "current window: 2026-02-06 .. 2026-02-08" in text
    assert "production: v3; drifted checks in a row: 2" in text
    assert "score change -0.081, p-value 0.004 (fell beyond the margin)" in text
    assert "top drifted terms: refund, invoice" in text
    assert message.links == (("drift history plot", "file:///store/drift/history.png"),)


def test_approval_reject_message_says_who_rejected_or_that_nobody_answered() -> None:
    review = {"version": "v4", "decision": "rejected", "by": "ana", "timed_out": False, "at": "2026-03-02T10:00:00+00:00", "baseline": "v3"}
    message = approval_reject_message(review, links={"gate report": ["file:///r/gate.md", "https://s3.example/r/gate.md?sig=1"]})
    assert message is not None and message.event == "gate_reject"
    assert message.title == "Approval rejected candidate v4: production stays v3"
    assert "why: rejected by ana, at 2026-03-02T10:00:00+00:00" in message.facts
    assert message.links == (("gate report", "https://s3.example/r/gate.md?sig=1"),)
    timed_out = approval_reject_message({**review, "by": None, "timed_out": True})
    assert timed_out is not None and any("nobody answered before the approval timeout" in fact for fact in timed_out.facts)
    assert approval_reject_message({**review, "decision": "approved"}) is None, "an approval sends the deploy message instead"


def test_gate_reject_message_lists_every_reason_and_failing_slice_with_a_browser_link() -> None:
    message = gate_reject_message(DECISION)
    assert message.event == "gate_reject"
    assert message.title == "Gate rejected candidate v4: production stays v3"
    text = message.plain_text()
    assert "decision: REJECT v4 (compared with v3)" in text
    for reason in DECISION["reasons"]:
        assert f"reason: {reason}" in text
    assert "slice drifted (improve, FAILED): candidate - production +0.010 CI [-0.012, +0.030], p 0.21, n=40" in text
    # a presigned HTTPS link is preferred over the s3:// URI a browser cannot open
    assert dict(message.links)["gate report (HTML)"].startswith("https://minio.example/reports/v4/gate.html")
    assert message.data["reasons"] == DECISION["reasons"]


def test_slack_text_escapes_control_characters_and_formats_links() -> None:
    slack = gate_reject_message(DECISION).slack_text()
    assert slack.startswith("*Gate rejected candidate v4: production stays v3*\n")
    assert "• reason: drifted: CI low -0.012 &lt;= 0: not better" in slack  # '<' would open a Slack link
    url = DECISION["report_links"]["html"][1].replace("&", "&amp;")
    assert f"<{url}|gate report (HTML)>" not in slack  # the URL itself is not escaped...
    assert f"<{DECISION['report_links']['html'][1]}|gate report (HTML)>" in slack  # ...it is sent as is


def test_email_html_escapes_text_and_keeps_links() -> None:
    body = gate_reject_message(DECISION).html()
    assert "<h3>Gate rejected candidate v4: production stays v3</h3>" in body
    assert "<li>reason: drifted: CI low -0.012 &lt;= 0: not better</li>" in body
    assert 'href="https://minio.example/reports/v4/gate.html?X-Amz-Signature=abc&amp;X-Amz-Expires=86400"' in body


def test_deploy_message_names_version_previous_and_servers() -> None:
    recorded = {"version": "v4", "aliases": {"production": "v4", "previous": "v3"}, "gate": {"reasons": ["drifted: better"]}, "at": "2026-02-09T03:00:00+00:00", "run_id": "r1"}
    message = deploy_message(recorded, endpoints=["http://vllm-a:8000", "http://vllm-b:8000"])
    assert message.title == "Deployed v4 to production"
    text = message.plain_text()
    assert "production: v4 (previous: v3)" in text
    assert "servers (2): http://vllm-a:8000, http://vllm-b:8000" in text
    assert "gate: drifted: better" in text


def test_rollback_messages_manual_and_automatic() -> None:
    manual = rollback_message(
        {"version": "v2", "from": "v3", "deploy": {"endpoints": [{"endpoint": "http://vllm-a:8000", "status": "deployed"}]}},
        requested="previous",
        reason="manual rollback (run r9, triggered by alice)",
    )
    assert manual.event == "rollback" and manual.title == "Rolled back production: v3 → v2"
    assert "why: manual rollback (run r9, triggered by alice)" in manual.plain_text()
    assert "servers (1): http://vllm-a:8000 (deployed)" in manual.plain_text()

    report = {
        "previous_adapter_dir": "/adapters/v3",
        "failed_step": "verify_stable",
        "failed_endpoint": "http://vllm-b:8000",
        "error": "2 of 12 golden answers differ",
        "endpoints": [{"endpoint": "http://vllm-a:8000", "status": "rolled_back"}, {"endpoint": "http://vllm-b:8000", "status": "rolled_back"}],
    }
    automatic = deploy_rollback_message(report, version="v4")
    assert automatic is not None and automatic.event == "rollback"
    assert automatic.title == "Deploy of v4 failed: rolled back to the previous adapter"
    assert "restored: /adapters/v3" in automatic.plain_text()
    failed = deploy_rollback_message({**report, "endpoints": [{"endpoint": "http://vllm-a:8000", "status": "rollback_failed"}]}, version="v4")
    assert failed is not None and failed.title.startswith("ROLLBACK FAILED after the deploy of v4: 1 server(s)")
    # a deploy that failed before any swap (validation, preflight) rolled nothing back
    assert deploy_rollback_message({**report, "endpoints": [{"endpoint": "http://vllm-a:8000", "status": "failed"}]}, version="v4") is None


def test_long_lists_and_lines_are_clipped() -> None:
    message = gate_reject_message({**DECISION, "reasons": [f"reason {i} " + "x" * 2000 for i in range(30)], "slices": {}})
    reasons = [fact for fact in message.facts if fact.startswith("reason: ")]
    assert len(reasons) == 13 and reasons[-1] == "reason: ... and 18 more"
    assert all(len(fact) <= 610 for fact in message.facts)


# --- settings -----------------------------------------------------------------------------


def test_notifications_are_off_by_default() -> None:
    settings = load_settings(env={})
    assert settings.notify.events == ["drift", "gate_reject", "deploy", "rollback", "task_failed"]
    assert channels(settings.notify) == [] and not settings.notify.enabled


def test_notify_settings_from_the_environment() -> None:
    env = {
        "TUNELOOP__NOTIFY__SLACK_WEBHOOK_CONN_ID": "tuneloop_slack",
        "TUNELOOP__NOTIFY__SMTP_CONN_ID": "tuneloop_smtp",
        "TUNELOOP__NOTIFY__EMAIL_TO": "a@example.org, b@example.org",
        "TUNELOOP__NOTIFY__EVENTS": "[gate_reject, rollback]",
    }
    notify = load_settings(env=env).notify
    assert channels(notify) == [("slack", "tuneloop_slack"), ("smtp", "tuneloop_smtp")]
    assert notify.email_to == ["a@example.org", "b@example.org"]
    assert notify.events == ["gate_reject", "rollback"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TUNELOOP__NOTIFY__EVENTS": "[drift, deploys]"}, "notify.events.1"),
        ({"TUNELOOP__NOTIFY__SMTP_CONN_ID": "smtp_default"}, "email_to names no recipient"),
        ({"TUNELOOP__NOTIFY__SLACK": "x"}, "notify.slack = 'x': unknown key"),
    ],
)
def test_bad_notify_settings_fail_fast(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_settings(env=env)


# --- sending ------------------------------------------------------------------------------


class FakeNotifier:
    def __init__(self, sent: list[tuple[str, Notification]], channel: str, message: Notification, error: Exception | None) -> None:
        self.sent, self.channel, self.message, self.error = sent, channel, message, error

    def notify(self, context: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((self.channel, self.message))


def fake_factories(sent: list[tuple[str, Notification]], failing: dict[str, Exception] | None = None) -> dict[str, Any]:
    failing = failing or {}
    return {
        channel: (lambda settings, message, channel=channel: FakeNotifier(sent, channel, message, failing.get(channel)))
        for channel in ("slack", "smtp")
    }


BOTH = NotifySettings(slack_webhook_conn_id="s", smtp_conn_id="m", email_to=["a@example.org"])


def test_sends_to_every_configured_channel_only_for_subscribed_events() -> None:
    sent: list[tuple[str, Notification]] = []
    message = drift_message(CHECK)
    assert send_notification(BOTH, message, factories=fake_factories(sent)) == {"slack": "sent", "smtp": "sent"}
    assert [channel for channel, _ in sent] == ["slack", "smtp"]
    sent.clear()
    only_rollback = BOTH.model_copy(update={"events": ["rollback"]})
    assert send_notification(only_rollback, message, factories=fake_factories(sent)) == {}
    assert send_notification(NotifySettings(), message, factories=fake_factories(sent)) == {}
    assert send_notification(BOTH, None, factories=fake_factories(sent)) == {}
    assert sent == []


def test_a_failing_channel_is_a_warning_naming_channel_and_cause(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[tuple[str, Notification]] = []
    with caplog.at_level(logging.WARNING, logger="tuneloop.notify"):
        outcome = send_notification(BOTH, drift_message(CHECK), factories=fake_factories(sent, {"slack": ConnectionRefusedError("[Errno 111] refused")}))
    assert outcome == {"slack": "failed: ConnectionRefusedError: [Errno 111] refused", "smtp": "sent"}
    assert [channel for channel, _ in sent] == ["smtp"]
    warning = caplog.records[-1].getMessage()
    assert "via slack (connection 's')" in warning and "ConnectionRefusedError: [Errno 111] refused" in warning


def test_the_task_context_adds_the_airflow_log_link() -> None:
    sent: list[tuple[str, Notification]] = []
    context = {"ti": types.SimpleNamespace(log_url="http://airflow:8080/dags/d/runs/r/tasks/t")}
    send_notification(BOTH, drift_message(CHECK), context=context, factories=fake_factories(sent))
    assert ("Airflow task log", "http://airflow:8080/dags/d/runs/r/tasks/t") in sent[0][1].links


def test_notify_task_event_builds_nothing_when_off_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    built: list[str] = []
    off = types.SimpleNamespace(settings=types.SimpleNamespace(notify=NotifySettings()))
    assert notify_task_event(lambda: off, lambda loop: built.append("x") or drift_message(CHECK), context={}, factories=fake_factories([])) == {}
    assert built == []

    def broken_loop() -> Any:
        raise RuntimeError("store unreachable")

    with caplog.at_level(logging.WARNING, logger="tuneloop.notify"):
        assert notify_task_event(broken_loop, lambda loop: drift_message(CHECK), context={}, factories=fake_factories([])) == {"build": "failed: RuntimeError: store unreachable"}
    assert "notify: no message sent: building it failed: RuntimeError: store unreachable" in caplog.text


# -- the Slack webhook URL stays out of the logs ----------------------------------------------


class ScriptedSlack:
    """A Slack incoming webhook on loopback answering with ``statuses`` in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.statuses, self.served, self.bodies = list(statuses), [], []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                sink.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status = sink.statuses.pop(0) if sink.statuses else 200
                sink.served.append(status)
                reply = b"ok" if status == 200 else b"rate_limited" if status == 429 else b"internal_error"
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0SECRET/B0SECRET/tokenSECRETtoken"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Captured(logging.Handler):
    """Every record that reaches the root logger, as its handlers would write it (with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize(("statuses", "outcome"), [([429, 500], "sent"), ([500, 500, 500], "failed")], ids=["retried-then-sent", "retries-exhausted"])
def test_the_slack_webhook_url_is_in_no_log_record_when_slack_sdk_retries(monkeypatch: pytest.MonkeyPatch, statuses: list[int], outcome: str) -> None:
    import json

    import airflow.sdk  # noqa: F401 (Airflow sets up logging on import: capture after it)

    from tuneloop_airflow.notifiers import FACTORIES

    slack = ScriptedSlack(statuses)
    root, captured = logging.getLogger(), Captured()
    level = root.level
    root.addHandler(captured)
    root.setLevel(logging.DEBUG)
    try:
        monkeypatch.setenv("AIRFLOW_CONN_TUNELOOP_SLACK", json.dumps({"conn_type": "slackwebhook", "password": slack.url}))
        sent = send_notification(NotifySettings(slack_webhook_conn_id="tuneloop_slack"), drift_message(CHECK), factories=FACTORIES)
    finally:
        root.removeHandler(captured)
        root.setLevel(level)
        slack.close()
    assert sent["slack"].startswith(outcome) and slack.served == [*statuses, 200][:3]
    retries = [line for line in captured.lines if "A retry handler found" in line]
    assert len(retries) == 2 and all(" for POST *** - HTTP Error " in line for line in retries), retries  # slack_sdk names the URL here
    logged = "\n".join(captured.lines) + json.dumps(sent)
    assert "SECRET" not in logged and "/services/" not in logged


def test_slack_webhook_urls_are_redacted_from_slack_sdk_records_and_tracebacks() -> None:
    from tuneloop.notify import redact_slack_logs

    redact_slack_logs("https://chat.example.org/hooks/abcdefSECRET")
    root, captured = logging.getLogger(), Captured()
    root.addHandler(captured)
    try:
        logging.getLogger("slack_sdk.webhook.client").warning("Going to retry the same request: POST %s", "https://hooks.slack.com/services/T0/B0/SECRET")
        try:
            raise ValueError("Invalid URL detected: https://chat.example.org/hooks/abcdefSECRET")
        except ValueError:
            logging.getLogger("tuneloop.notify").exception("notify: failed")
    finally:
        root.removeHandler(captured)
    text = "\n".join(captured.lines)
    assert "Going to retry the same request: POST https://hooks.slack.com/***" in text
    assert "ValueError: Invalid URL detected: ***" in text and "SECRET" not in text


def test_a_task_failure_message_names_the_task_and_the_error_and_redacts_secrets() -> None:
    from tuneloop.notify import REDACTOR, task_failure_message

    REDACTOR.add("sk-live-123456")
    message = task_failure_message(
        dag_id="tuneloop_refresh", task_id="train", run_id="scheduled__2026-04-01", tries=3,
        error=RuntimeError("upload refused for key sk-live-123456: " + "x" * 5000),
    )
    assert message.event == "task_failed" and message.title == "tuneloop_refresh: task train failed"
    assert message.facts[:2] == ("run: scheduled__2026-04-01", "tries: 3")
    assert message.facts[2].startswith("error: RuntimeError: upload refused for key ") and "sk-live-123456" not in message.facts[2]
    assert len(message.facts[2]) <= 610
