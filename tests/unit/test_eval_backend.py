"""Choosing the eval backend (auto falls back to HF and says why) and the vLLM backend's
adapter handling, without a model or a real server (a stub HTTP server stands in for vLLM's
/health and /v1/models where one is needed)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import Settings
from tuneloop.ml.backends import BackendUnavailable, HFBackend, select_backend
from tuneloop.ml.vllm_backend import (
    EVAL_NAME_INFIX,
    VllmBackend,
    eval_fleet,
    eval_lora_name,
    materialize_eval_adapter,
)
from tuneloop.serving.vllm_client import RequestPacer, VllmClient

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(endpoints: list[str], tmp_path: Path) -> Settings:
    return Settings.model_validate({"vllm": {"endpoints": endpoints, "adapter_dir": str(tmp_path / "served")}})


def _base_dir(tmp_path: Path, name: str, hidden: int) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    return directory


@pytest.fixture
def stub_vllm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An HTTP server that answers /health and lists ``tuneloop-base`` served from ``state['root']``."""
    state: dict[str, Any] = {"root": str(tmp_path / "unset")}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                body = b""
            elif self.path == "/v1/models":
                body = json.dumps({"data": [{"id": "tuneloop-base", "root": state["root"], "parent": None}]}).encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # a chat completion, for the pacing test
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200 if self.path == "/v1/chat/completions" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def torch_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF generate is possible (as in .venv-ml), whichever env runs the test: selection only."""
    monkeypatch.setattr("tuneloop.ml.backends.has_torch", lambda: True)


def test_auto_falls_back_to_hf_and_says_why_when_nothing_answers(tmp_path: Path, torch_here: None) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    said: list[str] = []
    backend = select_backend("auto", _settings([url], tmp_path), base_model=tmp_path, adapter_dir=None, progress=said.append)
    assert isinstance(backend, HFBackend)
    assert said == [f"backend auto: evaluating with HF generate because vLLM at {url} does not answer /health"]
    assert backend.describe()["selected"].startswith("auto: vLLM at")
    assert backend.latency_reason and "batches" in backend.latency_reason


def test_vllm_requested_but_down_is_an_error_naming_the_endpoint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(BackendUnavailable, match=f"{url} does not answer /health.*make serve"):
        select_backend("vllm", _settings([url], tmp_path), base_model=tmp_path, adapter_dir=None)


def test_hf_requested_never_asks_the_server(tmp_path: Path) -> None:
    backend = select_backend("hf", _settings(["http://127.0.0.1:9"], tmp_path), base_model=tmp_path, adapter_dir=None)
    assert isinstance(backend, HFBackend) and backend.describe()["selected"] == "requested"


def test_auto_uses_a_server_that_serves_the_configured_base(tmp_path: Path, stub_vllm: dict[str, Any]) -> None:
    base = _base_dir(tmp_path, "base", 128)
    stub_vllm["root"] = str(base)
    said: list[str] = []
    backend = select_backend(
        "auto", _settings([stub_vllm["url"]], tmp_path), base_model=base, adapter_dir=None, progress=said.append
    )
    assert isinstance(backend, VllmBackend) and backend.endpoints == [stub_vllm["url"]]
    assert said == [
        f"backend auto: vLLM answers at {stub_vllm['url']}; the serving fleet, bounded to 4 in flight and 8 req/s "
        "per endpoint (eval.production_*; set eval.endpoints to evaluate on servers of their own)"
    ]
    assert backend.latency_reason is None
    assert (backend.concurrency, backend.max_rps) == (4, 8.0)


def test_eval_endpoints_take_the_evaluation_off_the_serving_fleet(tmp_path: Path, stub_vllm: dict[str, Any]) -> None:
    """With eval.endpoints set, evaluation never asks the serving fleet (here a closed port) and
    runs at the full eval.batch_size, unpaced."""
    base = _base_dir(tmp_path, "base", 128)
    stub_vllm["root"] = str(base)
    serving = f"http://127.0.0.1:{_closed_port()}"
    settings = Settings.model_validate(
        {"vllm": {"endpoints": [serving], "adapter_dir": str(tmp_path / "served")}, "eval": {"endpoints": [stub_vllm["url"] + "/"], "batch_size": 12}}
    )
    said: list[str] = []
    backend = select_backend("vllm", settings, base_model=base, adapter_dir=None, progress=said.append)
    assert isinstance(backend, VllmBackend) and backend.endpoints == [stub_vllm["url"]]
    assert (backend.concurrency, backend.max_rps) == (12, None)
    assert serving not in said[0] and "evaluation endpoints (eval.endpoints), 12 in flight each" in said[0]
    fleet = eval_fleet(Settings.model_validate({"eval": {"batch_size": 2, "production_concurrency": 6, "production_max_rps": None}}))
    assert (fleet.serving, fleet.concurrency, fleet.max_rps) == (True, 2, None) and "no rate bound" in fleet.describe()
    with pytest.raises(ValueError, match="must start with http"):
        Settings.model_validate({"eval": {"endpoints": ["localhost:8000"]}})


def test_the_pacer_spaces_request_starts_across_threads() -> None:
    """Slots 1/rate apart whatever the threads do; a pause resets to now, never a burst."""
    now = [100.0]
    slept: list[float] = []
    pacer = RequestPacer(4.0, clock=lambda: now[0], sleep=slept.append)
    with ThreadPoolExecutor(8) as pool:
        delays = sorted(pool.map(lambda _: pacer.wait(), range(8)))
    assert delays == pytest.approx([0.25 * i for i in range(8)])
    assert sorted(slept) == pytest.approx([0.25 * i for i in range(1, 8)])
    now[0] += 10.0  # idle for a while: the next request goes at once, the one after waits again
    assert pacer.wait() == 0.0 and pacer.wait() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="> 0"):
        RequestPacer(0)


def test_a_paced_client_sends_at_most_the_rate(stub_vllm: dict[str, Any]) -> None:
    """Real requests from 6 threads through a client paced at 40/s: the k-th request starts no
    earlier than k x 25 ms after the first could (a lower bound that load on the machine cannot break)."""
    starts: list[float] = []
    client = VllmClient(stub_vllm["url"], max_rps=40.0)
    real = client._request

    def timed(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.monotonic())
        return real(*args, **kwargs)

    client._request = timed  # type: ignore[method-assign]
    began = time.monotonic()
    with client, ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: client.chat_reply("tuneloop-base", "hi", max_tokens=1), range(12)))
    assert len(starts) == 12
    assert all(start - began >= k * 0.025 - 1e-3 for k, start in enumerate(sorted(starts)))


def test_auto_with_no_server_and_no_torch_says_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Airflow image without the ML env: auto can only use vLLM, and says what to do."""
    monkeypatch.setattr("tuneloop.ml.backends.has_torch", lambda: False)
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(BackendUnavailable, match=f"{url} does not answer /health.*needs torch.*make serve"):
        select_backend("auto", _settings([url], tmp_path), base_model=tmp_path, adapter_dir=None)


