"""Performance drift: has production's score fallen? Its per-example scores on fresh labelled rows
against its scores on its own eval split at promotion, in a one-sided Welch test with a margin
(``drift.performance_margin``). The drift monitor runs it beside the traffic test."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tuneloop.drift import DriftInputError

if TYPE_CHECKING:
    from collections.abc import Sequence



@dataclass(frozen=True)


class PerformanceDriftReport:
    """Has the served adapter's score fallen on fresh labelled data since it was promoted?"""

    drift: bool
    p_value: float
    baseline_mean: float
    current_mean: float
    delta: float  # current - baseline
    ci_low: float
    ci_high: float
    n_baseline: int
    n_current: int
    margin: float
    alpha: float
    reason: str
    method: str = "performance"
    slices: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PERFORMANCE DRIFT" if self.drift else "no performance drift"
        return (
            f"{verdict}: score {self.baseline_mean:.3f} at promotion -> {self.current_mean:.3f} on fresh data "
            f"(delta {self.delta:+.3f}, 95% CI [{self.ci_low:+.3f}, {self.ci_high:+.3f}], p={self.p_value:.3g}, "
            f"n={self.n_baseline}/{self.n_current}, margin {self.margin})"
        )


def performance_drift(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    alpha: float = 0.05,
    margin: float = 0.05,
    min_examples: int = 30,
    current_slices: Sequence[str] | None = None,
) -> PerformanceDriftReport:
    """One-sided Welch test of H0: mean(current) >= mean(baseline) - margin.

    ``baseline``: per-example scores in [0, 1] of the adapter at promotion time (its eval
    split); ``current``: the same adapter's scores on fresh labelled rows. Different rows, so
    the test is unpaired: ``z = (delta + margin) / se`` with the Welch standard error, ``p =
    Phi(z)`` (normal approximation; scores are bounded, so it is good from a few dozen rows).
    ``drift`` = ``p < alpha``: the score fell by more than ``margin`` with confidence. Fewer than
    ``min_examples`` rows on either side -> no drift, reason "insufficient evidence".
    ``current_slices`` (one name per current score) adds per-slice means, descriptive only.
    """
    from scipy.stats import norm

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    base = np.asarray(baseline, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    for name, scores in (("baseline", base), ("current", cur)):
        if scores.size and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
            raise DriftInputError(f"{name} scores must be finite and within [0, 1]")
    slices: dict[str, dict[str, float]] = {}
    if current_slices is not None:
        if len(current_slices) != cur.size:
            raise ValueError(f"{len(current_slices)} slice names for {cur.size} current scores")
        for name in sorted(set(current_slices)):
            members = cur[np.asarray(current_slices) == name]
            slices[name] = {"n": int(members.size), "mean": float(members.mean())}
    if min(base.size, cur.size) < max(min_examples, 2):
        return PerformanceDriftReport(
            drift=False, p_value=1.0,
            baseline_mean=float(base.mean()) if base.size else float("nan"),
            current_mean=float(cur.mean()) if cur.size else float("nan"),
            delta=float("nan"), ci_low=float("nan"), ci_high=float("nan"),
            n_baseline=int(base.size), n_current=int(cur.size), margin=margin, alpha=alpha,
            reason=f"insufficient evidence: {base.size} baseline and {cur.size} fresh scores, need {min_examples} each",
            slices=slices,
        )  # fmt: skip
    delta = float(cur.mean() - base.mean())
    se = math.sqrt(base.var(ddof=1) / base.size + cur.var(ddof=1) / cur.size)
    if se == 0.0:
        p_value = 0.0 if delta < -margin else 1.0
    else:
        p_value = float(norm.cdf((delta + margin) / se))
    half = 1.959963984540054 * se
    drift = p_value < alpha
    if drift:
        reason = (
            f"the score fell by {-delta:.3f} (> margin {margin}) on fresh data, p={p_value:.3g}"
        )
    else:
        reason = (
            f"no fall beyond margin {margin} shown (delta {delta:+.3f}, p={p_value:.3g} >= {alpha})"
        )
    return PerformanceDriftReport(
        drift=drift, p_value=p_value, baseline_mean=float(base.mean()), current_mean=float(cur.mean()),
        delta=delta, ci_low=delta - half, ci_high=delta + half, n_baseline=int(base.size),
        n_current=int(cur.size), margin=margin, alpha=alpha, reason=reason, slices=slices,
    )  # fmt: skip
