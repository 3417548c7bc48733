"""LoRA fine-tuning of the base model on labelled records, on TRL's ``SFTTrainer``.

TRL (on Hugging Face ``Trainer`` + accelerate) runs the training: AdamW, warmup + cosine,
clipping at 1.0, gradient accumulation normalised by the supervised tokens of the whole step,
bf16 mixed precision, padding-free packing, gradient checkpointing, group-by-length batches,
checkpoints and resume, early stopping on eval loss, DDP / FSDP / DeepSpeed under
``accelerate launch``, QLoRA and Liger kernels. What tuneloop adds around it:

- each record is read through the task (:class:`tuneloop.tasks.TaskSpec`) and rendered with
  the chat template exactly as evaluation and vLLM render it; TRL gets its pre-tokenized
  prompt-completion format (``input_ids`` + ``completion_mask``: the loss is on the answer and
  the template's end of turn only); rows over ``max_seq_len`` are dropped and counted, never cut;
- the model: fresh LoRA matrices or a warm start from the production adapter (``model.py``);
- a stable validation share by id hash (never the gate's eval split) and replay rows;
- progress lines in the Airflow log, resume fingerprints (``checkpoint.py``);
- the output vLLM loads (``adapter_model.safetensors`` + ``adapter_config.json``), renamed into
  place whole, with ``provenance.json`` and ``train_metrics.json`` (:class:`TrainResult`).
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

from tuneloop.ml import checkpoint
from tuneloop.ml.model import (
    _fast_kernels,
    check_base_model,
    check_init_adapter,
    load_lora_model,
    resolve_device,
)
from tuneloop.ml.training_data import (
    TrainingError,
    default_spec,
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
    from tuneloop.ml.training_data import TokenizedExample
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
    trainer: str = "trl.SFTTrainer"

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


def _check_extras(settings: TrainingSettings) -> None:
    """Optional packages a setting needs, named before the model loads."""
    import importlib.util

    if settings.liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise TrainingError("training.liger_kernel: true needs the liger-kernel package in the training environment (pip install liger-kernel; CUDA only)")
    if settings.processes > 1 and settings.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise TrainingError("training.distributed: deepspeed needs the deepspeed package in the training image (pip install deepspeed)")


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be new, empty or an older adapter (replaced); anything else is refused."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "adapter_config.json").exists())
    ):
        raise TrainingError(f"{out_dir} exists and is not an adapter directory; choose an empty or new path")


def sft_config(settings: TrainingSettings, *, device: str, dtype: str, output_dir: Path, validation: bool) -> Any:
    """The ``SFTConfig`` for ``settings``: tuneloop's names mapped onto TRL's and HF's."""
    from trl import SFTConfig

    # with validation, a checkpoint at each eval: the best weights are restored from theirs
    every = settings.eval_every if validation else settings.checkpoint_every
    # under FSDP, activation checkpointing is FSDP's own (launch.py's fsdp_activation_checkpointing)
    checkpointing = settings.gradient_checkpointing and not (settings.processes > 1 and settings.distributed == "fsdp")
    length = {"max_steps": settings.max_steps} if settings.max_steps else {"num_train_epochs": settings.epochs}
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        **length,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        max_length=settings.max_seq_len,  # rows were dropped above it: nothing is cut
        completion_only_loss=True,
        packing=settings.packing,
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if settings.batching == "length_grouped" else "random",
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        use_liger_kernel=settings.liger_kernel and device == "cuda",
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a diverging loss stops the run (ProgressLines), it is not averaged away
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        save_total_limit=1,
        restore_callback_states_from_checkpoint=True,
        eval_strategy="steps" if validation else "no",
        eval_steps=settings.eval_every,
        load_best_model_at_end=validation,
        metric_for_best_model="eval_loss" if validation else None,
        greater_is_better=False,
        report_to=list(settings.report_to) or "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
    )


def _dataset(examples: Sequence[TokenizedExample]) -> Any:
    """TRL's pre-tokenized prompt-completion format: ``input_ids`` + ``completion_mask``."""
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "completion_mask": [[int(label != -100) for label in e.labels] for e in examples],
    })


