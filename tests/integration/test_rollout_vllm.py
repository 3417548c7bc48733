"""Versioned rollouts behind the REAL nginx gateway on the REAL vLLM CPU server.

A tiny random Llama with two LoRA adapters that answer differently (A, B); every rollout
loads a new version name (``tuneloop-v<N>``) from one of them. Clients call the stable name
through the gateway the whole time; every answer must be the reference answer of the version
the response names, and no request may fail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fixtures_vllm import (
    MAX_TOKENS,
    PROMPTS,
    SERVED,
    GatewayLoad,
    build_lora_adapter,
    build_tiny_llama,
    free_port,
    golden_of,
    serve_sh,
    staged_answers,
)
from processes import needs_nginx

from tuneloop.serving.gateway import (
    NginxGateway,
    version_name,
)
from tuneloop.serving.rollout import RolloutError, RolloutPolicy, rollout_version, versions_on
from tuneloop.serving.vllm_client import VllmClient

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.ml,
    pytest.mark.integration,
    needs_nginx(),
]


@dataclass
class Stack:
    url: str
    base: Path
    adapters: dict[str, Path]
    answers: dict[str, list[str]]
    gateway: NginxGateway
    made: dict[str, str] = field(default_factory=dict)  # version name -> adapter (A/B)
    counter: list[int] = field(default_factory=lambda: [0])

    def rollout(self, adapter: str, policy: RolloutPolicy, **kwargs: Any) -> Any:
        self.counter[0] += 1
        version = f"v{self.counter[0]}"
        self.made[version_name(SERVED, version)] = adapter
        options: dict[str, Any] = {
            "routes": self.gateway.routes,
            "access_log": self.gateway.access_log,
            "served_name": SERVED,
            "version": version,
            "golden": golden_of(self.answers[adapter]),
            "policy": policy,
            "max_lora_rank": 16,
            "max_loras": 2,
            "max_cpu_loras": 4,
            "base_model": self.base,
            "verify_min_agreement": 1.0,
            "max_tokens": MAX_TOKENS,
        }
        options.update(kwargs)
        return rollout_version([self.url], self.adapters[adapter], **options)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("rollout")
    base = build_tiny_llama(root / "base")
    adapters = {"A": build_lora_adapter(base, root / "A", seed=1), "B": build_lora_adapter(base, root / "B", seed=2)}
    run_dir = root / "run"
    port = free_port()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    gateway = NginxGateway(root / "gateway", port=free_port())
    try:
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr}"
        url = f"http://127.0.0.1:{port}"
        answers = staged_answers(url, adapters)
        with VllmClient(url) as client:
            client.unload_adapter(f"{SERVED}-staging")  # a slot the rollouts may use
        gateway.start()
        gateway.routes.set_upstreams([url])
        yield Stack(url, base, adapters, answers, gateway)
    finally:
        gateway.stop()
        serve_sh("stop", "--run-dir", str(run_dir), timeout=60)


def under_load(stack: Stack, work: Any) -> tuple[Any, GatewayLoad]:
    def reference(served: str, p: int) -> str | None:
        adapter = stack.made.get(served)
        return stack.answers[adapter][p] if adapter else None

    with GatewayLoad(stack.gateway.url, reference) as load:
        outcome = work()
    return outcome, load


def test_switch_rollouts_under_load_answer_every_request_from_exactly_one_version(stack: Stack) -> None:
    stack.rollout("A", RolloutPolicy(strategy="switch", bake_s=0, grace_s=0))  # v1: the first version, no previous

    def four() -> list[Any]:
        return [stack.rollout(a, RolloutPolicy(strategy="switch", bake_s=0, grace_s=0.3)) for a in ("B", "A", "B", "A")]

    reports, load = under_load(stack, four)
    assert load.failures == []
    assert load.wrong == []  # every answer is its version's reference answer: no hybrid
    assert len(load.answers) >= 2 and sum(load.answers.values()) > 20
    last = reports[-1]
    assert last.ok and last.version_name == f"{SERVED}-v5" and last.last_known_good == f"{SERVED}-v4"
    alias = stack.gateway.routes.alias(SERVED)
    assert alias.routes == {f"{SERVED}-v5": 100.0} and alias.last_known_good == f"{SERVED}-v4"
    with VllmClient(stack.url) as client:
        assert sorted(versions_on(client, SERVED)) == [f"{SERVED}-v4", f"{SERVED}-v5"]  # older ones retired
    assert last.retired == {stack.url: [f"{SERVED}-v3"]}


def test_a_canary_whose_live_answers_break_the_check_is_rolled_back_with_no_failed_request(stack: Stack) -> None:
    before = stack.gateway.routes.alias(SERVED)
    serving = before.serving()[0]
    good_adapter = stack.made[serving]
    bad_adapter = "B" if good_adapter == "A" else "A"
    labels = set(stack.answers[good_adapter])  # the task's "label set": what the good version says

    policy = RolloutPolicy(strategy="canary", steps=(30, 100), bake_s=6, poll_s=0.5, grace_s=0, min_requests=5, capture_share=1.0)

    def canary() -> RolloutError:
        with pytest.raises(RolloutError) as caught:
            # its golden answers are its own, so it passes verification; the evaluation found
            # every answer valid (offline_validity 1.0), but live, every answer fails the check
            stack.rollout(bad_adapter, policy, validity=lambda answer: answer in labels, offline_validity=1.0)
        return caught.value

    error, load = under_load(stack, canary)
    assert error.step == "bake"
    assert "validity of live answers 0.00" in str(error) and f"returned to ['{serving}']" in str(error)
    report = error.rollout
    assert report.rolled_back and report.offline_validity == 1.0
    assert report.bakes[0].weight == 30.0 and report.bakes[0].verdict == "breach"
    assert stack.gateway.routes.alias(SERVED).routes == {serving: 100.0}
    assert stack.gateway.routes.alias(SERVED).capture == {}
    assert load.failures == [] and load.wrong == []
    assert load.answers[report.version_name] > 0  # the canary did take traffic before the breach
    after = Counter(httpx.post(stack.gateway.url + "/v1/chat/completions", json={"model": SERVED, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": MAX_TOKENS}, timeout=60).json()["model"] for _ in range(10))
    assert after == Counter({serving: 10})


def test_a_version_name_is_never_reloaded_with_other_weights_and_the_slot_budget_holds(stack: Stack) -> None:
    serving = stack.gateway.routes.alias(SERVED).serving()[0]
    other = "B" if stack.made[serving] == "A" else "A"
    number = int(serving.rsplit("-v", 1)[1])
    with pytest.raises(RolloutError, match="version names are immutable"):
        rollout_version(
            [stack.url], stack.adapters[other], routes=stack.gateway.routes, access_log=None, served_name=SERVED,
            version=f"v{number}", golden=golden_of(stack.answers[other]), policy=RolloutPolicy(strategy="switch"),
            max_lora_rank=16, max_loras=2, base_model=stack.base, max_tokens=MAX_TOKENS,
        )
    with pytest.raises(RolloutError, match="more than --max-loras 1"):
        stack.rollout(other, RolloutPolicy(strategy="canary", bake_s=0), max_loras=1)
    assert stack.gateway.routes.alias(SERVED).routes == {serving: 100.0}


def test_shadow_replay_compares_with_production_before_any_traffic_and_can_stop_the_rollout(stack: Stack) -> None:
    serving = stack.gateway.routes.alias(SERVED).serving()[0]
    other = "B" if stack.made[serving] == "A" else "A"
    theirs, ours = stack.answers[stack.made[serving]], stack.answers[other]
    offset = stack.gateway.access_log.stat().st_size
    with pytest.raises(RolloutError) as caught:
        stack.rollout(other, RolloutPolicy(strategy="switch", bake_s=0), shadow_prompts=PROMPTS, min_shadow_agreement=0.99)
    shadow = caught.value.rollout.shadow
    assert caught.value.step == "shadow" and "below serving.min_shadow_agreement 0.99" in str(caught.value)
    assert shadow["production"] == serving and shadow["n"] == len(PROMPTS)
    assert shadow["identical"] == sum(a == b for a, b in zip(theirs, ours, strict=True)) < len(PROMPTS)
    assert stack.gateway.routes.alias(SERVED).routes == {serving: 100.0}  # no traffic moved
    with open(stack.gateway.access_log, "rb") as fh:  # the replay went to the servers, not through the gateway
        fh.seek(offset)
        assert fh.read() == b""


def test_a_canary_whose_live_answers_disagree_with_production_on_the_same_requests_is_rolled_back(stack: Stack) -> None:
    serving = stack.gateway.routes.alias(SERVED).serving()[0]
    other = "B" if stack.made[serving] == "A" else "A"
    theirs, ours = stack.answers[stack.made[serving]], stack.answers[other]
    graded: list[tuple[str, str, Any]] = []

    def grader(answer: str, reference: str, prompt: Any) -> float:  # the judge's place: same answer or not
        graded.append((answer, reference, prompt))
        return float(answer == reference)

    policy = RolloutPolicy(
        strategy="canary", steps=(30, 100), bake_s=6, poll_s=0.5, grace_s=0, min_requests=5, capture_share=1.0,
        live_sample=6, min_live_agreement=0.99,
    )

    def canary() -> RolloutError:
        with pytest.raises(RolloutError) as caught:
            stack.rollout(other, policy, grader=grader)  # valid, verified: only its answers differ
        return caught.value

    error, load = under_load(stack, canary)
    assert error.step == "bake" and "live answers agree" in str(error) and "below 0.99" in str(error)
    bake = error.rollout.bakes[0]
    assert bake.weight == 30.0 and bake.candidate.graded == len(graded) == 6
    # every grade: the canary's live answer against production's answer to the same prompt, asked again
    for answer, reference, prompt in graded:
        p = PROMPTS.index(prompt[-1]["content"])
        assert (answer, reference) == (ours[p], theirs[p])
    assert bake.candidate.agreement == sum(a == b for a, b, _ in graded) / 6 < 0.99
    assert stack.gateway.routes.alias(SERVED).routes == {serving: 100.0}
    assert load.failures == [] and load.wrong == []
