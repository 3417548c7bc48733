"""The hand-written LoRA training loop tuneloop used before it moved to TRL's SFTTrainer (issue 20),
kept only as a baseline for ``bench/train_throughput.py``: AdamW, linear warmup + cosine,
clipping at 1.0, grad accumulation normalised by the step's supervised tokens, the LM head
projected at supervised positions only, random or length-grouped micro-batches, optional
packing with restarting position ids. Checkpoints, early stopping and several processes are
left out (the benchmark uses none of them); ``eval_loss`` measures every trainer's adapter.
Not part of the package.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneloop.ml.model import _fast_kernels
from tuneloop.ml.training_data import IGNORE_INDEX, TokenizedExample, TrainingError
from tuneloop.progress import Progress, ProgressSink

GROUP_CHUNK_BATCHES = 50


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


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class FitStats:
    """What :func:`fit` measured."""

    losses: list[float]
    steps: int
    micro_batches: int
    micro_batches_per_epoch: int
    tokens: int
    seconds: float


def _loss_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, lm_head) when the loss may compute logits at supervised positions only.

    The prompt (the document) is most of a row, and the vocabulary projection is the largest
    matrix of a small model: skipping it where the label is -100 saves time and the memory of
    a (tokens x vocab) float tensor. Models that post-process logits (soft-capping, a logit
    scale) go through their own forward instead.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def loss_sum(model: Any, batch: Mapping[str, Any], head: tuple[Any, Any] | None) -> Any:
    """Sum of the next-token cross-entropy over the batch's supervised tokens."""
    import torch

    targets = batch["labels"][:, 1:]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if head is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    decoder, lm_head = head
    hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")


def n_targets(example: TokenizedExample) -> int:
    """Supervised next-token targets in one example (its labels after the first position)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def eval_loss(
    model: Any, examples: Sequence[TokenizedExample], settings: Any, *, pad_id: int, device: str, dtype: str
) -> float:
    """Mean cross-entropy per supervised token on ``examples`` (no gradients)."""
    import torch

    head = _loss_head(model)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), settings.batch_size):
            chunk = [examples[i] for i in order[start : start + settings.batch_size]]
            batch = _make_batch(chunk, settings, pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                total += float(loss_sum(model, batch, head))
            count += sum(n_targets(example) for example in chunk)
    model.train()
    return total / max(1, count)


def _make_batch(examples: Sequence[TokenizedExample], settings: Any, pad_id: int) -> dict[str, Any]:
    if settings.packing:
        return collate_packed(examples, pad_id, settings.max_seq_len)  # tokenize_records dropped longer rows
    return collate(examples, pad_id)


def fit(
    model: Any,
    examples: Sequence[TokenizedExample],
    settings: Any,
    *,
    pad_id: int,
    device: str,
    dtype: str,
    progress: ProgressSink | None = None,
) -> FitStats:
    """The old training loop (one process, no checkpoints, no early stopping)."""
    import torch

    micro_per_epoch = math.ceil(len(examples) / settings.batch_size)
    per_step = settings.grad_accum
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / per_step))
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = max(1, round(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    head = _loss_head(model)
    if settings.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tracker = Progress(label="legacy", every_n=settings.log_every, sink=progress)
    tracker.start(total_steps)
    model.train()
    lengths = [len(example.input_ids) for example in examples]
    targets_of = [n_targets(example) for example in examples]
    losses: list[float] = []
    tokens_seen, micro_done = 0, 0
    batches = micro_batch_stream(lengths, settings.batch_size, settings.seed, grouped=settings.batching == "length_grouped")
    with _fast_kernels(model, device, mixed=autocast_dtype is not None):
        started = time.monotonic()
        for step in range(total_steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * _lr_factor(step, total_steps, warmup)
            chunk = [next(batches) for _ in range(per_step)]
            step_targets = sum(targets_of[i] for batch in chunk for i in batch)
            step_loss, step_tokens = 0.0, 0
            for indices in chunk:
                batch = _make_batch([examples[i] for i in indices], settings, pad_id)
                batch = {key: value.to(device) for key, value in batch.items()}
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_sum(model, batch, head) / max(1, step_targets)
                loss.backward()
                step_loss += float(loss.detach())
                step_tokens += sum(lengths[i] for i in indices)
            micro_done += per_step
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss became {step_loss} at step {step + 1}")
            losses.append(step_loss)
            tokens_seen += step_tokens
            tracker.update(step + 1, items=step_tokens, loss=step_loss, lr=optimizer.param_groups[0]["lr"])
    tracker.finish(loss=losses[-1])
    return FitStats(
        losses=losses, steps=len(losses), micro_batches=micro_done, micro_batches_per_epoch=micro_per_epoch,
        tokens=tokens_seen, seconds=time.monotonic() - started,
    )
