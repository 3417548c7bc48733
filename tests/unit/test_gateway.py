"""The gateway's route table, config and log (tuneloop.serving.gateway) and the rollout's
pure parts (tuneloop.serving.rollout): bake judgement, answer parsing, policy checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.serving.gateway import (
    GatewayError,
    LogRecord,
    RouteTable,
    hostport,
    read_access_log,
    render_nginx_conf,
    version_name,
)
from tuneloop.serving.rollout import (
    RolloutPolicy,
    VersionStats,
    answer_text,
    flip_back,
    grade_live,
    judge_bake,
    live_requests,
    version_stats,
)

pytestmark = pytest.mark.unit


def test_version_names_are_immutable_per_version_and_safe() -> None:
    assert version_name("tuneloop", "v3") == "tuneloop-v3"
    assert version_name("tickets", "v12") == "tickets-v12"
    with pytest.raises(ValueError, match="not allowed"):
        version_name("tuneloop", "../v1")


def test_route_table_writes_atomically_and_keeps_what_it_is_not_told(tmp_path: Path) -> None:
    table = RouteTable(tmp_path / "gw" / "routes.json")
    assert table.alias("tuneloop").routes == {}
    table.set_upstreams(["http://127.0.0.1:8000/", "http://10.0.0.2:8000"])
    table.set_alias("tuneloop", {"tuneloop-v1": 100}, last_known_good=None)
    table.set_alias("tuneloop", {"tuneloop-v1": 90, "tuneloop-v2": 10}, capture={"tuneloop-v2": 0.5}, last_known_good="tuneloop-v1")
    table.set_alias("tuneloop", {"tuneloop-v2": 100})  # capture and last-known-good kept
    alias = table.alias("tuneloop")
    assert alias.routes == {"tuneloop-v2": 100.0}
    assert alias.capture == {"tuneloop-v2": 0.5}
    assert alias.last_known_good == "tuneloop-v1"
    assert table.upstreams() == ["127.0.0.1:8000", "10.0.0.2:8000"]
    data = json.loads(table.path.read_text())
    assert data["generation"] == 4
    assert sorted(p.name for p in table.path.parent.iterdir()) == ["routes.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("routes", "message"),
    [({}, "positive weight"), ({"tuneloop-v1": 0}, "positive weight"), ({"tuneloop-v1": 100, "tuneloop-v2": -5}, "negative"), ({"a/b": 1}, "not allowed")],
)
def test_route_table_refuses_weights_no_gateway_can_follow(tmp_path: Path, routes: dict[str, float], message: str) -> None:
    with pytest.raises((GatewayError, ValueError), match=message):
        RouteTable(tmp_path / "routes.json").set_alias("tuneloop", routes)


def test_an_unreadable_route_table_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text("{not json")
    with pytest.raises(GatewayError, match=r"routes\.json is unreadable.*reconcile"):
        RouteTable(path).alias("tuneloop")


def test_hostport_takes_what_nginx_connects_to() -> None:
    assert hostport("http://vllm-0.vllm:8000") == "vllm-0.vllm:8000"
    with pytest.raises(GatewayError, match="http://host:port"):
        hostport("http://127.0.0.1:8000/v1")


def test_nginx_conf_keeps_everything_under_the_run_dir(tmp_path: Path) -> None:
    conf = render_nginx_conf(run_dir=tmp_path, listen="127.0.0.1:9999", routes_file=tmp_path / "routes.json", njs_module="/x/ngx_http_js_module.so")
    assert "listen 127.0.0.1:9999;" in conf
    assert f"js_var $tl_routes_file {tmp_path / 'routes.json'};" in conf
    assert f"pid {tmp_path / 'nginx.pid'};" in conf
    assert "proxy_buffering off;" in conf  # streamed answers pass as they come
    assert "/var/" not in conf and "/etc/" not in conf


def test_access_log_reading_leaves_a_half_written_line_for_next_time(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    full = json.dumps({"msec": 1.5, "alias": "t", "version": "t-v1", "status": 200, "request_time": 0.012, "answer": ""})
    log.write_text(full + "\n" + "192.168.0.1 - - [combined format line]\n" + full[:20])
    records, offset = read_access_log(log)
    assert [(r.version, r.status, r.seconds) for r in records] == [("t-v1", 200, 0.012)]
    with open(log, "a") as fh:
        fh.write(full[20:] + "\n")
    more, _ = read_access_log(log, offset)
    assert len(more) == 1 and more[0].version == "t-v1"
    assert read_access_log(tmp_path / "missing.log", 7) == ([], 7)


def test_answer_text_reads_chat_completion_and_streamed_bodies() -> None:
    assert answer_text(json.dumps({"choices": [{"message": {"content": '{"a": 1}'}}]})) == '{"a": 1}'
    assert answer_text(json.dumps({"choices": [{"text": "billing"}]})) == "billing"
    stream = "\n\n".join(
        "data: " + json.dumps({"choices": [{"delta": {"content": part}}]}) for part in ("bil", "ling")
    ) + "\n\ndata: [DONE]\n\n"
    assert answer_text(stream) == "billing"
    assert answer_text('{"choices": [{"message": {"content": "trunc') is None


def _records(version: str, n: int, *, status: int = 200, seconds: float = 0.05, answer: str = "") -> list[LogRecord]:
    return [LogRecord(msec=float(i), alias="t", version=version, status=status, seconds=seconds, answer=answer) for i in range(n)]


def test_version_stats_count_errors_latency_and_validity_of_sampled_answers() -> None:
    good = json.dumps({"choices": [{"message": {"content": "billing"}}]})
    bad = json.dumps({"choices": [{"message": {"content": "no such label"}}]})
    records = _records("t-v2", 8, answer=good) + _records("t-v2", 2, answer=bad) + _records("t-v2", 3, status=503) + _records("t-v1", 5)
    stats = version_stats(records, "t-v2", lambda a: a in {"billing", "shipping"})
    assert (stats.requests, stats.errors, stats.sampled, stats.valid) == (13, 3, 10, 8)
    assert stats.validity == 0.8
    assert stats.p99_ms == 50.0


def test_bake_judgement() -> None:
    policy = RolloutPolicy(strategy="canary", min_requests=20, max_error_rate=0.05, validity_margin=0.05, max_p99_ratio=1.5, p99_floor_ms=50)
    few = VersionStats(requests=5)
    assert judge_bake(few, None, policy, 0.9)[0] == "not_judged"
    erring = VersionStats(requests=100, errors=6)
    assert judge_bake(erring, None, policy, None) == ("breach", "error rate 0.060 (6 of 100) above 0.05")
    invalid = VersionStats(requests=100, sampled=40, valid=30)  # 0.75 < 0.95 - 0.05
    verdict, reason = judge_bake(invalid, None, policy, 0.90)
    assert verdict == "breach" and "validity of live answers 0.75" in reason
    assert judge_bake(VersionStats(requests=100, sampled=40, valid=37), None, policy, 0.90)[0] == "pass"
    slow, before = VersionStats(requests=100, p99_ms=400.0), VersionStats(requests=100, p99_ms=100.0)
    verdict, reason = judge_bake(slow, before, policy, None)
    assert verdict == "breach" and "4.00x" in reason
    # a ratio over the limit on a few milliseconds is noise, not a breach
    assert judge_bake(VersionStats(requests=100, p99_ms=30.0), VersionStats(requests=100, p99_ms=10.0), policy, None)[0] == "pass"


def _captured(version: str, question: str, answer: str, **asked: object) -> LogRecord:
    body = json.dumps({"choices": [{"message": {"content": answer}}]})
    return LogRecord(msec=0.0, alias="t", version=version, status=200, seconds=0.1, answer=body, request=json.dumps(asked or {"messages": [{"role": "user", "content": question}]}))


def test_live_requests_take_only_the_versions_captured_chat_requests() -> None:
    records = [
        _captured("t-v2", "q1", "billing", messages=[{"role": "user", "content": "q1"}], max_tokens=7),
        _captured("t-v1", "q2", "billing"),  # another version
        _captured("t-v2", "q3", "billing", prompt="q3"),  # the completions API: nothing to re-ask
        LogRecord(msec=0.0, alias="t", version="t-v2", status=200, seconds=0.1, answer=json.dumps({"choices": [{"message": {"content": "x"}}]})),  # too long to capture
        LogRecord(msec=0.0, alias="t", version="t-v2", status=200, seconds=0.1, answer="{trunc", request=json.dumps({"messages": [{"role": "user", "content": "q"}]})),
        _captured("t-v2", "q4", "shipping"),
        _captured("t-v2", "q5", "refund"),
    ]
    found = live_requests(records, "t-v2", 2)
    assert found == [([{"role": "user", "content": "q1"}], 7, "billing"), ([{"role": "user", "content": "q4"}], None, "shipping")]


class _Previous:
    """The previous version as the bake asks it again: one fixed answer per question."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.asked = answers, []  # type: ignore[var-annotated]

    def chat_reply(self, model: str, prompt: object, *, max_tokens: int) -> object:
        from tuneloop.serving.vllm_client import ChatReply

        question = prompt[-1]["content"]  # type: ignore[index]
        self.asked.append((model, question, max_tokens))
        return ChatReply(text=self.answers[question], seconds=0.01)