def _callbacks(settings: TrainingSettings, progress: ProgressSink | None, *, enabled: bool, validation: bool) -> list[Any]:
    from transformers import EarlyStoppingCallback, TrainerCallback

    tracker = Progress(label="train", every_n=settings.log_every, sink=progress, enabled=enabled)

    class ProgressLines(TrainerCallback):
        """One line per ``log_every`` steps (loss, lr, tok/s, ETA), evals, checkpoints."""

        tokens = 0
        window: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tracker.start(state.max_steps)
            self.tokens = state.num_input_tokens_seen
            if state.global_step:
                tracker.note(f"resumed from the checkpoint at step {state.global_step}/{state.max_steps} ({args.output_dir})")

        def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                if not math.isfinite(float(logs["loss"])):
                    raise TrainingError(
                        f"loss became {logs['loss']} at step {state.global_step}; lower training.learning_rate "
                        f"(now {settings.learning_rate}) or check the rows"
                    )
                self.window.append(float(logs["loss"]))
                seen, self.tokens = state.num_input_tokens_seen - self.tokens, state.num_input_tokens_seen
                tracker.update(state.global_step, items=seen, loss=sum(self.window) / len(self.window), lr=float(logs.get("learning_rate", 0.0)))
                if state.global_step % settings.log_every == 0:
                    self.window = []
            if "eval_loss" in logs:
                best = state.best_metric if state.best_metric is not None else logs["eval_loss"]
                tracker.note(f"step {state.global_step}/{state.max_steps} eval loss {logs['eval_loss']:.4f} (best {min(best, logs['eval_loss']):.4f})")

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            tracker.note(f"checkpoint saved at step {state.global_step}/{state.max_steps}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            tracker.finish(**({"loss": losses[-1]} if losses else {}))

    callbacks: list[Any] = [ProgressLines()]
    if validation and settings.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.early_stopping_patience))
    return callbacks


