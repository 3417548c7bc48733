"""The alert webhook (plugins/tuneloop_alerts.py) over real HTTP, served by a running Airflow.

One throwaway Airflow for the module, started with the environment of scripts/airflow_env.sh
in a temporary AIRFLOW_HOME on free ports: the API server (with ``TUNELOOP_ALERT_TOKEN``), the
scheduler and the DAG processor, plus a second API server on the same database started without
the token. A firing Alertmanager and a firing Grafana payload each record an event on the drift
asset, and the scheduler starts ``tuneloop_refresh`` from them. Those runs are harmless
(TUNELOOP_HOME and the store are empty temporary directories, so ``pull`` finds no data) and
the test marks them failed once it has seen them. The same alert sent again joins the run it
started instead of starting another (the de-duplication state lives in that store); an endless
chunked body gets 413 before it ends; calls over the rate limit get 429 with Retry-After.
Every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
from processes import free_port, stop_process_tree

from tuneloop.alerts import MAX_BODY_BYTES
from tuneloop.assets import DRIFT_ASSET_URI

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).parent / "airflow"
ENV_TOKEN = secrets.token_urlsafe(24)
VARIABLE_TOKEN = secrets.token_urlsafe(24)
START_TIMEOUT_S = 150
TRIGGER_TIMEOUT_S = 90
# The tests before the rate-limit test send ~15 calls with a valid token within seconds: a
# burst above that, and a rate slow enough that the last test can run the bucket dry.
RATE_LIMIT_BURST = 25
RATE_LIMIT_PER_MINUTE = 6


@dataclass
class LocalAirflow:
    url: str  # API server started with TUNELOOP_ALERT_TOKEN
    url_without_token: str  # API server on the same database, started without it
    home: Path
    api: httpx.Client  # public REST API, with a JWT from POST /auth/token
    asset_id: int

    def logs(self) -> str:
        return _log_tails(self.home)


def _log_tails(home: Path) -> str:
    """The end of each component's output, for failure messages."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(home.glob("*.out")))


def _start_script(home: Path, port: int, port_without_token: int, tuneloop_home: Path) -> str:
    """bash: the project's Airflow environment, then the components, each logging to HOME/*.out."""
    q = shlex.quote
    out = q(str(home))
    return f"""
set -euo pipefail
export AIRFLOW_HOME={q(str(home))} TUNELOOP_AIRFLOW_PORT={port} AIRFLOW__CORE__PARALLELISM=2
source {q(str(ROOT / "scripts/airflow_env.sh"))}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///{q(str(home))}/airflow.db
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:{port}/execution/
export AIRFLOW__API_AUTH__JWT_SECRET={secrets.token_hex(32)}
export AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT={free_port()}
export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT={free_port()}
export TUNELOOP_HOME={q(str(tuneloop_home))} TUNELOOP__STORE__URI={q(str(tuneloop_home / "store"))}
export TUNELOOP__VLLM__ENDPOINTS="[http://127.0.0.1:{free_port()}]"
export TUNELOOP__ALERTS__RATE_LIMIT_BURST={RATE_LIMIT_BURST} TUNELOOP__ALERTS__RATE_LIMIT_PER_MINUTE={RATE_LIMIT_PER_MINUTE}
unset TUNELOOP_ALERT_TOKEN TUNELOOP_ALERT_MATCH TUNELOOP_ALERT_NAMES TUNELOOP_CONFIG
printf '{{"admin": "admin"}}\\n' > "$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
airflow db migrate > {out}/migrate.out 2>&1
airflow dag-processor > {out}/dag-processor.out 2>&1 &
airflow scheduler > {out}/scheduler.out 2>&1 &
airflow api-server --apps core -H 127.0.0.1 -p {port_without_token} -w 1 > {out}/api-without-token.out 2>&1 &
TUNELOOP_ALERT_TOKEN="$ALERT_TOKEN_FOR_TEST" airflow api-server -H 127.0.0.1 -p {port} -w 1 > {out}/api-server.out 2>&1 &
wait
"""


