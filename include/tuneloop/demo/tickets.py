"""The support-ticket world: seeded triage conversations that drift to a newly launched product.

A second demo task, unlike the invoices in every way that matters to the loop: rows are
multi-turn chat ``messages`` (OpenAI/TRL shape), the answer is one label out of a closed set
(``metric: label``), and the slices are products (``product``), not domains.

The fictional company, Brightwave, sells:

* ``nimbus``: a notes and file-sync app (workspaces, seats, sync, desktop and phone apps);
* ``beacon``: a mesh Wi-Fi router (satellites, firmware, the Beacon app, a Beacon Shield plan);
* ``orbit``: a smartwatch, launched at the drift. Its tickets speak a new vocabulary (watch
  face, strap, charging puck, heart-rate sensor, pairing, the Orbit Coach plan), and some of
  it collides with the old labels' keywords: "it stopped charging" is a bug, "charged twice"
  is billing.

Each ticket is one to three user turns (a share opens vaguely, gets a clarifying question from
the agent, then says what is wrong; or states the problem first and answers a follow-up) with
greetings, sign-offs, neutral context, cues of other labels as distractors, typos and lower
case. The target, the last assistant turn, is exactly one of LABELS. Rows carry no system turn
(the config's ``task.system_prompt`` supplies it) except about one in ten, whose explicit system
turn equals SYSTEM_PROMPT, so both paths are exercised. Texts hold no e-mail addresses, phone
or card numbers, so a PII check can treat any as a defect.

Everything is a pure function of the seed: each row and each day draws from its own
``random.Random`` seeded by a string, as in :mod:`tuneloop.demo.invoices`.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.demo.ticket_phrases import (
    _CLARIFY,
    _CLOSINGS,
    _COMMON_SLOTS,
    _CONTEXT,
    _FOLLOW_UPS,
    _GREETINGS,
    _INTENTS,
    _LABEL_WEIGHTS,
    _PRODUCT_SLOTS,
    _VAGUE_OPENERS,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

SYSTEM_PROMPT = (
    "You are the support triage assistant of Brightwave. Read the customer's conversation and "
    "reply with exactly one label: billing, bug, account_access, feature_request, shipping or "
    "cancellation."
)
"""The instruction of the task; ``examples/tickets/tuneloop.yaml`` carries the same text."""

LABELS: tuple[str, ...] = (
    "billing",  # charges, invoices, refunds, payment method, price
    "bug",  # something in the app or the device is broken
    "account_access",  # login, password, two-factor, locked out, sign-in e-mail
    "feature_request",  # please add / it would be great if
    "shipping",  # orders, delivery, tracking, damaged or wrong parcel (hardware only)
    "cancellation",  # cancel a plan, stop renewal, close the account, return and cancel
)
"""The closed label set; the target of every labelled row is exactly one of these."""

PRODUCTS_ORIGINAL: tuple[str, ...] = ("nimbus", "beacon")
"""Products present from the first day."""

PRODUCTS_DRIFTED: tuple[str, ...] = ("orbit",)
"""Products that appear only from ``drift_start`` on (the drift)."""

PRODUCTS: tuple[str, ...] = PRODUCTS_ORIGINAL + PRODUCTS_DRIFTED
"""Every slice value of ``product``, in a stable order."""

SLICE_FIELD = "product"
"""The record field the slices come from (``task.slice_field``)."""

BAD_ROW_KINDS: tuple[str, ...] = (
    "not_json",  # a line cut off mid-write
    "label_not_in_set",  # the final assistant turn is a label outside LABELS
    "no_final_assistant",  # the conversation ends with a user turn: nothing to learn
    "missing_messages",  # a record without its messages
    "empty_line",
    "duplicate_id",  # an exact copy of another line (at-least-once delivery)
    "bad_role",  # a turn whose role is not system, user or assistant
)
"""Kinds of defective labelled lines ``generate_ticket_world(bad_row_rate=...)`` mixes in."""

SERVED_MODEL = "tuneloop"
HELDOUT_LABELLED_AT = datetime(2026, 1, 1, tzinfo=UTC)

_WRONG_LABELS = ("other", "refund", "tech_support", "general", "complaint", "hardware", "spam")
_WRONG_ROLES = ("customer", "agent", "human", "bot", "moderator")
_MULTI_TURN_SHARE = 0.3
_OWN_WORDS_SHARE = {"nimbus": 0.4, "beacon": 0.4, "orbit": 0.7}  # intents in the product's own words
_SYSTEM_TURN_SHARE = 0.1


class PutStore(Protocol):
    """The one storage call the world needs (``tuneloop.storage`` stores provide it)."""

    def put_bytes(self, key: str, data: bytes) -> None: ...




# --- one ticket ----------------------------------------------------------------------------


def _check_product(product: str) -> None:
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; expected one of {PRODUCTS}")


def _slots(rng: random.Random, product: str) -> dict[str, str]:
    """One value per slot; a template uses the ones it names."""
    values = {name: rng.choice(options) for name, options in _PRODUCT_SLOTS[product].items()}
    values.update({name: rng.choice(options) for name, options in _COMMON_SLOTS.items()})
    others = [m for m in _PRODUCT_SLOTS[product]["model"] if m != values["model"]] or [values["model"]]
    seats = rng.randint(3, 40)
    values.update(
        other_model=rng.choice(others),
        amount=f"{values['currency']}{rng.randint(4, 480)}.{rng.choice(('00', '99', '49'))}",
        n=str(seats + rng.randint(2, 9)),
        m=str(seats),
        order=f"#{rng.choice(('BW', 'BW-', ''))}{rng.randint(10000, 999999)}",
        year=str(rng.randint(2019, 2025)),
    )
    return values


def _typos(rng: random.Random, text: str) -> str:
    """Swap two inner letters in one or two longer words, as a hurried customer would."""
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 5 and word.isalpha()]
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 2))):
        word = words[i]
        j = rng.randrange(1, len(word) - 2)
        words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _style(rng: random.Random, text: str) -> str:
    """Typos, lower case or a dropped full stop on some turns."""
    if rng.random() < 0.15:
        text = _typos(rng, text)
    if rng.random() < 0.15:
        text = text.lower()
    if text.endswith(".") and rng.random() < 0.2:
        text = text[:-1]
    return text


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _intent(rng: random.Random, product: str, label: str, slots: dict[str, str]) -> str:
    """The sentence that decides the label, often in the product's own words (mostly so for
    the new product: that is the drift a model trained before it has not seen)."""
    own = _INTENTS[label].get(product, ())
    pool = own if own and rng.random() < _OWN_WORDS_SHARE[product] else _INTENTS[label]["any"]
    text = rng.choice(pool).format(**slots)
    return text[:1].upper() + text[1:]


def _conversation(rng: random.Random, product: str) -> tuple[list[dict[str, str]], str]:
    """A ticket without its answer (``messages`` ending with a user turn) and its label."""
    _check_product(product)
    weights = _LABEL_WEIGHTS[product]
    label = rng.choices(LABELS, weights=[weights[name] for name in LABELS])[0]
    slots = _slots(rng, product)
    intent = _intent(rng, product, label, slots)
    context = rng.choice(_CONTEXT).format(**slots) if rng.random() < 0.35 else ""
    if context and rng.random() < 0.5:
        intent, context = context, intent  # the decisive sentence is not always first
    greeting = rng.choice(_GREETINGS)
    closing = rng.choice(_CLOSINGS).format(**slots)

    messages: list[dict[str, str]] = []
    if rng.random() < _SYSTEM_TURN_SHARE:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    if rng.random() >= _MULTI_TURN_SHARE:
        messages.append({"role": "user", "content": _style(rng, _join(greeting, intent, context, closing))})
    elif rng.random() < 0.65:  # vague opener, clarifying question, then the problem
        messages += [
            {"role": "user", "content": _style(rng, rng.choice(_VAGUE_OPENERS).format(**slots))},
            {"role": "assistant", "content": rng.choice(_CLARIFY)},
            {"role": "user", "content": _style(rng, _join(intent, context, closing))},
        ]
    else:  # the problem first; the last user turn only answers a follow-up question
        question, answers = rng.choice(_FOLLOW_UPS)
        answer = rng.choice(answers).format(**slots)
        messages += [
            {"role": "user", "content": _style(rng, _join(greeting, intent, context))},
            {"role": "assistant", "content": question},
            {"role": "user", "content": _style(rng, _join(answer[:1].upper() + answer[1:], closing))},
        ]
    return messages, label


def _utc_iso(moment: datetime) -> str:
    """``2026-03-15T14:05:09Z``; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labelled(
    record_id: str,
    messages: list[dict[str, str]],
    label: str,
    product: str,
    labelled_at: datetime | None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": record_id,
        "messages": [*messages, {"role": "assistant", "content": label}],
        SLICE_FIELD: product,
    }
    if labelled_at is not None:
        record["labelled_at"] = _utc_iso(labelled_at)
    return record


