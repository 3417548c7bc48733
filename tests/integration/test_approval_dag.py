"""The human approval between the gate and the deploy, answered like a person would: through
Airflow's HITL REST API.

``tuneloop_refresh`` runs with ``dag.test()`` in this process. When ``approve`` asks, the task
parks in ``awaiting_input`` and ``dag.test()`` waits for an answer from outside (Airflow 3.3's
documented way); a REAL ``airflow api-server`` on the same metadata database, started by this
module, receives ``PATCH .../taskInstances/approve/-1/hitlDetails`` from a second thread. The
timeout default is applied by the scheduler's own sweep (``check_awaiting_input_timeouts``),
called directly because no scheduler runs here.

The ML steps (pull, validate, train, evaluate) and the vLLM steps (reconcile, deploy, verify)
are stand-ins: they are tested elsewhere, and this module is about what happens between the
gate and the deploy. ``gate`` and ``record`` are the real steps on a local store.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import pytest
import stand_ins
from processes import free_port, stop_process_tree

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).parent / "airflow"
DAG_ID = "tuneloop_refresh"
START_TIMEOUT_S = 120
ANSWER_TIMEOUT_S = 90
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def api(airflow_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A real Airflow API server on this session's metadata DB; a client logged in as admin."""
    home = tmp_path_factory.mktemp("approval-api")
    passwords = home / "passwords.json"
    passwords.write_text('{"admin": "admin"}\n')
    port = free_port()
    env = {
        **os.environ,  # AIRFLOW_HOME and the database from tests/conftest.py
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
    }
    log_path = home / "api-server.out"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [str(AIRFLOW), "api-server", "--apps", "core", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    client: httpx.Client | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"api-server exited:\n{log_path.read_text(errors='replace')[-4000:]}"
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"api-server not healthy:\n{log_path.read_text(errors='replace')[-4000:]}"
            time.sleep(1)
        login = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10)
        assert login.status_code == 201, login.text
        client = httpx.Client(base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {login.json()['access_token']}"}, timeout=20)
        yield client
    finally:
        if client is not None:
            client.close()
        stop_process_tree(process)


# --- the loop's stand-ins around the real gate ------------------------------------------------


@pytest.fixture
def loop_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A local store whose production is v1, and stand-ins that train v2 to beat it."""
    from tuneloop.registry import Registry
    from tuneloop.storage import LocalStore

    store_dir = tmp_path / "store"
    for name, value in {
        **stand_ins.refresh_env(tmp_path),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TUNELOOP_CONFIG", raising=False)
    store = LocalStore(store_dir)
    registry = Registry(store)
    registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    registry.move_aliases({"production": "v1"}, reason="test setup")
    calls: list[str] = []

    def stand_in(name: str, result: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def step(*args: Any, **kwargs: Any) -> dict[str, Any]:
            calls.append(name)
            return result(*args, **kwargs)

        return step

    monkeypatch.setattr("tuneloop.steps.intake.pull_step", stand_in("pull", lambda loop, **_: {"partitions": []}))
    monkeypatch.setattr("tuneloop.steps.intake.validate_step", stand_in("validate", lambda loop, plan: {"snapshot": "0" * 64, "counts": {}}))
    monkeypatch.setattr("tuneloop.steps.train.train_step", stand_in("train", functools.partial(stand_ins.train_step, move_candidate=True)))
    monkeypatch.setattr("tuneloop.steps.evaluate.evaluate_step", stand_in("evaluate", stand_ins.evaluate_step(gain=1 / 6)))
    monkeypatch.setattr("tuneloop.steps.serve.reconcile_step", stand_in("reconcile", lambda loop: {"production": loop.registry.aliases()["production"]}))
    monkeypatch.setattr("tuneloop.steps.serve.deploy_step", stand_in("deploy", lambda loop, version, **_: {"version": version}))
    monkeypatch.setattr("tuneloop.steps.serve.verify_step", stand_in("verify", lambda loop, version: {"version": version}))
    return {"store": store, "registry": registry, "calls": calls, "dir": store_dir}


# --- running the DAG and answering it ---------------------------------------------------------


def _dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def _states(run: Any) -> dict[str, str]:
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in run.get_task_instances()}


def _stop_everything_waiting() -> None:
    """Last resort so a broken answer path fails the test instead of hanging dag.test()
    (pytest-timeout cannot help: Airflow's task timeouts take over SIGALRM in-process)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    with create_session() as session:
        for ti in session.query(TaskInstance).filter_by(dag_id=DAG_ID, state=TaskInstanceState.AWAITING_INPUT):
            ti.state = TaskInstanceState.FAILED
        for run in session.query(DagRun).filter_by(dag_id=DAG_ID, state=DagRunState.RUNNING):
            run.state = DagRunState.FAILED


class Answerer(threading.Thread):
    """Finds the approval request of the run for ``logical_date``, keeps what it showed, then
    answers it through the REST API (``answer``) or lets the scheduler's timeout sweep decide."""

    def __init__(self, api: httpx.Client, logical_date: datetime, answer: str | None) -> None:
        super().__init__(daemon=True)
        self.api, self.logical_date, self.answer = api, logical_date, answer
        self.path = ""
        self.request: dict[str, Any] = {}
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def _find_request(self) -> dict[str, Any] | None:
        reply = self.api.get(f"/dags/{DAG_ID}/dagRuns/~/hitlDetails", params={"task_id": "approve"})
        assert reply.status_code == 200, reply.text
        for detail in reply.json()["hitl_details"]:
            ti = detail["task_instance"]
            if ti["state"] == "awaiting_input" and datetime.fromisoformat(ti["logical_date"]) == self.logical_date:
                return dict(detail)
        return None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while not (found := self._find_request()):
                assert time.monotonic() < deadline, f"no approval request for {self.logical_date} within {ANSWER_TIMEOUT_S} s"
                time.sleep(0.5)
            self.request = found
            run_id = quote(found["task_instance"]["dag_run_id"], safe="")
            self.path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails"
            if self.answer is not None:
                self.response = self.api.patch(self.path, json={"chosen_options": [self.answer]})
                assert self.response.status_code == 200, self.response.text
            else:
                self._sweep_when_due()
        except BaseException as err:
            self.error = err
            _stop_everything_waiting()

    def _sweep_when_due(self) -> None:
        from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

        time.sleep(3)  # the test's timeout is 1.8 s
        SchedulerJobRunner.check_awaiting_input_timeouts(types.SimpleNamespace(log=logging.getLogger("sweep")))


def _run(logical_date: datetime, conf: dict[str, Any], api: httpx.Client | None = None, answer: str | None = None, sweep: bool = False) -> tuple[Any, Answerer | None]:
    """dag.test() for one run; an Answerer thread when asked; a watchdog against hangs."""
    answerer = Answerer(api, logical_date, answer) if api is not None and (answer or sweep) else None
    if answerer is not None:
        answerer.start()
    watchdog = threading.Timer(RUN_TIMEOUT_S, _stop_everything_waiting)
    watchdog.start()
    try:
        run = _dag().test(logical_date=logical_date, run_conf=conf)
    finally:
        watchdog.cancel()
    if answerer is not None:
        answerer.join(timeout=30)
        if answerer.error is not None:
            raise answerer.error
    return run, answerer


def _log_text(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    captured = capfd.readouterr()
    return caplog.text + captured.out + captured.err


# --- the tests -------------------------------------------------------------------------------


def test_off_by_default_the_approval_passes_and_the_candidate_is_deployed(
    loop_world: dict[str, Any], api: httpx.Client, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    run, _ = _run(datetime(2026, 2, 1, tzinfo=UTC), {"force": True})
    states = _states(run)
    assert str(run.state).endswith("success"), states
    assert all(state == "success" for state in states.values()), states
    assert loop_world["registry"].aliases()["production"] == "v2"
    assert loop_world["calls"].count("deploy") == 1
    # nobody was asked: no HITL request exists for this run
    assert api.get(f"/dags/{DAG_ID}/dagRuns/{quote(run.run_id, safe='')}/taskInstances/approve/-1/hitlDetails").status_code == 404
    assert not loop_world["store"].exists("reports/v2/approval.json")
    text = _log_text(caplog, capfd)
    assert "approval: not required" in text
    report = loop_world["dir"] / "reports" / "v2"
    assert f"gate report (HTML, plots inside): {(report / 'gate.html').as_uri()}" in text
    assert f"gate report (Markdown, a plot per slice): {(report / 'gate.md').as_uri()}" in text


def test_approved_by_a_human_the_candidate_is_deployed(
    loop_world: dict[str, Any], api: httpx.Client, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    run, answerer = _run(datetime(2026, 2, 2, tzinfo=UTC), {"force": True, "require_approval": True}, api, answer="Approve")
    states = _states(run)
    assert str(run.state).endswith("success"), states
    for task_id in ("approve", "reconcile_before", "deploy", "verify", "record", "reconcile_after"):
        assert states[task_id] == "success", (task_id, states)
    assert loop_world["registry"].aliases() == {"production": "v2", "previous": "v1", "candidate": None}

    # what the approver saw: the gate's numbers, reasons and where the report is
    assert answerer is not None
    request = answerer.request
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] == ["Reject"]
    assert request["subject"] == "Deploy candidate v2 to production (now: v1)?"
    gate = loop_world["store"].get_json("reports/v2/gate.json")
    for name, row in gate["slices"].items():
        assert f"| {name} | {row['rule']} | {row['n']} |" in request["body"]
        assert f"{row['delta']:+.3f} | [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in request["body"]
    for reason in gate["reasons"]:
        assert reason in request["body"]
    assert (loop_world["dir"] / "reports" / "v2" / "gate.html").as_uri() in request["body"]
    assert "No answer within 72 h counts as **Reject**" in request["body"]

    review = loop_world["store"].get_json("reports/v2/approval.json")
    assert review["decision"] == "approved" and review["by"] == "admin" and review["timed_out"] is False
    assert "approval: candidate v2 APPROVED by admin; deploying" in _log_text(caplog, capfd)
    # the same request cannot be answered twice
    assert api.patch(answerer.path, json={"chosen_options": ["Reject"]}).status_code == 409


def _capture_notifications(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Turn notifications on with a channel that keeps each message instead of sending it
    (test_notify_sinks.py checks the real channels)."""
    from tuneloop import notify

    sent: list[Any] = []
    monkeypatch.setattr(notify, "channels", lambda settings: [("slack", "captured")])
    monkeypatch.setattr(notify, "send_notification", lambda settings, message, context=None, **_: sent.append(message) or {"slack": "sent"})
    return sent


def test_rejected_by_a_human_nothing_is_deployed_and_the_rejection_is_recorded(
    loop_world: dict[str, Any], api: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    sent = _capture_notifications(monkeypatch)
    run, answerer = _run(datetime(2026, 2, 3, tzinfo=UTC), {"force": True, "require_approval": True}, api, answer="Reject")
    states = _states(run)
    assert str(run.state).endswith("success"), states
    assert states["gate"] == "success" and states["approve"] == "success", states
    for task_id in ("reconcile_before", "deploy", "verify", "record", "reconcile_after"):
        assert states[task_id] == "skipped", (task_id, states)
    assert "deploy" not in loop_world["calls"] and "reconcile" not in loop_world["calls"]
    assert loop_world["registry"].aliases() == {"production": "v1", "previous": None, "candidate": "v2"}
    assert answerer is not None and answerer.response is not None
    assert answerer.response.json()["responded_by"]["name"] == "admin"

    review = loop_world["store"].get_json("reports/v2/approval.json")
    assert review["decision"] == "rejected" and review["by"] == "admin" and review["timed_out"] is False
    assert review["gate_report"] == "reports/v2/gate.md"
    text = _log_text(caplog, capfd)
    assert "approval: candidate v2 REJECTED by a human (admin); nothing is deployed, v1 keeps serving" in text
    assert [message.title for message in sent] == ["Approval rejected candidate v2: production stays v1"]
    assert sent[0].event == "gate_reject" and any("rejected by admin" in fact for fact in sent[0].facts)
    assert [label for label, _ in sent[0].links] == ["gate report"]


def test_nobody_answers_in_time_the_default_rejects(
    loop_world: dict[str, Any], api: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Approval required by the config (no param), a 1.8 s timeout, the scheduler's sweep."""
    caplog.set_level(logging.INFO)
    sent = _capture_notifications(monkeypatch)
    monkeypatch.setenv("TUNELOOP__GATE__REQUIRE_APPROVAL", "true")
    monkeypatch.setenv("TUNELOOP__GATE__APPROVAL_TIMEOUT_HOURS", "0.0005")
    run, answerer = _run(datetime(2026, 2, 4, tzinfo=UTC), {"force": True}, api, sweep=True)
    states = _states(run)
    assert str(run.state).endswith("success"), states
    assert states["deploy"] == "skipped" and states["record"] == "skipped", states
    assert loop_world["registry"].aliases()["production"] == "v1"
    review = loop_world["store"].get_json("reports/v2/approval.json")
    assert review["decision"] == "rejected" and review["timed_out"] is True and review["by"] is None
    assert answerer is not None and "No answer within 0.0005 h" in answerer.request["body"]
    assert "nobody answered before the approval timeout" in _log_text(caplog, capfd)
    assert len(sent) == 1 and any("nobody answered before the approval timeout" in fact for fact in sent[0].facts)
