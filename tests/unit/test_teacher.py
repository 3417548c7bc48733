"""Distillation's client side (data.label_source: teacher) over real HTTP on loopback: which
traffic rows go out, retries on 429/5xx that never become labels, the answer cache (a re-run and
a run killed mid-way pay for no prompt twice), the budget, residency refused before anything is
sent, PII redacted before a non-local teacher, the validity check, self-consistency and the
agreement with human labels, and the label step writing a partition intake reads.

The endpoint is a small OpenAI-compatible responder in this process whose answers are scripted
from the prompt: what is tested is tuneloop's labelling, not a model. The real vLLM server as a
teacher: tests/integration/test_teacher_vllm.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import TaskSettings, TeacherSettings
from tuneloop.intake.teacher import (
    Teacher,
    TeacherError,
    _quotas,
    check_residency,
    label_rows,
    select_rows,
)
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["billing", "shipping", "other"]
SPEC = TaskSpec(TaskSettings(name="tickets", metric="label", labels=LABELS, slice_field="channel", system_prompt="Route the ticket."))


class Scripted:
    """Answers ``billing`` / ``shipping`` / ``other`` from keywords of the last user turn;
    ``faults`` is a list of statuses to answer first (429 with Retry-After: 0, 500...);
    prompts containing ``ALWAYS500`` always get 500, ``GIBBERISH`` gets a label outside the set,
    ``UNSURE`` gets one when sampled (temperature > 0)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.faults: list[int] = []
        self.delay = 0.0
        self.lock = threading.Lock()

    def answer(self, body: dict[str, Any]) -> tuple[int, str]:
        text = body["messages"][-1]["content"].lower()
        with self.lock:
            self.requests.append(body)
            if self.faults:
                return self.faults.pop(0), ""
        if "always500" in text:
            return 500, ""
        if "gibberish" in text or ("unsure" in text and body.get("temperature", 0) > 0):
            return 200, "maybe"
        return 200, "billing" if "invoice" in text or "charge" in text else "shipping" if "parcel" in text else "other"


