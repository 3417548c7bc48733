"""The serving steps in gateway mode (serving.rollout: switch|canary) around a rollout that the
bake rolled back: the reason lands in the registry's history, the report in the store, and the
rollback notification says what happened. The rollout itself runs against real servers in
tests/integration/test_rollout_vllm.py; here it is replaced by one that fails as a breach does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tuneloop import layout
from tuneloop.notify import deploy_rollback_message
from tuneloop.serving.rollout import BakeRecord, RolloutError, RolloutReport, VersionStats
from tuneloop.steps.loop import open_loop
from tuneloop.steps.serve import deploy_step, shadow_prompts

pytestmark = pytest.mark.unit


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TUNELOOP__STORE__URI", str(tmp_path / "store"))
    monkeypatch.setenv("TUNELOOP__VLLM__ADAPTER_DIR", str(tmp_path / "served"))
    monkeypatch.setenv("TUNELOOP__SERVING__ROLLOUT", "canary")
    monkeypatch.setenv("TUNELOOP__SERVING__ROUTES_FILE", str(tmp_path / "gw" / "routes.json"))
    return open_loop(None, run_id="manual__canary", progress=lambda _m: None)


def test_a_breach_is_recorded_in_the_registry_the_store_and_the_message(loop: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loop.registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    loop.registry.move_aliases({"candidate": "v1"}, reason="trained", run_id="train-run")
    seen: dict[str, Any] = {}

    def breached(endpoints: list[str], adapter_dir: Any, **kwargs: Any) -> RolloutReport:
        seen.update(kwargs)
        report = RolloutReport(
            strategy="canary", version="v1", version_name="tuneloop-v1", alias="tuneloop", adapter_path=str(adapter_dir),
            previous_routes={"tuneloop-v0": 100.0}, started_at="2026-12-07T00:00:00+00:00", rolled_back=True, failed_step="bake",
        )
        report.bakes.append(BakeRecord(weight=10.0, seconds=4.0, candidate=VersionStats(requests=40, sampled=10, valid=2), previous=VersionStats(requests=300), verdict="breach", reason="validity 0.20 below 0.90"))
        report.error = "rollout of tuneloop-v1 failed at step bake: at 10% of traffic: validity 0.20 below 0.90; traffic returned to ['tuneloop-v0']"
        raise RolloutError(report.error, step="bake", report=report)

    monkeypatch.setattr("tuneloop.serving.rollout.rollout_version", breached)
    monkeypatch.setattr("tuneloop.steps.serve.materialize_adapter", lambda _loop, version: tmp_path / "served" / version)
    monkeypatch.setattr("tuneloop.steps.serve.server_path", lambda _loop, _version: None)
    with pytest.raises(RolloutError) as caught:
        deploy_step(loop, "v1", scores_key=None)
    assert seen["policy"].strategy == "canary" and seen["policy"].weights() == (10.0, 50.0, 100.0)
    assert callable(seen["validity"])  # the task's reference-free check is what the bake applies

    last = loop.registry.history()[-1]
    assert loop.registry.aliases()["candidate"] is None
    assert last["reason"].startswith("rollout of v1 rolled back: ") and "validity 0.20 below 0.90" in last["reason"]
    stored = loop.store.get_json(layout.rollout_report("v1"))  # beside the gate's report of v1
    assert stored["rolled_back"] and stored["bakes"][0]["verdict"] == "breach" and stored["run_id"] == "manual__canary"
    text = loop.store.get_text(layout.rollout_report("v1", "md"))
    assert text.startswith("# Rollout of v1 (tuneloop-v1): rolled back")
    assert "| 10 % | 4.0 | 40 | 0 | None / None | 2/10 | - | breach: validity 0.20 below 0.90 |" in text

    message = deploy_rollback_message(caught.value.rollout.to_dict(), version="v1")
    assert message is not None and message.title == "Rollout of v1 rolled back: traffic returned to tuneloop-v0"
    assert any("2 of 10 sampled answers valid" in fact for fact in message.facts)


def test_a_rollback_in_gateway_mode_is_one_flip_without_bake_or_shadow(loop: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def flipped(endpoints: list[str], adapter_dir: Any, **kwargs: Any) -> RolloutReport:
        seen.update(kwargs)
        return RolloutReport(strategy="switch", version="v1", version_name="tuneloop-v1", alias="tuneloop", adapter_path="x", previous_routes={}, started_at="now", ok=True)

    loop.registry.register("v1", adapter_key="adapters/v1", snapshot=None, base_model="demo")
    loop.store.put_jsonl("traffic/dt=2026-12-01/part-0.jsonl", [{"prompt": "hello"}])
    monkeypatch.setattr("tuneloop.serving.rollout.rollout_version", flipped)
    monkeypatch.setattr("tuneloop.steps.serve.materialize_adapter", lambda _loop, version: tmp_path / "served" / version)
    monkeypatch.setattr("tuneloop.steps.serve.server_path", lambda _loop, _version: None)
    deploy_step(loop, "v1", urgent=True)
    assert seen["policy"].strategy == "switch" and seen["policy"].bake_s == 0.0 and seen["shadow_prompts"] == []
    deploy_step(loop, "v1")
    assert seen["policy"].strategy == "canary" and len(seen["shadow_prompts"]) == 1


def test_shadow_prompts_are_the_newest_distinct_traffic_rows_and_skip_broken_ones(loop: Any) -> None:
    loop.store.put_jsonl("traffic/dt=2026-11-30/part-0.jsonl", [{"prompt": "oldest"}, {"prompt": "old"}])
    loop.store.put_jsonl("traffic/dt=2026-12-01/part-0.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "b"}, {"not": "a prompt"}])
    texts = [turns[-1]["content"] for turns in shadow_prompts(loop, 3)]
    assert texts == ["b", "a", "old"]
    assert shadow_prompts(loop, 0) == []
    assert len(shadow_prompts(loop, 50)) == 4


def test_the_judge_grades_shadow_and_live_answers_with_the_conversation_for_judge_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.steps.serve import grader, live_sample
    from tuneloop.tasks.scoring import Scored

    monkeypatch.setenv("TUNELOOP__STORE__URI", str(tmp_path / "store"))
    plain = open_loop(None, run_id="manual__plain", progress=lambda _m: None)
    assert live_sample(plain) == 0  # validity only, unless asked for
    assert grader(plain)("billing", " Billing ", [{"role": "user", "content": "q"}]) == plain.spec.scorer.agreement("billing", " Billing ")

    monkeypatch.setenv("TUNELOOP__TASK__METRIC", "judge")
    monkeypatch.setenv("TUNELOOP__TASK__JUDGE__ENDPOINT", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("TUNELOOP__TASK__JUDGE__MODEL", "big-judge")
    judged = open_loop(None, run_id="manual__judged", progress=lambda _m: None)
    assert live_sample(judged) == 8
    seen: list[Any] = []

    def score(_self: Any, prediction: str, gold: str, example: Any = None) -> Scored:
        seen.append((prediction, gold, example))
        return Scored(0.25, {})

    monkeypatch.setattr(type(judged.spec.scorer), "score", score)  # the judge's HTTP side: tests/unit/test_judge.py
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise: the parcel is late."}]
    assert grader(judged)("Late parcel.", "The parcel is late.", conversation) == 0.25
    (prediction, gold, example), = seen
    assert (prediction, gold) == ("Late parcel.", "The parcel is late.")
    assert example.context == conversation and example.target == "The parcel is late."
    monkeypatch.setenv("TUNELOOP__SERVING__LIVE_SAMPLE", "0")
    assert live_sample(open_loop(None, run_id="manual__off", progress=lambda _m: None)) == 0