def test_live_answers_are_graded_against_the_previous_versions_answer_to_the_same_request() -> None:
    previous = _Previous({"q1": "billing", "q2": "shipping", "q3": "refund"})
    asked = [([{"role": "user", "content": q}], tokens, a) for q, tokens, a in [("q1", 5, "billing"), ("q2", None, "billing"), ("q3", 10_000, "refund")]]
    seen: list[object] = []

    def grader(answer: str, reference: str, prompt: object) -> float:
        seen.append(prompt)
        return float(answer == reference)

    graded, total = grade_live(previous, "t-v1", asked, grader, max_tokens=16)  # type: ignore[arg-type]
    assert (graded, total) == (3, 2.0)
    # the request's own max_tokens, the default without one, and never more than 4x the default
    assert previous.asked == [("t-v1", "q1", 5), ("t-v1", "q2", 16), ("t-v1", "q3", 64)]
    assert seen == [m for m, _, _ in asked]  # the judge sees the conversation


def test_bake_breaches_on_live_agreement_below_its_floor_only_when_graded() -> None:
    policy = RolloutPolicy(strategy="canary", min_requests=20)
    drifting = VersionStats(requests=100, graded=8, agreement_sum=4.0)
    verdict, reason = judge_bake(drifting, None, policy, None, 0.75)
    assert verdict == "breach" and "live answers agree 0.50" in reason and "8 graded" in reason
    assert judge_bake(VersionStats(requests=100, graded=8, agreement_sum=7.0), None, policy, None, 0.75)[0] == "pass"
    assert judge_bake(VersionStats(requests=100), None, policy, None, 0.75)[0] == "pass"  # nothing graded: nothing to say
    assert judge_bake(drifting, None, policy, None, None)[0] == "pass"  # no floor: reported only


