"""Notifications arrive, for each of the four events, at real local sinks through Airflow's own
notifiers: a Slack incoming webhook (an HTTP server on loopback that the provider's
``SlackWebhookHook`` posts to, its URL built from the connection's schema, host and token) and
an SMTP server on loopback (a minimal sink written here: stdlib ``smtpd`` is deprecated and
``aiosmtpd`` is not a dependency) that ``SmtpHook`` talks real SMTP to.

The events are driven through the DAGs themselves with ``dag.test()``: the drift monitor's real
``check_drift`` on a drifted demo world; ``tuneloop_refresh`` with the real ``gate_step`` and
``record_step`` (its ML and vLLM steps are stand-ins, as in test_approval_dag.py, because this
module is about what the tasks tell people); ``tuneloop_rollback`` with the real
``rollback_step`` (its hot-swap a stand-in). Connections come from ``AIRFLOW_CONN_*``
variables, the ``notify`` settings from ``TUNELOOP__NOTIFY__*``, as a user would set them.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import socketserver
import threading
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import stand_ins
from processes import free_port, load_dag

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SLACK_TOKEN = "T0000TEST/B0000TEST/abcdefSECRET"
RECIPIENTS = ["ml-oncall@example.org", "ops@example.org"]
SENDER = "tuneloop@example.org"


# --- the sinks ----------------------------------------------------------------------------


class SlackSink(ThreadingHTTPServer):
    """Answers like Slack's incoming webhook (200 "ok") and keeps every POST."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _SlackHandler)
        self.received: list[dict[str, Any]] = []
        self.status = 200


