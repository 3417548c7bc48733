"""The demo world: deterministic, learnable documents and a production-shaped store layout."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from tuneloop.demo.invoice_documents import make_document
from tuneloop.demo.invoice_locales import LAYOUTS
from tuneloop.demo.invoice_task import (
    FIELDS,
    LABELLED_RECORD_KEYS,
    TRAFFIC_RECORD_KEYS,
    format_completion,
    make_prompt,
    parse_completion,
    schema_errors,
)
from tuneloop.demo.invoices import (
    BAD_ROW_KINDS,
    drift_fraction,
    generate_world,
    heldout_sets,
    make_labelled_record,
    make_traffic_record,
    pretraining_corpus,
)

pytestmark = pytest.mark.unit

START = date(2026, 1, 1)
# What a PII / prompt-injection scanner flags; clean documents must trigger none of them.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}")
CARD = re.compile(r"\b(?:\d[ -]?){13,16}\b")
INJECTION = re.compile(r"(?i)ignore (all )?previous instructions")
EU_VAT = re.compile(r"\b(?:DE|FR|NL|ES)[0-9A-Z]{8,12}\b")


class MemoryStore:
    """The slice of the store API the world uses, recording every write."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = data
        self.writes.append(key)

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(key for key in self.objects if key.startswith(prefix))

    def lines(self, key: str) -> list[str]:
        return self.objects[key].decode("utf-8").split("\n")[:-1]


def _documents(domain: str, count: int, seed: str = "docs") -> list[tuple[str, dict[str, Any]]]:
    return [make_document(random.Random(f"{seed}-{i}"), domain) for i in range(count)]


def _date_renderings(iso: str) -> set[str]:
    day = date.fromisoformat(iso)
    month = day.strftime("%B")
    return {
        iso,
        f"{day.month:02d}/{day.day:02d}/{day.year}",
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month[:3]} {day.year}",
        f"{day.day} {month} {day.year}",
        f"{day.day:02d}.{day.month:02d}.{day.year}",
        f"{day.day:02d}/{day.month:02d}/{day.year}",
        f"{day.day:02d}-{day.month:02d}-{day.year}",
    }


def _amount_renderings(total: float) -> set[str]:
    units, cents = divmod(round(total * 100), 100)
    renderings = set()
    for thousands, decimal in ((",", "."), ("", "."), (".", ","), (" ", ",")):
        whole = f"{units:,}".replace(",", thousands)
        renderings.add(f"{whole}{decimal}{cents:02d}")
    return renderings


# --- documents -----------------------------------------------------------------------------


def test_same_seed_same_document_and_different_seed_different() -> None:
    first = make_document(random.Random(7), "drifted")
    assert make_document(random.Random(7), "drifted") == first
    assert make_document(random.Random(8), "drifted") != first


@pytest.mark.parametrize("domain", ["original", "drifted"])
def test_gold_completions_are_valid_and_round_trip(domain: str) -> None:
    for _, fields in _documents(domain, 300):
        assert list(fields) == list(FIELDS)
        completion = format_completion(fields)
        parsed = parse_completion(completion)
        assert parsed is not None and schema_errors(parsed) == []
        assert format_completion(parsed) == completion


@pytest.mark.parametrize("domain", ["original", "drifted"])
def test_every_gold_field_is_recoverable_from_the_document(domain: str) -> None:
    symbols = {"USD": "$", "GBP": "£", "EUR": "€"}
    for document, fields in _documents(domain, 300):
        assert fields["vendor"] in document
        assert fields["invoice_number"] in document
        assert any(rendering in document for rendering in _date_renderings(fields["date"])), (
            fields["date"],
            document,
        )
        assert any(rendering in document for rendering in _amount_renderings(fields["total"])), (
            fields["total"],
            document,
        )
        currency = fields["currency"]
        assert currency in document or symbols[currency] in document
        if fields["vat_id"] is None:
            assert not EU_VAT.search(document), document
        else:
            assert fields["vat_id"] in document


def test_domains_differ_in_language_conventions_and_the_new_field() -> None:
    original, drifted = _documents("original", 200), _documents("drifted", 200)
    assert {f["currency"] for _, f in original} == {"USD", "GBP"}
    assert all(f["vat_id"] is None for _, f in original)
    assert {f["currency"] for _, f in drifted} == {"EUR"}
    assert {f["vat_id"][:2] for _, f in drifted} == {"DE", "FR", "NL", "ES"}
    drifted_text = "\n".join(document for document, _ in drifted)
    for marker in (
        "Rechnung",
        "Facture",
        "Factuur",
        "Factura",
        "Total TTC",
        "Gesamtbetrag",
        "EN 16931",
    ):
        assert marker in drifted_text
    assert not any(marker in document for document, _ in original for marker in ("€", "Rechnung"))


