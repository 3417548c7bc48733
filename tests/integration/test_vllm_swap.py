"""Hot-swapping LoRA adapters into a REAL vLLM CPU server: swaps, load, failures, rollback.

One server for the module, started with ``scripts/serve.sh`` on a free port of 127.0.0.1
(about 20-60 s on 2 cores), serving a tiny random Llama built here; two LoRA adapters with
different random B matrices answer differently, one adapter has a rank above the server's
maximum and one has a corrupt safetensors header. The expected ("golden") answers of v1
and v2 are captured from the server itself, as an evaluation through vLLM would.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fixtures_vllm import (
    MAX_TOKENS,
    PROMPTS,
    SERVED,
    STAGING,
    FaultProxy,
    build_lora_adapter,
    build_tiny_llama,
    corrupt_safetensors,
    free_port,
    golden_of,
    on_load_of,
    serve_sh,
    serves,
    staged_answers,
)

import tuneloop.serving.deploy as deploy_module
from tuneloop.serving.adapters import AdapterInfo
from tuneloop.serving.deploy import DeployError, DeployReport, deploy_adapter
from tuneloop.serving.vllm_client import VllmClient, VllmError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = [pytest.mark.ml, pytest.mark.integration]

API_KEY = "tl-test-key-5c1e7d0a"  # the second server's; must never show in a log or report


@dataclass
class Served:
    """The running server and what the tests built for it."""

    url: str
    base: Path
    adapters: dict[str, Path]
    answers: dict[str, list[str]]  # adapter name -> greedy answers to PROMPTS (captured on staging)
    start_seconds: float

    def golden(self, adapter: str) -> list[dict[str, str]]:
        return golden_of(self.answers[adapter])

    def deploy(self, adapter: str, previous: str | None, **kwargs: Any) -> DeployReport:
        options: dict[str, Any] = {
            "served_name": SERVED,
            "golden": kwargs.pop("golden", None) or self.golden(adapter),
            "previous_adapter_dir": self.adapters[previous] if previous else None,
            "max_lora_rank": 16,
            "base_model": self.base,
            "verify_min_agreement": 1.0,
            "max_tokens": MAX_TOKENS,
            "timeout_s": 60,
        }
        options.update(kwargs)
        endpoints = options.pop("endpoints", [self.url])
        return deploy_adapter(endpoints, self.adapters[adapter], **options)

    def stable_answers(self) -> list[str]:
        with VllmClient(self.url) as client:
            return client.chat_many(SERVED, PROMPTS, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("vllm-swap")
    base = build_tiny_llama(root / "base")
    adapters = {
        "v1": build_lora_adapter(base, root / "adapters" / "v1", seed=1),
        "v2": build_lora_adapter(base, root / "adapters" / "v2", seed=2),
        "big": build_lora_adapter(base, root / "adapters" / "big", rank=32, seed=3),
    }
    adapters["corrupt"] = corrupt_safetensors(adapters["v1"], root / "adapters" / "corrupt")
    run_dir = root / "run"
    port = free_port()
    started = time.monotonic()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    start_seconds = time.monotonic() - started
    try:
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr}"
        url = f"http://127.0.0.1:{port}"
        again = serve_sh("start", "--port", str(port), "--model", str(base), "--run-dir", str(run_dir))
        assert again.returncode == 0 and "already running" in again.stderr
        answers = staged_answers(url, {name: adapters[name] for name in ("v1", "v2")})
        print(f"\n[vllm] server start {start_seconds:.1f} s (serve.sh start -> healthy)")
        yield Served(url, base, adapters, answers, start_seconds)
    finally:
        log = run_dir / "vllm.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        stopped = serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        dead = [line for line in text.splitlines() if "EngineDeadError" in line]
        assert not dead, "the vLLM engine died during the tests:\n" + "\n".join(dead[:5])


@pytest.fixture
def stable_v1(served: Served) -> Served:
    """The stable name serves v1 (deploying it if it does not)."""
    with VllmClient(served.url) as client:
        current = client.adapters().get(SERVED)
    if current != str(served.adapters["v1"].resolve()):
        served.deploy("v1", None)
    assert served.stable_answers() == served.answers["v1"]
    return served


def test_the_adapters_answer_differently(served: Served) -> None:
    v1, v2, base = served.answers["v1"], served.answers["v2"], served.answers["base"]
    assert sum(a != b for a, b in zip(v1, v2, strict=True)) >= len(PROMPTS) - 1
    assert v1 != base and v2 != base
    with VllmClient(served.url) as client:  # greedy answers are reproducible
        assert client.chat_many(f"{SERVED}-base", PROMPTS, max_tokens=MAX_TOKENS) == base


def test_deploy_v1_then_v2(served: Served) -> None:
    first = served.deploy("v1", None)
    assert first.ok and served.stable_answers() == served.answers["v1"]
    second = served.deploy("v2", "v1")
    assert second.ok and served.stable_answers() == served.answers["v2"]
    endpoint = second.endpoints[0]
    assert endpoint.status == "deployed" and endpoint.previous_served == str(served.adapters["v1"].resolve())
    assert endpoint.stable is not None and endpoint.stable["agreement"] == 1.0 and endpoint.stable["consistency"] == 1.0
    with VllmClient(served.url) as client:
        assert client.adapters() == {
            STAGING: str(served.adapters["v2"].resolve()),
            SERVED: str(served.adapters["v2"].resolve()),
        }
        assert "vllm:" in client.metrics()
    assert endpoint.swap_seconds is not None
    print(
        f"\n[vllm] deploy v2: {second.seconds:.2f} s in all; in-place swap of the stable name "
        f"{endpoint.swap_seconds * 1000:.0f} ms; steps "
        + ", ".join(f"{s.step} {s.seconds * 1000:.0f} ms" for s in endpoint.steps)
    )


def test_swaps_under_load_fail_no_request(stable_v1: Served) -> None:
    served = stable_v1
    stop = threading.Event()
    deadline = time.monotonic() + 240  # bounded even if the swaps hang
    outcomes: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        prompt = PROMPTS[index % len(PROMPTS)]
        with VllmClient(served.url, timeout_s=60) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    answer = client.chat(SERVED, prompt, max_tokens=MAX_TOKENS)
                except Exception as err:  # every failure counts, whatever its kind
                    with lock:
                        outcomes["failed"] += 1
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                p = PROMPTS.index(prompt)
                kind = "v1" if answer == served.answers["v1"][p] else "v2" if answer == served.answers["v2"][p] else "mixed"
                with lock:
                    outcomes["ok"] += 1
                    answers[kind] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # let the clients get going
    swap_ms = []
    try:
        for adapter, previous in [("v2", "v1"), ("v1", "v2"), ("v2", "v1"), ("v1", "v2")]:
            report = served.deploy(adapter, previous)
            swap_ms.append((report.endpoints[0].swap_seconds or 0.0) * 1000)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    print(
        f"\n[vllm] 4 verified deploys under 5 clients: {outcomes['ok'] + outcomes['failed']} requests, "
        f"{outcomes['failed']} failed; answers {dict(answers)}; in-place swap "
        f"{min(swap_ms):.0f}-{max(swap_ms):.0f} ms"
    )
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes["failed"] == 0, failures[:5]
    assert outcomes["ok"] >= 10
    assert answers["v1"] > 0 and answers["v2"] > 0
    assert served.stable_answers() == served.answers["v1"]


@pytest.mark.parametrize("adapter", ["big", "corrupt"])
def test_bad_adapter_is_rejected_before_sending(stable_v1: Served, adapter: str) -> None:
    served = stable_v1
    with VllmClient(served.url) as client:
        before = client.adapters()
    with pytest.raises(DeployError) as caught:
        served.deploy(adapter, "v1", golden=served.golden("v1"))
    assert caught.value.step == "validate"
    message = str(caught.value)
    assert ("rank 32 exceeds the server's max_lora_rank 16" if adapter == "big" else "corrupt safetensors") in message
    with VllmClient(served.url) as client:
        assert client.adapters() == before
    assert served.stable_answers() == served.answers["v1"]


def _skip_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept(adapter_dir: Any, **_: Any) -> AdapterInfo:
        return AdapterInfo(str(adapter_dir), "LORA", 0, 0.0, [], "", "forced", 0, "", 0, 0)

    monkeypatch.setattr(deploy_module, "validate_adapter", accept)


@pytest.mark.parametrize(
    ("adapter", "server_says"),
    [("big", "LoRA rank 32 is greater than max_lora_rank 16"), ("corrupt", "Error while deserializing header")],
)
def test_server_rejection_past_validation_keeps_the_previous_adapter(
    stable_v1: Served, monkeypatch: pytest.MonkeyPatch, adapter: str, server_says: str
) -> None:
    served = stable_v1
    _skip_validation(monkeypatch)
    with pytest.raises(DeployError) as caught:
        served.deploy(adapter, "v1", golden=served.golden("v1"))
    err = caught.value
    assert err.step == "load_staging" and err.endpoint == served.url
    assert server_says in str(err) and "-> 500" in str(err) and "tuneloop untouched" in str(err)
    with VllmClient(served.url) as client:
        assert client.health()
        assert client.adapters()[SERVED] == str(served.adapters["v1"].resolve())
    assert served.stable_answers() == served.answers["v1"]


def test_server_error_on_the_stable_swap_restores_the_previous_adapter(
    stable_v1: Served, tmp_path: Path
) -> None:
    """The adapter directory is overwritten with a corrupt copy between staging and stable."""
    served = stable_v1
    moving = tmp_path / "v2-being-overwritten"
    shutil.copytree(served.adapters["v2"], moving)
    good = (moving / "adapter_model.safetensors").read_bytes()
    bad = (served.adapters["corrupt"] / "adapter_model.safetensors").read_bytes()

    def overwrite_after_staging(message: str) -> None:
        if "verify_staging ok" in message:
            (moving / "adapter_model.safetensors").write_bytes(bad)

    try:
        with pytest.raises(DeployError) as caught:
            deploy_adapter(
                [served.url],
                moving,
                served_name=SERVED,
                golden=served.golden("v2"),
                previous_adapter_dir=served.adapters["v1"],
                max_lora_rank=16,
                base_model=served.base,
                verify_min_agreement=1.0,
                max_tokens=MAX_TOKENS,
                progress=overwrite_after_staging,
            )
        err = caught.value
        assert err.step == "load_stable" and "Error while deserializing header" in str(err)
        assert "tuneloop rolled back" in str(err)
        assert err.report is not None and err.report.endpoints[0].status == "rolled_back"
        assert served.stable_answers() == served.answers["v1"]
    finally:
        # staging still points at this directory: make it loadable again, then point it elsewhere
        (moving / "adapter_model.safetensors").write_bytes(good)
        with VllmClient(served.url) as client:
            client.load_adapter(STAGING, str(served.adapters["v1"].resolve()), inplace=True)


def test_golden_that_cannot_match_stops_at_staging(stable_v1: Served) -> None:
    served = stable_v1
    impossible = [{**case, "expected": "this answer never comes"} for case in served.golden("v2")]
    with pytest.raises(DeployError) as caught:
        served.deploy("v2", "v1", golden=impossible)
    err = caught.value
    assert err.step == "verify_staging" and err.endpoint == served.url
    assert "golden agreement 0.00" in str(err) and "tuneloop untouched" in str(err)
    assert served.stable_answers() == served.answers["v1"]


def _fails_after(n_calls: int) -> Callable[[str, str], float]:
    """A scorer that judges honestly for the first ``n_calls`` answers (staging), then fails."""
    calls = {"n": 0}

    def score(answer: str, expected: str) -> float:
        calls["n"] += 1
        return float(answer.strip() == expected.strip()) if calls["n"] <= n_calls else 0.0

    return score


def test_stable_verification_failure_rolls_back(stable_v1: Served) -> None:
    served = stable_v1
    with pytest.raises(DeployError) as caught:
        served.deploy("v2", "v1", scorer=_fails_after(len(PROMPTS)))
    err = caught.value
    assert err.step == "verify_stable" and err.endpoint == served.url
    assert f"to {served.url} failed at step verify_stable" in str(err)
    assert "tuneloop rolled back" in str(err) and "1.00 of answers as before the swap" in str(err)
    with VllmClient(served.url) as client:
        assert client.adapters()[SERVED] == str(served.adapters["v1"].resolve())
    assert served.stable_answers() == served.answers["v1"]


def test_down_endpoint_gives_a_clear_error_and_touches_nothing(stable_v1: Served) -> None:
    served = stable_v1
    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DeployError) as caught:
        served.deploy("v2", "v1", endpoints=[served.url, down])
    err = caught.value
    assert err.step == "preflight" and err.endpoint == down
    assert f"vLLM at {down} is down" in str(err) and "start it with `make serve`" in str(err)
    assert served.stable_answers() == served.answers["v1"]


# -- faults in the middle of a rollout ------------------------------------------------------




def test_timeout_in_the_middle_of_the_stable_swap_restores_the_previous_adapter(stable_v1: Served) -> None:
    """The server swaps, but its reply to the stable load never reaches the deployer in time."""
    served = stable_v1
    with FaultProxy(served.url, on_load_of(SERVED, ("hang", 8))) as proxy:
        with pytest.raises(DeployError) as caught:
            served.deploy("v2", "v1", endpoints=[proxy.url], timeout_s=4)
        loads = [outcome for _, path, name, outcome in proxy.seen if name == SERVED]
    err = caught.value
    assert err.step == "load_stable" and err.endpoint == proxy.url
    assert "did not answer POST /v1/load_lora_adapter within 4 s" in str(err)
    assert "tuneloop rolled back" in str(err)
    assert loads == ["200 held 8 s", "200"]  # the swap happened on the server, then the restore
    assert serves(served.url) == str(served.adapters["v1"].resolve())
    assert served.stable_answers() == served.answers["v1"]


@pytest.fixture(scope="module")
def second(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second real vLLM server (the same base model) that wants an API key: a replica."""
    run_dir = tmp_path_factory.mktemp("vllm-second")
    port = free_port()
    result = serve_sh("start", "--port", str(port), "--model", str(served.base), "--name", SERVED, "--run-dir", str(run_dir), api_key=API_KEY)
    try:
        assert result.returncode == 0, f"serve.sh start (second server) failed:\n{result.stderr}"
        yield f"http://127.0.0.1:{port}"
    finally:
        log = run_dir / "vllm.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        stopped = serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert API_KEY not in text, "the API key shows in the vLLM log"


