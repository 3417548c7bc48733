"""The real nginx gateway (tuneloop.serving.gateway) in front of a loopback upstream that
answers like vLLM's chat endpoint (the model it was asked for, the prompt echoed; streamed
when asked). No vLLM here: tests/integration/test_rollout_vllm.py puts the gateway in front
of the real server."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from processes import needs_nginx

from tuneloop.serving.gateway import (
    VERSION_HEADER,
    NginxGateway,
    read_access_log,
)
from tuneloop.serving.rollout import answer_text, live_requests

pytestmark = [
    pytest.mark.integration,
    needs_nginx(),
]


class _Upstream(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, json.dumps({"object": "list", "data": [], "port": self.server.server_address[1]}).encode())

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, json.dumps({"error": "not JSON", "got": raw.decode(errors="replace")}).encode())
            return
        content = f"{body['model']} says {body['messages'][0]['content']}"
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for part in (content[:5], content[5:]):
                chunk = {"model": body["model"], "choices": [{"delta": {"content": part}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        reply = {"model": body["model"], "port": self.server.server_address[1], "choices": [{"message": {"content": content}}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def _start_upstream() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[NginxGateway, list[ThreadingHTTPServer]]]:
    from fixtures_vllm import free_port

    upstreams = [_start_upstream(), _start_upstream()]
    gw = NginxGateway(tmp_path / "gw", port=free_port())
    gw.start()
    gw.routes.set_upstreams([f"http://127.0.0.1:{u.server_address[1]}" for u in upstreams])
    try:
        yield gw, upstreams
    finally:
        gw.stop()
        for u in upstreams:
            u.shutdown()


def _ask(gw: NginxGateway, model: str, prompt: str = "hello", **extra: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}], **extra}, timeout=10)


def test_alias_is_rewritten_by_weight_and_flips_without_a_reload(gateway: tuple[NginxGateway, list[ThreadingHTTPServer]]) -> None:
    gw, _ = gateway
    gw.routes.set_alias("tl", {"tl-v1": 100})
    pid = gw.pid()
    first = _ask(gw, "tl", "Größe 12 €")
    assert first.status_code == 200
    assert first.json()["model"] == "tl-v1" and first.headers[VERSION_HEADER] == "tl-v1"
    assert first.json()["choices"][0]["message"]["content"] == "tl-v1 says Größe 12 €"  # UTF-8 survives the rewrite

    gw.routes.set_alias("tl", {"tl-v1": 70, "tl-v2": 30})
    seen = Counter(_ask(gw, "tl").json()["model"] for _ in range(300))
    assert set(seen) == {"tl-v1", "tl-v2"}
    assert 0.2 < seen["tl-v2"] / 300 < 0.4  # 30 % by weight (binomial sd 2.6 %)

    gw.routes.set_alias("tl", {"tl-v2": 100})
    assert {_ask(gw, "tl").json()["model"] for _ in range(20)} == {"tl-v2"}  # the next request already follows
    assert gw.pid() == pid  # no reload, no new workers, no dropped connection


def test_other_names_and_other_paths_pass_unchanged_and_replicas_share_the_load(gateway: tuple[NginxGateway, list[ThreadingHTTPServer]]) -> None:
    gw, upstreams = gateway
    gw.routes.set_alias("tl", {"tl-v1": 100})
    direct = _ask(gw, "tl-base")
    assert direct.json()["model"] == "tl-base"
    garbage = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert garbage.status_code == 400 and garbage.json()["got"] == "{not json"  # the upstream judges it, as without a gateway
    ports = Counter(_ask(gw, "tl").json()["port"] for _ in range(60))
    assert set(ports) == {u.server_address[1] for u in upstreams}
    assert httpx.get(gw.url + "/v1/models", timeout=10).json()["object"] == "list"


def test_no_ready_replica_is_a_502_not_a_hang(gateway: tuple[NginxGateway, list[ThreadingHTTPServer]]) -> None:
    gw, _ = gateway
    gw.routes.set_alias("tl", {"tl-v1": 100})
    gw.routes.set_upstreams([])
    assert _ask(gw, "tl").status_code == 502


def test_only_the_captured_version_has_its_answers_logged_streamed_or_not(gateway: tuple[NginxGateway, list[ThreadingHTTPServer]]) -> None:
    gw, _ = gateway
    gw.routes.set_alias("tl", {"tl-v1": 50, "tl-v2": 50}, capture={"tl-v2": 1.0})
    for i in range(40):
        assert _ask(gw, "tl", f"q{i}", stream=bool(i % 2)).status_code == 200
    records, _ = read_access_log(gw.access_log)
    by_version: dict[str, list[str]] = {}
    for record in records:
        by_version.setdefault(record.version, []).append(record.answer)
    assert by_version.keys() == {"tl-v1", "tl-v2"}
    assert all(answer == "" for answer in by_version["tl-v1"])
    assert all(record.request == "" for record in records if record.version == "tl-v1")
    texts = [answer_text(answer) for answer in by_version["tl-v2"]]
    assert texts and all(t is not None and t.startswith("tl-v2 says q") for t in texts)
    # each captured answer comes with its request, so the bake can ask the previous version again
    captured = [r for r in records if r.version == "tl-v2"]
    for record in captured:
        asked = json.loads(record.request)
        answer = answer_text(record.answer)
        assert answer is not None and asked["messages"][0]["content"] == answer.removeprefix("tl-v2 says ")
    asked_back = live_requests(captured, "tl-v2", 5)
    assert len(asked_back) == 5 and all(answer.endswith(messages[0]["content"]) for messages, _, answer in asked_back)  # type: ignore[index]


def test_a_replica_that_lacks_the_version_fails_or_is_down_is_retried_on_another(gateway: tuple[NginxGateway, list[ThreadingHTTPServer]], tmp_path: Path) -> None:
    from fixtures_vllm import free_port

    gw, upstreams = gateway
    good = upstreams[0].server_address[1]

    class Forgetful(_Upstream):  # a restarted vLLM: it does not know the version names yet
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(404, json.dumps({"error": {"message": "The model `tl-v1` does not exist."}}).encode())

    class Stopping(_Upstream):  # a vLLM shutting down fails the requests it still holds
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(500, b'{"error": {"message": "engine is shutting down"}}')

    forgetful = ThreadingHTTPServer(("127.0.0.1", 0), Forgetful)
    stopping = ThreadingHTTPServer(("127.0.0.1", 0), Stopping)
    for server in (forgetful, stopping):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    down = free_port()  # nothing listens there
    try:
        gw.routes.set_alias("tl", {"tl-v1": 100})
        gw.routes.set_upstreams(
            [f"127.0.0.1:{good}", f"127.0.0.1:{forgetful.server_address[1]}", f"127.0.0.1:{stopping.server_address[1]}", f"127.0.0.1:{down}"]
        )
        replies = [_ask(gw, "tl", f"q{i}", stream=bool(i % 3 == 0)) for i in range(60)]
        assert {r.status_code for r in replies} == {200}
        assert {r.json()["port"] for r in replies if not r.headers.get("content-type", "").startswith("text/event-stream")} == {good}
        # a model no replica serves still gets the server's own 404, once retried
        gw.routes.set_upstreams([f"127.0.0.1:{forgetful.server_address[1]}"])
        missing = _ask(gw, "tl")
        assert missing.status_code == 404 and "does not exist" in missing.text
    finally:
        forgetful.shutdown()
        stopping.shutdown()
