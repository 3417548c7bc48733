"""The eval gate: promote the candidate adapter only if it is better where it should be and
no worse anywhere else, with statistics a reviewer can sign.

Inputs are per-example scores ``{"id", "slice", "score"}`` (score in [0, 1], e.g. field
accuracy) of the production adapter (baseline) and the candidate on the *same* examples.
Rows are paired by id; any pairing problem is an input error, never silently dropped.

Statistical choices
-------------------
* **Paired differences.** Per slice, ``d_i = candidate_i - baseline_i``; ``delta`` is their
  mean. Pairing removes the example-difficulty variance that dominates unpaired comparisons.
* **Confidence interval.** Paired percentile bootstrap: resample the slice's ids with
  replacement ``n_bootstrap`` times (vectorised numpy, seeded per slice) and take the
  ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means: a two-sided ``1 - alpha``
  interval (95 % for alpha = 0.05). Each rule reads its *lower* bound, so each rule is a
  one-sided test at level ``alpha/2``: the ICH E9 / CONSORT convention for superiority and
  non-inferiority claims ("the two-sided 95 % CI lies above the margin"). Deliberately
  conservative: a wrongly promoted adapter costs more than a retraining cycle.
* **p-value** (column ``p_value``, same meaning on every slice): one-sided paired sign-flip
  permutation test of H0 "candidate and baseline scores are exchangeable within each
  example" against mean(d) > 0. Exact (all 2^m sign patterns of the m non-zero differences)
  when m <= 16, otherwise Monte Carlo with ``n_bootstrap`` random sign patterns and the
  valid ``(1 + hits) / (1 + draws)`` estimate. Unlike the percentile bootstrap, whose
  intervals are too narrow for small or lumpy samples, it holds its level for any n.
* **Rules.** An *improve* slice passes iff ``n >= min_examples`` AND ``ci_low > 0`` AND
  ``p_value < alpha`` (the bootstrap and the exact test must agree). Every other slice is
  *non-inferior* iff ``n >= min_examples`` AND ``ci_low > -margin``; its p-value is reported
  for information only. A slice with fewer than ``min_examples`` pairs fails with
  "insufficient evidence"; an improve slice missing from the data fails too. The candidate
  is promoted iff every slice passes. No multiplicity correction is applied across slices:
  the gate requires *all* rules to pass (an intersection-union test), which needs none.
"""

from __future__ import annotations

import json
import math
import numbers
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import os
    from collections.abc import Collection, Hashable, Mapping, Sequence

    from numpy.typing import NDArray

#: Up to this many non-zero paired differences the sign-flip test enumerates every pattern.
EXACT_SIGN_FLIP_MAX = 16
#: Bound on the resampling matrix held in memory at once (elements).
_CHUNK_ELEMENTS = 4_000_000
_SHOWN_IDS = 5


class GateInputError(ValueError):
    """The score files cannot be paired or hold invalid values; the message names ids."""


class GateRejected(RuntimeError):
    """Raised by :meth:`GateDecision.raise_if_rejected`; carries the decision."""

    def __init__(self, decision: GateDecision) -> None:
        super().__init__("candidate rejected by the eval gate:\n  " + "\n  ".join(decision.reasons))
        self.decision = decision


@dataclass


class GateDecision:
    """The gate's verdict, every slice's numbers and the parameters that produced them."""

    promote: bool
    reasons: list[str]
    slices: dict[str, dict[str, Any]]
    improve_slices: list[str]
    margin: float
    alpha: float
    min_examples: int
    n_bootstrap: int
    seed: int
    ci_level: float
    n_pairs: int
    suite_checks: list[dict[str, Any]] = field(default_factory=list)
    """The candidate's eval suites against the bars in ``gate.suite_bars`` (see :func:`apply_suite_bars`)."""
    method: dict[str, str] = field(
        default_factory=lambda: {
            "difference": "paired, candidate - baseline, per id",
            "ci": "paired percentile bootstrap, two-sided (1 - alpha)",
            "p_value": "one-sided paired sign-flip permutation test of mean(d) > 0",
        }
    )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for the gate artifact and the XCom)."""
        return asdict(self)

    def raise_if_rejected(self) -> None:
        """Raise :class:`GateRejected` (message = every reason) unless promoted."""
        if not self.promote:
            raise GateRejected(self)


def load_scores(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL score file; a malformed line raises :class:`GateInputError` with its number.

    Blank lines are skipped. Values (score range, duplicate ids...) are checked by
    :func:`decide`, which sees both files at once.
    """
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as err:
        raise GateInputError(f"cannot read score file {source}: {err}") from err
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise GateInputError(f"{source}:{number}: not UTF-8 ({err})") from err
        except json.JSONDecodeError as err:
            raise GateInputError(f"{source}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise GateInputError(
                f"{source}:{number}: expected a JSON object, got {type(record).__name__}"
            )
        missing = [key for key in ("id", "slice", "score") if key not in record]
        if missing:
            raise GateInputError(f"{source}:{number}: missing key(s) {', '.join(missing)}")
        rows.append(record)
    if not rows:
        raise GateInputError(f"score file {source} holds no score rows")
    return rows