def _ModelLossSFTTrainer() -> Any:  # noqa: N802 - a class built on first use (TRL imports torch)
    """SFTTrainer with the model's own loss (HF ``Trainer.compute_loss``) instead of TRL's chunked
    fp32 LM head. On a GPU TRL's head is kept: it never holds the (tokens x vocab) logits, which
    matters at 128k vocabularies. On a CPU it ran 1.19x slower on the demo model for the same
    loss (it also computes entropy and token accuracy for its logs): see docs/benchmarks.md."""
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


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
    Every ``checkpoint_every`` steps the Trainer's state is saved beside ``out_dir``; running
    again with the same inputs after a crash or a pre-empted node resumes from there. Under
    ``accelerate launch`` / torchrun each process trains on its share and rank 0 writes.
    """
    spec = spec or default_spec()
    read_examples(train_records, spec)
    validate_settings(settings)
    _check_extras(settings)
    check_base_model(base_model)
    if init_adapter is not None:
        check_init_adapter(init_adapter, base_model)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    dataset_hash = dataset_hash or records_digest(train_records)

    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress goes through ``progress``
    started = time.monotonic()
    set_seed(settings.seed)
    device, dtype = resolve_device(settings.device, settings.dtype)
    model, tokenizer = load_lora_model(base_model, settings, device, dtype, init_adapter=init_adapter)
    fit_records, validation_records = split_validation(train_records, settings.validation_fraction)
    examples, dropped = tokenize_records(tokenizer, fit_records, settings.max_seq_len, spec)
    validation, dropped_validation = tokenize_records(tokenizer, validation_records, settings.max_seq_len, spec)
    dropped += dropped_validation
    if dropped:
        logger.warning("dropped %d of %d records longer than max_seq_len=%d tokens", dropped, len(train_records), settings.max_seq_len)
    if not examples:
        raise TrainingError(
            f"all {len(fit_records)} training records are longer than max_seq_len={settings.max_seq_len} "
            "tokens; raise training.max_seq_len"
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    import datasets
    from transformers import PrinterCallback
    from trl import SFTTrainer

    datasets.disable_progress_bars()  # progress goes through ``progress``; stdout carries the CLI's JSON
    world = int(os.environ.get("WORLD_SIZE", "1"))
    writer = int(os.environ.get("RANK", "0")) == 0
    state_dir = checkpoint.checkpoint_path(out_dir)
    resume = checkpoint.prepare(state_dir, checkpoint.fingerprint(dataset_hash, settings, base_model, init_adapter, world), writer=writer)
    config = sft_config(settings, device=device, dtype=dtype, output_dir=state_dir, validation=bool(validation))
    trainer_class = SFTTrainer if device == "cuda" else _ModelLossSFTTrainer()
    trainer = trainer_class(
        model=model, args=config, processing_class=tokenizer, train_dataset=_dataset(examples),
        eval_dataset=_dataset(validation) if validation else None,
        callbacks=_callbacks(settings, progress, enabled=writer, validation=bool(validation)),
    )
    trainer.remove_callback(PrinterCallback)
    logger.info(
        "LoRA r=%d alpha=%s on %s (%s): %d examples (%d for eval loss), batch %dx%dx%d%s, %s %s, %.2f%% of %d parameters trainable",
        settings.lora_rank, settings.lora_alpha, base_model, f"warm start from {init_adapter}" if init_adapter else "fresh",
        len(examples), len(validation), settings.batch_size, settings.grad_accum, world, ", packed" if settings.packing else "",
        device, dtype, 100 * trainable / total, total,
    )
    with _fast_kernels(trainer.model, device, mixed=dtype != "float32"):
        output = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    losses = [float(entry["loss"]) for entry in state.log_history if "loss" in entry]
    eval_losses = [[entry["step"], round(float(entry["eval_loss"]), 6)] for entry in state.log_history if "eval_loss" in entry]
    best_step = int(state.best_model_checkpoint.rsplit("-", 1)[-1]) if state.best_model_checkpoint else None
    final_loss = sum(losses[-10:]) / len(losses[-10:])
    seconds = float(output.metrics.get("train_runtime", 0.0))
    resumed_at = int(resume.rsplit("-", 1)[-1]) if resume else None
    result = TrainResult(
        steps=state.global_step,
        epochs=round(float(state.epoch or 0.0), 3),
        final_loss=round(final_loss, 5),
        loss_history=[round(loss, 5) for loss in losses],
        tokens_per_second=round((state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)) / seconds, 1) if seconds > 0 else 0.0,
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
        eval_loss_history=eval_losses,
        best_step=best_step,
        stopped_early=bool(validation) and state.global_step < state.max_steps,
        resumed_from_step=resumed_at,
        world_size=world,
    )
    if best_step is not None and best_step != state.global_step:
        logger.info("kept the weights of step %d (eval loss %.4f)", best_step, state.best_metric)
    _write_adapter(trainer, out_dir, result, base_model, dataset_hash, len(train_records), settings, writer=writer)
    if writer:
        checkpoint.remove(state_dir)
    logger.info("adapter written to %s: loss %.3f -> %.3f in %.0f s (%.0f tok/s)", out_dir, losses[0], final_loss, result.seconds, result.tokens_per_second)
    return result


def _write_adapter(
    trainer: Any, out_dir: Path, result: TrainResult, base_model: Any, dataset_hash: str, n_records: int,
    settings: TrainingSettings, *, writer: bool,
) -> None:
    """Adapter files, provenance.json and train_metrics.json, renamed into ``out_dir`` at once.

    ``trainer.save_model`` runs on every process (FSDP and ZeRO-3 gather the weights there);
    only the adapter files are kept of what it writes."""
    staging = out_dir.parent / f".{out_dir.name}.training"
    if writer:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging / "saved"))
    if not writer:
        return
    try:
        for name in ADAPTER_FILES:
            os.replace(staging / "saved" / name, staging / name)
        shutil.rmtree(staging / "saved")
        provenance = collect_provenance(
            kind="lora_adapter", base_model=str(base_model), dataset_hash=dataset_hash, init_from=result.init_from,
            n_records=n_records, config=settings.model_dump(mode="json"),
        )
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (staging / "train_metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        check_out_dir(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