@pytest.fixture
def both_v1(stable_v1: Served, second: str) -> tuple[Served, str]:
    served = stable_v1
    if serves(second, API_KEY) != str(served.adapters["v1"].resolve()):
        served.deploy("v1", None, endpoints=[second], api_key=API_KEY)
    return served, second


def test_one_of_two_replicas_failing_rolls_back_both(both_v1: tuple[Served, str]) -> None:
    served, second = both_v1
    with FaultProxy(second, on_load_of(SERVED, ("status", 500))) as proxy:
        with pytest.raises(DeployError) as caught:
            served.deploy("v2", "v1", endpoints=[served.url, proxy.url], api_key=API_KEY)
    err = caught.value
    assert err.step == "load_stable" and err.endpoint == proxy.url and "-> 500" in str(err)
    assert f"{served.url}: tuneloop rolled back" in str(err)  # the canary, already on v2, went back
    assert err.report is not None and [ep.status for ep in err.report.endpoints] == ["rolled_back", "rolled_back"]
    v1 = str(served.adapters["v1"].resolve())
    assert serves(served.url) == v1 and serves(second, API_KEY) == v1
    assert served.stable_answers() == served.answers["v1"]
    with VllmClient(second, api_key=API_KEY) as client:
        assert client.chat_many(SERVED, PROMPTS, max_tokens=MAX_TOKENS) == served.answers["v1"]


