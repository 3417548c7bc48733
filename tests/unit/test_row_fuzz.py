"""Hostile input through the row checks: thousands of generated lines (lone surrogates, JSON
nested 30,000 deep, NUL, BOM, every line end, duplicate keys, 1e999, 5,000-digit integers,
control and bidi-override characters, random bytes) mixed with valid rows, for a
prompt/completion JSON task and a chat label task. No line may raise, none may be lost or
counted twice, and every valid row must come through."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import pytest

from tuneloop.config import TaskSettings
from tuneloop.intake.rows import check_line, check_lines, iter_lines, split_lines
from tuneloop.tasks import TaskSpec

pytestmark = pytest.mark.unit

CATALOG_SCHEMA = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "minLength": 1},
        "price": {"type": "number", "minimum": 0},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sku", "price", "in_stock", "tags"],
    "additionalProperties": False,
}
LABELS = ["billing", "bug", "account", "other"]
JSON_SPEC = TaskSpec(TaskSettings(format="prompt_completion", metric="json", json_schema=CATALOG_SCHEMA, slice_field="shop", max_prompt_chars=20_000))
CHAT_SPEC = TaskSpec(TaskSettings(format="messages", metric="label", labels=LABELS, slice_field="product", system_prompt="Label the ticket."))
SPECS = {"prompt_completion/json": JSON_SPEC, "messages/label": CHAT_SPEC}

HOSTILE_LINES = 6_000
VALID_ROWS = 600
# Line ends the file may use between records (LS/PS are not among them: JSON allows them raw in strings).
LINE_ENDS = [b"\n", b"\r\n", b"\r"]
ODD_CHARS = [
    "\u0000", "\u0001", "\u0007", "\u001b", "\u007f", "\u0085", "\u2028", "\u2029", "\ufeff", "\u200b",
    "\u202e", "\u202d", "\u2066", "\u2069", "\u061c", "\ufffd", "\U0001f600", "e\u0301", "\t",
]  # fmt: skip


def _odd_text(rng: random.Random, n: int = 12) -> str:
    """Legal text full of characters that break naive tools: controls, bidi overrides, LS/PS, BOM."""
    return "".join(rng.choice([*ODD_CHARS, "a", "b", " ", "ü", "Я", "中"]) for _ in range(n))


def _valid_row(spec_name: str, index: int, rng: random.Random) -> dict[str, Any]:
    """A row the task must accept, often carrying odd but legal characters."""
    text = f"request {index}: " + (_odd_text(rng) if index % 2 else "plain words here")
    if spec_name == "prompt_completion/json":
        answer = {"sku": f"SKU-{index}", "price": rng.randint(0, 99_999) / 100, "in_stock": bool(index % 3), "tags": [_odd_text(rng, 4)]}
        return {"id": f"ok-{index}", "prompt": text, "completion": json.dumps(answer, ensure_ascii=index % 4 == 0), "shop": rng.choice(["eu", "us", None])}
    turns = [{"role": "user", "content": text}, {"role": "assistant", "content": rng.choice(LABELS)}]
    if index % 3 == 0:
        turns.insert(0, {"role": "system", "content": "Label the ticket: " + _odd_text(rng, 5)})
    return {"id": index if index % 5 == 0 else f"ok-{index}", "messages": turns, "product": rng.choice(["app", "web"])}


def _valid_bytes(row: dict[str, Any], rng: random.Random) -> bytes:
    raw = json.dumps(row, ensure_ascii=rng.random() < 0.5).encode("utf-8")
    if rng.random() < 0.2:
        raw = b"  " + raw + b" \t"
    if rng.random() < 0.2:
        raw = "\ufeff".encode() + raw  # a byte-order mark from an editor, before anything else
    return raw


def _row_like(spec_name: str, rng: random.Random) -> dict[str, Any]:
    """A plausible row of the task, to be damaged."""
    if spec_name == "prompt_completion/json":
        return {"id": f"h-{rng.random()}", "prompt": "p " + _odd_text(rng), "completion": '{"sku": "x", "price": 1, "in_stock": true, "tags": []}'}
    return {"id": f"h-{rng.random()}", "messages": [{"role": "user", "content": _odd_text(rng)}, {"role": "assistant", "content": "bug"}]}


def _hostile(spec_name: str, rng: random.Random, index: int) -> bytes:
    """One hostile line (it may hold raw CR/LF itself: then it is several records)."""
    kind = index % 24
    row = _row_like(spec_name, rng)
    deep = rng.choice([30_000, 5_000, 990])
    if kind == 0:
        return rb'{"id": "s1", "prompt": "lone \ud800 surrogate", "completion": "{}"}'
    if kind == 1:
        return b'{"id": "s2", "messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "bug"}]}'
    if kind == 2:
        return b"[" * deep + b"]" * deep  # nested 30,000 deep (under the 64 KiB line bound)
    if kind == 3:
        body = "[" * deep + "1" + "]" * deep
        return json.dumps({**row, "completion": body, "deep": None}).encode()[:60_000]
    if kind == 4:
        return json.dumps({**row, "completion": '{"sku": ' + "[" * 2_000 + "]" * 2_000 + "}"}).encode()
    if kind == 5:
        return b'{"id": "n1", "prompt": "nul \x00 raw", "completion": "{}"}'  # a raw NUL: invalid JSON
    if kind == 6:
        return json.dumps({**row, "prompt": "escaped nul \u0000 " + _odd_text(rng)}).encode()
    if kind == 7:
        return b"\xef\xbb\xbf" * rng.randint(1, 3) + json.dumps(row).encode()  # one BOM, or several
    if kind == 8:
        return json.dumps(row).encode().replace(b'"id"', b'"id": "dup", "id"', 1)  # duplicate keys
    if kind == 9:
        return json.dumps(row).encode()[:-1] + b', "price": 1e999}'
    if kind == 10:
        return json.dumps({**row, "completion": '{"sku": "x", "price": 1e999, "in_stock": true, "tags": []}'}).encode()
    if kind == 11:
        return json.dumps(row).encode()[:-1] + b', "n": ' + b"9" * 5_000 + b"}"  # a 5,000-digit integer
    if kind == 12:
        return json.dumps({**row, "completion": '{"sku": "x", "price": ' + "7" * 5_000 + ', "in_stock": true, "tags": []}'}).encode()
    if kind == 13:
        return json.dumps({**row, "id": _odd_text(rng, 6)}, ensure_ascii=False).encode()  # control/bidi id
    if kind == 14:
        return "".join(rng.choice(ODD_CHARS) for _ in range(rng.randint(1, 40))).encode("utf-8", "surrogatepass")
    if kind == 15:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))  # byte soup
    if kind == 16:
        raw = bytearray(json.dumps(row).encode())
        for _ in range(rng.randint(1, 5)):  # flip bytes of an otherwise good row
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
        return bytes(raw)
    if kind == 17:
        cut = json.dumps(row).encode()
        return cut[: rng.randrange(len(cut))]  # truncated
    if kind == 18:
        return rng.choice([b"NaN", b"null", b"1", b'"row"', b"true", b"[]", b"{}", b"-Infinity", b'{"id": null}'])
    if kind == 19:
        wrong = rng.choice([{"id": []}, {"id": True}, {"id": "x", "prompt": ["a"]}, {"id": "x", "messages": "hi"},
                            {"id": "x", "messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "bug"}]},
                            {"id": "x", "messages": [{"role": "user", "content": "x"}]},
                            {"id": "x", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]},
                            {"id": "x", "prompt": "x", "completion": "Sure! {\"sku\": \"x\"}"},
                            {"id": "x", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "not-a-label"}]},
                            {"id": "x", "labels": {"a": 1}}])  # fmt: skip
        return json.dumps({**row, **wrong}).encode()
    if kind == 20:
        return json.dumps({**row, "prompt": "x" * 25_000, "messages": row.get("messages") and [{"role": "user", "content": "y" * 25_000}, {"role": "assistant", "content": "bug"}]}).encode()
    if kind == 21:
        return b"x" * 70_000  # over the line bound
    if kind == 22:
        return json.dumps(row).encode().replace(b'"', b"\xe2\x80\x9c", 2)  # typographic quotes
    return "".join(chr(rng.choice([0x202E, 0x2066, 0x200F, 0x0007, 0x2028, 0x2029, 0xFEFF, 0x41])) for _ in range(30)).encode()


def _file(spec_name: str, seed: int) -> tuple[bytes, set[str]]:
    """A batch file: hostile lines with valid rows mixed in, joined by mixed line ends."""
    rng = random.Random(f"fuzz|{spec_name}|{seed}")
    pieces: list[bytes] = []
    valid_ids: set[str] = set()
    valid_at = set(rng.sample(range(HOSTILE_LINES + VALID_ROWS), VALID_ROWS))
    hostile = valid = 0
    for position in range(HOSTILE_LINES + VALID_ROWS):
        if position in valid_at:
            row = _valid_row(spec_name, valid, rng)
            valid += 1
            valid_ids.add(str(row["id"]))
            pieces.append(_valid_bytes(row, rng))
        else:
            pieces.append(_hostile(spec_name, rng, hostile))
            hostile += 1
        pieces.append(rng.choice(LINE_ENDS))
    if rng.random() < 0.5:
        pieces.pop()  # no line end after the last record
    return b"".join(pieces), valid_ids


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_hostile_lines_never_raise_and_every_line_is_counted_once(spec_name: str) -> None:
    spec = SPECS[spec_name]
    data, valid_ids = _file(spec_name, seed=0)
    lines = split_lines(data)
    assert len(lines) >= HOSTILE_LINES + VALID_ROWS  # byte soup may hold line ends of its own
    assert list(iter_lines(io.BytesIO(data), chunk_bytes=4_093)) == lines  # streaming splits the same way

    batch = check_lines((("fuzz.jsonl", number, raw) for number, raw in enumerate(lines, 1)), spec)

    assert batch.total == len(lines)
    assert len(batch.accepted) + len(batch.quarantined) == batch.total
    assert len(batch.origins) == len(batch.accepted)
    accepted_ids = {str(spec.row_id(record)) for record in batch.accepted}
    assert len(accepted_ids) == len(batch.accepted)  # ids stay unique
    missing = valid_ids - accepted_ids
    assert not missing, [(q.reasons, q.raw[:120]) for q in batch.quarantined if any(f'"{i}"' in q.raw for i in list(missing)[:3])]
    assert all(q.reasons for q in batch.quarantined)
    assert {q.line for q in batch.quarantined}.isdisjoint(number for _, number in batch.origins)
    # every accepted row reads through the task and can be written back out
    for record in batch.accepted:
        example = spec.example(record)
        assert example.target is not None and not spec.check_target(example.target)
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    for row in batch.quarantined:
        json.dumps(row.to_json(), ensure_ascii=False).encode("utf-8")  # the quarantine file can be written
    reasons = batch.reasons
    for expected in ("not_json", "not_utf8", "line_too_large", "duplicate_key", "bad_unicode", "not_an_object"):
        assert reasons.get(expected), (expected, reasons)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_each_hostile_kind_alone_is_quarantined_or_read_without_raising(spec_name: str) -> None:
    spec = SPECS[spec_name]
    rng = random.Random(f"kinds|{spec_name}")
    for index in range(24 * 20):
        raw = _hostile(spec_name, rng, index)
        for line in split_lines(raw) or [raw]:
            record, reasons = check_line(line, spec)
            assert (record is None) == bool(reasons), (index % 24, reasons)
            assert all(isinstance(reason, str) and reason for reason in reasons)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (rb'{"id": "a", "prompt": "x \ud800", "completion": "{}"}', "bad_unicode"),
        (b"[" * 30_000 + b"]" * 30_000, "not_json"),
        (b'{"id": "a", "id": "b", "prompt": "x", "completion": "{}"}', "duplicate_key"),
        (b'{"id": "a", "prompt": "x", "completion": "{}", "n": 1e999}', "not_json"),
        (b'{"id": "a", "prompt": "x", "completion": "{}", "n": ' + b"1" * 5_000 + b"}", "not_json"),
        (b'{"id": "a", "prompt": "x\x00", "completion": "{}"}', "not_json"),
        (b"\xff\xfe{}", "not_utf8"),
        (b"\xef\xbb\xbf", "empty_line"),
    ],
)
def test_named_hostile_lines_get_their_reason(raw: bytes, reason: str) -> None:
    assert check_line(raw, JSON_SPEC) == (None, [reason])


def test_a_gold_answer_with_an_overflowing_number_is_refused() -> None:
    """1e999 is refused in the row itself (it overflows to infinity); inside the gold JSON answer
    it must be refused too: the scorer cannot compare infinity and the model would learn it."""
    answer = '{"sku": "s", "price": 1e999, "in_stock": true, "tags": []}'
    raw = json.dumps({"id": "a", "prompt": "x", "completion": answer}).encode()
    record, reasons = check_line(raw, JSON_SPEC)
    assert record is None, "a gold answer holding 1e999 (infinity) was accepted"
    assert reasons and all(r.startswith(("completion_", "row_check_error:")) for r in reasons), reasons


@pytest.mark.parametrize(
    ("data", "records"),
    [
        (b"a\nb\r\nc\rd", [b"a", b"b", b"c", b"d"]),
        (b"a\r\n", [b"a"]),
        (b"a\n\nb", [b"a", b"", b"b"]),
        (b"a\r\rb", [b"a", b"", b"b"]),
        ("a\u2028b\u2029c\n".encode(), ["a\u2028b\u2029c".encode()]),  # LS/PS end no record
        (b"", []),
    ],
)
def test_split_lines_and_the_stream_agree_on_every_line_end(data: bytes, records: list[bytes]) -> None:
    assert split_lines(data) == records
    for chunk in (1, 2, 3, 1 << 20):  # a CRLF split across reads is still one line end
        assert list(iter_lines(io.BytesIO(data), chunk_bytes=chunk)) == records


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_the_hostile_file_through_the_chunked_intake_loses_nothing(spec_name: str, tmp_path: Any) -> None:
    """The same file through every check (row checks, intake checks, the GX suite) in chunks of
    777 lines: nothing raises, each line is accepted or quarantined once, with a reason."""
    from tuneloop.intake.checks import IntakeOptions
    from tuneloop.intake.expectations import QualitySuite
    from tuneloop.intake.stream import run_intake

    spec = SPECS[spec_name]
    data, _ = _file(spec_name, seed=1)
    stream = (("fuzz.jsonl", number, raw) for number, raw in enumerate(iter_lines(io.BytesIO(data), chunk_bytes=65_521), 1))
    run = run_intake(stream, spec, tmp_path, options=IntakeOptions(), quality=QualitySuite(spec=spec, intake_ran=True), chunk_rows=777)
    accepted = list(run.iter_accepted())
    quarantined = list(run.iter_quarantined())
    assert run.total == len(split_lines(data)) == len(accepted) + len(quarantined)
    assert sorted([line for _, _, line in accepted] + [q["line"] for q in quarantined]) == list(range(1, run.total + 1))
    assert all(q["reasons"] for q in quarantined) and accepted