@pytest.fixture
def teacher() -> Iterator[tuple[Scripted, str]]:
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, content = state.answer(body)
            if state.delay:
                time.sleep(state.delay)
            payload = (
                {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": {"prompt_tokens": 20, "completion_tokens": 2}}
                if status == 200 else {"error": {"message": "injected"}}
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _traffic() -> list[dict[str, Any]]:
    rows = [{"prompt": f"My invoice {i} shows a double charge of {i} euros", "channel": "email"} for i in range(12)]
    rows += [{"prompt": f"Where is parcel number {1000 + i} sent on day {i}", "channel": "chat"} for i in range(6)]
    rows += [{"prompt": f"Can I change my password, attempt {i}?", "channel": "chat"} for i in range(4)]
    rows.append(dict(rows[0]))  # an exact duplicate
    rows.append({"prompt": "gibberish that gets a label outside the set", "channel": "email"})
    rows.append({"channel": "email"})  # no prompt: unreadable
    return rows


def _cfg(endpoint: str, **overrides: Any) -> TeacherSettings:
    base = {"endpoint": endpoint, "model": "teacher-7b", "consistency_sample": 0, "max_retries": 3}
    return TeacherSettings(**{**base, **overrides})


def test_every_traffic_row_is_labelled_left_out_or_quarantined(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    server, url = teacher
    rows = _traffic()
    run = label_rows(rows, SPEC, _cfg(url), cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert len(run.labelled) + len(run.quarantined) + sum(run.left_out.values()) == len(rows)
    assert run.left_out == {"already_labelled": 0, "duplicate": 1, "near_duplicate": 0, "not_sampled": 0}
    reasons = sorted(reason for _, reason in run.quarantined)
    assert reasons == ["teacher_invalid:label_not_in_set", "teacher_unreadable:missing_field:prompt"], reasons
    by_prompt = {row["prompt"]: row for row in run.labelled}
    assert by_prompt["My invoice 3 shows a double charge of 3 euros"]["completion"] == "billing"
    assert by_prompt["Where is parcel number 1002 sent on day 2"]["completion"] == "shipping"
    row = by_prompt["Can I change my password, attempt 1?"]
    assert row["completion"] == "other" and row["label_source"] == "teacher" and row["teacher_model"] == "teacher-7b"
    assert row["id"].startswith("t-") and len({r["id"] for r in run.labelled}) == len(run.labelled)
    sent = server.requests[0]
    assert sent["model"] == "teacher-7b" and sent["temperature"] == 0.0
    assert sent["messages"][0] == {"role": "system", "content": "Route the ticket."}  # the task's system prompt
    assert run.account.requests == len(server.requests) == 23 and run.account.prompt_tokens == 23 * 20


def test_sampled_answers_outside_the_label_set_disagree_instead_of_failing_the_run(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    # Found by the end-to-end distillation test: a sampled answer is the reference of the
    # self-consistency check, and the label scorer refuses a gold label outside task.labels.
    _, url = teacher
    rows = [{"prompt": f"unsure about invoice {i}", "channel": "email"} for i in range(4)]
    run = label_rows(rows, SPEC, _cfg(url, consistency_sample=4), cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert [row["completion"] for row in run.labelled] == ["billing"] * 4  # greedy answers are fine
    assert run.consistency == {"n": 4, "temperature": 0.7, "agreement": 0.0, "with_label": 0.0, "unusable_references": 4}


def test_429_and_500_are_retried_and_a_prompt_that_never_gets_an_answer_is_quarantined(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    server, url = teacher
    server.faults = [429, 500, 503, 429, 500]
    run = label_rows(_traffic()[:6], SPEC, _cfg(url, max_concurrency=1, max_retries=6), cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert len(run.labelled) == 6 and not run.quarantined, "every fault was retried into a real answer"
    assert all(row["completion"] == "billing" for row in run.labelled)
    assert run.account.retries == 5 and len(server.requests) == 6 + 5
    hopeless = [{"prompt": "ALWAYS500 for this one", "channel": "chat"}, {"prompt": "Where is my parcel", "channel": "chat"}]
    run = label_rows(hopeless, SPEC, _cfg(url), cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert [row["completion"] for row in run.labelled] == ["shipping"]
    assert run.quarantined == [(hopeless[0], "teacher_unavailable:no answer after 4 tries: HTTP 500")], "no label, and the row is kept"
    assert run.account.failed == 1 and len(server.requests) == 11 + 4 + 1


def test_a_rerun_pays_for_no_prompt_twice(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    server, url = teacher
    cfg = _cfg(url, consistency_sample=5)
    first = label_rows(_traffic(), SPEC, cfg, cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    paid = len(server.requests)
    assert first.account.cache_hits == 0 and paid == 23 + 2 * 5  # labels + two consistency answers each
    again = label_rows(_traffic(), SPEC, cfg, cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert len(server.requests) == paid and again.account.requests == 0 and again.account.cache_hits == paid
    assert again.labelled == first.labelled
    assert first.consistency == {"n": 5, "temperature": 0.7, "agreement": 1.0, "with_label": 1.0, "unusable_references": 0}


def test_the_budget_caps_a_run_and_leaves_the_rest_for_the_next(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    server, url = teacher
    run = label_rows(_traffic(), SPEC, _cfg(url, max_requests=5, max_concurrency=1), cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
    assert len(server.requests) == 5 and len(run.labelled) == 5
    assert run.account.budget_exhausted == "teacher.max_requests=5" and run.unlabelled_budget == 23 - 5
    money = label_rows(
        _traffic(), SPEC, _cfg(url, max_cost=0.001, price_per_1k_prompt_tokens=0.01, max_concurrency=1), cache_dir=tmp_path / "cache2",
        near_duplicate_jaccard=None,
    )
    assert money.account.requests == 5 and money.account.cost == pytest.approx(5 * 20 * 0.01 / 1000)  # 0.001 reached after 5


def test_local_only_refuses_a_remote_teacher_before_sending_anything(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    server, _ = teacher
    remote = _cfg("https://api.teacher.example.com/v1", data_residency="local_only")
    with pytest.raises(TeacherError, match=r"teacher.data_residency=local_only refuses .*api.teacher.example.com.*nothing was sent"):
        label_rows(_traffic(), SPEC, remote, cache_dir=tmp_path / "cache")
    assert server.requests == []
    assert check_residency(_cfg("http://teacher.ml.svc:8000/v1", data_residency="local_only", private_hosts=["teacher.ml.svc"]))
    assert check_residency(_cfg("http://10.2.3.4:8000/v1", data_residency="local_only"))
    assert not check_residency(_cfg("https://api.teacher.example.com/v1"))  # allowed under "any", but not local


def test_pii_is_redacted_before_it_reaches_a_teacher_that_is_not_local(
    teacher: tuple[Scripted, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneloop.intake import teacher as module

    server, url = teacher
    monkeypatch.setattr(module, "is_local_host", lambda host, private=(): False)  # pretend loopback is a hosted API
    rows = [{"id": "p1", "prompt": "Refund the charge to jane.doe@example.org, card 4111 1111 1111 1111", "channel": "email"}]
    run = label_rows(rows, SPEC, _cfg(url), cache_dir=tmp_path / "cache")
    sent = server.requests[0]["messages"][-1]["content"]
    assert "jane.doe@example.org" not in sent and "4111" not in sent
    assert "jane.doe" not in run.labelled[0]["prompt"], "the stored row is the redacted one"
    flagged = label_rows(rows, SPEC, _cfg(url, pii="flag"), cache_dir=tmp_path / "cache2")
    assert flagged.labelled == [] and flagged.quarantined[0][1] == "teacher_pii_not_sent:card_number,email"
    assert len(server.requests) == 1, "a flagged row is never sent"


def test_agreement_with_human_labels_per_slice(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    _, url = teacher
    rows = [{"id": f"e{i}", "prompt": f"My invoice {i} shows a double charge", "channel": "email"} for i in range(4)]
    rows += [{"id": f"c{i}", "prompt": f"Where is parcel {i} sent now", "channel": "chat"} for i in range(4)]
    human = [{**row, "completion": "billing" if row["channel"] == "email" else "other" if row["id"] == "c0" else "shipping"} for row in rows]
    run = label_rows(rows, SPEC, _cfg(url), cache_dir=tmp_path / "cache", human=human, near_duplicate_jaccard=None)
    assert run.agreement is not None
    assert run.agreement["email"] == {"n": 4, "mean": 1.0, "low": 1.0, "high": 1.0}
    assert run.agreement["chat"]["mean"] == 0.75 and run.agreement["chat"]["low"] < 0.75 < run.agreement["chat"]["high"]
    assert run.agreement["all"]["n"] == 8


def test_an_unreachable_teacher_or_a_refused_key_stops_the_run_naming_it(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = _cfg(f"http://127.0.0.1:{port}/v1", max_retries=0)
    with pytest.raises(TeacherError, match=rf"teacher at http://127.0.0.1:{port}/v1 \(model teacher-7b\) answered none of 3 prompts"):
        label_rows(_traffic()[:3], SPEC, down, cache_dir=tmp_path / "cache")
    server, url = teacher
    server.faults = [401]
    with pytest.raises(TeacherError, match="check teacher.api_key"):
        label_rows(_traffic()[:1], SPEC, _cfg(url, api_key="sk-wrong"), cache_dir=tmp_path / "cache")
    assert server.requests[0] and "sk-wrong" not in json.dumps(server.requests)


def test_stratified_sample_keeps_each_slice_in_proportion() -> None:
    assert _quotas({"a": 80, "b": 15, "c": 5}, 20) == {"a": 16, "b": 3, "c": 1}
    assert _quotas({"a": 99, "b": 1}, 10) == {"a": 9, "b": 1}, "a small slice keeps a row"
    assert _quotas({"a": 3, "b": 2}, 10) == {"a": 3, "b": 2}
    rows = [{"prompt": f"invoice question {i} " + "x" * (i % 7), "channel": "email" if i % 4 else "chat"} for i in range(40)]
    chosen, left_out, _ = select_rows(rows, SPEC, n=8, seed=1, near_duplicate_jaccard=None)
    assert sorted(c.example.slice for c in chosen) == ["chat"] * 2 + ["email"] * 6 and left_out["not_sampled"] == 32
    again, _, _ = select_rows(rows, SPEC, n=8, seed=1, near_duplicate_jaccard=None)
    assert [c.key for c in again] == [c.key for c in chosen], "the same seed draws the same rows"


def test_the_sample_leans_toward_what_the_drift_check_found_new() -> None:
    from tuneloop.drift import novelty_key

    familiar = [{"prompt": f"where is my parcel number {i}", "channel": "email"} for i in range(100)]
    new = [{"prompt": f"the new subscription plan {i} charged me twice", "channel": "email"} for i in range(100)]
    rows = familiar + new
    novelty = {novelty_key(SPEC.input_text(r) or ""): 1.0 for r in new} | {novelty_key(SPEC.input_text(r) or ""): 0.0 for r in familiar}
    chosen, _, _ = select_rows(rows, SPEC, n=40, seed=3, near_duplicate_jaccard=None, novelty=novelty)
    share_new = sum("subscription" in c.row["prompt"] for c in chosen) / len(chosen)
    assert share_new >= 0.75, share_new  # weights 1.0 vs 0.1: about 0.9 expected; the familiar still get some
    assert share_new < 1.0
    plain, _, _ = select_rows(rows, SPEC, n=40, seed=3, near_duplicate_jaccard=None)
    assert 0.3 <= sum("subscription" in c.row["prompt"] for c in plain) / 40 <= 0.7
    unscored, _, _ = select_rows(rows, SPEC, n=40, seed=3, near_duplicate_jaccard=None, novelty={"0" * 16: 1.0})
    assert 0.3 <= sum("subscription" in c.row["prompt"] for c in unscored) / 40 <= 0.7  # all 0.5: a uniform draw


def test_label_step_uses_the_novelty_of_the_newest_drift_check_in_its_window(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    from tuneloop.drift import detect_drift, novelty_key
    from tuneloop.steps.label import label_step
    from tuneloop.steps.loop import open_loop

    _, url = teacher
    reference = [f"where is my parcel number {i}, it was due on monday" for i in range(200)]
    current = [f"where is my parcel number {i}, it was due on monday" for i in range(200, 300)]
    current += [f"the new subscription plan {i} charged me twice this month" for i in range(100)]
    report = detect_drift(reference, current, seed=0)
    novel = [report.novelty[novelty_key(t)] for t in current[100:]]
    assert report.drift and sum(novel) / len(novel) > 0.7  # the new kind of prompt ranks high
    traffic = tmp_path / "store" / "traffic" / "dt=2026-03-02"
    traffic.mkdir(parents=True)
    (traffic / "part-0.jsonl").write_text("".join(json.dumps({"prompt": t, "channel": "email"}) + "\n" for t in current))
    novelty_dir = tmp_path / "store" / "drift" / "novelty"
    novelty_dir.mkdir(parents=True)
    (novelty_dir / "2026-03-02__scheduled.json").write_text(json.dumps({"as_of": "2026-03-02", "novelty": report.novelty}))
    (novelty_dir / "2026-02-01__old.json").write_text(json.dumps({"as_of": "2026-02-01", "novelty": {}}))  # outside the window
    config = tmp_path / "tuneloop.yaml"
    config.write_text(_LABEL_CONFIG.format(store=tmp_path / "store", work=tmp_path / "work", url=url).replace("consistency_sample: 0,", "consistency_sample: 0, sample_rows: 30,"))
    loop = open_loop(str(config), run_id="manual__novel", progress=lambda _: None)
    summary = label_step(loop, as_of="2026-03-02")
    assert summary["novelty_source"] == "drift/novelty/2026-03-02__scheduled.json"
    labelled = [json.loads(line) for f in (tmp_path / "store" / "labelled").rglob("teacher-*.jsonl") for line in f.read_text().splitlines()]
    assert len(labelled) == 30
    # a third of the traffic (10 of 30 by a uniform draw); drawn in proportion to 0.1 + 0.9 x rank: ~17
    assert sum("subscription" in row["prompt"] for row in labelled) >= 15


def test_rate_limit_spaces_the_requests(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    _, url = teacher
    starts: list[float] = []  # when each delayed request was let go (the fake sleep returns at once)
    limited = Teacher(_cfg(url, requests_per_minute=60), tmp_path / "cache", sleep=lambda wait: starts.append(time.monotonic() + wait))
    for i in range(6):
        limited.ask([{"role": "user", "content": f"invoice {i}"}])
    # 60/min: one request a second; the loopback requests come far faster, so each after the first waits
    assert len(starts) == 5, starts
    assert all(later - earlier >= 1.0 - 1e-3 for earlier, later in zip(starts, starts[1:], strict=False)), starts


_LABEL_CONFIG = """
store: {{uri: {store}}}
work_dir: {work}
task: {{name: tickets, metric: label, labels: [billing, shipping, other], slice_field: channel}}
data: {{label_source: teacher}}
teacher: {{endpoint: {url}, model: teacher-7b, consistency_sample: 0, max_concurrency: 2}}
drift: {{current_days: 7}}
"""


def test_label_step_killed_mid_way_and_rerun_pays_for_no_prompt_twice(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    """`tuneloop label` on a store's traffic window, SIGKILLed after some answers, then run again:
    the second run asks only what the first did not get, and writes the labelled partition."""
    server, url = teacher
    server.delay = 0.05
    traffic = tmp_path / "store" / "traffic"
    for day in ("2026-03-01", "2026-03-02"):
        (traffic / f"dt={day}").mkdir(parents=True)
        rows = [{"prompt": f"My invoice {day} number {i} has a wrong charge", "channel": "email"} for i in range(30)]
        (traffic / f"dt={day}" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "tuneloop.yaml"
    config.write_text(_LABEL_CONFIG.format(store=tmp_path / "store", work=tmp_path / "work", url=url))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "TUNELOOP_CONFIG": str(config)}
    command = [sys.executable, "-m", "tuneloop.cli", "label", "--config", str(config), "--json"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(server.requests) < 15 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    paid_first = len(server.requests)
    assert 15 <= paid_first < 60, paid_first
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    prompts = [request["messages"][-1]["content"] for request in server.requests]
    assert len(set(prompts)) == 60
    # answered prompts came from the cache; only the (at most max_concurrency) requests in flight
    # when the process died were asked again
    assert len(prompts) - 60 <= 2
    assert result["account"]["cache_hits"] + result["account"]["requests"] == 60
    assert result["account"]["cache_hits"] >= paid_first - 2
    assert result["labelled"] == 60 and result["window"] == ["2026-03-01", "2026-03-02"]
    labels = tmp_path / "store" / result["labels"]
    assert labels.parent.name == "dt=2026-03-02" and len(labels.read_text().splitlines()) == 60
    summary = json.loads((tmp_path / "store" / result["summary_key"]).read_text())
    assert summary["teacher"] == {"endpoint": url, "model": "teacher-7b"}


def test_the_gate_sees_the_candidate_as_a_share_of_the_teacher(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    from tuneloop import gate
    from tuneloop.intake.teacher import teacher_retention

    server, url = teacher
    held_out = [{"id": f"h{i}", "prompt": f"My invoice {i} has a wrong charge", "completion": "billing", "channel": "email"} for i in range(6)]
    held_out += [{"id": f"s{i}", "prompt": f"Where is parcel {i}", "completion": "other" if i < 2 else "shipping", "channel": "chat"} for i in range(4)]
    student = [{"id": f"h{i}", "slice": "email", "score": 1.0 if i < 3 else 0.0} for i in range(6)]
    student += [{"id": f"s{i}", "slice": "chat", "score": 1.0} for i in range(4)]
    cfg = _cfg(url, price_per_1k_prompt_tokens=0.5)
    served = _cfg(url, model="student-1b")  # the same client times the served model
    block = teacher_retention(held_out, student, SPEC, cfg, cache_dir=tmp_path / "cache", student=served, latency_prompts=3)
    # the teacher gets every email row right and half the chat rows (it says "shipping" for s0, s1)
    assert block["slices"]["email"] == {"n": 6, "student": 0.5, "teacher": 1.0, "retention": 0.5}
    assert block["slices"]["chat"] == {"n": 4, "student": 1.0, "teacher": 0.5, "retention": 2.0}
    assert (block["n"], block["student"], block["teacher"]) == (10, 0.7, 0.8) and block["retention"] == 0.875
    latency = block["latency"]
    assert latency["student"]["requests"] == latency["teacher"]["requests"] == 3
    assert latency["teacher"]["cost_per_1k_requests"] == pytest.approx(1000 * 20 * 0.5 / 1000) and latency["cost_ratio"] == 0.0
    assert latency["latency_ratio"] is not None and latency["latency_ratio"] > 0
    assert [r["model"] for r in server.requests[-6:]] == ["student-1b"] * 3 + ["teacher-7b"] * 3
    bars = {"min_teacher_retention": 0.9}
    decision = gate.GateDecision(
        promote=True, reasons=["drifted: improved"], slices={}, improve_slices=["drifted"], margin=0.05, alpha=0.05,
        min_examples=10, n_bootstrap=100, seed=0, ci_level=0.95, n_pairs=0,
    )
    rejected = gate.apply_suite_bars(decision, {"teacher_retention": block}, bars)
    assert not rejected.promote and rejected.reasons == ["teacher_retention: 0.875 misses the bar >= 0.9"]
    assert gate.apply_suite_bars(decision, {"teacher_retention": block}, {"min_teacher_retention": 0.8}).promote


def test_gate_step_reports_retention_and_holds_the_candidate_to_the_bar(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    """The gate step of a teacher-labelled loop: gate.json carries the teacher block, and a
    candidate under gate.suite_bars.min_teacher_retention is rejected naming the bar."""
    from tuneloop.steps.gate import gate_step
    from tuneloop.steps.loop import open_loop

    server, url = teacher
    snapshot = "1" * 64
    store = tmp_path / "store"
    rows = [{"id": f"e{i}", "prompt": f"My invoice {i} has a wrong charge", "completion": "billing", "channel": "drifted"} for i in range(12)]
    (store / "snapshots" / snapshot).mkdir(parents=True)
    (store / "snapshots" / snapshot / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (store / "snapshots" / snapshot / "manifest.json").write_text(json.dumps({"slices": {"train": {"drifted": 12}, "eval": {"drifted": 12}}}))
    for role, score in (("production", 0.0), ("candidate", 0.75)):
        scores = [{"id": r["id"], "slice": "drifted", "score": 1.0 if i < 12 * score else 0.0} for i, r in enumerate(rows)]
        (store / "evals" / "v2" / "run1" / role).mkdir(parents=True)
        (store / "evals" / "v2" / "run1" / role / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    config = tmp_path / "tuneloop.yaml"
    config.write_text(
        f"store: {{uri: {store}}}\nwork_dir: {tmp_path / 'work'}\n"
        "task: {name: tickets, metric: label, labels: [billing, shipping, other], slice_field: channel}\n"
        f"data: {{label_source: teacher}}\nteacher: {{endpoint: {url}, model: teacher-7b, consistency_sample: 0}}\n"
        f"vllm: {{endpoints: ['{url.removesuffix('/v1')}']}}\n"
        "gate: {min_examples: 10, bootstrap_samples: 300, improve_slices: [drifted], suite_bars: {min_teacher_retention: 0.9}}\n"
    )
    logged: list[str] = []
    loop = open_loop(str(config), run_id="manual__teacher-gate", progress=logged.append)
    evaluation = {
        "version": "v2", "snapshot": snapshot, "production": "v1",
        "candidate_eval": {"scores_key": "evals/v2/run1/candidate/scores.jsonl"},
        "production_eval": {"scores_key": "evals/v2/run1/production/scores.jsonl"},
    }
    decision = gate_step(loop, evaluation)
    stored = json.loads((store / "reports" / "v2" / "gate.json").read_text())
    block = stored["teacher_retention"]
    assert (block["n"], block["student"], block["teacher"], block["retention"]) == (12, 0.75, 1.0, 0.75)
    assert block["latency"]["student"]["requests"] == 12 and {r["model"] for r in server.requests} == {"teacher-7b", "tuneloop"}
    assert decision["promote"] is False and "teacher_retention: 0.75 misses the bar >= 0.9" in stored["reasons"]
    assert any("keeps 0.75 of the teacher's score" in line for line in logged)


def test_an_overlapping_window_labels_only_what_earlier_runs_did_not(teacher: tuple[Scripted, str], tmp_path: Path) -> None:
    from tuneloop.steps.label import label_step
    from tuneloop.steps.loop import open_loop

    server, url = teacher
    traffic = tmp_path / "store" / "traffic"
    for day in ("2026-03-01", "2026-03-02", "2026-03-03"):
        (traffic / f"dt={day}").mkdir(parents=True)
        rows = [{"prompt": f"My invoice {day} number {i} has a wrong charge", "channel": "email"} for i in range(5)]
        (traffic / f"dt={day}" / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "tuneloop.yaml"
    config.write_text(_LABEL_CONFIG.format(store=tmp_path / "store", work=tmp_path / "work", url=url).replace("current_days: 7", "current_days: 2"))
    loop = open_loop(str(config), run_id="manual__overlap", progress=lambda _: None)
    first = label_step(loop, as_of="2026-03-02")
    second = label_step(loop, as_of="2026-03-03")
    assert first["labelled"] == 10 and second["labelled"] == 5 and second["left_out"]["already_labelled"] == 5
    assert len(server.requests) == 15, "the overlap day was neither asked nor stored again"
    files = sorted((tmp_path / "store" / "labelled").rglob("teacher-*.jsonl"))
    ids = [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 15
    assert label_step(loop, as_of="2026-03-03")["labels"] == second["labels"], "a re-run of a window writes the same file"
