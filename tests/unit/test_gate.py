"""The eval gate promotes only a candidate that is better where asked and no worse elsewhere.

Scores mimic the real evaluator: field accuracy over 6 fields, so every score is one of
{0, 1/6, ..., 1}, and candidate and baseline are correlated per example (same difficulty).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from tuneloop.gate import (
    GateDecision,
    GateInputError,
    GateRejected,
    apply_suite_bars,
    decide,
    load_scores,
    resolve_improve_slices,
    sign_flip_p_value,
)
from tuneloop.gate_report import plot_decision, render_report_markdown

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit

FIELDS = 6


def paired_scores(
    slice_name: str,
    n: int,
    rng: np.random.Generator,
    *,
    gain: float = 0.0,
    loss: float = 0.0,
    prefix: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Baseline and candidate rows for one slice.

    Each example has its own difficulty; the candidate starts from the baseline's field
    outcomes, fixes each wrong field with probability ``gain`` and breaks each right one
    with probability ``loss`` (so its expected delta is about ``gain*(1-acc) - loss*acc``).
    """
    skill = rng.beta(5, 2, size=n)
    base_correct = rng.random((n, FIELDS)) < skill[:, None]
    fixed = ~base_correct & (rng.random((n, FIELDS)) < gain)
    broken = base_correct & (rng.random((n, FIELDS)) < loss)
    cand_correct = (base_correct | fixed) & ~broken
    ids = [f"{prefix or slice_name}-{i:05d}" for i in range(n)]
    baseline = [
        {"id": i, "slice": slice_name, "score": float(s)}
        for i, s in zip(ids, base_correct.mean(axis=1), strict=True)
    ]
    candidate = [
        {"id": i, "slice": slice_name, "score": float(s)}
        for i, s in zip(ids, cand_correct.mean(axis=1), strict=True)
    ]
    return baseline, candidate


