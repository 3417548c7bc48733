"""The generic extraction curriculum the demo base model is pre-trained on: varied, answerable
from the document, deterministic, and never an invoice."""

from __future__ import annotations

import json
import re

import pytest

from tuneloop.demo.curriculum import KINDS, curriculum, extraction_example
from tuneloop.demo.invoice_task import FIELDS

pytestmark = pytest.mark.unit

_INSTRUCTION = re.compile(r"^Extract (.+) from the ([a-z ]+)\. Answer with JSON only\.$")


def _keys(instruction: str) -> list[str]:
    match = _INSTRUCTION.match(instruction)
    assert match, instruction
    named = re.split(r", | and ", match.group(1))
    return [name.removesuffix(" (YYYY-MM-DD)") for name in named]


def test_same_seed_same_examples_other_seed_others() -> None:
    assert curriculum(0, 50) == curriculum(0, 50)
    assert curriculum(1, 50) != curriculum(0, 50)


def test_answers_are_json_with_the_instructions_keys_in_order_and_values_from_the_document() -> None:
    kinds, layouts_seen, nulls = set(), set(), 0
    for user, answer in curriculum(3, 400):
        instruction, document = user.split("\n\n", 1)
        keys = _keys(instruction)
        parsed = json.loads(answer)
        assert list(parsed) == keys
        kinds.add(_INSTRUCTION.match(instruction).group(2))  # type: ignore[union-attr]
        for key, value in parsed.items():
            if value is None:
                nulls += 1
            elif isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) and len(value) > 3:
                assert value in document, (key, value, document)  # names, codes and ids are copied verbatim
            elif isinstance(value, float):
                assert re.search(r"\.\d\d[,}]", answer), answer  # amounts keep two decimals
        layouts_seen.add(document.count("|") > 0)
    assert kinds == {kind.key for kind in KINDS}
    assert layouts_seen == {True, False}
    assert nulls > 0


def test_never_an_invoice() -> None:
    invoice_words = re.compile(r"\b(invoices?|rechnung|facture|factuur|factura|receipt|quittung)\b", re.IGNORECASE)
    for user, answer in curriculum(5, 300):
        assert not invoice_words.search(user), user
        assert not set(json.loads(answer)) & (set(FIELDS) - {"currency"})


def test_dates_are_normalised_whatever_the_locale() -> None:
    import random

    seen_styles = set()
    for index in range(300):
        user, answer = extraction_example(random.Random(f"dates|{index}"))
        for value in json.loads(answer).values():
            if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                year, month, day = value.split("-")
                written = [f"{day}.{month}.{year}", f"{month}/{day}/{year}", f"{day}/{month}/{year}", f"{day}-{month}-{year}", value]
                if any(form in user for form in written):
                    seen_styles.add(next(form for form in written if form in user).count("."))
    assert seen_styles  # numeric forms occur (long month names are the rest)