def test_every_layout_is_reachable_and_layouts_stay_in_their_domain() -> None:
    for domain, layouts in LAYOUTS.items():
        texts = {
            layout: make_document(random.Random(1), domain, layout=layout)[0] for layout in layouts
        }
        assert len(set(texts.values())) == len(layouts)
    assert "E-INVOICE" in make_document(random.Random(1), "drifted", layout="e_invoice")[0]
    with pytest.raises(ValueError, match="e_invoice"):
        make_document(random.Random(1), "original", layout="e_invoice")
    with pytest.raises(ValueError, match="domain"):
        make_document(random.Random(1), "klingon")


def test_documents_are_modest_and_varied() -> None:
    documents = _documents("original", 200) + _documents("drifted", 200)
    words = [len(document.split()) for document, _ in documents]
    assert 35 <= min(words) and max(words) <= 125, (min(words), max(words))
    assert len({fields["vendor"] for _, fields in documents}) > 150
    assert len({fields["invoice_number"] for _, fields in documents}) > 390


def test_clean_documents_trip_no_pii_or_injection_check() -> None:
    for document, _ in _documents("original", 300, "pii") + _documents("drifted", 300, "pii"):
        for pattern in (EMAIL, PHONE, CARD, INJECTION):
            assert not pattern.search(document), (pattern.pattern, document)


def test_record_builders_follow_the_record_schema() -> None:
    labelled = make_labelled_record(
        random.Random(3), "drifted", "x-1", datetime(2026, 3, 15, 14, 5, 9)
    )
    assert tuple(labelled) == LABELLED_RECORD_KEYS
    assert labelled["labelled_at"] == "2026-03-15T14:05:09Z"
    assert labelled["domain"] == "drifted"
    assert schema_errors(parse_completion(labelled["completion"])) == []
    ts = datetime(2026, 3, 15, 16, 5, 9, tzinfo=UTC).astimezone(timezone(timedelta(hours=1)))
    traffic = make_traffic_record(random.Random(3), "drifted", "x-1", ts)
    assert tuple(traffic) == TRAFFIC_RECORD_KEYS
    assert traffic["ts"] == "2026-03-15T16:05:09Z" and traffic["model"] == "tuneloop"
    assert traffic["prompt"] == labelled["prompt"]  # same rng state, same document


# --- drift ---------------------------------------------------------------------------------


def test_drift_fraction_ramps_linearly_then_holds() -> None:
    drift_start = date(2026, 2, 1)
    assert drift_fraction(date(2026, 3, 1), None) == 0.0
    assert drift_fraction(drift_start - timedelta(days=1), drift_start) == 0.0
    ramp = [
        drift_fraction(drift_start + timedelta(days=k), drift_start, ramp_days=4, final=0.8)
        for k in range(6)
    ]
    assert ramp == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert drift_fraction(drift_start, drift_start, ramp_days=0, final=0.5) == 0.5
    with pytest.raises(ValueError):
        drift_fraction(drift_start, drift_start, ramp_days=-1)
    with pytest.raises(ValueError):
        drift_fraction(drift_start, drift_start, final=1.5)


# --- the world -----------------------------------------------------------------------------


def _world(store: MemoryStore, start: date = START, days: int = 4, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "traffic_per_day": 30,
        "labelled_per_day": 12,
        "drift_start": START + timedelta(days=2),
    }
    options.update(kwargs)
    return generate_world(store, start, days, **options)


def test_world_is_byte_identical_for_a_seed_and_differs_across_seeds() -> None:
    first, second, other = MemoryStore(), MemoryStore(), MemoryStore()
    _world(first, seed=5)
    _world(second, seed=5)
    _world(other, seed=6)
    assert first.objects == second.objects
    assert all(first.objects[key] != other.objects[key] for key in first.objects)