def test_policy_refuses_steps_that_do_not_end_in_full_traffic() -> None:
    assert RolloutPolicy(strategy="switch").weights() == (100.0,)
    assert RolloutPolicy(strategy="canary", steps=(5, 25, 100)).weights() == (5.0, 25.0, 100.0)
    for steps in [(10, 50), (50, 10, 100), (0, 100), ()]:
        with pytest.raises(ValueError, match="end at 100"):
            RolloutPolicy(strategy="canary", steps=steps)
    with pytest.raises(ValueError, match="inplace"):
        RolloutPolicy(strategy="inplace")


def test_flip_back_routes_everything_to_last_known_good(tmp_path: Path) -> None:
    table = RouteTable(tmp_path / "routes.json")
    table.set_alias("t", {"t-v1": 100})
    with pytest.raises(ValueError, match="no last-known-good"):
        flip_back(table, "t")
    table.set_alias("t", {"t-v2": 100}, last_known_good="t-v1")
    before = flip_back(table, "t")
    assert before.serving() == ["t-v2"]
    after = table.alias("t")
    assert after.routes == {"t-v1": 100.0} and after.last_known_good == "t-v2"


def test_waiting_requests_reads_the_vllm_gauge_not_its_breakdown() -> None:
    from tuneloop.serving.rollout import waiting_requests

    text = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
vllm:num_requests_running{engine="0",model_name="tuneloop-base"} 4.0
vllm:num_requests_waiting{engine="0",model_name="tuneloop-base"} 3.0
vllm:num_requests_waiting{engine="1",model_name="tuneloop-base"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tuneloop-base",reason="capacity"} 3.0
"""
    assert waiting_requests(text) == 4.0
    assert waiting_requests("") == 0.0
