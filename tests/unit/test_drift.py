"""The drift test: calibrated under no drift, powerful under a clear shift, and explainable.

Texts are synthetic prompts: 8-20 words drawn with Zipfian weights from a vocabulary of
pseudo-words (the everyday traffic) or, for the shift, from a list of clinical words.
"""

from __future__ import annotations

import importlib.util
import json
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tuneloop.drift import DriftInputError, classifier_two_sample_test, detect_drift, load_texts
from tuneloop.embeddings import EmbeddingUnavailableError

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit

SYLLABLES = "ka lo mi ne ru sa te vo zi pa de go fu ba ri no".split()
SHIFT_WORDS = (
    "patient dosage clinic referral symptom allergy prescription diagnosis insurer copay "
    "radiology biopsy discharge triage pharmacy inpatient outpatient ward nurse antibiotic "
    "vaccine cardiology oncology pediatric surgeon anesthesia fracture infusion therapy "
    "ultrasound"
).split()
WINDOW = 300
NULL_SEEDS = 40
POWER_SEEDS = 20


def _pseudo_words(n: int, rng: np.random.Generator) -> np.ndarray:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES, size=rng.integers(2, 4))))
    return np.array(sorted(words))


EVERYDAY_WORDS = _pseudo_words(1500, np.random.default_rng(2024))


