"""Performance drift: has the served adapter's score fallen beyond a margin on fresh labels?"""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.drift import DriftInputError
from tuneloop.performance import performance_drift

pytestmark = pytest.mark.unit


def scores(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    """Field accuracy of n examples: six fields, each right with probability ``mean``."""
    return rng.binomial(6, mean, size=n) / 6


def test_false_alarms_at_the_margin_stay_below_alpha() -> None:
    rng = np.random.default_rng(0)
    # the hardest null: the score fell by exactly the tolerated margin
    alarms = sum(
        performance_drift(scores(rng, 0.80, 200), scores(rng, 0.75, 150), margin=0.05).drift
        for _ in range(400)
    )
    assert alarms <= 0.05 * 400 * 1.6, f"{alarms} false alarms in 400 (alpha 0.05)"


def test_a_clear_fall_is_found_and_its_interval_covers_it() -> None:
    rng = np.random.default_rng(1)
    report = performance_drift(scores(rng, 0.80, 200), scores(rng, 0.60, 150), margin=0.05)
    assert (
        report.drift
        and report.p_value < 1e-6
        and report.ci_low < -0.2 + 0.05 < report.ci_high + 0.05
    )
    assert report.ci_low < report.delta < report.ci_high and report.delta == pytest.approx(
        -0.2, abs=0.04
    )
    assert "fell by" in report.reason and report.to_json()["method"] == "performance"


def test_no_change_or_a_gain_is_no_drift() -> None:
    rng = np.random.default_rng(2)
    assert not performance_drift(scores(rng, 0.7, 300), scores(rng, 0.7, 300)).drift
    assert not performance_drift(scores(rng, 0.6, 300), scores(rng, 0.9, 300)).drift


def test_too_few_rows_is_insufficient_evidence_not_drift() -> None:
    report = performance_drift([0.9] * 40, [0.0] * 10, min_examples=30)
    assert not report.drift and report.reason.startswith("insufficient evidence")
    assert (report.n_baseline, report.n_current) == (40, 10)


def test_constant_scores_and_per_slice_means() -> None:
    fell = performance_drift(
        [1.0] * 50, [0.5] * 50, margin=0.1, current_slices=["a"] * 25 + ["b"] * 25
    )
    assert (
        fell.drift
        and fell.p_value == 0.0
        and fell.slices == {"a": {"n": 25, "mean": 0.5}, "b": {"n": 25, "mean": 0.5}}
    )
    within = performance_drift([1.0] * 50, [0.95] * 50, margin=0.1)
    assert not within.drift and within.p_value == 1.0


def test_bad_scores_and_arguments_fail_loudly() -> None:
    with pytest.raises(DriftInputError, match="within \\[0, 1\\]"):
        performance_drift([0.5] * 40, [1.5] * 40)
    with pytest.raises(DriftInputError, match="finite"):
        performance_drift([float("nan")] * 40, [0.5] * 40)
    with pytest.raises(ValueError, match="margin"):
        performance_drift([0.5] * 40, [0.5] * 40, margin=-0.1)
    with pytest.raises(ValueError, match="slice names"):
        performance_drift([0.5] * 40, [0.5] * 40, current_slices=["a"])
