"""Copy rows for the demo base model (tuneloop.demo.copying): the loss sees only the copies,
the rows are a pure function of the generator, and a build with copy steps runs them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tuneloop.demo.copying import IGNORE, copy_row

pytestmark = pytest.mark.unit

ROW = {"vocab": range(7, 500), "bos": 1, "eos": 2, "digit_ids": list(range(10, 24)), "stream": list(range(100, 400))}


def _spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled stretches of a row (each copy and its closing eos)."""
    out: list[list[int]] = []
    run: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if run:
                out.append(run)
            run = []
        else:
            assert label == token  # a label is the token at its own place (the model shifts)
            run.append(token)
    return [*out, run] if run else out


@pytest.mark.parametrize("mixed", [False, True])
def test_only_the_second_copy_of_each_span_is_learned(mixed: bool) -> None:
    ids, labels = copy_row(random.Random(3), 512, mixed=mixed, **ROW)  # type: ignore[arg-type]
    assert len(ids) == len(labels) == 512
    spans = _spans(ids, labels)
    assert len(spans) >= 3
    for copy in spans[:-1]:  # the last may be cut by the row's end
        body = copy[:-1]
        assert copy[-1] == 2
        start = next(i for i in range(len(ids)) if ids[i : i + len(copy)] == copy and labels[i] != IGNORE)
        first = ids[:start]
        assert any(first[i : i + len(body)] == body for i in range(len(first) - len(body) + 1))  # it was read before
        assert start == 0 or labels[start - 1] == IGNORE


def test_rows_are_reproducible_and_mixed_rows_hold_digits_and_corpus_text() -> None:
    one = copy_row(random.Random(7), 2048, mixed=True, **ROW)  # type: ignore[arg-type]
    assert one == copy_row(random.Random(7), 2048, mixed=True, **ROW)  # type: ignore[arg-type]
    assert one != copy_row(random.Random(8), 2048, mixed=True, **ROW)  # type: ignore[arg-type]
    tokens = set(one[0])
    assert tokens & set(ROW["digit_ids"]) and tokens & set(ROW["stream"])  # type: ignore[arg-type]
    uniform = copy_row(random.Random(7), 2048, mixed=False, **ROW)  # type: ignore[arg-type]
    assert all(t in (1, 2) or 7 <= t < 500 for t in uniform[0])


@pytest.mark.ml
def test_a_build_with_copy_steps_runs_them_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from tuneloop.demo import basemodel

    tiny = basemodel.PRESETS["tiny"]
    monkeypatch.setitem(
        basemodel.PRESETS, "tiny-copy",
        dataclasses.replace(tiny, name="tiny-copy", steps=8, copy_steps=6, copy_uniform_steps=3, copy_every=2, copy_batch_size=4, copy_seq_len=64, tie_embeddings=True, cpu_bf16=True),
    )
    model_dir = basemodel.build_demo_model(tmp_path / "m", preset="tiny-copy", progress=lambda _line: None)
    again = basemodel.build_demo_model(tmp_path / "again", preset="tiny-copy", progress=lambda _line: None, shipped=None)
    record = basemodel.read_model_record(model_dir)
    # the same recipe on the same machine rebuilds bit for bit (the shipped model's promise)
    assert record is not None and record["files"] == basemodel.read_model_record(again)["files"]  # type: ignore[index]
    assert record is not None and record["preset"]["copy_steps"] == 6
    assert len(record["loss_history"]) == 14  # 6 copy steps + 8 corpus steps
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "copy rows" in card and "6 steps before the corpus" in card and "one such batch every 2 corpus steps" in card
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(model_dir).tie_word_embeddings is True


@pytest.mark.ml
def test_the_shipped_copy_model_is_intact_and_of_the_current_recipe(tmp_path: Path) -> None:
    """A change to the copy preset or its corpus must ship a rebuilt model with it (else every
    checkout would spend ~20 minutes building one)."""
    from tuneloop.demo import basemodel

    spec = basemodel.PRESETS["copy"]
    corpus = [d for d in basemodel.default_corpus(spec, 0) if d.strip()]
    recipe = basemodel._recipe(spec, 0, basemodel._corpus_sha256(corpus))
    shipped = basemodel.shipped_model(recipe["recipe_hash"], basemodel.shipped_dir("copy"))
    assert shipped is not None, "models/copy-base is not the copy preset's current recipe: `tuneloop build-model --preset copy --rebuild --out models/copy-base`"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(shipped)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (spec.num_layers, spec.hidden_size, spec.vocab_size)
