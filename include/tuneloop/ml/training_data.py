"""What the trainer trains on: rows read through the task (the context and the answer), rendered
with the chat template exactly as evaluation and vLLM render them, tokenized with the context
masked out of the loss (rows over ``max_seq_len`` dropped, never cut); a validation share by id
hash; replayed rows from production's data. Batching, packing and the loss are TRL's."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tuneloop.tasks import Example, TaskSpec


IGNORE_INDEX = -100


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