def test_world_bytes_do_not_depend_on_the_process_hash_seed() -> None:
    script = (
        "import hashlib, datetime as d; from tuneloop.demo.invoices import generate_world\n"
        "class S:\n"
        "    def __init__(self): self.h = hashlib.sha256()\n"
        "    def put_bytes(self, key, data): self.h.update(key.encode() + data)\n"
        "s = S(); generate_world(s, d.date(2026, 1, 1), 2, traffic_per_day=20, labelled_per_day=10,"
        " drift_start=d.date(2026, 1, 2), bad_row_rate=0.4); print(s.h.hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(digests) == 1


def test_world_writes_daily_partitions_of_well_formed_records() -> None:
    store = MemoryStore()
    messages: list[str] = []
    summary = _world(store, days=3, progress=messages.append)
    expected = [
        f"{kind}/dt={START + timedelta(days=k)}/part-00000.jsonl"
        for k in range(3)
        for kind in ("traffic", "labelled")
    ]
    assert store.writes == expected and summary["keys"] == expected
    assert len(messages) == 3 and messages[0].startswith("2026-01-01")

    traffic_ids: list[str] = []
    labelled_ids: list[str] = []
    for k in range(3):
        day = START + timedelta(days=k)
        traffic = [json.loads(line) for line in store.lines(f"traffic/dt={day}/part-00000.jsonl")]
        labelled = [json.loads(line) for line in store.lines(f"labelled/dt={day}/part-00000.jsonl")]
        assert len(traffic) == 30 and len(labelled) == 12
        assert all(tuple(row) == TRAFFIC_RECORD_KEYS for row in traffic)
        assert all(tuple(row) == LABELLED_RECORD_KEYS for row in labelled)
        stamps = [row["ts"] for row in traffic]
        assert stamps == sorted(stamps) and all(
            s.startswith(f"{day}T") and s.endswith("Z") for s in stamps
        )
        assert all(row["labelled_at"].startswith(f"{day}T") for row in labelled)
        # Labels are for a sample of that day's requests: same id, same prompt.
        prompts = {row["id"]: row["prompt"] for row in traffic}
        assert all(prompts[row["id"]] == row["prompt"] for row in labelled)
        assert all(schema_errors(parse_completion(row["completion"])) == [] for row in labelled)
        traffic_ids += [row["id"] for row in traffic]
        labelled_ids += [row["id"] for row in labelled]
    assert len(set(traffic_ids)) == len(traffic_ids) and len(set(labelled_ids)) == len(labelled_ids)
    assert traffic_ids[0] == "req-2026-01-01-0000"


def test_domain_mix_follows_the_drift_schedule() -> None:
    store = MemoryStore()
    drift_start = START + timedelta(days=1)
    summary = generate_world(
        store, START, 9, drift_start=drift_start, traffic_per_day=50, labelled_per_day=20
    )
    for k in range(9):
        day = START + timedelta(days=k)
        fraction = drift_fraction(day, drift_start)
        assert summary["drift_fraction"][day.isoformat()] == fraction
        traffic = [
            json.loads(line)["prompt"] for line in store.lines(f"traffic/dt={day}/part-00000.jsonl")
        ]
        labelled = Counter(
            json.loads(line)["domain"]
            for line in store.lines(f"labelled/dt={day}/part-00000.jsonl")
        )
        assert labelled["drifted"] == round(20 * fraction)
        # Traffic carries no domain label; the drifted layouts give it away (VAT ids are drifted-only).
        assert sum(1 for prompt in traffic if EU_VAT.search(prompt)) == round(50 * fraction)
    assert summary["traffic_rows"]["original"] + summary["traffic_rows"]["drifted"] == 9 * 50
    assert summary["labelled_rows"]["drifted"] == sum(
        round(20 * f) for f in summary["drift_fraction"].values()
    )


def test_rolling_forward_appends_without_rewriting_old_partitions() -> None:
    rolled, whole = MemoryStore(), MemoryStore()
    _world(rolled, days=3)
    before = dict(rolled.objects)
    rolled.writes.clear()
    _world(rolled, start=START + timedelta(days=3), days=2)
    assert not set(rolled.writes) & set(before)
    assert all(rolled.objects[key] == data for key, data in before.items())
    _world(whole, days=5)
    assert rolled.objects == whole.objects


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _bad_kind(line: str, clean_line: str, lines: list[str]) -> str | None:
    """Classify a labelled line independently of the generator; None when it is clean."""
    if not line.strip():
        return "empty_line"
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return "not_json"
    if any(key not in row for key in LABELLED_RECORD_KEYS):
        return "missing_field"
    if line != clean_line and lines.count(line) > 1:
        return "duplicate_id"
    parsed = parse_completion(row["completion"])
    if parsed is None:
        return "completion_not_json"
    if any(error.startswith("missing field") for error in schema_errors(parsed)):
        return "completion_missing_field"
    if EMAIL.search(row["prompt"]) and PHONE.search(row["prompt"]):
        return "pii"
    if INJECTION.search(row["prompt"]):
        return "prompt_injection"
    return None


def test_bad_row_rate_mixes_in_each_kind_of_defect() -> None:
    clean, dirty = MemoryStore(), MemoryStore()
    _world(clean, days=2, labelled_per_day=20)
    summary = _world(dirty, days=2, labelled_per_day=20, bad_row_rate=0.4)
    # 8 bad lines a day cycle through all 8 kinds once.
    assert summary["bad_rows"] == dict.fromkeys(BAD_ROW_KINDS, 2)

    found: Counter[str] = Counter()
    for key in clean.list("labelled/"):
        clean_lines, dirty_lines = clean.lines(key), dirty.lines(key)
        assert len(dirty_lines) == len(clean_lines) == 20
        rows = [_json_or_none(line) for line in dirty_lines]
        ids = Counter(row["id"] for row in rows if isinstance(row, dict) and "id" in row)
        assert sorted(ids.values())[-1] == 2  # the duplicate repeats another row's id
        for clean_line, dirty_line in zip(clean_lines, dirty_lines, strict=True):
            kind = _bad_kind(dirty_line, clean_line, dirty_lines)
            if kind is None:
                assert dirty_line == clean_line  # good rows do not depend on the bad-row rate
            found[kind or "clean"] += 1
        assert all(_bad_kind(line, line, clean_lines) is None for line in clean_lines)
    assert dict(found) == {"clean": 24, **summary["bad_rows"]}
    assert summary["labelled_rows"]["original"] + summary["labelled_rows"]["drifted"] == 24
    # Traffic never carries defects.
    assert all(dirty.objects[key] == clean.objects[key] for key in clean.list("traffic/"))


def test_world_refuses_impossible_arguments() -> None:
    with pytest.raises(ValueError, match="sample of the day's traffic"):
        generate_world(MemoryStore(), START, 1, traffic_per_day=10, labelled_per_day=20)
    with pytest.raises(ValueError, match="bad_row_rate"):
        generate_world(MemoryStore(), START, 1, bad_row_rate=1.0)


# --- held-out sets and pre-training text ---------------------------------------------------


def test_heldout_sets_are_fixed_and_disjoint_from_daily_data() -> None:
    sets = heldout_sets(seed=0, n_per_domain=40)
    assert heldout_sets(seed=0, n_per_domain=40) == sets
    assert heldout_sets(seed=1, n_per_domain=40) != sets
    store = MemoryStore()
    _world(store, days=2, seed=0)
    daily_prompts = {
        json.loads(line)["prompt"] for key in store.list("traffic/") for line in store.lines(key)
    }
    for domain, rows in sets.items():
        assert len(rows) == 40
        assert all(tuple(row) == LABELLED_RECORD_KEYS and row["domain"] == domain for row in rows)
        assert all(row["id"].startswith(f"heldout-{domain}-") for row in rows)
        assert not {row["prompt"] for row in rows} & daily_prompts
    assert len({row["id"] for rows in sets.values() for row in rows}) == 80


def test_pretraining_corpus_has_documents_and_unpaired_json() -> None:
    corpus = pretraining_corpus(seed=0, n_documents=200)
    assert pretraining_corpus(seed=0, n_documents=200) == corpus
    assert pretraining_corpus(seed=1, n_documents=200) != corpus
    objects = [parse_completion(text) for text in corpus if text.startswith("{")]
    documents = [text for text in corpus if not text.startswith("{")]
    assert len(objects) == len(documents) == 100
    assert all(obj is not None and schema_errors(obj) == [] for obj in objects)
    assert 30 < sum(obj["vat_id"] is None for obj in objects if obj is not None) < 70
    # No answer ever appears next to its document, and no document carries the instruction.
    assert all("{" not in text and not text.startswith(make_prompt("")) for text in documents)


def test_clean_labelled_rows_pass_the_invoice_examples_row_checks() -> None:
    """The world is what `make demo` pulls with examples/invoices/tuneloop.yaml: every clean
    labelled row must pass that config's row checks (format, slice field, gold JSON against
    schema.json)."""
    from pathlib import Path

    from tuneloop.config import load_settings
    from tuneloop.intake.rows import check_lines
    from tuneloop.tasks import TaskSpec

    spec = TaskSpec(load_settings(Path(__file__).resolve().parents[2] / "examples" / "invoices" / "tuneloop.yaml", env={}).task)
    store = MemoryStore()
    _world(store, days=4, labelled_per_day=30)
    triples = [(key, n, line.encode()) for key in store.list("labelled/") for n, line in enumerate(store.lines(key), 1)]
    batch = check_lines(triples, spec)
    assert batch.total == 120
    assert batch.reasons == {}, [(q.reasons, json.loads(q.raw)["completion"]) for q in batch.quarantined[:3]]
    assert {spec.example(row).slice for row in batch.accepted} <= {"original", "drifted"}