def test_auto_falls_back_when_the_server_serves_another_base_model(tmp_path: Path, stub_vllm: dict[str, Any], torch_here: None) -> None:
    stub_vllm["root"] = str(_base_dir(tmp_path, "other", 256))
    base = _base_dir(tmp_path, "base", 128)
    said: list[str] = []
    backend = select_backend(
        "auto", _settings([stub_vllm["url"]], tmp_path), base_model=base, adapter_dir=None, progress=said.append
    )
    assert isinstance(backend, HFBackend)
    assert "not the configured base model" in said[0] and str(base) in said[0]
    with pytest.raises(BackendUnavailable, match="not the configured base model"):
        select_backend("vllm", _settings([stub_vllm["url"]], tmp_path), base_model=base, adapter_dir=None)


def test_auto_skips_a_down_endpoint_and_uses_the_healthy_one(tmp_path: Path, stub_vllm: dict[str, Any]) -> None:
    base = _base_dir(tmp_path, "base", 128)
    stub_vllm["root"] = str(base)
    down = f"http://127.0.0.1:{_closed_port()}"
    backend = select_backend("auto", _settings([down, stub_vllm["url"]], tmp_path), base_model=base, adapter_dir=None)
    assert isinstance(backend, VllmBackend) and backend.endpoints == [stub_vllm["url"]]
    assert down in backend.describe()["selected"]


def test_the_base_model_is_asked_under_the_base_name_with_nothing_loaded(tmp_path: Path, stub_vllm: dict[str, Any]) -> None:
    base = _base_dir(tmp_path, "base", 128)
    stub_vllm["root"] = str(base)
    backend = VllmBackend(
        [stub_vllm["url"]], served_name="tuneloop", base_model=base, adapter_dir=None, max_lora_rank=16,
        adapter_root=tmp_path / "served", max_tokens=8,
    )  # fmt: skip
    with backend:
        assert backend.model == "tuneloop-base"
    assert backend.describe()["lora_name"] is None and backend.describe()["unloaded"] is None


def test_an_invalid_adapter_is_refused_before_anything_is_loaded(tmp_path: Path, stub_vllm: dict[str, Any]) -> None:
    from tuneloop.serving.adapters import AdapterValidationError

    base = _base_dir(tmp_path, "base", 128)
    stub_vllm["root"] = str(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64}))
    backend = VllmBackend(
        [stub_vllm["url"]], served_name="tuneloop", base_model=base, adapter_dir=adapter, max_lora_rank=16,
        adapter_root=tmp_path / "served", max_tokens=8,
    )  # fmt: skip
    with pytest.raises(AdapterValidationError, match="exceeds the server's max_lora_rank"):
        backend.open()
    assert backend.lora_name is None and not (tmp_path / "served").exists()


def test_eval_lora_names_are_fresh_and_never_the_served_names() -> None:
    names = {eval_lora_name("tuneloop") for _ in range(20)}
    assert len(names) == 20
    assert all(name.startswith("tuneloop" + EVAL_NAME_INFIX) for name in names)
    assert not names & {"tuneloop", "tuneloop-staging", "tuneloop-base"}


def test_eval_names_are_dated_so_reconcile_can_sweep_what_a_killed_evaluation_left() -> None:
    from tuneloop.ml.vllm_backend import stale_eval_names

    old, fresh = eval_lora_name("tuneloop", now=1_000_000), eval_lora_name("tuneloop", now=2_000_000)
    other_loop = eval_lora_name("tuneloop-tickets", now=1_000_000)
    names = [old, fresh, other_loop, "tuneloop", "tuneloop-v3", "tuneloop-eval-1234abcd"]  # the last: undated (older tuneloop)
    assert stale_eval_names(names, "tuneloop", max_age_s=3600, now=2_000_100) == [old]
    assert stale_eval_names(names, "tuneloop", max_age_s=20 * 86400, now=2_000_100) == []


def test_materialize_eval_adapter_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "README.md").write_text("not copied")
    first = materialize_eval_adapter(adapter, tmp_path / "served")
    assert first.parent == (tmp_path / "served" / "eval").resolve()
    assert sorted(p.name for p in first.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert materialize_eval_adapter(adapter, tmp_path / "served") == first
    (adapter / "adapter_model.safetensors").write_bytes(b"other weights")
    second = materialize_eval_adapter(adapter, tmp_path / "served")
    assert second != first and (first / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "no partial copies left"