def make_ticket(
    rng: random.Random,
    product: str,
    record_id: str = "tkt-0000",
    labelled_at: datetime | None = None,
) -> dict[str, Any]:
    """A labelled row: ``id``, ``messages`` ending with the label as assistant turn, ``product``
    (and ``labelled_at`` when given)."""
    messages, label = _conversation(rng, product)
    return _labelled(record_id, messages, label, product, labelled_at)


def make_traffic_record(
    rng: random.Random, product: str, record_id: str, ts: datetime, *, model: str = SERVED_MODEL
) -> dict[str, Any]:
    """A production request log row: the conversation up to the last user turn, no answer."""
    messages, _ = _conversation(rng, product)
    return {"id": record_id, "ts": _utc_iso(ts), "messages": messages, SLICE_FIELD: product, "model": model}


def label_of(record: dict[str, Any]) -> str:
    """The target of a labelled row: the content of its last (assistant) turn."""
    return str(record["messages"][-1]["content"])


# --- defects -------------------------------------------------------------------------------


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def _jsonl(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _corrupt(kind: str, rng: random.Random, record: dict[str, Any], duplicate_of: str | None) -> str:
    """One defective labelled line of ``kind``, made from a good ``record``."""
    messages = [dict(turn) for turn in record["messages"]]
    if kind == "not_json":
        line = _dumps(record)
        return line[: rng.randint(20, len(line) // 2)]
    if kind == "label_not_in_set":
        messages[-1]["content"] = rng.choice(_WRONG_LABELS)
    elif kind == "no_final_assistant":
        messages = messages[:-1]
    elif kind == "missing_messages":
        return _dumps({key: value for key, value in record.items() if key != "messages"})
    elif kind == "empty_line":
        return ""
    elif kind == "duplicate_id":
        if duplicate_of is None:
            raise ValueError("a duplicate needs a line to copy")
        return duplicate_of
    elif kind == "bad_role":
        messages[rng.randrange(len(messages) - 1)]["role"] = rng.choice(_WRONG_ROLES)
    else:
        raise ValueError(f"unknown bad row kind {kind!r}")
    return _dumps({**record, "messages": messages})


def _mix_in_defects(
    rng: random.Random, records: list[dict[str, Any]], n_bad: int
) -> tuple[list[str], list[int], dict[str, int]]:
    """Lines of ``records`` with ``n_bad`` of them replaced by defects cycling through the kinds.

    Returns the lines, the positions left good and the count per kind.
    """
    lines = [_dumps(record) for record in records]
    bad_positions = rng.sample(range(len(lines)), n_bad)
    good_positions = sorted(set(range(len(lines))) - set(bad_positions))
    counts = dict.fromkeys(BAD_ROW_KINDS, 0)
    first_kind = rng.randrange(len(BAD_ROW_KINDS))
    for rank, position in enumerate(bad_positions):
        kind = BAD_ROW_KINDS[(first_kind + rank) % len(BAD_ROW_KINDS)]
        duplicate_of = None
        if kind == "duplicate_id":
            if good_positions:
                duplicate_of = lines[rng.choice(good_positions)]
            else:
                kind = "not_json"
        lines[position] = _corrupt(kind, rng, records[position], duplicate_of)
        counts[kind] += 1
    return lines, good_positions, counts


# --- the world -----------------------------------------------------------------------------


def drift_fraction(
    day: date, drift_start: date | None, ramp_days: int = 7, final: float = 0.5
) -> float:
    """Share of the day's traffic about the new product(s) of PRODUCTS_DRIFTED.

    0 before ``drift_start``; from that day on it rises linearly, reaching ``final`` on day
    ``drift_start + ramp_days - 1`` (``ramp_days=0`` jumps straight to ``final``).
    """
    if ramp_days < 0:
        raise ValueError(f"ramp_days must be >= 0, got {ramp_days}")
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"final must be within [0, 1], got {final}")
    if drift_start is None or day < drift_start:
        return 0.0
    if ramp_days == 0:
        return final
    elapsed = (day - drift_start).days + 1
    return final * min(1.0, elapsed / ramp_days)


def _assign_products(rng: random.Random, n: int, drifted_share: float) -> list[str]:
    """``n`` products: ``round(n * drifted_share)`` new ones, the rest the original products in
    turn, in a seeded order."""
    n_drifted = round(n * drifted_share)
    products = [PRODUCTS_DRIFTED[i % len(PRODUCTS_DRIFTED)] for i in range(n_drifted)]
    products += [PRODUCTS_ORIGINAL[i % len(PRODUCTS_ORIGINAL)] for i in range(n - n_drifted)]
    rng.shuffle(products)
    return products


def _day_partitions(
    day: date,
    *,
    seed: int,
    drift_start: date | None,
    traffic_per_day: int,
    labelled_per_day: int,
    bad_row_rate: float,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Traffic lines, labelled lines and counts for one day; depends on nothing else."""
    day_rng = random.Random(f"tuneloop-tickets|{seed}|{day.isoformat()}|day")
    fraction = drift_fraction(day, drift_start)
    products = _assign_products(day_rng, traffic_per_day, fraction)
    seconds = sorted(day_rng.randrange(86_400) for _ in range(traffic_per_day))
    midnight = datetime.combine(day, time(), tzinfo=UTC)
    end_of_day = midnight + timedelta(seconds=86_399)

    traffic: list[str] = []
    candidates: list[dict[str, Any]] = []  # every request, labelled; a sample is kept
    for index, product in enumerate(products):
        row_rng = random.Random(f"tuneloop-tickets|{seed}|{day.isoformat()}|request|{index}")
        messages, label = _conversation(row_rng, product)
        ts = midnight + timedelta(seconds=seconds[index])
        record_id = f"tkt-{day.isoformat()}-{index:04d}"
        traffic.append(
            _dumps({"id": record_id, "ts": _utc_iso(ts), "messages": messages, SLICE_FIELD: product, "model": SERVED_MODEL})
        )
        labelled_at = min(ts + timedelta(minutes=row_rng.randint(5, 240)), end_of_day)
        candidates.append(_labelled(record_id, messages, label, product, labelled_at))

    # Labellers see a sample of the day's requests, stratified so the mix matches the traffic.
    by_product = {p: [i for i, row in enumerate(candidates) if row[SLICE_FIELD] == p] for p in PRODUCTS}
    n_new = sum(len(by_product[p]) for p in PRODUCTS_DRIFTED)
    picked: list[int] = []
    left = labelled_per_day
    for product in PRODUCTS:
        pool = by_product[product]
        want = min(round(labelled_per_day * len(pool) / traffic_per_day), len(pool), left) if traffic_per_day else 0
        picked += day_rng.sample(pool, want)
        left -= want
    spare = sorted(set(range(len(candidates))) - set(picked))
    picked += day_rng.sample(spare, min(left, len(spare)))  # rounding leftovers
    labelled = [candidates[i] for i in sorted(picked)]

    lines, good_positions, bad_counts = _mix_in_defects(day_rng, labelled, round(len(labelled) * bad_row_rate))
    counts = {
        "drift_fraction": fraction,
        "traffic": {p: len(by_product[p]) for p in PRODUCTS},
        "traffic_new": n_new,
        "labelled": {p: sum(1 for i in good_positions if labelled[i][SLICE_FIELD] == p) for p in PRODUCTS},
        "bad_rows": bad_counts,
    }
    return traffic, lines, counts


def generate_ticket_world(
    store: PutStore,
    start: date,
    days: int,
    *,
    seed: int = 0,
    drift_start: date | None = None,
    traffic_per_day: int = 120,
    labelled_per_day: int = 60,
    bad_row_rate: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``days`` daily partitions of ticket traffic and labelled tickets from ``start`` on.

    Keys: ``traffic/dt=YYYY-MM-DD/part-00000.jsonl`` and ``labelled/dt=.../part-00000.jsonl``.
    Labelled rows are a sample of the same day's requests (stratified by product) with the
    label appended as the final assistant turn; they keep the request id
    (``tkt-YYYY-MM-DD-NNNN``). With ``bad_row_rate`` > 0 that share of each labelled
    partition's lines is replaced by defects cycling through BAD_ROW_KINDS. Each day depends
    only on ``seed``, its date and the arguments, so the world can be rolled forward.

    Returns a summary: the days, clean rows per product, bad rows per kind, keys written.
    """
    from tuneloop.demo.worlds import check_world_args

    check_world_args(days, traffic_per_day, labelled_per_day, bad_row_rate)

    summary: dict[str, Any] = {
        "seed": seed,
        "start": start.isoformat(),
        "days": days,
        "drift_start": drift_start.isoformat() if drift_start else None,
    }
    from tuneloop.demo.worlds import write_days

    def day_partitions(day: date) -> tuple[list[str], list[str], dict[str, Any]]:
        return _day_partitions(
            day, seed=seed, drift_start=drift_start, traffic_per_day=traffic_per_day,
            labelled_per_day=labelled_per_day, bad_row_rate=bad_row_rate,
        )  # fmt: skip

    def say(day: date, traffic: list[str], labelled: list[str], counts: dict[str, Any]) -> None:
        if progress is not None:
            progress(f"{day.isoformat()}: traffic {len(traffic)} (new product {counts['traffic_new']}), "
                     f"labelled {len(labelled)} (bad {sum(counts['bad_rows'].values())})")

    write_days(store, start, days, PRODUCTS, BAD_ROW_KINDS, day_partitions, summary, say)
    return summary


def heldout_sets(seed: int, n_per_slice: int = 60) -> dict[str, list[dict[str, Any]]]:
    """Fixed labelled eval sets per product, from a seed stream the daily partitions never use.

    Written as ``heldout/<product>.jsonl``; ids ``heldout-<product>-NNNN``.
    """
    if n_per_slice < 0:
        raise ValueError(f"n_per_slice must be >= 0, got {n_per_slice}")
    return {
        product: [
            make_ticket(
                random.Random(f"tuneloop-tickets-heldout|{seed}|{product}|{index}"),
                product,
                f"heldout-{product}-{index:04d}",
                HELDOUT_LABELLED_AT,
            )
            for index in range(n_per_slice)
        ]
        for product in PRODUCTS
    }


def write_ticket_files(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 400,
    n_eval: int = 120,
    drifted_share: float = 0.5,
    bad_rows: int = 0,
) -> dict[str, Any]:
    """Plain labelled files for the file-level CLI path (``tuneloop validate``/``train``/``evaluate``).

    Writes ``train.jsonl`` (``n_train`` rows) and ``eval.jsonl`` (``n_eval`` rows), each with
    ``drifted_share`` of rows about the new product and the rest split over the original ones,
    from seed streams of their own. With ``bad_rows`` > 0 also ``bad.jsonl``: that many
    defective lines cycling through BAD_ROW_KINDS; its ``duplicate_id`` lines copy lines of
    ``train.jsonl``, so validate the two files together to see them. Returns what was written.
    """
    if min(n_train, n_eval, bad_rows) < 0:
        raise ValueError("n_train, n_eval and bad_rows must be >= 0")
    if not 0.0 <= drifted_share <= 1.0:
        raise ValueError(f"drifted_share must be within [0, 1], got {drifted_share}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed, "out": str(out), "files": {}, "products": {}}

    def rows(split: str, n: int) -> list[dict[str, Any]]:
        order_rng = random.Random(f"tuneloop-tickets-files|{seed}|{split}|order")
        return [
            make_ticket(
                random.Random(f"tuneloop-tickets-files|{seed}|{split}|{index}"),
                product,
                f"tkt-{split}-{index:05d}",
                HELDOUT_LABELLED_AT + timedelta(minutes=index),
            )
            for index, product in enumerate(_assign_products(order_rng, n, drifted_share))
        ]

    train = rows("train", n_train)
    for name, records in (("train", train), ("eval", rows("eval", n_eval))):
        (out / f"{name}.jsonl").write_bytes(_jsonl([_dumps(r) for r in records]))
        summary["files"][f"{name}.jsonl"] = len(records)
        summary["products"][name] = {p: sum(1 for r in records if r[SLICE_FIELD] == p) for p in PRODUCTS}
    if bad_rows:
        bad_rng = random.Random(f"tuneloop-tickets-files|{seed}|bad")
        sources = rows("bad", bad_rows)
        counts = dict.fromkeys(BAD_ROW_KINDS, 0)
        first_kind = bad_rng.randrange(len(BAD_ROW_KINDS))
        lines = []
        for rank, record in enumerate(sources):
            kind = BAD_ROW_KINDS[(first_kind + rank) % len(BAD_ROW_KINDS)]
            if kind == "duplicate_id" and not train:
                kind = "not_json"
            duplicate_of = _dumps(bad_rng.choice(train)) if kind == "duplicate_id" else None
            lines.append(_corrupt(kind, bad_rng, record, duplicate_of))
            counts[kind] += 1
        (out / "bad.jsonl").write_bytes(_jsonl(lines))
        summary["files"]["bad.jsonl"] = len(lines)
        summary["bad_rows"] = counts
    return summary