class _SlackHandler(BaseHTTPRequestHandler):
    server: SlackSink

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append({"path": self.path, "body": json.loads(body), "content_type": self.headers.get("Content-Type")})
        reply = b"ok" if self.server.status == 200 else b"internal_error"
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class SmtpSink(socketserver.ThreadingTCPServer):
    """Enough of RFC 5321 for smtplib: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _SmtpHandler)
        self.received: list[dict[str, Any]] = []


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: SmtpSink

    def _reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        self._reply("220 sink.local ESMTP test sink")
        sender, recipients = "", []
        while line := self.rfile.readline():
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = command[:4].upper()
            if verb == "EHLO":
                self._reply("250-sink.local\r\n250 8BITMIME")
            elif verb == "HELO":
                self._reply("250 sink.local")
            elif verb == "MAIL":
                sender, recipients = command.split(":", 1)[1].strip().strip("<>"), []
                self._reply("250 OK")
            elif verb == "RCPT":
                recipients.append(command.split(":", 1)[1].strip().strip("<>"))
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                lines = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                message = email.message_from_bytes(b"".join(lines), policy=email.policy.default)
                self.server.received.append({"from": sender, "rcpt": recipients, "message": message})
                self._reply("250 OK: queued")
            elif verb in ("RSET", "NOOP"):
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 Bye")
                return
            else:
                self._reply("502 Command not implemented")


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def sinks() -> Iterator[dict[str, Any]]:
    slack, smtp = SlackSink(free_port()), SmtpSink(free_port())
    threads = [_serve(slack), _serve(smtp)]
    try:
        yield {"slack": slack, "smtp": smtp}
    finally:
        for server in (slack, smtp):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=10)


@pytest.fixture
def notify_env(sinks: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: str) -> dict[str, Any]:
    """Connections and settings as a user would define them; the sinks emptied."""
    slack, smtp = sinks["slack"], sinks["smtp"]
    slack.received.clear()
    smtp.received.clear()
    slack.status = 200
    env = {
        "AIRFLOW_CONN_TUNELOOP_SLACK": json.dumps(
            {"conn_type": "slackwebhook", "schema": "http", "host": f"127.0.0.1:{slack.server_address[1]}", "password": SLACK_TOKEN}
        ),
        "AIRFLOW_CONN_TUNELOOP_SMTP": json.dumps(
            {
                "conn_type": "smtp",
                "host": "127.0.0.1",
                "port": smtp.server_address[1],
                "extra": {"disable_tls": True, "disable_ssl": True, "retry_limit": 0, "timeout": 10},
            }
        ),
        "TUNELOOP__NOTIFY__SLACK_WEBHOOK_CONN_ID": "tuneloop_slack",
        "TUNELOOP__NOTIFY__SMTP_CONN_ID": "tuneloop_smtp",
        "TUNELOOP__NOTIFY__EMAIL_TO": ",".join(RECIPIENTS),
        "TUNELOOP__NOTIFY__EMAIL_FROM": SENDER,
        "TUNELOOP_HOME": str(tmp_path),
        "TUNELOOP__STORE__URI": str(tmp_path / "store"),
        "TUNELOOP__VLLM__ENDPOINTS": f"[http://127.0.0.1:{free_port()}, http://127.0.0.1:{free_port()}]",
        "TUNELOOP__GATE__IMPROVE_SLICES": "[drifted]",
        "TUNELOOP__GATE__MIN_EXAMPLES": "10",
        "TUNELOOP__GATE__BOOTSTRAP_SAMPLES": "300",
        "TUNELOOP__DRIFT__CURRENT_DAYS": "3",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    return {"slack": slack, "smtp": smtp, "store_dir": tmp_path / "store", "endpoints": env["TUNELOOP__VLLM__ENDPOINTS"]}


def _one_of_each(sinks: dict[str, Any], event_title: str) -> tuple[str, Any]:
    """The single Slack text and the single email of the event; both must have arrived."""
    slack = [r for r in sinks["slack"].received if event_title in r["body"]["text"]]
    mails = [r for r in sinks["smtp"].received if event_title in str(r["message"]["Subject"])]
    assert len(slack) == 1, [r["body"]["text"][:120] for r in sinks["slack"].received]
    assert len(mails) == 1, [str(r["message"]["Subject"]) for r in sinks["smtp"].received]
    # the webhook URL is the connection's schema://host + token, as the provider builds it
    assert slack[0]["path"] == "/" + SLACK_TOKEN
    assert slack[0]["content_type"].startswith("application/json")
    mail = mails[0]
    assert mail["from"] == SENDER and mail["rcpt"] == RECIPIENTS
    assert str(mail["message"]["Subject"]).startswith("[tuneloop] ")
    html_body = mail["message"].get_body(("html",)).get_content()
    return slack[0]["body"]["text"], html_body


# --- the loop around the DAGs -------------------------------------------------------------


def _dag(dag_id: str) -> Any:
    return load_dag(ROOT / "dags", dag_id)


def _states(run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in run.get_task_instances()}


def _refresh_stand_ins(monkeypatch: pytest.MonkeyPatch, *, gain: float, deploy: Callable[..., dict[str, Any]] | None = None) -> Any:
    """Production v1 in a local store; stand-ins for the ML and vLLM steps (gate and record are real)."""
    from tuneloop.config import load_settings
    from tuneloop.registry import Registry
    from tuneloop.storage import open_store_from_settings

    registry = Registry(open_store_from_settings(load_settings()))
    registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    registry.move_aliases({"production": "v1"}, reason="test setup")

    monkeypatch.setattr("tuneloop.steps.intake.pull_step", lambda loop, **_: {"partitions": []})
    monkeypatch.setattr("tuneloop.steps.intake.validate_step", lambda loop, plan: {"snapshot": "0" * 64, "counts": {}})
    monkeypatch.setattr("tuneloop.steps.train.train_step", stand_ins.train_step)
    monkeypatch.setattr("tuneloop.steps.evaluate.evaluate_step", stand_ins.evaluate_step(gain))
    monkeypatch.setattr("tuneloop.steps.serve.reconcile_step", lambda loop: {"production": loop.registry.aliases()["production"]})
    monkeypatch.setattr("tuneloop.steps.serve.deploy_step", deploy or (lambda loop, version, **_: {"version": version}))
    monkeypatch.setattr("tuneloop.steps.serve.verify_step", lambda loop, version: {"version": version})
    return registry


# --- the four events ----------------------------------------------------------------------


def test_drift_event_reaches_slack_and_email(notify_env: dict[str, Any]) -> None:
    from tuneloop.config import load_settings
    from tuneloop.demo.invoices import generate_world
    from tuneloop.storage import open_store_from_settings

    start = date(2026, 1, 5)
    drift_start = start + timedelta(days=28)
    generate_world(open_store_from_settings(load_settings()), start, 38, drift_start=drift_start, traffic_per_day=40, labelled_per_day=12)
    as_of = (drift_start + timedelta(days=6)).isoformat()

    run = _dag("tuneloop_drift_monitor").test(logical_date=datetime(2026, 5, 1, tzinfo=UTC), run_conf={"as_of": as_of})
    states = _states(run)
    assert states["emit_drift_event"] == "success", states

    slack, body = _one_of_each(notify_env, f"Drift detected as of {as_of}")
    check = json.loads(next((notify_env["store_dir"] / "drift" / "checks").glob(f"{as_of}__*.json")).read_text())
    assert check["emit"] is True
    for text in (slack, body):
        assert f"p-value {check['p_value']:.3g}" in text
        assert f"statistic: {check['statistic']:.3f}" in text
        assert "refresh requested" in text
    history = (notify_env["store_dir"] / "drift" / "history.png").as_uri()
    assert f"<{history}|drift history plot>" in slack
    assert f'href="{history}"' in body
    assert "/dags/tuneloop_drift_monitor/runs/" in body  # the task's log in the Airflow UI


def test_gate_reject_reaches_slack_and_email_with_the_failing_reasons(notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _refresh_stand_ins(monkeypatch, gain=0.0)  # no better on `drifted`: the real gate rejects

    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 5, 2, tzinfo=UTC), run_conf={"force": True})
    states = _states(run)
    assert states["gate"] == "success" and states["deploy"] == "skipped", states

    slack, body = _one_of_each(notify_env, "Gate rejected candidate v2")
    decision = json.loads((notify_env["store_dir"] / "reports" / "v2" / "gate.json").read_text())
    assert decision["promote"] is False and decision["reasons"]
    for text in (slack, body):
        assert "production stays v1" in text
        assert "slice drifted (improve, FAILED)" in text
    for reason in decision["reasons"]:
        assert reason.split(":")[0] in slack
    report = (notify_env["store_dir"] / "reports" / "v2" / "gate.html").as_uri()
    assert f"<{report}|gate report (HTML)>" in slack
    # nothing else was sent: no deploy, no rollback
    assert len(notify_env["slack"].received) == 1 and len(notify_env["smtp"].received) == 1


def test_deploy_event_reaches_slack_and_email_naming_version_and_servers(notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _refresh_stand_ins(monkeypatch, gain=1 / 6)

    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 5, 3, tzinfo=UTC), run_conf={"force": True})
    assert str(run.state).endswith("success"), _states(run)
    assert registry.aliases()["production"] == "v2"

    slack, body = _one_of_each(notify_env, "Deployed v2 to production")
    for text in (slack, body):
        assert "production: v2 (previous: v1)" in text
        for endpoint in notify_env["endpoints"].strip("[]").split(", "):
            assert endpoint in text
    assert len(notify_env["slack"].received) == 1  # a promoted candidate: no gate-reject message


def test_manual_rollback_reaches_slack_and_email(notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:

    registry = _refresh_stand_ins(monkeypatch, gain=0.0)
    registry.register("v2", adapter_key="adapters/v2", snapshot=None, base_model="demo")
    registry.promote("v2", reason="test setup")
    swapped: list[str] = []
    monkeypatch.setattr("tuneloop.steps.serve.deploy_step", lambda loop, version, **_: swapped.append(version) or {"version": version, "endpoints": [{"endpoint": "http://vllm-a:8000", "status": "deployed"}]})

    run = _dag("tuneloop_rollback").test(logical_date=datetime(2026, 5, 4, tzinfo=UTC), run_conf={"version": "previous"})
    assert str(run.state).endswith("success"), _states(run)
    assert swapped == ["v1"] and registry.aliases()["production"] == "v1"

    slack, body = _one_of_each(notify_env, "Rolled back production: v2 → v1")
    for text in (slack, body):
        assert "production: v2 → v1 (requested: 'previous')" in text
        assert "manual rollback (tuneloop_rollback run " in text
        assert "http://vllm-a:8000 (deployed)" in text


def test_automatic_rollback_of_a_failed_deploy_reaches_slack_and_email(notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.serving.deploy import DeployError, DeployReport, EndpointReport

    def failing_deploy(loop: Any, version: str, **_: Any) -> dict[str, Any]:
        report = DeployReport(
            adapter_dir=f"/adapters/{version}", served_path=f"/adapters/{version}", served_name="tuneloop",
            staging_name="tuneloop-staging", base_model="demo", previous_adapter_dir="/adapters/v1",
            started_at="2026-05-05T00:00:00+00:00",
            endpoints=[EndpointReport("http://vllm-a:8000", status="rolled_back"), EndpointReport("http://vllm-b:8000", status="failed")],
            failed_step="verify_stable", failed_endpoint="http://vllm-b:8000",
            error=f"deploy of /adapters/{version} to http://vllm-b:8000 failed at step verify_stable: 2 of 12 golden answers differ",
        )
        raise DeployError(report.error or "", step="verify_stable", endpoint="http://vllm-b:8000", report=report)

    registry = _refresh_stand_ins(monkeypatch, gain=1 / 6, deploy=failing_deploy)
    dag = _dag("tuneloop_refresh")
    dag.get_task("deploy").retries = 0  # one attempt: the retry would only repeat the message

    run = dag.test(logical_date=datetime(2026, 5, 5, tzinfo=UTC), run_conf={"force": True})
    states = _states(run)
    assert states["deploy"] == "failed" and states["record"] != "success", states
    assert registry.aliases()["production"] == "v1"

    slack, body = _one_of_each(notify_env, "Deploy of v2 failed: rolled back to the previous adapter")
    for text in (slack, body):
        assert "failed at step verify_stable on http://vllm-b:8000" in text
        assert "2 of 12 golden answers differ" in text
        assert "restored: /adapters/v1" in text
        assert "http://vllm-a:8000 (rolled_back)" in text


def test_a_channel_that_fails_is_a_warning_and_the_other_still_delivers(
    notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    notify_env["slack"].status = 500  # Slack is down
    _refresh_stand_ins(monkeypatch, gain=0.0)

    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 5, 6, tzinfo=UTC), run_conf={"force": True})
    states = _states(run)
    assert states["gate"] == "success", states  # the notification did not fail the task

    assert len(notify_env["slack"].received) >= 1  # it was tried...
    mails = [r for r in notify_env["smtp"].received if "Gate rejected candidate v2" in str(r["message"]["Subject"])]
    assert len(mails) == 1  # ...and email still went out
    captured = capfd.readouterr()
    logged = [line for line in (caplog.text + captured.out + captured.err).splitlines() if "notify:" in line and "not sent" in line]
    assert any("via slack (connection 'tuneloop_slack')" in line and "Status Code: 500" in line for line in logged), logged


def test_a_task_that_fails_after_its_retries_sends_one_failure_alert(notify_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """train raises on both of its tries: one message after the last try (a retry sends none),
    naming the DAG, the task, the run and the error, with the task's log link."""
    _refresh_stand_ins(monkeypatch, gain=0.0)
    calls = []

    def out_of_memory(loop: Any, snapshot: str, **_: Any) -> dict[str, Any]:
        calls.append(snapshot)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("tuneloop.steps.train.train_step", out_of_memory)
    dag = _dag("tuneloop_refresh")
    train = dag.get_task("train")
    train.retries, train.retry_delay, train.retry_exponential_backoff = 1, timedelta(seconds=1), False
    run = dag.test(logical_date=datetime(2026, 5, 6, tzinfo=UTC), run_conf={"force": True})
    states = _states(run)
    assert states["train"] == "failed" and str(run.state).endswith("failed"), states
    assert len(calls) == 2  # the first try and its retry

    slack, body = _one_of_each(notify_env, "tuneloop_refresh: task train failed")
    for text in (slack, body):
        assert "run: " in text and "tries: 2" in text
        assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in text
    assert "/dags/tuneloop_refresh/runs/" in body  # the task's log in the Airflow UI
    assert len(notify_env["slack"].received) == 1 and len(notify_env["smtp"].received) == 1
