"""LoRA fine-tuning of the base model on labelled records (conversation -> gold answer).

Each record is read through the task (:class:`tuneloop.tasks.TaskSpec`: the system prompt and
earlier turns as context, the last assistant turn or the completion as the answer) and
rendered with the tokenizer's chat template exactly as evaluation and vLLM render it (answer
+ the template's end of turn); context tokens are masked out of the loss, and a plain PyTorch loop trains
the LoRA matrices (AdamW, linear warmup + cosine decay, gradient clipping 1.0). The output
directory is what vLLM loads at runtime: ``adapter_model.safetensors`` + ``adapter_config.json``,
next to ``provenance.json`` and ``train_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.ml.checkpoint import (
    Checkpointer,
    _all_reduce_gradients,
    _all_reduce_sum,
    _fingerprint,
    checkpoint_path,
    distributed_world,
    init_distributed,
)
from tuneloop.ml.model import (
    _fast_kernels,
    check_base_model,
    check_init_adapter,
    load_lora_model,
    resolve_device,
)
from tuneloop.ml.training_data import (
    IGNORE_INDEX,
    TokenizedExample,
    TrainingError,
    collate,
    collate_packed,
    default_spec,
    micro_batch_stream,
    read_examples,
    records_digest,
    split_validation,
    tokenize_records,
)
from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import collect_provenance

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tuneloop.config import TrainingSettings
    from tuneloop.tasks import TaskSpec

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass


class TrainResult:
    """What one training run did; also written to ``train_metrics.json``."""

    steps: int
    epochs: float
    final_loss: float
    loss_history: list[float]
    tokens_per_second: float
    seconds: float
    device: str
    dtype: str
    trainable_params: int
    total_params: int
    adapter_dir: str
    n_examples: int = 0
    n_dropped_too_long: int = 0
    dataset_hash: str = ""
    init_from: str | None = None
    packing: bool = False
    n_validation: int = 0
    eval_loss_history: list[list[float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_settings(settings: TrainingSettings) -> None:
    """Checks the pydantic model cannot express (and a guard for ``model_construct`` callers)."""
    if settings.lora_rank < 1:
        raise TrainingError(f"lora_rank must be >= 1, got {settings.lora_rank}")
    if not settings.lora_alpha > 0:
        raise TrainingError(f"lora_alpha must be > 0, got {settings.lora_alpha}")
    if not settings.target_modules:
        raise TrainingError("target_modules is empty: name the linear layers LoRA should adapt")
    if settings.batch_size < 1 or settings.grad_accum < 1:
        raise TrainingError("batch_size and grad_accum must be >= 1")


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be new, empty or an older adapter (replaced); anything else is refused."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "adapter_config.json").exists())
    ):
        raise TrainingError(f"{out_dir} exists and is not an adapter directory; choose an empty or new path")


def _prepare_out_dir(out_dir: Path) -> Path:
    """A fresh staging directory beside ``out_dir`` (renamed into place when complete)."""
    check_out_dir(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.training-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


@dataclass


class FitStats:
    """What :func:`fit` measured (over the whole run, also when it was resumed)."""

    losses: list[float]
    steps: int
    micro_batches: int
    micro_batches_per_epoch: int
    tokens: int
    seconds: float
    eval_losses: list[list[float]] = field(default_factory=list)  # [step, eval loss]
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None


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
    model: Any, examples: Sequence[TokenizedExample], settings: TrainingSettings, *, pad_id: int, device: str, dtype: str
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


def _make_batch(examples: Sequence[TokenizedExample], settings: TrainingSettings, pad_id: int) -> dict[str, Any]:
    if settings.packing:
        return collate_packed(examples, pad_id, settings.max_seq_len)  # tokenize_records dropped longer rows
    return collate(examples, pad_id)


def fit(
    model: Any,
    examples: Sequence[TokenizedExample],
    settings: TrainingSettings,
    *,
    pad_id: int,
    device: str,
    dtype: str,
    progress: ProgressSink | None = None,
    validation: Sequence[TokenizedExample] = (),
    checkpointer: Checkpointer | None = None,
) -> FitStats:
    """The training loop: AdamW on the trainable (LoRA) parameters, warmup + cosine, clip 1.0.

    Each micro-batch's loss is the sum over its supervised tokens divided by the supervised
    tokens of the whole accumulated step, so ``grad_accum`` equals one larger batch, packed or
    not, on one process or several. With ``validation`` rows, the eval loss is measured every
    ``eval_every`` steps, training stops after ``early_stopping_patience`` evals without a new
    best, and the best weights are the ones returned. ``checkpointer`` saves the state every
    ``checkpoint_every`` steps and resumes from a matching checkpoint.
    """
    import torch

    rank, world = distributed_world()
    micro_per_epoch = math.ceil(len(examples) / settings.batch_size)
    per_step = settings.grad_accum * world
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / per_step))
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = max(1, round(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" and device == "cuda" else None
    head = _loss_head(model)
    if settings.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    tracker = Progress(label="train", every_n=settings.log_every, sink=progress, enabled=rank == 0)
    tracker.start(total_steps)
    model.train()
    lengths = [len(example.input_ids) for example in examples]
    targets_of = [n_targets(example) for example in examples]

    losses: list[float] = []
    eval_losses: list[list[float]] = []
    best: dict[str, Any] = {"loss": math.inf, "step": None, "weights": None, "bad_evals": 0}
    tokens_seen, micro_done, first_step, seconds_before = 0, 0, 0, 0.0
    state = checkpointer.load() if checkpointer is not None else None
    if state is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if device == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        first_step, micro_done = int(state["step"]), int(state["micro_done"])
        losses, eval_losses = list(state["losses"]), [list(e) for e in state["eval_losses"]]
        tokens_seen, seconds_before = int(state["tokens"]), float(state["seconds"])
        best = dict(state["best"])
        where = checkpointer.path if checkpointer is not None else None
        tracker.note(f"resumed from the checkpoint at step {first_step}/{total_steps} ({where})")
    batches = micro_batch_stream(lengths, settings.batch_size, settings.seed, skip=micro_done, grouped=settings.batching == "length_grouped")
    window: list[float] = []
    stopped_early = False
    with _fast_kernels(model, device, mixed=autocast_dtype is not None):
        started = time.monotonic()
        for step in range(first_step, total_steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * _lr_factor(step, total_steps, warmup)
            chunk = [next(batches) for _ in range(per_step)]
            step_targets = sum(targets_of[i] for batch in chunk for i in batch)
            mine = chunk[rank::world]
            step_loss = 0.0
            step_tokens = 0
            for indices in mine:
                batch = _make_batch([examples[i] for i in indices], settings, pad_id)
                batch = {key: value.to(device) for key, value in batch.items()}
                with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_sum(model, batch, head) / max(1, step_targets)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += float(loss.detach())
                step_tokens += sum(lengths[i] for i in indices)
            micro_done += per_step
            if world > 1:
                _all_reduce_gradients(trainable)
                step_loss, step_tokens = _all_reduce_sum(step_loss, step_tokens, device)
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(step_loss):
                raise TrainingError(
                    f"loss became {step_loss} at step {step + 1}; lower training.learning_rate "
                    f"(now {settings.learning_rate})"
                )
            losses.append(step_loss)
            window.append(step_loss)
            tokens_seen += step_tokens
            done = step + 1
            tracker.update(done, items=step_tokens, loss=sum(window) / len(window), lr=optimizer.param_groups[0]["lr"])
            if done % settings.log_every == 0:
                window = []
            if validation and (done % settings.eval_every == 0 or done == total_steps):
                value = eval_loss(model, validation, settings, pad_id=pad_id, device=device, dtype=dtype)
                eval_losses.append([done, round(value, 6)])
                if value < best["loss"] - 1e-6:
                    best = {"loss": value, "step": done, "bad_evals": 0,
                            "weights": {name: p.detach().to("cpu", copy=True) for name, p in named}}
                else:
                    best["bad_evals"] += 1
                tracker.note(f"step {done}/{total_steps} eval loss {value:.4f} (best {best['loss']:.4f} at step {best['step']})")
                if settings.early_stopping_patience and best["bad_evals"] >= settings.early_stopping_patience:
                    stopped_early = True
                    tracker.note(f"early stop at step {done}: no better eval loss in {best['bad_evals']} evals")
                    break
            if checkpointer is not None and checkpointer.due(done, total_steps):
                checkpointer.save({
                    "step": done, "micro_done": micro_done, "losses": losses, "eval_losses": eval_losses,
                    "tokens": tokens_seen, "seconds": seconds_before + time.monotonic() - started,
                    "trainable": {name: p.detach().to("cpu") for name, p in named},
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else None,
                    "best": best,
                })
                tracker.note(f"checkpoint saved at step {done}/{total_steps}")
    if best["weights"] is not None and best["step"] != len(losses):
        with torch.no_grad():
            for name, p in named:
                p.copy_(best["weights"][name])
        tracker.note(f"kept the weights of step {best['step']} (eval loss {best['loss']:.4f})")
    tracker.finish(loss=losses[-1])
    return FitStats(
        losses=losses,
        steps=len(losses),
        micro_batches=micro_done,
        micro_batches_per_epoch=micro_per_epoch,
        tokens=tokens_seen,
        seconds=seconds_before + time.monotonic() - started,
        eval_losses=eval_losses,
        best_step=best["step"],
        stopped_early=stopped_early,
        resumed_from_step=first_step or None,
    )


def train_lora(
    base_model: str | os.PathLike[str],
    train_records: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    settings: TrainingSettings,
    *,
    dataset_hash: str | None = None,
    init_adapter: str | os.PathLike[str] | None = None,
    progress: ProgressSink | None = None,
    spec: TaskSpec | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``train_records`` (rows in ``spec``'s format; default
    ``prompt``/``completion``) and write it to ``out_dir``.

    ``dataset_hash`` identifies the data in the provenance record (default: a hash of the
    records). ``init_adapter`` warm-starts from an existing adapter's weights (default: fresh).
    ``progress`` receives one line per ``settings.log_every`` steps (default stderr).
    The adapter is written to a sibling directory first and renamed into place at the end.
    Every ``checkpoint_every`` steps the state is saved beside ``out_dir``; running again
    with the same inputs after a crash or a pre-empted node resumes from there. Under
    torchrun (WORLD_SIZE > 1) each process trains on its share and rank 0 writes the adapter.
    """
    spec = spec or default_spec()
    read_examples(train_records, spec)
    validate_settings(settings)
    check_base_model(base_model)
    if init_adapter is not None:
        check_init_adapter(init_adapter, base_model)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    dataset_hash = dataset_hash or records_digest(train_records)

    from transformers import set_seed

    started = time.monotonic()
    set_seed(settings.seed)
    device, dtype = resolve_device(settings.device, settings.dtype)
    joined = init_distributed(device)
    rank, world = distributed_world()
    model, tokenizer = load_lora_model(base_model, settings, device, dtype, init_adapter=init_adapter)
    fit_records, validation_records = split_validation(train_records, settings.validation_fraction)
    examples, dropped = tokenize_records(tokenizer, fit_records, settings.max_seq_len, spec)
    validation, dropped_validation = tokenize_records(tokenizer, validation_records, settings.max_seq_len, spec)
    dropped += dropped_validation
    if dropped:
        logger.warning(
            "dropped %d of %d records longer than max_seq_len=%d tokens",
            dropped, len(train_records), settings.max_seq_len,
        )
    if not examples:
        raise TrainingError(
            f"all {len(fit_records)} training records are longer than max_seq_len={settings.max_seq_len} "
            "tokens; raise training.max_seq_len"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA r=%d alpha=%s on %s (%s): %d examples (%d for eval loss), batch %dx%dx%d%s, %s %s, %.2f%% of %d parameters trainable",
        settings.lora_rank, settings.lora_alpha, base_model,
        f"warm start from {init_adapter}" if init_adapter else "fresh", len(examples), len(validation), settings.batch_size,
        settings.grad_accum, world, ", packed" if settings.packing else "", device, dtype, 100 * trainable / total, total,
    )
    checkpointer = Checkpointer(
        checkpoint_path(out_dir), _fingerprint(dataset_hash, settings, base_model, init_adapter, world),
        settings.checkpoint_every, writer=rank == 0,
    )
    stats = fit(
        model, examples, settings, pad_id=pad_id, device=device, dtype=dtype, progress=progress,
        validation=validation, checkpointer=checkpointer,
    )
    losses = stats.losses
    final_loss = sum(losses[-10:]) / len(losses[-10:])
    result = TrainResult(
        steps=stats.steps,
        epochs=round(stats.micro_batches / stats.micro_batches_per_epoch, 3),
        final_loss=round(final_loss, 5),
        loss_history=[round(loss, 5) for loss in losses],
        tokens_per_second=round(stats.tokens / stats.seconds, 1) if stats.seconds > 0 else 0.0,
        seconds=round(time.monotonic() - started, 2),
        device=device,
        dtype=dtype,
        trainable_params=trainable,
        total_params=total,
        adapter_dir=str(out_dir),
        n_examples=len(examples),
        n_dropped_too_long=dropped,
        dataset_hash=dataset_hash,
        init_from=str(init_adapter) if init_adapter is not None else None,
        packing=settings.packing,
        n_validation=len(validation),
        eval_loss_history=stats.eval_losses,
        best_step=stats.best_step,
        stopped_early=stats.stopped_early,
        resumed_from_step=stats.resumed_from_step,
        world_size=world,
    )
    if rank == 0:
        _write_adapter(model, out_dir, result, base_model, dataset_hash, len(train_records), settings)
        checkpointer.remove()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if joined:
            dist.destroy_process_group()
    logger.info(
        "adapter written to %s: loss %.3f -> %.3f in %.0f s (%.0f tok/s)",
        out_dir, losses[0], final_loss, result.seconds, result.tokens_per_second,
    )
    return result


def _write_adapter(
    model: Any, out_dir: Path, result: TrainResult, base_model: Any, dataset_hash: str, n_records: int, settings: TrainingSettings
) -> None:
    """Adapter files, provenance.json and train_metrics.json, renamed into ``out_dir`` at once."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.training-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    staging = _prepare_out_dir(out_dir)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        provenance = collect_provenance(
            kind="lora_adapter",
            base_model=str(base_model),
            dataset_hash=dataset_hash,
            init_from=result.init_from,
            n_records=n_records,
            config=settings.model_dump(mode="json"),
        )
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (staging / "train_metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
