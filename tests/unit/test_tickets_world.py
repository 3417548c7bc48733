"""The support-ticket world: deterministic chat rows, one label each, drifting to a new product."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneloop.demo.tickets import (
    BAD_ROW_KINDS,
    HELDOUT_LABELLED_AT,
    LABELS,
    PRODUCTS,
    PRODUCTS_DRIFTED,
    PRODUCTS_ORIGINAL,
    SLICE_FIELD,
    SYSTEM_PROMPT,
    drift_fraction,
    generate_ticket_world,
    heldout_sets,
    label_of,
    make_ticket,
    make_traffic_record,
    write_ticket_files,
)

pytestmark = pytest.mark.unit

START = date(2026, 3, 1)
DRIFT = date(2026, 3, 8)
ROLES = {"system", "user", "assistant"}
ID = re.compile(r"^tkt-(\d{4}-\d{2}-\d{2})-\d{4}$")
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# What a PII scanner flags; clean tickets must trigger none of them.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"\+\d{1,3}[ -]?\(?\d{2,4}\)?[ -]?\d{3,4}[ -]?\d{3,4}")
CARD = re.compile(r"\b(?:\d[ -]?){13,16}\b")
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tickets" / "tuneloop.yaml"


class MemoryStore:
    """The one store call the world uses, kept in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def lines(self, prefix: str, day: date) -> list[str]:
        return self.objects[f"{prefix}/dt={day.isoformat()}/part-00000.jsonl"].decode("utf-8").splitlines()

    def rows(self, prefix: str, day: date) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines(prefix, day)]


def _world(days: int = 14, **kwargs: Any) -> tuple[MemoryStore, dict[str, Any]]:
    store = MemoryStore()
    kwargs.setdefault("drift_start", DRIFT)
    return store, generate_ticket_world(store, START, days, **kwargs)


@pytest.fixture(scope="module")
def world() -> tuple[MemoryStore, dict[str, Any]]:
    return _world()


def _days(n: int = 14) -> list[date]:
    return [START + timedelta(days=i) for i in range(n)]


def _user_texts(record: dict[str, Any]) -> list[str]:
    return [turn["content"] for turn in record["messages"] if turn["role"] == "user"]


def _check_conversation(messages: list[dict[str, Any]], *, answered: bool) -> None:
    """Roles valid, an optional leading system turn equal to SYSTEM_PROMPT, user and assistant
    alternating from a user turn; labelled rows end with the label, traffic with a user turn."""
    assert all(set(turn) == {"role", "content"} and isinstance(turn["content"], str) for turn in messages)
    assert all(turn["role"] in ROLES for turn in messages)
    turns = messages
    if turns[0]["role"] == "system":
        assert turns[0]["content"] == SYSTEM_PROMPT
        turns = turns[1:]
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2)
    if answered:
        assert turns[-1]["role"] == "assistant" and turns[-1]["content"] in LABELS
    else:
        assert turns[-1]["role"] == "user"


def _defect(line: str, counts: Counter[str]) -> str | None:
    """The BAD_ROW_KINDS kind a line shows, judged from the line alone (duplicates by count)."""
    if not line.strip():
        return "empty_line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "not_json"
    if counts[line] > 1:
        return "duplicate_id"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing_messages"
    if any(turn.get("role") not in ROLES for turn in messages):
        return "bad_role"
    if messages[-1]["role"] != "assistant":
        return "no_final_assistant"
    if messages[-1]["content"] not in LABELS:
        return "label_not_in_set"
    return None


def test_same_seed_same_bytes() -> None:
    first, summary = _world(days=4, bad_row_rate=0.1)
    second, again = _world(days=4, bad_row_rate=0.1)
    assert first.objects == second.objects and summary == again
    other, _ = _world(days=4, bad_row_rate=0.1, seed=1)
    assert other.objects.keys() == first.objects.keys()
    assert all(other.objects[key] != first.objects[key] for key in first.objects)


