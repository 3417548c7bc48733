"""The LLM judge's client side (task.metric: judge) over real HTTP on loopback: the request it
sends, verdict parsing, the on-disk cache (the same answer is never paid for twice), retries on
429/5xx, pairwise order swapping, and an API key that never shows in an error.

The endpoint is a small OpenAI-compatible responder in this process whose verdicts are scripted:
what is tested is tuneloop's client, not a model's judgement."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import JudgeSettings, TaskSettings
from tuneloop.tasks import Example
from tuneloop.tasks.judge import JudgeScorer
from tuneloop.tasks.scoring import ScoringError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.unit

EXAMPLE = Example("q1", [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"}], "4", "all")


class Judge:
    """Scripted verdicts: ``reply(prompt) -> content``; ``fail_first`` answers 503 that many times."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_first = 0
        self.status = 200

    def reply(self, prompt: str) -> str:
        if "ANSWER A:" in prompt:  # pairwise: the answer "4" is better wherever it stands
            a = prompt.split("ANSWER A:\n", 1)[1].split("\n\nANSWER B:", 1)[0]
            b = prompt.split("ANSWER B:\n", 1)[1]
            return json.dumps({"better": "tie" if a == b else ("A" if a.strip() == "4" else "B")})
        answer = prompt.rsplit("ANSWER TO GRADE:\n", 1)[1]
        return 'Sure. {"score": 1, "reason": "right"}' if answer.strip() == "4" else "score: 0"


@pytest.fixture
def judge() -> Iterator[tuple[Judge, str]]:
    state = Judge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(body)
            state.headers.append(dict(self.headers))
            if state.fail_first > 0:
                state.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            if state.status != 200:
                self.send_response(state.status)
                self.end_headers()
                return
            content = state.reply(body["messages"][0]["content"])
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _scorer(endpoint: str, cache: Path, **judge: Any) -> JudgeScorer:
    settings = TaskSettings(metric="judge", judge=JudgeSettings(endpoint=endpoint, model="big-judge", api_key="sk-secret-123", cache_dir=str(cache), **judge))
    return JudgeScorer(settings)


def test_pointwise_verdicts_are_parsed_and_cached(judge: tuple[Judge, str], tmp_path: Path) -> None:
    state, endpoint = judge
    scorer = _scorer(endpoint, tmp_path / "cache")
    scored = scorer.score_batch(["4", "5", "4"], ["4", "4", "4"], [EXAMPLE, EXAMPLE, EXAMPLE])
    assert [s.score for s in scored] == [1.0, 0.0, 1.0]
    assert scored[0].details == {"judge_parsed": True, "judge_reason": "right"}
    assert scored[1].details["judge_parsed"] is True  # "score: 0" without JSON is still read
    sent = state.requests[0]
    assert sent["model"] == "big-judge" and sent["temperature"] == 0.0
    assert "SYSTEM: Be kind." in sent["messages"][0]["content"] and "REFERENCE ANSWER:\n4" in sent["messages"][0]["content"]
    assert state.headers[0]["Authorization"] == "Bearer sk-secret-123"
    calls = len(state.requests)
    assert calls <= 3
    again = _scorer(endpoint, tmp_path / "cache")  # a new process: the verdicts come from the cache
    assert [s.score for s in again.score_batch(["4", "5"], ["4", "4"], [EXAMPLE, EXAMPLE])] == [1.0, 0.0]
    assert len(state.requests) == calls and again.cache_hits == 2
    assert again.aggregate([{"judge_parsed": True}, {"judge_parsed": False}]) == {"judge_parsed": 0.5, "judge_calls": 0, "judge_cache_hits": 2}


def test_pairwise_judges_both_orders(judge: tuple[Judge, str], tmp_path: Path) -> None:
    state, endpoint = judge
    scorer = _scorer(endpoint, tmp_path / "cache", pairwise=True)
    assert scorer.score("4", "5", EXAMPLE).score == 1.0  # better than the reference in both orders
    assert scorer.score("5", "4", EXAMPLE).score == 0.0
    assert scorer.score("4", "4", EXAMPLE).score == 0.5
    firsts = [r["messages"][0]["content"] for r in state.requests[:2]]
    assert "ANSWER A:\n4" in firsts[0] and "ANSWER B:\n4" in firsts[1], "the answer is shown first, then second"


def test_retries_then_names_the_endpoint_but_never_the_key(judge: tuple[Judge, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuneloop.tasks.judge.time.sleep", lambda _s: None)
    state, endpoint = judge
    state.fail_first = 2
    assert _scorer(endpoint, tmp_path / "a").score("4", "4", EXAMPLE).score == 1.0
    assert len(state.requests) == 3
    state.status = 401
    with pytest.raises(ScoringError) as caught:
        _scorer(endpoint, tmp_path / "b").score("7", "4", EXAMPLE)
    assert "HTTP 401" in str(caught.value) and endpoint in str(caught.value)
    assert "sk-secret" not in str(caught.value)
    assert len(state.requests) == 4, "a 401 is not retried"


def test_agreement_with_human_verdicts_is_reported(judge: tuple[Judge, str], tmp_path: Path) -> None:
    _state, endpoint = judge
    humans = tmp_path / "humans.jsonl"
    rows = [
        {"prompt": "What is 2+2?", "reference": "4", "answer": "4", "score": 1},
        {"prompt": "What is 2+2?", "reference": "4", "answer": "5", "score": 0},
        {"prompt": "What is 2+2?", "reference": "4", "answer": "four", "score": 1},  # the scripted judge says 0 here
    ]
    humans.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = _scorer(endpoint, tmp_path / "cache", calibration_set=str(humans))
    block = scorer.aggregate([{"judge_parsed": True}])["judge_agreement_with_humans"]
    assert block["n"] == 3 and block["agreement"] == pytest.approx(2 / 3) and block["mean_abs_diff"] == pytest.approx(1 / 3)