def sentences(words: np.ndarray, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` prompts of 8-20 words, word ranks Zipf-distributed (exponent 1.1)."""
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    grid = rng.choice(words, size=(n, 20), p=weights / weights.sum())
    lengths = rng.integers(8, 21, size=n)
    return [" ".join(row[:length]) for row, length in zip(grid, lengths, strict=True)]


def same_distribution(seed: int) -> tuple[list[str], list[str]]:
    """Shuffle one shared pool and split it: H0 holds by construction."""
    rng = np.random.default_rng(seed)
    pool = sentences(EVERYDAY_WORDS, 2 * WINDOW, rng)
    order = rng.permutation(len(pool))
    return [pool[i] for i in order[:WINDOW]], [pool[i] for i in order[WINDOW:]]


def shifted(seed: int, fraction: float = 0.3) -> tuple[list[str], list[str]]:
    """Current window: ``fraction`` of its prompts come from the clinical vocabulary."""
    rng = np.random.default_rng(seed)
    injected = int(fraction * WINDOW)
    reference = sentences(EVERYDAY_WORDS, WINDOW, rng)
    current = sentences(EVERYDAY_WORDS, WINDOW - injected, rng)
    current += sentences(np.array(SHIFT_WORDS), injected, rng)
    return reference, [current[i] for i in rng.permutation(len(current))]


def test_false_alarm_rate_is_near_alpha_under_no_drift() -> None:
    p_values = np.array(
        [
            detect_drift(*same_distribution(seed), seed=seed, explain_top=0, examples=0).p_value
            for seed in range(NULL_SEEDS)
        ]
    )
    false_alarms = float(np.mean(p_values < 0.05))
    print(f"false alarm rate at alpha=0.05 over {NULL_SEEDS} seeds: {false_alarms:.3f}")
    assert false_alarms <= 0.15
    # ...and the test is not vacuous: p-values spread out instead of sticking at 1.
    assert 0.1 <= float(np.mean(p_values < 0.5)) <= 0.7
    assert np.all((p_values >= 0) & (p_values <= 1))


def test_clear_shift_is_detected_in_nearly_all_seeds() -> None:
    reports = [
        detect_drift(*shifted(seed), seed=seed, explain_top=0, examples=0)
        for seed in range(POWER_SEEDS)
    ]
    detected = sum(report.drift for report in reports)
    print(f"detected {detected}/{POWER_SEEDS} shifts of 30% of the current window")
    assert detected >= POWER_SEEDS - 1
    assert all(report.statistic > 0.55 for report in reports)  # AUC: a visible effect


def test_explanations_point_at_the_injected_vocabulary() -> None:
    reference, current = shifted(seed=123)
    report = detect_drift(reference, current, seed=0, explain_top=8, examples=5)
    assert report.drift
    towards_current = [t["term"] for t in report.top_terms if t["direction"] == "current"]
    towards_reference = [t["term"] for t in report.top_terms if t["direction"] == "reference"]
    assert len(towards_current) == 8
    assert all(any(word in SHIFT_WORDS for word in term.split()) for term in towards_current)
    assert not any(word in SHIFT_WORDS for t in towards_reference for word in t.split())
    assert all(t["weight"] > 0 for t in report.top_terms if t["direction"] == "current")
    assert all(t["weight"] < 0 for t in report.top_terms if t["direction"] == "reference")
    assert len(report.examples) == 5
    clinical = [text for text in report.examples if set(text.split()) <= set(SHIFT_WORDS)]
    assert len(clinical) >= 4, report.examples


def test_p_value_is_deterministic_for_a_seed_and_json_ready() -> None:
    reference, current = shifted(seed=5, fraction=0.08)
    first = detect_drift(reference, current, seed=11).to_json()
    second = detect_drift(reference, current, seed=11).to_json()
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert 0 <= first["p_value"] <= 1 and 0 <= first["statistic"] <= 1
    assert json.loads(json.dumps(first)) == first


def test_unbalanced_windows_and_the_subsampling_cap() -> None:
    rng = np.random.default_rng(9)
    reference = sentences(EVERYDAY_WORDS, 500, rng)
    current = sentences(EVERYDAY_WORDS, 120, rng)
    report = detect_drift(reference, current, seed=1)
    assert (report.n_reference, report.n_current) == (500, 120)
    capped = detect_drift(reference, current, seed=1, max_examples_per_side=200)
    assert (capped.n_reference, capped.n_current) == (200, 120)
    assert (
        capped.p_value
        == detect_drift(reference, current, seed=1, max_examples_per_side=200).p_value
    )


def test_the_test_accepts_any_feature_matrix() -> None:
    """The seam for the embedding method: dense vectors through the same calibrated test."""
    rng = np.random.default_rng(0)
    is_current = np.r_[np.zeros(200, bool), np.ones(200, bool)]
    same = rng.normal(size=(400, 16))
    moved = same.copy()
    moved[is_current, 0] += 1.0
    assert classifier_two_sample_test(moved, is_current, seed=0).p_value < 1e-6
    result = classifier_two_sample_test(same, is_current, seed=0)
    assert result.p_value > 0.01 and result.oof_scores.shape == (400,)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None, reason="this env can embed (see test_drift_embedding)"
)
def test_embedding_method_outside_the_ml_env_says_where_to_run_it() -> None:
    reference, current = same_distribution(0)
    with pytest.raises(EmbeddingUnavailableError, match=r"\.venv-ml/bin/tuneloop drift"):
        detect_drift(reference, current, method="embedding")


def test_bad_arguments_fail_loudly() -> None:
    reference, current = same_distribution(0)
    with pytest.raises(ValueError, match="unknown drift method"):
        detect_drift(reference, current, method="bag-of-vibes")  # type: ignore[arg-type]
    with pytest.raises(DriftInputError, match="current window has 3 texts; at least 10"):
        detect_drift(reference, current[:3])
    with pytest.raises(DriftInputError, match="2 non-string items"):
        detect_drift(reference, [*current, None, 7])  # type: ignore[list-item]


def test_load_texts_counts_every_skipped_line(tmp_path: Path) -> None:
    path = tmp_path / "window.jsonl"
    lines = [
        b'{"prompt": "total due on invoice 42", "id": 1}',
        b'{"prompt": "ship to warehouse b"}',
        b"not json at all",
        b'["a", "list"]',
        b'{"completion": "no prompt"}',
        b'{"prompt": "   "}',
        b'{"prompt": 17}',
        b'{"prompt": "caf\xe9"}',  # latin-1, not UTF-8
        b"",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    texts, report = load_texts(path)
    assert texts == ["total due on invoice 42", "ship to warehouse b"]
    assert report == {
        "lines": 9,
        "used": 2,
        "skipped": {
            "empty_line": 1,
            "empty_text": 1,
            "missing_field": 1,
            "not_json": 1,
            "not_object": 1,
            "not_string": 1,
            "not_utf8": 1,
        },
    }
    assert load_texts(path, field="completion")[0] == ["no prompt"]


def test_load_texts_raises_on_unreadable_or_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DriftInputError, match="cannot read drift window"):
        load_texts(tmp_path / "absent.jsonl")
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"text": "wrong field"}\n{"text": "again"}\noops\n')
    with pytest.raises(DriftInputError) as err:
        load_texts(useless)
    assert "3 lines" in str(err.value)
    assert "'missing_field': 2" in str(err.value) and "'not_json': 1" in str(err.value)
