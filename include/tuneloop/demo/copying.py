"""Copy rows: the part of the demo base model's pre-training that teaches it to repeat what it read.

An extraction adapter has little to learn if its base model can already copy a name or a number
from the document into its answer (the attention pattern known as an induction head: find the
earlier place where the current token occurred, predict the token that followed it). Real LLMs
learn this from scale. A 4M-parameter model pre-trained for minutes on invoices does not: its
adapters wrote well-formed JSON with invented values (docs/benchmarks.md, "Toward a demo base
model that copies"). Rows where the only way to lower the loss is copying teach it directly:

* a span, then the same span again; the loss counts only the second copy;
* first ``uniform`` rows (random tokens of the whole vocabulary, short spans, adjacent copies),
  where copying has no shortcut but also nothing else to learn: the induction pattern appears
  after a few hundred steps;
* then mixed rows: random tokens, digit strings (one digit per token, so copying a number
  needs the two or three tokens before it, not one) and stretches of the corpus itself, with
  corpus text between a span and its copy so the distance varies.

None of these rows pairs a document with its fields: they teach copying in general. A pure
function of the random generator, so a build is reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import random
    from collections.abc import Sequence

IGNORE = -100


def _span(rng: random.Random, kind: int, n: int, vocab: range, digit_ids: Sequence[int], stream: Sequence[int]) -> list[int]:
    if kind == 0 or not stream:
        return [rng.randrange(vocab.start, vocab.stop) for _ in range(n)]
    if kind == 1 and digit_ids:
        return [rng.choice(digit_ids) for _ in range(n)]
    start = rng.randrange(0, max(1, len(stream) - n))
    return list(stream[start : start + n])


def copy_row(
    rng: random.Random,
    seq_len: int,
    *,
    vocab: range,
    bos: int,
    eos: int,
    mixed: bool,
    digit_ids: Sequence[int] = (),
    stream: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
    """One row of ``seq_len`` tokens and its labels (``IGNORE`` except on the copies)."""
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < seq_len:
        if mixed:
            span = _span(rng, rng.randrange(3), rng.randint(4, 64), vocab, digit_ids, stream)
            gap = _span(rng, 2, rng.randint(0, 40), vocab, digit_ids, stream)
            ids += [bos, *span, eos, *gap, eos, *span, eos]
            labels += [IGNORE] * (len(span) + len(gap) + 3) + [*span, eos]
        else:
            span = _span(rng, 0, rng.randint(4, 24), vocab, digit_ids, stream)
            ids += [bos, *span, eos, *span, eos]
            labels += [IGNORE] * (len(span) + 2) + [*span, eos]
    return ids[:seq_len], labels[:seq_len]


def copy_batch(rng: random.Random, batch_size: int, seq_len: int, **row: Any) -> tuple[Any, Any]:
    """``batch_size`` rows of :func:`copy_row` as ``(input_ids, labels)`` tensors."""
    import torch

    rows = [copy_row(rng, seq_len, **row) for _ in range(batch_size)]
    return torch.tensor([r[0] for r in rows], dtype=torch.long), torch.tensor([r[1] for r in rows], dtype=torch.long)