def test_both_replicas_swap_and_the_key_never_shows(
    both_v1: tuple[Served, str], caplog: pytest.LogCaptureFixture
) -> None:
    served, second = both_v1
    with VllmClient(second) as client:  # the runtime LoRA API is behind the key too
        with pytest.raises(VllmError, match="-> 401.*TUNELOOP__VLLM__API_KEY"):
            client.load_adapter(STAGING, str(served.adapters["v2"].resolve()), inplace=True)
    messages: list[str] = []
    caplog.set_level("DEBUG")
    try:
        report = served.deploy("v2", "v1", endpoints=[served.url, second], api_key=API_KEY, progress=messages.append)
        assert report.ok and [ep.status for ep in report.endpoints] == ["deployed", "deployed"]
        v2 = str(served.adapters["v2"].resolve())
        assert serves(served.url) == v2 and serves(second, API_KEY) == v2
        seen = "\n".join(messages) + caplog.text + report.to_json()
        assert len(messages) > 10 and API_KEY not in seen
    finally:
        served.deploy("v1", "v2", endpoints=[served.url, second], api_key=API_KEY)


def test_registry_write_failing_after_a_rollback_swap_reconciles_the_servers(
    stable_v1: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """production=v2, previous=v1; `rollback` swaps v1 in, then the registry write fails: the
    servers must serve v2 again, which the registry still names. Then the stable name is
    dropped (as after a vLLM restart) and `reconcile` brings production back."""
    import yaml

    from tuneloop.steps.loop import open_loop
    from tuneloop.steps.serve import reconcile_step, rollback_step
    from tuneloop.storage import StorageError

    served = stable_v1
    config = tmp_path / "tuneloop.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"uri": str(tmp_path / "store")},
                "model": {"base_model": str(served.base), "served_model_name": SERVED},
                "vllm": {"endpoints": [served.url], "adapter_dir": str(tmp_path / "served"), "max_lora_rank": 16},
            }
        )
    )
    loop = open_loop(str(config), run_id="fault-test", progress=lambda message: None)
    for version in ("v1", "v2"):
        loop.store.put_dir(f"adapters/{version}", served.adapters[version])
        loop.registry.register(version, adapter_key=f"adapters/{version}", snapshot=None, base_model=str(served.base))
        loop.registry.promote(version, reason="test setup")
    assert reconcile_step(loop)["endpoints"][0]["action"] == "loaded"
    v2_dir = str((tmp_path / "served" / "v2").resolve())
    try:
        assert serves(served.url) == v2_dir and served.stable_answers() == served.answers["v2"]

        def broken_write(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("injected: the registry bucket refused the write (503 SlowDown, retries exhausted)")

        monkeypatch.setattr(loop.registry, "move_aliases", broken_write)
        with pytest.raises(RuntimeError) as caught:
            rollback_step(loop, "previous")
        message = str(caught.value)
        assert "injected: the registry bucket refused the write" in message
        assert "the servers serve the registry's production (v2) again" in message
        monkeypatch.undo()
        assert loop.registry.aliases()["production"] == "v2"
        assert serves(served.url) == v2_dir and served.stable_answers() == served.answers["v2"]

        with VllmClient(served.url) as client:
            client.unload_adapter(SERVED)
        result = reconcile_step(loop)
        assert result["production"] == "v2" and result["endpoints"][0]["action"] == "loaded"
        assert served.stable_answers() == served.answers["v2"]
    finally:  # leave the server on the module's own adapter directories
        with VllmClient(served.url) as client:
            client.load_adapter(SERVED, str(served.adapters["v1"].resolve()), inplace=True)
            client.load_adapter(STAGING, str(served.adapters["v1"].resolve()), inplace=True)