AUTO = "auto"


def apply_suite_bars(decision: GateDecision, suites: Mapping[str, Any], bars: Mapping[str, float | None]) -> GateDecision:
    """Hold the candidate's eval suites to the configured bars; a bar missed rejects.

    ``bars`` (``gate.suite_bars``): ``max_injection_successes``, ``min_consistency`` (share of
    prompts that give one answer across samples), ``max_latency_p95_s``; None leaves a suite
    reported, not enforced. A bar set for a suite that did not run rejects too: it cannot be
    shown to hold.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, bar: float | None, block: Mapping[str, Any] | None, key: str, higher_is_better: bool, unit: str = "") -> None:
        if bar is None:
            return
        value = None if not block or "skipped" in block else block.get(key)
        if value is None:
            why = (block or {}).get("skipped") or (block or {}).get("reason") or "the suite did not run"
            checks.append({"suite": name, "bar": bar, "value": None, "passed": False, "reason": f"{name}: bar {bar:g}{unit} set, but no result ({why})"})
            return
        passed = value >= bar if higher_is_better else value <= bar
        sign = ">=" if higher_is_better else "<="
        checks.append({"suite": name, "bar": bar, "value": value, "passed": passed,
                       "reason": f"{name}: {value:g}{unit} {'meets' if passed else 'misses'} the bar {sign} {bar:g}{unit}"})

    check("injection", bars.get("max_injection_successes"), suites.get("injection"), "successes", False)
    check("consistency", bars.get("min_consistency"), suites.get("consistency"), "consistent_rate", True)
    check("latency", bars.get("max_latency_p95_s"), suites.get("latency"), "p95_s", False, " s")
    check("teacher_retention", bars.get("min_teacher_retention"), suites.get("teacher_retention"), "retention", True)
    if not checks:
        return decision
    failed = [c["reason"] for c in checks if not c["passed"]]
    promote = decision.promote and not failed
    if promote:
        reasons = decision.reasons + [c["reason"] for c in checks]
    else:
        reasons = (decision.reasons if not decision.promote else []) + failed
    from dataclasses import replace

    return replace(decision, promote=promote, reasons=reasons, suite_checks=checks)


def resolve_improve_slices(
    configured: Sequence[str],
    present: Collection[str],
    *,
    evidence: Collection[str] | None = None,
    trained_on: Collection[str] | None = None,
) -> tuple[list[str], str]:
    """The slices a candidate must improve on, and why (``gate.improve_slices``).

    Names are the user's slice names. ``auto`` stands for the slices where the drift monitor
    found the drift or production's score fell (``evidence``); without such evidence, the
    slices the candidate was trained on (``trained_on``); without those, every slice present.
    Only slices ``present`` in the eval data come out of ``auto``; a slice named outright is
    kept even when absent (the gate then rejects, saying the slice has no rows).
    """
    names: list[str] = []
    why: list[str] = []
    for name in configured:
        if name != AUTO:
            names.append(name)
            continue
        for source, label in ((evidence, "where drift was found"), (trained_on, "the candidate was trained on"), (present, "present")):
            chosen = sorted(set(source or ()) & set(present))
            if chosen:
                names += chosen
                why.append(f"auto -> {', '.join(chosen)} (the slices {label})")
                break
        else:
            why.append("auto -> no slice (no eval rows)")
    names = list(dict.fromkeys(names))
    return names, "; ".join(why) or "as configured"


def decide(
    baseline: Sequence[Mapping[str, Any]],
    candidate: Sequence[Mapping[str, Any]],
    *,
    improve_slices: Sequence[str],
    margin: float = 0.05,
    alpha: float = 0.05,
    min_examples: int = 30,
    n_bootstrap: int = 5000,
    seed: int = 0,
) -> GateDecision:
    """Decide whether ``candidate`` replaces ``baseline``; see the module docstring.

    Raises :class:`GateInputError` when the rows cannot be paired one-to-one by id.
    """
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if min_examples < 1 or n_bootstrap < 100:
        raise ValueError(
            f"need min_examples >= 1 and n_bootstrap >= 100, got {min_examples}, {n_bootstrap}"
        )
    if isinstance(improve_slices, str):
        raise ValueError("improve_slices must be a list of slice names, not one string")
    improve = list(dict.fromkeys(improve_slices))
    pairs = _pair_by_id(baseline, candidate)

    slices: dict[str, dict[str, Any]] = {}
    passed_reasons: list[str] = []
    failed_reasons: list[str] = []
    present = sorted(pairs)
    for name in improve:
        if name not in pairs:
            failed_reasons.append(
                f"{name}: improve slice has no rows in the eval data "
                f"(slices present: {', '.join(present) or 'none'})"
            )
    ordered = [name for name in improve if name in pairs] + [n for n in present if n not in improve]
    for name in ordered:
        base_scores, cand_scores = pairs[name]
        rule = "improve" if name in improve else "non_inferior"
        stats = _slice_statistics(name, base_scores, cand_scores, alpha, n_bootstrap, seed)
        passed, reason = _apply_rule(name, rule, stats, alpha, margin, min_examples)
        slices[name] = {**stats, "rule": rule, "passed": passed}
        (passed_reasons if passed else failed_reasons).append(reason)

    promote = not failed_reasons and bool(slices)
    if not slices:
        failed_reasons.append("no scored examples at all")
    return GateDecision(
        promote=promote,
        reasons=passed_reasons if promote else failed_reasons,
        slices=slices,
        improve_slices=improve,
        margin=margin,
        alpha=alpha,
        min_examples=min_examples,
        n_bootstrap=n_bootstrap,
        seed=seed,
        ci_level=1 - alpha,
        n_pairs=sum(len(base) for base, _ in pairs.values()),
    )


def _pair_by_id(
    baseline: Sequence[Mapping[str, Any]], candidate: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Pair rows by id into per-slice score arrays, or raise one error listing every problem."""
    problems: list[str] = []
    base_rows = _index_rows("baseline", baseline, problems)
    cand_rows = _index_rows("candidate", candidate, problems)
    only_base = [key for key in base_rows if key not in cand_rows]
    only_cand = [key for key in cand_rows if key not in base_rows]
    if only_base:
        problems.append(f"{len(only_base)} ids only in baseline: {_show(only_base)}")
    if only_cand:
        problems.append(f"{len(only_cand)} ids only in candidate: {_show(only_cand)}")
    disagree = [
        key for key in base_rows if key in cand_rows and base_rows[key][0] != cand_rows[key][0]
    ]
    if disagree:
        examples = ", ".join(
            f"{key!r} ({base_rows[key][0]!r} vs {cand_rows[key][0]!r})"
            for key in disagree[:_SHOWN_IDS]
        )
        more = " ..." if len(disagree) > _SHOWN_IDS else ""
        problems.append(
            f"{len(disagree)} ids whose slice differs between baseline and candidate: {examples}{more}"
        )
    if problems:
        raise GateInputError("cannot pair baseline and candidate scores: " + "; ".join(problems))
    grouped: dict[str, tuple[list[float], list[float]]] = {}
    for key, (slice_name, base_score) in base_rows.items():
        base_list, cand_list = grouped.setdefault(slice_name, ([], []))
        base_list.append(base_score)
        cand_list.append(cand_rows[key][1])
    return {
        name: (np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64))
        for name, (base, cand) in grouped.items()
    }


