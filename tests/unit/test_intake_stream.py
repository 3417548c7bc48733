"""Bounded-memory intake (intake/stream.py): checked chunk by chunk, a batch gives exactly what
the whole-batch checks give -- the same accepted rows, the same quarantine reasons and matched
rows, the same snapshot hash -- for two tasks of different kinds, with duplicates, near-duplicates
and eval leaks placed across chunk boundaries."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config import TaskSettings
from tuneloop.intake.checks import IntakeOptions, run_intake_checks
from tuneloop.intake.expectations import ExpectationsFileError, QualitySuite, run_quality_gate
from tuneloop.intake.pull import is_eval_id, pull_snapshot
from tuneloop.intake.rows import check_lines
from tuneloop.intake.stream import IdHashes, run_intake
from tuneloop.storage import LocalStore
from tuneloop.tasks import TaskSpec

pytestmark = pytest.mark.unit

TICKETS = TaskSpec(TaskSettings(format="messages", metric="label", labels=["billing", "bug", "account"], slice_field="product", system_prompt="Label it."))
CATALOG = TaskSpec(
    TaskSettings(
        format="prompt_completion", metric="json", slice_field="shop",
        json_schema={"type": "object", "properties": {"sku": {"type": "string"}, "price": {"type": "number"}}, "required": ["sku", "price"]},
    )
)
WORDS = "order refund login crash export invoice shipping delay password account billing team mobile sync report".split()


def _text(rng: random.Random, n: int = 14) -> str:
    """Words of a small vocabulary with made-up ones between: rows share words, rarely shingles."""
    return " ".join(rng.choice(WORDS) if i % 2 else "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)) for i in range(n))


def _row(kind: str, row_id: str, text: str, rng: random.Random, **extra: Any) -> dict[str, Any]:
    if kind == "tickets":
        turns = [{"role": "user", "content": text}, {"role": "assistant", "content": rng.choice(["billing", "bug", "account"])}]
        return {"id": row_id, "messages": turns, "product": rng.choice(["app", "web"]), **extra}
    answer = json.dumps({"sku": f"S-{row_id}", "price": rng.randrange(1000) / 10})
    return {"id": row_id, "prompt": text, "completion": answer, "shop": rng.choice(["eu", "us"]), **extra}


def _lines(kind: str, n: int = 90, seed: int = 0) -> tuple[list[bytes], list[dict[str, Any]]]:
    """``n`` good rows of ``kind``, with near-duplicates of earlier rows, a repeated id, rows that
    copy an eval row, broken lines, a card number and a disagreeing label spread through the
    file (so that chunks of 7 rows split every pair); and the stored eval rows."""
    rng = random.Random(f"{kind}|{seed}")
    rows = [_row(kind, f"{kind[0]}{i:03d}", _text(rng), rng) for i in range(n)]
    evals = [_row(kind, f"e{i}", _text(rng), rng) for i in range(5)]
    lines = [json.dumps(r).encode() for r in rows]
    text_of = (lambda r: r["messages"][0]["content"]) if kind == "tickets" else (lambda r: r["prompt"])
    inserts = [
        (60, _row(kind, "near-of-3", text_of(rows[3]) + " thanks", rng)),       # near-duplicate of a row 9 chunks back
        (45, _row(kind, "leak-of-e2", text_of(evals[2]), rng)),                 # copies a stored eval row
        (80, {**rows[10], "shop": "eu"} if kind == "catalog" else {**rows[10]}),  # the id of row 10 again
        (30, _row(kind, "card", "paid with 4539 1488 0343 6467 " + _text(rng), rng)),
        (50, _row(kind, "odd-labels", _text(rng), rng, labels=["nonsense-label"])),
    ]
    for position, row in sorted(inserts, key=lambda item: -item[0]):
        lines.insert(position, json.dumps(row).encode())
    for position, raw in ((5, b"{not json"), (25, b'"a string"'), (70, b"")):
        lines.insert(position, raw)
    # a training-side row copying one of the batch's own eval side (a near-duplicate first)
    eval_side = next(r for r in rows if is_eval_id(r["id"], 0.2))
    train_copy = next(i for i in range(1000) if not is_eval_id(f"copy{i}", 0.2))
    lines.append(json.dumps(_row(kind, f"copy{train_copy}", text_of(eval_side), rng)).encode())
    return lines, evals


def _reference(
    lines: list[bytes], spec: TaskSpec, evals: list[dict[str, Any]], options: IntakeOptions
) -> tuple[list[str], dict[int, tuple[list[str], str | None]]]:
    """The whole-batch path: check_lines + run_intake_checks + run_quality_gate in memory."""
    batch = check_lines((("f.jsonl", n, raw) for n, raw in enumerate(lines, 1)), spec)
    intake = run_intake_checks(batch, options, spec, eval_records=evals, is_eval=lambda i: is_eval_id(i, 0.2))
    run_quality_gate(batch, max_quarantine_rate=1, min_accepted_rows=1, spec=spec, intake=intake)
    accepted = [str(spec.row_id(r)) for r in batch.accepted]
    return accepted, {q.line: (q.reasons, q.matched_id) for q in batch.quarantined}


def _streamed(
    lines: list[bytes], spec: TaskSpec, evals: list[dict[str, Any]], options: IntakeOptions, workdir: Path, chunk_rows: int
) -> tuple[list[str], dict[int, tuple[list[str], str | None]], Any]:
    suite = QualitySuite(spec=spec, intake_ran=True)
    run = run_intake(
        (("f.jsonl", n, raw) for n, raw in enumerate(lines, 1)), spec, workdir, options=options, eval_records=iter(evals),
        is_eval=lambda i: is_eval_id(i, 0.2), quality=suite, chunk_rows=chunk_rows,
    )
    accepted = [str(spec.row_id(record)) for record, _, _ in run.iter_accepted(order="input")]
    quarantined = {q["line"]: (q["reasons"], q.get("matched_id")) for q in run.iter_quarantined()}
    return accepted, quarantined, run


@pytest.mark.parametrize("kind,spec", [("tickets", TICKETS), ("catalog", CATALOG)])
@pytest.mark.parametrize("chunk_rows", [7, 32, 10_000])
def test_chunked_intake_finds_what_the_whole_batch_checks_find(kind: str, spec: TaskSpec, chunk_rows: int, tmp_path: Path) -> None:
    lines, evals = _lines(kind)
    want_accepted, want_quarantined = _reference(lines, spec, evals, IntakeOptions())
    accepted, quarantined, run = _streamed(lines, spec, evals, IntakeOptions(), tmp_path / "spill", chunk_rows)
    assert accepted == want_accepted
    assert quarantined == want_quarantined
    reasons = {tuple(r) for r, _ in quarantined.values()}
    for expected in ("near_duplicate", "eval_leakage", "duplicate_id", "not_json", "not_an_object", "empty_line", "label_disagreement", "pii:card_number"):
        assert (expected,) in reasons, (expected, reasons)
    matched = sorted((r[0], m) for r, m in quarantined.values() if m)
    assert ("near_duplicate", f"{kind[0]}003") in matched and ("eval_leakage", "e2") in matched
    assert run.total == len(lines) == run.accepted + run.quarantined
    assert run.chunks == -(-len(lines) // chunk_rows)
    assert [p.name for p in (tmp_path / "spill").iterdir() if "spill" in p.name] == []  # the spill files are gone


@pytest.mark.parametrize("chunk_rows", [7, 10_000])
def test_with_near_duplicates_off_a_copy_of_the_batchs_own_eval_row_leaks(chunk_rows: int, tmp_path: Path) -> None:
    lines, evals = _lines("tickets")
    options = IntakeOptions(near_duplicate_jaccard=None)
    want_accepted, want_quarantined = _reference(lines, TICKETS, evals, options)
    accepted, quarantined, _ = _streamed(lines, TICKETS, evals, options, tmp_path / "spill", chunk_rows)
    assert (accepted, quarantined) == (want_accepted, want_quarantined)
    leaks = sorted(m for r, m in quarantined.values() if r == ["eval_leakage"])
    assert "e2" in leaks and any(m.startswith("t") for m in leaks)  # a stored eval row, and one of this batch


def test_the_snapshot_is_the_same_whatever_the_chunk_size(tmp_path: Path) -> None:
    lines, evals = _lines("catalog", n=60)
    hashes = set()
    for chunk_rows in (5, 17, 100_000):
        store = LocalStore(tmp_path / f"store{chunk_rows}")
        store.put_bytes("heldout/original.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in evals))
        half = len(lines) // 2
        store.put_bytes("labelled/dt=2026-01-01/a.jsonl", b"\n".join(lines[:half]) + b"\n")
        store.put_bytes("labelled/dt=2026-01-02/b.jsonl", b"\r\n".join(lines[half:]))
        result = pull_snapshot(store, spec=CATALOG, eval_fraction=0.2, checks=IntakeOptions(), chunk_rows=chunk_rows)
        hashes.add(result["snapshot"])
        counts = result["counts"]
        assert counts["train"] + counts["eval"] + counts["quarantined"] == counts["total"] == len(lines)
        train = [json.loads(x)["id"] for x in store.get_text(f"snapshots/{result['snapshot']}/train.jsonl").splitlines()]
        assert train == sorted(train)
    assert len(hashes) == 1


def test_a_repeated_id_is_found_however_far_back_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IdHashes, "FLUSH_AT", 3)  # most ids sit in the sorted array, not the recent set
    rng = random.Random(1)
    rows = [_row("tickets", f"t{i}", _text(rng), rng) for i in range(40)]
    lines = [json.dumps(r).encode() for r in rows] + [json.dumps({**rows[0], "product": "web"}).encode(), json.dumps(rows[39]).encode()]
    run = run_intake((("f", n, raw) for n, raw in enumerate(lines, 1)), TICKETS, tmp_path, chunk_rows=4)
    assert [(q["line"], q["reasons"]) for q in run.iter_quarantined()] == [(41, ["duplicate_id"]), (42, ["duplicate_id"])]
    assert [record["id"] for record, _, _ in run.iter_accepted()] == sorted(r["id"] for r in rows)


def test_a_batch_level_expectation_fails_on_the_chunk_it_fails_on(tmp_path: Path) -> None:
    """Row-level expectations mark the same rows in any chunking; a batch-level one (here a
    mean) is judged per chunk and its failure names the chunk."""
    rng = random.Random(2)
    rows = [_row("catalog", f"c{i:02d}", _text(rng), rng, stars=5 if i < 20 else 1) for i in range(30)]
    suite_file = tmp_path / "suite.json"
    suite_file.write_text(json.dumps({"expectations": [
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "stars", "min_value": 3, "max_value": 5}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "shop", "value_set": ["eu"]}},
    ]}))
    suite = QualitySuite(spec=CATALOG, expectations_file=str(suite_file))
    run = run_intake((("f", n, json.dumps(r).encode()) for n, r in enumerate(rows, 1)), CATALOG, tmp_path / "spill", quality=suite, chunk_rows=10)
    report = suite.report(total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=1, min_accepted_rows=1)
    assert not report.passed
    assert [f for f in report.failures if "mean" in f] == [
        "expectation expect_column_mean_to_be_between(stars) failed on the batch (rows 21..30 of those that passed the intake checks): observed 1.0"
    ]
    us_rows = {r["id"] for r in rows if r["shop"] == "us"}
    assert {json.loads(q["raw"])["id"] for q in run.iter_quarantined()} == us_rows
    assert report.validation_result["success"] is False and len(report.validation_result["chunks"]) == 3


def test_an_expectation_on_a_column_no_row_has_is_refused_and_one_some_chunks_lack_is_not(tmp_path: Path) -> None:
    rng = random.Random(3)
    rows = [_row("tickets", f"t{i}", _text(rng), rng, **({"team": "ops"} if i >= 8 else {})) for i in range(12)]
    for column, refused in (("team", False), ("teem", True)):
        suite_file = tmp_path / f"{column}.json"
        suite_file.write_text(json.dumps({"expectations": [{"type": "expect_column_values_to_be_in_set", "kwargs": {"column": column, "value_set": ["ops"]}}]}))
        suite = QualitySuite(spec=TICKETS, expectations_file=str(suite_file))
        run = run_intake((("f", n, json.dumps(r).encode()) for n, r in enumerate(rows, 1)), TICKETS, tmp_path / column, quality=suite, chunk_rows=4)
        if refused:
            with pytest.raises(ExpectationsFileError, match="names column 'teem', which no row has"):
                suite.report(total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=1, min_accepted_rows=1)
        else:
            assert suite.report(total=run.total, accepted=run.accepted, reasons=run.reasons, max_quarantine_rate=1, min_accepted_rows=1).passed


def test_the_performance_sample_is_the_lowest_id_hashes_whatever_the_chunks(tmp_path: Path) -> None:
    import hashlib

    from tuneloop.intake.pull import plan_pull, read_batch, sample_accepted

    lines, _ = _lines("tickets", n=50)
    store = LocalStore(tmp_path)
    store.put_bytes("labelled/dt=2026-01-01/a.jsonl", b"\n".join(lines) + b"\n")
    plan = plan_pull(store)
    everything = read_batch(store, plan, TICKETS).accepted
    want = sorted(everything, key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())[:12]
    for chunk_rows in (4, 1000):
        assert sample_accepted(store, plan, TICKETS, 12, chunk_rows=chunk_rows) == (len(everything), want)


def test_row_blocks_read_rows_and_columns_across_parts_without_copying_them() -> None:
    import numpy as np

    from tuneloop.intake.similarity import RowBlocks

    a = np.arange(12, dtype=np.uint32).reshape(4, 3)
    b = np.arange(100, 115, dtype=np.uint32).reshape(5, 3)
    blocks = RowBlocks([(a, None), (b, np.array([4, 0]))]) + RowBlocks.of(np.zeros((1, 3), dtype=np.uint32))
    whole = np.concatenate((a, b[[4, 0]], np.zeros((1, 3), dtype=np.uint32)))
    assert len(blocks) == 7 and blocks.width == 3
    assert blocks.column(1).tolist() == whole[:, 1].tolist()
    at = np.array([6, 5, 0, 4, 3])
    assert blocks.rows(at).tolist() == whole[at].tolist()
    assert blocks.nonzero_rows().tolist() == [True, True, True, True, True, True, False]


def test_the_summary_of_a_chunked_run_keeps_the_token_bound_and_sums_the_counts(tmp_path: Path) -> None:
    rng = random.Random(4)
    rows = [_row("tickets", f"t{i}", _text(rng), rng, **({"labels": ["bug", "billing"]} if i % 5 == 0 else {})) for i in range(30)]
    run = run_intake((("f", n, json.dumps(r).encode()) for n, r in enumerate(rows, 1)), TICKETS, tmp_path, options=IntakeOptions(max_tokens=999), chunk_rows=7)
    assert run.intake is not None
    summary = run.intake.summary()
    assert summary["tokens"]["max_tokens"] == 999 and summary["rows_checked"] == 30
    assert summary["labels"]["multi_labelled_rows"] == 6 and summary["quarantined"]["label_disagreement"] == 6


def test_a_row_a_check_changed_is_spilled_as_changed_and_the_rest_verbatim(tmp_path: Path) -> None:
    """Spilled rows are the input's own bytes (a BOM dropped), except where a check changed the
    record: data.pii=redact masks an e-mail, and the accepted row carries the mask."""
    rng = random.Random(5)
    rows = [_row("catalog", f"c{i}", _text(rng), rng) for i in range(9)]
    rows[4]["prompt"] = "write to jane.doe@example.com about " + _text(rng)
    lines = [json.dumps(r, indent=None, separators=(", ", ":")).encode() for r in rows]
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    lines[7] = b'{  "id":"c7",\t"prompt": "tabs\\tand spaces", "completion": "{\\"sku\\": \\"S\\", \\"price\\": 1}", "shop": "eu"}'
    run = run_intake((("f", n, raw) for n, raw in enumerate(lines, 1)), CATALOG, tmp_path, options=IntakeOptions(pii="redact"), chunk_rows=4)
    accepted = {record["id"]: record for record, _, _ in run.iter_accepted()}
    assert len(accepted) == 9 and run.quarantined == 0
    assert accepted["c4"]["prompt"].startswith("write to [EMAIL] about ")
    assert accepted["c7"]["prompt"] == "tabs\tand spaces" and accepted["c0"] == rows[0]
