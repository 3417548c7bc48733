"""The drift monitor's policy: K consecutive drifted checks, a cooldown after a refresh, and a
stored history with its plot. Runs ``steps.monitor.check_drift`` on a small demo world in a local
store (no Airflow, no ML env)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.demo.invoices import generate_world
from tuneloop.steps.intake import pull_step, validate_step
from tuneloop.steps.loop import Loop, open_loop
from tuneloop.steps.monitor import check_drift, drift_history

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.unit

START = date(2026, 1, 5)
DRIFT_START = START + timedelta(days=28)


def monitor(tmp_path: Path, **drift: object) -> Loop:
    """A loop on a local store holding 28 calm days of traffic, then 10 drifted ones."""
    lines = [f"store:\n  uri: {tmp_path / 'store'}\ndrift:"]
    lines += [f"  {key}: {value}" for key, value in {"current_days": 3, **drift}.items()]
    config = tmp_path / "tuneloop.yaml"
    config.write_text("\n".join(lines) + "\n")
    loop = open_loop(str(config), run_id="monitor-test", progress=lambda message: None)
    generate_world(
        loop.store, START, 38, drift_start=DRIFT_START, traffic_per_day=40, labelled_per_day=12
    )
    return loop


def day(offset: int) -> str:
    return (DRIFT_START + timedelta(days=offset)).isoformat()


def test_calm_traffic_is_stored_and_plotted_without_an_event(tmp_path: Path) -> None:
    loop = monitor(tmp_path)
    check = check_drift(loop, as_of=day(-1))
    assert not check["drift"] and not check["emit"]
    assert check["decision"].startswith("no significant drift")
    # reference: the first 28 days up to the current window, never overlapping it
    assert (check["n_reference"], check["n_current"]) == (25 * 40, 3 * 40)
    stored = drift_history(loop.store)
    assert len(stored) == 1 and stored[0]["p_value"] == check["p_value"]
    for key in ("statistic", "p_value", "decision", "n_reference", "n_current", "method"):
        assert key in stored[0]
    assert loop.store.get_bytes("drift/history.png").startswith(b"\x89PNG")


def test_drift_must_persist_for_k_checks_and_a_calm_check_resets_the_streak(tmp_path: Path) -> None:
    loop = monitor(tmp_path, consecutive_checks=2)
    calm = check_drift(loop, as_of=day(-1))
    assert not calm["drift"] and calm["streak"] == 0
    first = check_drift(loop, as_of=day(6))
    assert first["drift"] and not first["emit"] and first["streak"] == 1
    assert "policy needs 2" in first["decision"]
    second = check_drift(loop, as_of=day(7))
    assert second["emit"] and second["streak"] == 2
    assert "refresh requested" in second["decision"]
    rerun = check_drift(loop, as_of=day(7))  # a re-run of the same day does not lengthen it
    assert rerun["streak"] == 2
    # a calm check in between (stored by hand: the world's drift only grows) breaks the streak
    loop.store.put_json(f"drift/checks/{day(8)}__calm.json", {**calm, "as_of": day(8)})
    after_calm = check_drift(loop, as_of=day(9))
    assert after_calm["drift"] and after_calm["streak"] == 1 and not after_calm["emit"]
    stored = drift_history(loop.store)
    # one record per (day, run id): the re-run under the same run id replaced its first record
    assert [c["as_of"] for c in stored] == [day(-1), day(6), day(7), day(8), day(9)]


def test_no_event_within_the_cooldown_after_a_refresh_even_a_rejected_one(tmp_path: Path) -> None:
    loop = monitor(tmp_path, cooldown_days=14)
    # a refresh trained v1 on data up to drift day 5 (registered, never promoted)
    snapshot = validate_step(loop, pull_step(loop, until=day(5)))["snapshot"]
    loop.registry.register("v1", adapter_key="adapters/v1", snapshot=snapshot, base_model="demo")
    cooled = check_drift(loop, as_of=day(9))
    assert cooled["drift"] and not cooled["emit"]
    assert cooled["last_refresh"] == "v1" and cooled["trained_until"] == day(5)
    assert "cooldown" in cooled["decision"] and "v1" in cooled["decision"]


def test_the_cooldown_ends_and_production_s_training_data_is_the_reference(tmp_path: Path) -> None:
    loop = monitor(tmp_path, cooldown_days=2)
    snapshot = validate_step(loop, pull_step(loop, until=day(-1)))["snapshot"]
    loop.registry.register("v1", adapter_key="adapters/v1", snapshot=snapshot, base_model="demo")
    loop.registry.promote("v1", reason="test")
    check = check_drift(loop, as_of=day(9))
    assert check["production"] == "v1" and check["reference"].startswith(
        "training data of production v1"
    )
    assert check["drift"] and check["emit"], check["decision"]


def promoted_with_scores(loop: Loop, until: str, score: float) -> str:
    """v1 promoted on data up to ``until``, with its candidate scores on the snapshot's eval split."""
    snapshot = validate_step(loop, pull_step(loop, until=until))["snapshot"]
    loop.registry.register("v1", adapter_key="adapters/v1", snapshot=snapshot, base_model="demo")
    loop.registry.promote("v1", reason="test")
    rows = [
        {"id": r["id"], "slice": r["domain"], "score": score}
        for r in loop.store.iter_jsonl(f"snapshots/{snapshot}/eval.jsonl")
    ]
    loop.store.put_bytes(
        "evals/v1/run/candidate/scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    return snapshot


def fake_evaluate(
    loop: Loop, calls: list[list[str]], score_of: dict[str, float]
) -> Callable[[Loop, list[str]], dict[str, Any]]:
    """Stands in for the ML env's `tuneloop evaluate`: scores each fresh row by its domain."""

    def run(_: Loop, args: list[str]) -> dict[str, Any]:
        calls.append(args)
        source, upload = args[args.index("--eval") + 1], args[args.index("--upload") + 1]
        rows = [
            {"id": r["id"], "slice": r["domain"], "score": score_of[r["domain"]]}
            for r in loop.store.iter_jsonl(source)
        ]
        loop.store.put_bytes(
            f"{upload}/scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
        )
        return {}

    return run


def test_a_fall_in_production_s_score_on_fresh_labels_requests_a_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = monitor(tmp_path, cooldown_days=2, min_auc=0.99)  # the data drift alone is not acted on
    promoted_with_scores(loop, until=day(-1), score=0.8)
    calls: list[list[str]] = []
    monkeypatch.setattr(
        "tuneloop.steps.loop.Loop.run_ml", fake_evaluate(loop, calls, {"original": 0.8, "drifted": 0.1})
    )
    check = check_drift(loop, as_of=day(9))
    performance = check["performance"]
    assert calls and calls[0][:3] == ["evaluate", "--adapter", "v1"]
    assert (
        performance["checked"]
        and performance["drift"]
        and performance["fresh_days"] == [day(0), day(9)]
    )
    assert performance["n_current"] == 10 * 12 and performance["baseline_mean"] == pytest.approx(0.8)
    assert performance["slices"]["drifted"]["mean"] == pytest.approx(0.1)
    assert not check["drift"] and check["emit"] and "score fell" in check["decision"]


def test_an_unchanged_score_is_not_performance_drift_and_too_few_rows_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = monitor(tmp_path, cooldown_days=2, min_auc=0.99, performance_min_rows=50)
    promoted_with_scores(loop, until=day(-1), score=0.8)
    calls: list[list[str]] = []
    monkeypatch.setattr(
        "tuneloop.steps.loop.Loop.run_ml", fake_evaluate(loop, calls, {"original": 0.8, "drifted": 0.8})
    )
    check = check_drift(loop, as_of=day(9))
    assert (
        check["performance"]["checked"] and not check["performance"]["drift"] and not check["emit"]
    )
    early = check_drift(loop, as_of=day(1))  # two days of 12 labelled rows: too few to judge
    assert (
        not early["performance"]["checked"]
        and "performance_min_rows" in early["performance"]["reason"]
    )
    assert len(calls) == 1