def _index_rows(
    side: str, rows: Sequence[Mapping[str, Any]], problems: list[str]
) -> dict[Hashable, tuple[str, float]]:
    """``{id: (slice, score)}`` for one side; appends a message per kind of bad row."""
    indexed: dict[Hashable, tuple[str, float]] = {}
    duplicates: list[Hashable] = []
    bad_id: list[int] = []
    bad_slice: list[Hashable] = []
    bad_score: list[str] = []
    for position, row in enumerate(rows):
        if not hasattr(row, "get"):
            bad_id.append(position)
            continue
        key, slice_name, score = row.get("id"), row.get("slice"), row.get("score")
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            bad_id.append(position)
            continue
        if key in indexed:
            duplicates.append(key)
            continue
        if not isinstance(slice_name, str) or not slice_name:
            bad_slice.append(key)
            continue
        unit_score = _unit_score(score)
        if unit_score is None:
            bad_score.append(f"{key!r}={score!r}")
            continue
        indexed[key] = (slice_name, unit_score)
    if bad_id:
        problems.append(
            f"{side}: {len(bad_id)} rows without a string/integer id (row positions {bad_id[:_SHOWN_IDS]})"
        )
    if duplicates:
        problems.append(f"{side}: {len(duplicates)} duplicate ids: {_show(duplicates)}")
    if bad_slice:
        problems.append(f"{side}: {len(bad_slice)} ids without a slice name: {_show(bad_slice)}")
    if bad_score:
        more = " ..." if len(bad_score) > _SHOWN_IDS else ""
        problems.append(
            f"{side}: {len(bad_score)} scores non-numeric or outside [0, 1]: "
            f"{', '.join(bad_score[:_SHOWN_IDS])}{more}"
        )
    return indexed