def test_days_are_independent_so_the_world_rolls_forward() -> None:
    whole, _ = _world(days=3)
    later = MemoryStore()
    generate_ticket_world(later, START + timedelta(days=1), 2, drift_start=DRIFT)
    assert later.objects and all(whole.objects[key] == data for key, data in later.objects.items())


def test_layout_summary_and_counts(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, summary = world
    expected = {f"{p}/dt={d.isoformat()}/part-00000.jsonl" for d in _days() for p in ("traffic", "labelled")}
    assert set(store.objects) == expected == set(summary["keys"])
    for day in _days():
        assert len(store.lines("traffic", day)) == 120
        assert len(store.lines("labelled", day)) == 60
    assert sum(summary["traffic_rows"].values()) == 14 * 120
    assert sum(summary["labelled_rows"].values()) == 14 * 60
    assert set(summary["traffic_rows"]) == set(PRODUCTS)
    assert set(summary["bad_rows"]) == set(BAD_ROW_KINDS) and not any(summary["bad_rows"].values())


def test_labelled_rows_end_with_one_label(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, _ = world
    rows = [row for day in _days() for row in store.rows("labelled", day)]
    for row in rows:
        assert set(row) == {"id", "messages", SLICE_FIELD, "labelled_at"}
        assert ID.match(row["id"]) and ISO.match(row["labelled_at"])
        assert row[SLICE_FIELD] in PRODUCTS
        _check_conversation(row["messages"], answered=True)
        assert label_of(row) in LABELS
    labels = Counter(label_of(row) for row in rows)
    assert set(labels) == set(LABELS)
    assert max(labels.values()) < 0.35 * len(rows)  # no label is a free win
    system = sum(row["messages"][0]["role"] == "system" for row in rows)
    assert 0.05 * len(rows) < system < 0.16 * len(rows)  # both paths: with and without a system turn
    multi = sum(len(_user_texts(row)) > 1 for row in rows)
    assert 0.2 * len(rows) < multi < 0.4 * len(rows)


def test_labelled_rows_are_a_sample_of_the_days_traffic(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, _ = world
    for day in _days():
        traffic = {row["id"]: row for row in store.rows("traffic", day)}
        for row in traffic.values():
            assert set(row) == {"id", "ts", "messages", SLICE_FIELD, "model"}
            match = ID.match(row["id"])
            assert match is not None and match[1] == day.isoformat()
            assert ISO.match(row["ts"]) and row["ts"].startswith(day.isoformat())
            _check_conversation(row["messages"], answered=False)
        for row in store.rows("labelled", day):
            request = traffic[row["id"]]
            assert row["messages"][:-1] == request["messages"]
            assert row[SLICE_FIELD] == request[SLICE_FIELD]
            assert request["ts"] <= row["labelled_at"] <= f"{day.isoformat()}T23:59:59Z"


def test_tickets_are_short_and_free_of_pii(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, _ = world
    texts = [text for day in _days() for row in store.rows("traffic", day) for text in _user_texts(row)]
    assert max(len(text.split()) for text in texts) <= 60
    assert not [text for text in texts if EMAIL.search(text) or PHONE.search(text) or CARD.search(text)]
    assert len(set(texts)) > 0.9 * len(texts)  # phrasing varies


def test_drift_brings_a_new_product_with_a_growing_share(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, summary = world
    new = set(PRODUCTS_DRIFTED)
    shares = []
    for day in _days():
        rows = store.rows("traffic", day)
        products = Counter(row[SLICE_FIELD] for row in rows)
        share = sum(products[p] for p in new) / len(rows)
        shares.append(share)
        assert share == pytest.approx(drift_fraction(day, DRIFT), abs=0.01)
        assert all(products[p] > 0 for p in PRODUCTS_ORIGINAL)
        labelled = Counter(row[SLICE_FIELD] for row in store.rows("labelled", day))
        assert sum(labelled[p] for p in new) == pytest.approx(share * 60, abs=1)  # stratified sample
    before = [s for d, s in zip(_days(), shares, strict=True) if d < DRIFT]
    after = [s for d, s in zip(_days(), shares, strict=True) if d >= DRIFT]
    assert before and not any(before)
    assert after == sorted(after) and after[0] > 0 and after[-1] >= 0.45
    assert summary["drift_fraction"][DRIFT.isoformat()] > 0
    # The new product speaks its own vocabulary, absent before the drift.
    old = " ".join(t for d in _days() if d < DRIFT for r in store.rows("traffic", d) for t in _user_texts(r))
    fresh = " ".join(t for d in _days() for r in store.rows("traffic", d) if r[SLICE_FIELD] in new for t in _user_texts(r))
    for word in ("orbit", "watch", "puck", "strap"):
        assert word in fresh.lower() and word not in old.lower()


def test_no_drift_without_drift_start() -> None:
    store, summary = _world(days=3, drift_start=None)
    assert not any(summary["traffic_rows"][p] for p in PRODUCTS_DRIFTED)
    assert set(summary["drift_fraction"].values()) == {0.0}


def test_bad_rows_of_every_kind_are_really_defective() -> None:
    store, summary = _world(days=4, bad_row_rate=0.2)
    assert all(summary["bad_rows"][kind] >= 1 for kind in BAD_ROW_KINDS)
    seen: Counter[str] = Counter()
    for day in _days(4):
        lines = store.lines("labelled", day)
        assert len(lines) == 60
        counts = Counter(lines)
        kinds = [_defect(line, counts) for line in lines]
        # A duplicate shows twice (copy and original); one of the pair is the defect.
        seen.update(kind for kind in kinds if kind not in (None, "duplicate_id"))
        seen["duplicate_id"] += sum(n - 1 for line, n in counts.items() if n > 1 and line)
        for line, kind in zip(lines, kinds, strict=True):
            if kind is None:
                _check_conversation(json.loads(line)["messages"], answered=True)
    assert dict(seen) == {kind: n for kind, n in summary["bad_rows"].items() if n}
    assert sum(summary["bad_rows"].values()) == 4 * 12
    assert sum(summary["labelled_rows"].values()) == 4 * 48


def test_heldout_sets_per_product_disjoint_from_daily_rows(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    store, _ = world
    sets = heldout_sets(0, n_per_slice=40)
    assert list(sets) == list(PRODUCTS) and all(len(rows) == 40 for rows in sets.values())
    assert sets == heldout_sets(0, n_per_slice=40) and sets != heldout_sets(1, n_per_slice=40)
    daily = {row["id"] for day in _days() for prefix in ("traffic", "labelled") for row in store.rows(prefix, day)}
    held = [row for rows in sets.values() for row in rows]
    assert len({row["id"] for row in held}) == len(held) and not daily & {row["id"] for row in held}
    daily_texts = {"\n".join(_user_texts(row)) for day in _days() for row in store.rows("traffic", day)}
    # Same distribution, other draws: a few short tickets may coincide, most do not.
    assert sum("\n".join(_user_texts(row)) in daily_texts for row in held) < 0.1 * len(held)
    for product, rows in sets.items():
        for row in rows:
            assert row[SLICE_FIELD] == product and row["id"].startswith(f"heldout-{product}-")
            assert row["labelled_at"] == "2026-01-01T00:00:00Z" == HELDOUT_LABELLED_AT.strftime("%Y-%m-%dT%H:%M:%SZ")
            _check_conversation(row["messages"], answered=True)
        assert len({label_of(row) for row in rows}) >= 5


def test_make_ticket_and_traffic_record_are_pure() -> None:
    ts = datetime(2026, 3, 15, 14, 5, 9)
    for product in PRODUCTS:
        ticket = make_ticket(random.Random(f"t|{product}"), product, "tkt-x")
        assert ticket == make_ticket(random.Random(f"t|{product}"), product, "tkt-x")
        assert "labelled_at" not in ticket and ticket["id"] == "tkt-x"
        request = make_traffic_record(random.Random(f"t|{product}"), product, "tkt-x", ts)
        assert request["ts"] == "2026-03-15T14:05:09Z" and request["messages"] == ticket["messages"][:-1]
    with pytest.raises(ValueError, match="unknown product"):
        make_ticket(random.Random(0), "toaster")


def test_write_ticket_files_writes_the_counts_asked(tmp_path: Path) -> None:
    summary = write_ticket_files(tmp_path, seed=3, n_train=50, n_eval=20, drifted_share=0.4, bad_rows=14)
    train = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    evals = (tmp_path / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    bad = (tmp_path / "bad.jsonl").read_text(encoding="utf-8").splitlines()
    assert (len(train), len(evals), len(bad)) == (50, 20, 14)
    assert summary["files"] == {"train.jsonl": 50, "eval.jsonl": 20, "bad.jsonl": 14}
    assert summary["bad_rows"] == dict.fromkeys(BAD_ROW_KINDS, 2)
    for lines, n in ((train, 50), (evals, 20)):
        rows = [json.loads(line) for line in lines]
        for row in rows:
            _check_conversation(row["messages"], answered=True)
        products = Counter(row[SLICE_FIELD] for row in rows)
        assert sum(products[p] for p in PRODUCTS_DRIFTED) == round(n * 0.4)
        assert all(products[p] for p in PRODUCTS_ORIGINAL)
    ids = {json.loads(line)["id"] for line in train + evals}
    assert len(ids) == 70
    counts = Counter(bad + train)  # a duplicate_id line copies a train line
    assert all(_defect(line, counts) is not None for line in bad)
    assert Counter(_defect(line, counts) for line in bad) == dict.fromkeys(BAD_ROW_KINDS, 2)
    again = tmp_path / "again"
    write_ticket_files(again, seed=3, n_train=50, n_eval=20, drifted_share=0.4, bad_rows=14)
    assert all((again / n).read_bytes() == (tmp_path / n).read_bytes() for n in summary["files"])
    plain = tmp_path / "plain"
    assert write_ticket_files(plain, n_train=5, n_eval=3)["files"] == {"train.jsonl": 5, "eval.jsonl": 3}
    assert not (plain / "bad.jsonl").exists()


def test_arguments_are_checked() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError, match="days"):
        generate_ticket_world(store, START, -1)
    with pytest.raises(ValueError, match="exceeds"):
        generate_ticket_world(store, START, 1, traffic_per_day=10, labelled_per_day=11)
    with pytest.raises(ValueError, match="bad_row_rate"):
        generate_ticket_world(store, START, 1, bad_row_rate=1.0)
    assert not store.objects


def test_labels_are_learnable_from_the_text(world: tuple[MemoryStore, dict[str, Any]]) -> None:
    """A bag-of-words naive Bayes, fitted on the daily rows, labels the held-out tickets well:
    the label is in the words (a LoRA can learn it), not in chance or the product."""
    store, _ = world
    train = [row for day in _days() for row in store.rows("labelled", day)]

    def words(row: dict[str, Any]) -> list[str]:
        return re.findall(r"[a-z_']+", " ".join(_user_texts(row)).lower())

    counts: dict[str, Counter[str]] = {label: Counter() for label in LABELS}
    priors = Counter(label_of(row) for row in train)
    for row in train:
        counts[label_of(row)].update(words(row))
    vocabulary = set().union(*counts.values())

    def predict(row: dict[str, Any]) -> str:
        def score(label: str) -> float:
            total = sum(counts[label].values()) + len(vocabulary)
            return math.log(priors[label]) + sum(math.log((counts[label][w] + 1) / total) for w in words(row))

        return max(LABELS, key=score)

    for product, rows in heldout_sets(0, n_per_slice=60).items():
        accuracy = sum(predict(row) == label_of(row) for row in rows) / len(rows)
        assert accuracy >= 0.8, (product, accuracy)


def test_example_config_matches_the_generator() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    task = config["task"]
    assert task["format"] == "messages" and task["metric"] == "label"
    assert task["system_prompt"] == SYSTEM_PROMPT
    assert tuple(task["labels"]) == LABELS
    assert task["slice_field"] == SLICE_FIELD
    assert config["gate"]["improve_slices"] == ["auto"]
    assert config["eval"]["injection_set"] is None
