"""What the trainer trains on: rows read through the task (the context and the answer), rendered
with the chat template exactly as evaluation and vLLM render them, tokenized with the context
masked out of the loss (rows over ``max_seq_len`` dropped, never cut), and grouped into
micro-batches: padded, or packed with a block-diagonal mask; random or length-grouped; a
validation share by id hash; replayed rows from production's data."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from tuneloop.tasks import Example, TaskSpec


IGNORE_INDEX = -100
GROUP_CHUNK_BATCHES = 50  # length grouping sorts rows within chunks of this many batches


class TrainingError(ValueError):
    """Training cannot start or cannot go on; the message says what to fix."""


@dataclass


class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def records_digest(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the records (canonical JSON), in order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def default_spec() -> TaskSpec:
    """The task of the embedded defaults (``prompt``/``completion`` rows)."""
    from tuneloop.config import TaskSettings
    from tuneloop.tasks import TaskSpec

    return TaskSpec(TaskSettings())


def read_examples(records: Sequence[Mapping[str, Any]], spec: TaskSpec) -> list[Example]:
    """The records as training examples; fail fast when the dataset is empty or rows do not fit
    the task (no answer to learn, wrong format)."""
    if not records:
        raise TrainingError(
            "no training records: the dataset is empty (check the snapshot with `tuneloop pull`)"
        )
    examples, bad = spec.examples(records)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingError(f"{len(bad)} of {len(records)} records cannot be trained on (task.format={spec.format}): {shown}")
    return examples


def validate_records(records: Sequence[Mapping[str, Any]], spec: TaskSpec | None = None) -> None:
    """Fail fast when the dataset is empty or rows do not fit the task."""
    read_examples(records, spec or default_spec())


def _split_chat(tokenizer: Any, context: str | Sequence[Mapping[str, str]], completion: str) -> tuple[str, str]:
    """The context text (through the generation prompt) and the supervised text after it."""
    messages = [{"role": "user", "content": context}] if isinstance(context, str) else [dict(turn) for turn in context]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False
    )
    eos = tokenizer.eos_token or ""
    if full_text.startswith(prompt_text):
        answer = full_text[len(prompt_text) :]
        # Train up to and including eos; whatever the template puts after it is never generated.
        if eos and eos in answer[len(completion) :]:
            answer = answer[: answer.index(eos, len(completion)) + len(eos)]
    else:
        answer = completion + eos
    return prompt_text, answer


def tokenize_records(
    tokenizer: Any, records: Sequence[Mapping[str, Any] | Example], max_seq_len: int, spec: TaskSpec | None = None
) -> tuple[list[TokenizedExample], int]:
    """Prompt tokens get label -100; rows longer than ``max_seq_len`` are dropped, not cut.

    Cutting would remove the end of the completion (or the document it copies from), which
    teaches the model to stop early; so over-long rows are counted and left out.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainingError(
            "the base model's tokenizer has no chat template; vLLM's /v1/chat/completions needs one "
            "(use the demo model, an instruct model, or add a template to tokenizer_config.json)"
        )
    from tuneloop.tasks import Example

    examples: list[TokenizedExample] = []
    dropped = 0
    task = spec or default_spec()
    for record in records:
        example = record if isinstance(record, Example) else task.example(record)
        prompt_text, answer_text = _split_chat(tokenizer, example.context, example.target or "")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) > max_seq_len:
            dropped += 1
            continue
        examples.append(
            TokenizedExample(
                input_ids=prompt_ids + answer_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            )
        )
    return examples, dropped


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest row (dynamic padding)."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def collate_packed(examples: Sequence[TokenizedExample], pad_id: int, capacity: int) -> dict[str, Any]:
    """Pack a micro-batch's examples into as few rows of ``capacity`` tokens as fit.

    Each example keeps its own position ids (0, 1, ...); transformers turns restarting
    position ids with ``attention_mask=None`` into a block-diagonal causal mask, so no token
    attends across examples and the loss equals the unpacked batch's. A row's tail padding
    is a segment of its own with labels -100.
    """
    import torch

    rows = pack_rows([len(example.input_ids) for example in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            example = examples[index]
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at : at + n] = torch.tensor(example.labels)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _epoch_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, *, grouped: bool = True) -> list[list[int]]:
    """One epoch of shuffled batches; ``grouped``: of similar length (sort within chunks of 50
    batches, shuffle the batches), which saves padding when batches are not packed."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not grouped:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * GROUP_CHUNK_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda index: lengths[index])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def micro_batch_stream(
    lengths: Sequence[int], batch_size: int, seed: int, skip: int = 0, *, grouped: bool = True
) -> Iterator[list[int]]:
    """Endless epochs of micro-batches, a pure function of ``seed``; ``skip`` drops the first
    micro-batches (a resumed run continues the interrupted run's order). ``grouped``: see
    ``training.batching``."""
    rng = random.Random(seed)
    produced = 0
    while True:
        for batch in _epoch_batches(lengths, batch_size, rng, grouped=grouped):
            produced += 1
            if produced > skip:
                yield batch


def split_validation(records: Sequence[Mapping[str, Any]], fraction: float) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, validation): a stable share of rows by id hash, never the gate's eval split."""
    if fraction <= 0:
        return list(records), []
    train: list[Mapping[str, Any]] = []
    validation: list[Mapping[str, Any]] = []
    for index, record in enumerate(records):
        key = f"validation:{record.get('id', index)}".encode()
        share = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (validation if share < fraction else train).append(record)
    return train, validation


def mix_replay(
    records: Sequence[Mapping[str, Any]], earlier: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0
) -> tuple[list[Mapping[str, Any]], int]:
    """``records`` plus a seeded sample of ``earlier`` rows making up ``fraction`` of the mix.

    Replaying some of what the production adapter learnt from keeps the candidate from
    forgetting it while it learns the new data. Rows whose id is in ``records`` are skipped.
    """
    if fraction <= 0 or not earlier:
        return list(records), 0
    ids = {record.get("id") for record in records}
    pool = [record for record in earlier if record.get("id") not in ids]
    want = min(len(pool), round(fraction / (1 - fraction) * len(records)))
    sample = random.Random(seed).sample(pool, want) if want else []
    return [*records, *sample], len(sample)