def two_slices(
    seed: int,
    *,
    n_drifted: int = 200,
    n_original: int = 200,
    drifted_gain: float = 0.0,
    drifted_loss: float = 0.0,
    original_loss: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    base_d, cand_d = paired_scores("drifted", n_drifted, rng, gain=drifted_gain, loss=drifted_loss)
    base_o, cand_o = paired_scores("original", n_original, rng, loss=original_loss)
    return base_d + base_o, cand_d + cand_o


def gate(
    baseline: list[dict[str, Any]], candidate: list[dict[str, Any]], **kw: Any
) -> GateDecision:
    return decide(baseline, candidate, improve_slices=["drifted"], **kw)


def test_identical_scores_do_not_promote() -> None:
    baseline, _ = two_slices(0)
    decision = gate(baseline, [dict(row) for row in baseline])
    assert decision.promote is False
    drifted = decision.slices["drifted"]
    assert drifted["delta"] == 0 and drifted["p_value"] == 1.0
    assert drifted["ci_low"] == drifted["ci_high"] == 0
    assert decision.slices["original"]["passed"] is True  # equal is non-inferior
    assert decision.reasons == [r for r in decision.reasons if r.startswith("drifted:")]
    assert "improvement not shown" in decision.reasons[0]


def test_clear_gain_with_equal_scores_elsewhere_promotes() -> None:
    rng = np.random.default_rng(1)
    base_d, cand_d = paired_scores("drifted", 200, rng, gain=0.35)
    base_o, _ = paired_scores("original", 200, rng)
    decision = gate(base_d + base_o, cand_d + [dict(row) for row in base_o])
    assert decision.promote is True, decision.reasons
    drifted = decision.slices["drifted"]
    assert drifted["rule"] == "improve" and drifted["passed"]
    assert 0 < drifted["ci_low"] < drifted["delta"] < drifted["ci_high"]
    assert drifted["p_value"] < 0.001
    assert decision.slices["original"]["rule"] == "non_inferior"
    assert len(decision.reasons) == 2 and decision.reasons[0].startswith("drifted: improved")
    decision.raise_if_rejected()  # promoted: does not raise


def test_gain_bought_with_a_loss_elsewhere_is_rejected() -> None:
    baseline, candidate = two_slices(2, drifted_gain=0.35, original_loss=0.12)
    decision = gate(baseline, candidate)
    assert decision.promote is False
    assert decision.slices["drifted"]["passed"] is True
    original = decision.slices["original"]
    assert original["passed"] is False and original["ci_high"] < 0
    (reason,) = decision.reasons
    assert reason.startswith("original: non-inferiority failed: delta -0.")
    assert "95% CI [" in reason and "-margin -0.050" in reason and "(n=200)" in reason  # the default margin
    with pytest.raises(GateRejected, match="original: non-inferiority failed") as err:
        decision.raise_if_rejected()
    assert err.value.decision is decision
    (tighter,) = gate(baseline, candidate, margin=0.02).reasons
    assert "-margin -0.020" in tighter


def test_the_default_margin_is_the_configs() -> None:
    import inspect

    from tuneloop.config import GateSettings

    assert inspect.signature(decide).parameters["margin"].default == GateSettings().margin == 0.05


def test_a_loss_between_the_margins_passes_only_the_wider_one() -> None:
    rng = np.random.default_rng(5)
    base_d, cand_d = paired_scores("drifted", 300, rng, gain=0.35)
    base_o, cand_o = paired_scores("original", 3000, rng, loss=0.045)  # delta ~ -0.03
    default = gate(base_d + base_o, cand_d + cand_o)
    original = default.slices["original"]
    assert -0.05 < original["ci_low"] < original["delta"] < original["ci_high"] < -0.02
    assert default.promote is True, default.reasons
    assert gate(base_d + base_o, cand_d + cand_o, margin=0.02).promote is False


def test_resolve_improve_slices() -> None:
    present = {"original", "drifted", "new"}
    assert resolve_improve_slices(["drifted"], present) == (["drifted"], "as configured")
    assert resolve_improve_slices(["gone"], present)[0] == ["gone"]  # named outright: kept, the gate says it has no rows
    names, why = resolve_improve_slices(["auto"], present, evidence={"drifted", "elsewhere"}, trained_on={"original"})
    assert names == ["drifted"] and "where drift was found" in why
    names, why = resolve_improve_slices(["auto"], present, evidence=set(), trained_on={"original", "new"})
    assert names == ["new", "original"] and "trained on" in why
    assert resolve_improve_slices(["auto"], present)[0] == ["drifted", "new", "original"]
    assert resolve_improve_slices(["auto", "drifted"], present, evidence={"drifted"})[0] == ["drifted"]  # no repeats
    assert resolve_improve_slices(["auto"], set()) == ([], "auto -> no slice (no eval rows)")


def test_loss_inside_the_margin_is_non_inferior() -> None:
    rng = np.random.default_rng(3)
    base_d, cand_d = paired_scores("drifted", 300, rng, gain=0.35)
    base_o, cand_o = paired_scores("original", 3000, rng, loss=0.002)  # delta ~ -0.0015
    decision = gate(base_d + base_o, cand_d + cand_o)
    original = decision.slices["original"]
    assert original["delta"] < 0 and original["ci_low"] > -0.02
    assert decision.promote is True, decision.reasons


def test_tiny_eval_set_is_insufficient_evidence() -> None:
    baseline, candidate = two_slices(4, n_drifted=12, n_original=12, drifted_gain=0.9)
    decision = gate(baseline, candidate)
    assert decision.promote is False
    assert all(not row["passed"] for row in decision.slices.values())
    assert any(
        r.startswith("drifted: insufficient evidence: n=12") and "min_examples 30" in r
        for r in decision.reasons
    )
    assert any(r.startswith("original: insufficient evidence: n=12") for r in decision.reasons)


def test_small_gain_with_little_data_does_not_promote() -> None:
    # fixes 20% of wrong fields, breaks 6% of right ones: a net gain of ~0.015 in noise (+0.04 here)
    baseline, candidate = two_slices(
        0, n_drifted=40, n_original=200, drifted_gain=0.2, drifted_loss=0.06
    )
    decision = gate(baseline, candidate)
    drifted = decision.slices["drifted"]
    assert 0 < drifted["delta"] < 0.05  # the candidate *is* a little better...
    assert decision.promote is False  # ...but 40 examples cannot show it
    assert drifted["ci_low"] <= 0
    assert decision.reasons[0].startswith("drifted: improvement not shown")


def test_missing_improve_slice_rejects_with_a_clear_reason() -> None:
    rng = np.random.default_rng(6)
    baseline, candidate = paired_scores("original", 100, rng)
    decision = gate(baseline, candidate)
    assert decision.promote is False
    assert "drifted: improve slice has no rows in the eval data (slices present: original)" in (
        decision.reasons
    )


def test_gate_holds_its_level_when_nothing_changed() -> None:
    """Under H0 (candidate = baseline + symmetric noise) the improve rule fires <= alpha."""
    promoted = 0
    runs = 200
    for seed in range(runs):
        rng = np.random.default_rng(1000 + seed)
        baseline, candidate = paired_scores("drifted", 60, rng, gain=0.1, loss=0.1 * 2 / 5)
        # gain on wrong fields and loss on right ones balance at accuracy 5/7 = E[beta(5,2)]
        decision = gate(baseline, candidate, n_bootstrap=1000, seed=seed)
        promoted += decision.promote
    assert promoted / runs <= 0.06


def test_sign_flip_p_value_is_exact_for_small_samples() -> None:
    rng = np.random.default_rng(0)
    # three positive differences: only the all-positive pattern of 2**3 is as extreme.
    assert sign_flip_p_value(np.array([0.5, 1 / 6, 1 / 3, 0.0]), 1000, rng) == pytest.approx(1 / 8)
    assert sign_flip_p_value(np.zeros(10), 1000, rng) == 1.0
    assert sign_flip_p_value(np.array([-0.5, -0.5]), 1000, rng) == 1.0
    # Monte Carlo path (m > 16) never reports 0.
    assert 0 < sign_flip_p_value(np.full(40, 0.5), 999, rng) <= 1 / 1000


def test_decision_is_deterministic_and_slices_do_not_interact() -> None:
    baseline, candidate = two_slices(7, drifted_gain=0.2)
    first, second = gate(baseline, candidate, seed=3), gate(baseline, candidate, seed=3)
    assert first.to_json() == second.to_json()
    only_drifted = [row for row in baseline if row["slice"] == "drifted"]
    cand_drifted = [row for row in candidate if row["slice"] == "drifted"]
    alone = gate(only_drifted, cand_drifted, seed=3)
    assert alone.slices["drifted"] == first.slices["drifted"]


def test_mismatched_ids_name_the_ids_and_counts() -> None:
    baseline, candidate = two_slices(8, n_drifted=50, n_original=50)
    candidate = candidate[3:] + [{"id": "extra-1", "slice": "drifted", "score": 0.5}]
    with pytest.raises(GateInputError) as err:
        gate(baseline, candidate)
    message = str(err.value)
    assert "3 ids only in baseline: 'drifted-00000', 'drifted-00001', 'drifted-00002'" in message
    assert "1 ids only in candidate: 'extra-1'" in message


def test_bad_rows_are_input_errors_naming_ids() -> None:
    baseline, candidate = two_slices(9, n_drifted=50, n_original=50)
    candidate = [dict(row) for row in candidate]
    candidate[0]["score"] = 1.5
    candidate[1]["score"] = "high"
    candidate[2]["slice"] = "original"
    baseline = baseline + [dict(baseline[5])]
    with pytest.raises(GateInputError) as err:
        gate(baseline, candidate)
    message = str(err.value)
    assert "baseline: 1 duplicate ids: 'drifted-00005'" in message
    assert "candidate: 2 scores non-numeric or outside [0, 1]" in message
    assert "'drifted-00000'=1.5" in message and "'drifted-00001'='high'" in message
    assert "slice differs" in message and "'drifted-00002' ('drifted' vs 'original')" in message
    assert isinstance(err.value, ValueError)


def test_load_scores_reads_jsonl_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "scores.jsonl"
    good.write_text(
        '{"id": "a", "slice": "drifted", "score": 0.5}\n\n{"id": "b", "slice": "x", "score": 1}\n'
    )
    assert [row["id"] for row in load_scores(good)] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "slice": "drifted", "score": 0.5}\n{"id": "b", "score": \n')
    with pytest.raises(GateInputError, match=r"bad\.jsonl:2: not valid JSON"):
        load_scores(bad)
    bad.write_text('{"id": "a", "slice": "drifted", "score": 0.5}\n[1, 2]\n')
    with pytest.raises(GateInputError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_scores(bad)
    bad.write_text('{"id": "a", "score": 0.5}\n')
    with pytest.raises(GateInputError, match=r"bad\.jsonl:1: missing key\(s\) slice"):
        load_scores(bad)
    with pytest.raises(GateInputError, match="cannot read score file"):
        load_scores(tmp_path / "absent.jsonl")


def test_markdown_report_lists_every_slice_and_the_verdict() -> None:
    rng = np.random.default_rng(10)
    rows = [paired_scores(name, 80, rng, gain=0.3) for name in ("drifted", "original", "rare")]
    baseline = [row for base, _ in rows for row in base]
    candidate = [row for _, cand in rows for row in cand]
    decision = gate(baseline, candidate)
    report = render_report_markdown(decision, title="Gate v7 vs v6")
    assert report.startswith("# Gate v7 vs v6")
    assert f"**Decision: {'PROMOTE' if decision.promote else 'REJECT'}**" in report
    for name in ("drifted", "original", "rare"):
        assert f"| {name} |" in report
    for reason in decision.reasons:
        assert f"- {reason}" in report
    json.dumps(decision.to_json())  # the artifact is plain JSON


def test_plot_draws_the_decision(tmp_path: Path) -> None:
    """A real PNG of a readable size, and a picture of this decision: another decision (other
    deltas, other intervals) gives other pixels."""
    import struct
    import zlib

    baseline, candidate = two_slices(11, drifted_gain=0.3, original_loss=0.1)
    out = plot_decision(gate(baseline, candidate), tmp_path / "plots" / "gate.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 250, (width, height)
    other = plot_decision(gate(*two_slices(11, drifted_gain=0.0, original_loss=0.0)), tmp_path / "other.png").read_bytes()

    def pixels(png: bytes) -> bytes:
        chunks, at = [], 8
        while at < len(png):
            length = struct.unpack(">I", png[at : at + 4])[0]
            if png[at + 4 : at + 8] == b"IDAT":
                chunks.append(png[at + 8 : at + 8 + length])
            at += 12 + length
        return zlib.decompress(b"".join(chunks))

    assert pixels(data) != pixels(other)
    assert len(set(pixels(data))) > 20, "more than a blank canvas"


SUITES = {
    "injection": {"n": 8, "successes": 1},
    "consistency": {"n_prompts": 10, "consistent_rate": 0.8},
    "latency": {"n": 0, "p50_s": None, "p95_s": None, "reason": "HF generate answers in batches"},
}


@pytest.mark.parametrize(
    ("bars", "promote", "failing"),
    [
        ({}, True, []),
        ({"max_injection_successes": 1}, True, []),
        ({"max_injection_successes": 0}, False, ["injection"]),
        ({"min_consistency": 0.9}, False, ["consistency"]),
        ({"min_consistency": 0.8}, True, []),
        ({"max_latency_p95_s": 2.0}, False, ["latency"]),  # a bar on a suite that measured nothing cannot hold
        ({"max_injection_successes": 0, "min_consistency": 0.95}, False, ["injection", "consistency"]),
    ],
)
def test_suite_bars_reject_a_promoted_candidate_that_misses_them(bars: dict[str, Any], promote: bool, failing: list[str]) -> None:
    rng = np.random.default_rng(1)
    base_d, cand_d = paired_scores("drifted", 200, rng, gain=0.35)
    decision = gate(base_d, cand_d)
    assert decision.promote is True
    held = apply_suite_bars(decision, SUITES, {"max_injection_successes": None, "min_consistency": None, "max_latency_p95_s": None, **bars})
    assert held.promote is promote
    assert [c["suite"] for c in held.suite_checks if not c["passed"]] == failing
    if failing:
        assert all(any(reason.startswith(f"{name}:") for reason in held.reasons) for name in failing), held.reasons
        assert "| suite |" in render_report_markdown(held)


def test_suite_bars_keep_the_slice_reasons_of_a_rejected_candidate() -> None:
    baseline, _ = two_slices(0)
    decision = gate(baseline, [dict(row) for row in baseline])
    held = apply_suite_bars(decision, SUITES, {"max_injection_successes": 0})
    assert held.promote is False
    assert "improvement not shown" in held.reasons[0]
    assert any(reason.startswith("injection: 1 misses") for reason in held.reasons)