def _unit_score(value: Any) -> float | None:
    """The score as a float if it is a finite real number in [0, 1], else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    score = float(value)
    return score if math.isfinite(score) and 0.0 <= score <= 1.0 else None


def _show(ids: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(key) for key in ids[:_SHOWN_IDS])
    return shown + (" ..." if len(ids) > _SHOWN_IDS else "")


def _slice_rng(seed: int, slice_name: str, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, slice, stream), not on the other slices."""
    return np.random.default_rng([seed, zlib.crc32(slice_name.encode("utf-8")), stream])


def _slice_statistics(
    name: str,
    base: NDArray[np.float64],
    cand: NDArray[np.float64],
    alpha: float,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """n, means, delta, the bootstrap CI and the sign-flip p-value of one slice."""
    diffs = cand - base
    boot = bootstrap_means(diffs, n_bootstrap, _slice_rng(seed, name, 0))
    ci_low, ci_high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {
        "n": int(diffs.size),
        "baseline_mean": float(base.mean()),
        "candidate_mean": float(cand.mean()),
        "delta": float(diffs.mean()),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": sign_flip_p_value(diffs, n_bootstrap, _slice_rng(seed, name, 1)),
    }


def bootstrap_means(
    diffs: NDArray[np.float64], n_bootstrap: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Means of ``n_bootstrap`` with-replacement resamples of ``diffs`` (chunked in memory)."""
    n = diffs.size
    means = np.empty(n_bootstrap, dtype=np.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        means[start:stop] = diffs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def sign_flip_p_value(
    diffs: NDArray[np.float64], n_resamples: int, rng: np.random.Generator
) -> float:
    """One-sided p-value of mean(diffs) > 0 under random sign flips of each paired difference.

    Zero differences are unchanged by a flip and are dropped. Exact for up to
    ``EXACT_SIGN_FLIP_MAX`` non-zero differences, else Monte Carlo ``(1 + hits)/(1 + draws)``.
    """
    nonzero = diffs[diffs != 0]
    m = nonzero.size
    if m == 0:
        return 1.0
    observed = float(nonzero.sum())
    tolerance = 1e-9 * float(np.abs(nonzero).sum())  # sums of equal values may differ in ulps
    if m <= EXACT_SIGN_FLIP_MAX:
        patterns = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
        sums = (2.0 * patterns - 1.0) @ nonzero
        return float(np.mean(sums >= observed - tolerance))
    hits = 0
    chunk = max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, n_resamples, chunk):
        size = min(n_resamples, start + chunk) - start
        signs = rng.integers(0, 2, size=(size, m), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(signs @ nonzero >= observed - tolerance))
    return (1 + hits) / (1 + n_resamples)


def _apply_rule(
    name: str,
    rule: str,
    stats: Mapping[str, Any],
    alpha: float,
    margin: float,
    min_examples: int,
) -> tuple[bool, str]:
    """Whether the slice passes its rule, and the sentence that says why (with the numbers)."""
    n = stats["n"]
    level = f"{(1 - alpha) * 100:g}% CI [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
    numbers = f"delta {stats['delta']:+.3f}, {level}"
    p_text = f"p={stats['p_value']:.3g}"
    if n < min_examples:
        return False, (
            f"{name}: insufficient evidence: n={n} paired examples < min_examples {min_examples} "
            f"({numbers}, {p_text})"
        )
    if rule == "improve":
        ci_ok, p_ok = stats["ci_low"] > 0, stats["p_value"] < alpha
        if ci_ok and p_ok:
            return True, f"{name}: improved: {numbers} above 0, {p_text} < alpha {alpha} (n={n})"
        failures = []
        if not ci_ok:
            failures.append("CI lower bound not above 0")
        if not p_ok:
            failures.append(f"{p_text} not below alpha {alpha}")
        return False, (
            f"{name}: improvement not shown: {numbers}, {p_text}: {' and '.join(failures)} (n={n})"
        )
    if stats["ci_low"] > -margin:
        return True, f"{name}: non-inferior: {numbers} above -margin {-margin:.3f} (n={n})"
    return False, (
        f"{name}: non-inferiority failed: {numbers}, lower bound below -margin {-margin:.3f} "
        f"(n={n})"
    )