def _wait_for(what: str, check: Any, timeout: float, airflow_logs: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{airflow_logs()}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAirflow]:
    home = tmp_path_factory.mktemp("alert-airflow")
    tuneloop_home = tmp_path_factory.mktemp("alert-tuneloop")
    (tuneloop_home / "store").mkdir()
    port, port_without_token = free_port(), free_port()
    url, url_without_token = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port_without_token}"
    script = _start_script(home, port, port_without_token, tuneloop_home)
    # The token travels in the environment, never on a command line `ps` shows.
    env = {**os.environ, "ALERT_TOKEN_FOR_TEST": ENV_TOKEN}
    process = subprocess.Popen(["bash", "-c", script], cwd=home, env=env, start_new_session=True)

    def logs() -> str:
        return _log_tails(home)

    def healthy(base: str) -> bool:
        assert process.poll() is None, f"Airflow exited with {process.returncode}\n{logs()}"
        return httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200

    api: httpx.Client | None = None
    try:
        _wait_for("the API servers", lambda: healthy(url) and healthy(url_without_token), START_TIMEOUT_S, logs)
        login = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10)
        assert login.status_code == 201, login.text
        api = httpx.Client(base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {login.json()['access_token']}"}, timeout=20)

        def drift_asset_id() -> int | None:
            found = api.get("/assets", params={"uri_pattern": DRIFT_ASSET_URI}).json().get("assets", [])
            dag = api.get("/dags/tuneloop_refresh")
            return found[0]["id"] if found and dag.status_code == 200 else None

        asset_id = _wait_for("the DAG processor to register tuneloop_refresh and its drift asset", drift_asset_id, START_TIMEOUT_S, logs)
        yield LocalAirflow(url=url, url_without_token=url_without_token, home=home, api=api, asset_id=asset_id)
    finally:
        if api is not None:
            api.close()
        stop_process_tree(process)


def alertmanager_payload(status: str = "firing", fingerprint: str = "a1b2c3d4e5f60718") -> dict[str, Any]:
    """As Alertmanager's webhook receiver posts it (version 4)."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="TuneloopTrafficDrift"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "tuneloop-refresh",
        "groupLabels": {"alertname": "TuneloopTrafficDrift"},
        "commonLabels": {"alertname": "TuneloopTrafficDrift", "severity": "page", "tuneloop": "drift"},
        "commonAnnotations": {"summary": "traffic drifted from the adapter's training data"},
        "externalURL": "http://alertmanager.example:9093",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "TuneloopTrafficDrift", "severity": "page", "tuneloop": "drift"},
                "annotations": {"summary": "traffic drifted from the adapter's training data"},
                "startsAt": "2026-11-02T09:51:03.157Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example:9090/graph?g0.expr=tuneloop_drift_p_value",
                "fingerprint": fingerprint,
            }
        ],
    }


def grafana_payload() -> dict[str, Any]:
    """As a Grafana unified-alerting webhook contact point posts it."""
    return {
        "receiver": "tuneloop",
        "status": "firing",
        "orgId": 1,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "Answer quality dropped", "grafana_folder": "ML", "tuneloop": "drift"},
                "annotations": {"summary": "field accuracy below 0.8 for 1h"},
                "startsAt": "2026-11-02T09:51:03.157076+02:00",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "https://grafana.example/alerting/grafana/abc/view",
                "fingerprint": "c6eadffa33fcdf37",
                "silenceURL": "https://grafana.example/alerting/silence/new",
                "values": {"B": 0.74, "C": 1},
            }
        ],
        "groupLabels": {"alertname": "Answer quality dropped"},
        "commonLabels": {"alertname": "Answer quality dropped", "tuneloop": "drift"},
        "commonAnnotations": {},
        "externalURL": "https://grafana.example/",
        "version": "1",
        "groupKey": '{}/{tuneloop="drift"}:{alertname="Answer quality dropped"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1] Answer quality dropped ML",
        "state": "alerting",
        "message": "**Firing**\n\nValue: B=0.74",
    }


def _post(base: str, body: Any, token: str | None = ENV_TOKEN, raw: bytes | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{base}/tuneloop/alerts", content=content, headers=headers, timeout=30)


def _drift_events(airflow: LocalAirflow) -> list[dict[str, Any]]:
    """The drift asset's events from the public REST API. Airflow 3.3.2 answers 500 while a run
    created by one of them is queued (NULL start_date, apache/airflow#71360): retry for 15 s."""
    for _ in range(15):
        reply = airflow.api.get("/assets/events", params={"asset_id": airflow.asset_id, "limit": 100})
        if reply.status_code != 500:
            break
        time.sleep(1)
    assert reply.status_code == 200, reply.text
    return reply.json()["asset_events"]


def test_without_a_token_configured_every_call_is_refused(airflow: LocalAirflow) -> None:
    reply = _post(airflow.url_without_token, alertmanager_payload(), token="anything")
    assert reply.status_code == 503, reply.text
    assert "TUNELOOP_ALERT_TOKEN" in reply.json()["detail"] and "tuneloop_alert_token" in reply.json()["detail"]
    assert _post(airflow.url_without_token, None, token=None, raw=b"not json").status_code == 503
    assert _drift_events(airflow) == []


def test_the_metrics_endpoint_serves_prometheus_text_behind_the_token(airflow: LocalAirflow) -> None:
    """GET /tuneloop/metrics on the running API server: 401 without the token; with it, text
    that prometheus_client's parser reads, labelled with the loop (an empty store: up, no versions)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{airflow.url}/tuneloop/metrics", timeout=30).status_code == 401
    reply = httpx.get(f"{airflow.url}/tuneloop/metrics", headers={"Authorization": f"Bearer {ENV_TOKEN}"}, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(reply.text) for s in f.samples}
    assert samples[("tuneloop_loop_up", (("loop", "loop"),))] == 1.0
    assert samples[("tuneloop_versions", (("loop", "loop"),))] == 0.0


def test_missing_or_wrong_token_is_401(airflow: LocalAirflow) -> None:
    for token, reason in ((None, "missing bearer token"), ("wrong-" + ENV_TOKEN, "invalid bearer token"), (ENV_TOKEN[:-1], "invalid bearer token")):
        reply = _post(airflow.url, alertmanager_payload(), token=token)
        assert reply.status_code == 401, reply.text
        assert reply.json()["detail"].startswith(reason)
        assert reply.headers["www-authenticate"] == "Bearer"
    basic = httpx.post(f"{airflow.url}/tuneloop/alerts", json=alertmanager_payload(), auth=("admin", ENV_TOKEN), timeout=30)
    assert basic.status_code == 401
    assert _drift_events(airflow) == []


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"{not json", 400, "body is not valid JSON"),
        (b"", 400, "body is empty"),
        (b"[]", 422, "payload must be a JSON object, got a list"),
        (b'{"version": "4", "status": "firing"}', 422, "no 'alerts' list"),
        (b'{"version": "4", "alerts": []}', 422, "'alerts' is empty"),
        (b'{"version": "4", "alerts": [{"status": "pending", "labels": {}}]}', 422, "alerts[0].status must be one of"),
        (b'{"status": "firing", "alerts": [{"status": "firing", "labels": {}}]}', 422, "not an Alertmanager"),
    ],
)
def test_bad_payloads_get_400_or_422_with_the_reason(airflow: LocalAirflow, raw: bytes, status: int, reason: str) -> None:
    reply = _post(airflow.url, None, raw=raw)
    assert reply.status_code == status, reply.text
    assert reason in reply.json()["detail"]


def test_resolved_alerts_record_nothing(airflow: LocalAirflow) -> None:
    reply = _post(airflow.url, alertmanager_payload(status="resolved"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["recorded"] is False
    assert "no firing alert" in reply.json()["reason"]
    assert _drift_events(airflow) == []


def test_the_airflow_variable_supplies_the_token_when_the_environment_does_not(airflow: LocalAirflow) -> None:
    created = airflow.api.post("/variables", json={"key": "tuneloop_alert_token", "value": VARIABLE_TOKEN})
    assert created.status_code == 201, created.text
    # The server without the environment variable now takes the Variable's token...
    reply = _post(airflow.url_without_token, alertmanager_payload(status="resolved"), token=VARIABLE_TOKEN)
    assert reply.status_code == 200 and reply.json()["recorded"] is False, reply.text
    assert _post(airflow.url_without_token, alertmanager_payload(status="resolved"), token=ENV_TOKEN).status_code == 401
    # ...while the environment's token wins where it is set.
    assert _post(airflow.url, alertmanager_payload(status="resolved"), token=VARIABLE_TOKEN).status_code == 401


def _run_consuming(airflow: LocalAirflow, event_id: int) -> dict[str, Any]:
    """Wait for the asset-triggered tuneloop_refresh run that consumed the event; return it.

    Active runs are marked failed once seen, or max_active_runs=1 would hold back the next
    one (unpausing also queued the cron's last tick). An asset-triggered run only once it has
    started: a run that never started breaks Airflow 3.3.2's asset event listings
    (apache/airflow#71360)."""
    found: dict[str, Any] = {}

    def stop(run: dict[str, Any]) -> None:
        if run["state"] not in ("queued", "running"):
            return
        # SQLite, shared with a busy scheduler and DAG processor, can answer "database is
        # locked" (a 500) on a loaded machine: retry the write a few times.
        for _ in range(10):
            stopped = airflow.api.patch(f"/dags/tuneloop_refresh/dagRuns/{run['dag_run_id']}", json={"state": "failed"})
            if stopped.status_code < 500:
                break
            time.sleep(1)
        assert stopped.status_code == 200, stopped.text

    def consumed() -> bool:
        runs = airflow.api.get("/dags/tuneloop_refresh/dagRuns", params={"limit": 100}).json()["dag_runs"]
        for run in runs:
            if run["run_type"] != "asset_triggered":
                stop(run)
            elif run["start_date"] is not None:
                events = airflow.api.get(f"/dags/tuneloop_refresh/dagRuns/{run['dag_run_id']}/upstreamAssetEvents")
                assert events.status_code == 200, events.text
                if event_id in {event["id"] for event in events.json()["asset_events"]}:
                    found.update(run)
                stop(run)
        return bool(found)

    _wait_for(f"an asset-triggered tuneloop_refresh run consuming asset event {event_id}", consumed, TRIGGER_TIMEOUT_S, airflow.logs)
    return found


def test_while_the_dag_is_paused_the_event_is_recorded_with_a_warning(airflow: LocalAirflow) -> None:
    assert airflow.api.get("/dags/tuneloop_refresh").json()["is_paused"] is True
    reply = _post(airflow.url, alertmanager_payload(fingerprint="0000000000000001"))
    assert reply.status_code == 202, reply.text
    assert reply.json()["triggers"] == [] and reply.json()["paused"] == ["tuneloop_refresh"]
    assert "starts no run while paused" in reply.json()["warning"]
    assert [e["id"] for e in _drift_events(airflow)] == [reply.json()["asset_event_id"]]


def test_firing_alertmanager_payload_records_a_drift_event_that_triggers_a_refresh(airflow: LocalAirflow) -> None:
    unpaused = airflow.api.patch("/dags/tuneloop_refresh", json={"is_paused": False})
    assert unpaused.status_code == 200 and unpaused.json()["is_paused"] is False, unpaused.text

    reply = _post(airflow.url, alertmanager_payload())
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["recorded"] is True and body["asset_uri"] == DRIFT_ASSET_URI
    assert body["triggers"] == ["tuneloop_refresh"]
    assert body["alertnames"] == ["TuneloopTrafficDrift"] and body["fingerprints"] == ["a1b2c3d4e5f60718"]

    event = {e["id"]: e for e in _drift_events(airflow)}[body["asset_event_id"]]
    extra = event["extra"]
    assert extra["source"] == "alertmanager"
    assert extra["alertnames"] == ["TuneloopTrafficDrift"]
    assert extra["fingerprints"] == ["a1b2c3d4e5f60718"]
    assert extra["receiver"] == "tuneloop-refresh" and extra["external_url"] == "http://alertmanager.example:9093"
    assert extra["alerts"][0]["labels"]["tuneloop"] == "drift"
    assert extra["alerts"][0]["annotations"]["summary"] == "traffic drifted from the adapter's training data"

    run = _run_consuming(airflow, body["asset_event_id"])
    assert run["run_type"] == "asset_triggered" and run["triggered_by"] == "asset"

    # Alertmanager re-sends the still-firing alert every repeat_interval: it joins that run.
    events_before = len(_drift_events(airflow))
    resent = _post(airflow.url, alertmanager_payload())
    assert resent.status_code == 200, resent.text
    assert resent.json()["recorded"] is False and resent.json()["duplicate"] is True
    assert f"joined asset event {body['asset_event_id']}" in resent.json()["reason"]
    [joined] = resent.json()["joined"]
    assert joined["asset_event_id"] == body["asset_event_id"]
    assert joined["dag_run_ids"] == [run["dag_run_id"]]
    assert joined["fingerprints"] == ["a1b2c3d4e5f60718"] and joined["alertnames"] == ["TuneloopTrafficDrift"]
    assert len(_drift_events(airflow)) == events_before


def test_firing_grafana_payload_records_a_drift_event_that_triggers_a_refresh(airflow: LocalAirflow) -> None:
    reply = _post(airflow.url, grafana_payload())
    assert reply.status_code == 202, reply.text
    event_id = reply.json()["asset_event_id"]
    assert reply.json()["triggers"] == ["tuneloop_refresh"]

    extra = {e["id"]: e for e in _drift_events(airflow)}[event_id]["extra"]
    assert extra["source"] == "grafana"
    assert extra["alertnames"] == ["Answer quality dropped"]
    assert extra["fingerprints"] == ["c6eadffa33fcdf37"]
    assert extra["title"] == "[FIRING:1] Answer quality dropped ML"
    assert extra["external_url"] == "https://grafana.example/"

    run = _run_consuming(airflow, event_id)
    assert run["run_type"] == "asset_triggered" and run["triggered_by"] == "asset"


def test_an_endless_chunked_body_gets_413_before_it_ends(airflow: LocalAirflow) -> None:
    """Chunked transfer has no length to check up front: the server must stop reading at the
    cap. The body is sent just past the cap and never terminated; a server reading it whole
    would wait for the end and never answer."""
    host, port = airflow.url.removeprefix("http://").split(":")
    chunk = b" " * (64 * 1024)
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(
            f"POST /tuneloop/alerts HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {ENV_TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = b""
        while b"\r\n\r\n" not in reply:
            try:
                received = connection.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within 30 s to an unfinished body past the cap; got {reply!r}") from None
            assert received, f"connection closed without an answer; got {reply!r}"
            reply += received
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_calls_over_the_rate_limit_get_429_with_retry_after(airflow: LocalAirflow) -> None:
    for _ in range(RATE_LIMIT_BURST + 5):
        reply = _post(airflow.url, alertmanager_payload(status="resolved"))
        if reply.status_code != 200:
            break
    assert reply.status_code == 429, reply.text
    assert "at most 6 a minute (burst 25" in reply.json()["detail"]
    assert 1 <= int(reply.headers["retry-after"]) <= 60 / RATE_LIMIT_PER_MINUTE
    # The token is checked before the bucket: without it, 401 even while the bucket is empty.
    assert _post(airflow.url, alertmanager_payload(), token="wrong").status_code == 401


def test_a_refresh_with_no_new_data_ends_green_under_the_scheduler(airflow: LocalAirflow) -> None:
    """The store is empty: a refresh finds nothing to train on, which is a normal outcome. Under
    the real scheduler its pull is skipped, every other task skipped after it, the run a success."""
    assert airflow.api.patch("/dags/tuneloop_refresh", json={"is_paused": False}).status_code == 200
    for _ in range(3):  # earlier tests' runs: out of the way (max_active_runs=1)
        for run in airflow.api.get("/dags/tuneloop_refresh/dagRuns", params={"limit": 100}).json()["dag_runs"]:
            if run["state"] in ("queued", "running"):
                airflow.api.patch(f"/dags/tuneloop_refresh/dagRuns/{run['dag_run_id']}", json={"state": "failed"})
        time.sleep(1)
    created = airflow.api.post("/dags/tuneloop_refresh/dagRuns", json={"logical_date": None, "conf": {}})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]

    def finished() -> dict[str, Any] | None:
        run = airflow.api.get(f"/dags/tuneloop_refresh/dagRuns/{run_id}").json()
        return run if run["state"] in ("success", "failed") else None

    run = _wait_for(f"tuneloop_refresh run {run_id} to finish", finished, TRIGGER_TIMEOUT_S * 2, airflow.logs)
    states = {ti["task_id"]: ti["state"] for ti in airflow.api.get(f"/dags/tuneloop_refresh/dagRuns/{run_id}/taskInstances").json()["task_instances"]}
    assert run["state"] == "success", states
    assert states["pull"] == "skipped" and "failed" not in states.values() and "upstream_failed" not in states.values(), states


def test_tokens_never_reach_the_logs_or_a_command_line(airflow: LocalAirflow) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        assert ENV_TOKEN not in " ".join(proc.info["cmdline"] or []), proc
    logs = [*airflow.home.glob("*.out"), *airflow.home.glob("logs/**/*.log")]
    assert any(p.name == "api-server.out" for p in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        assert ENV_TOKEN not in text and VARIABLE_TOKEN not in text, path
