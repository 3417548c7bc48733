"""LoRA fine-tuning of the base model on labelled records (prompt -> gold completion).

Each record is rendered with the tokenizer's chat template (user = ``prompt``, assistant =
``completion`` + eos), prompt tokens are masked out of the loss, and a plain PyTorch loop trains
the LoRA matrices (AdamW, linear warmup + cosine decay, gradient clipping 1.0). The output
directory is what vLLM loads at runtime: ``adapter_model.safetensors`` + ``adapter_config.json``,
next to ``provenance.json`` and ``train_metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import collect_provenance

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from tuneloop.config import TrainingSettings

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TrainingError(ValueError):
    """Training cannot start or cannot go on; the message says what to fix."""


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def records_digest(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the records' ids, prompts and completions, in order."""
    digest = hashlib.sha256()
    for record in records:
        row = {key: record.get(key) for key in ("id", "prompt", "completion")}
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def validate_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Fail fast when the dataset is empty or rows lack a non-empty prompt/completion."""
    if not records:
        raise TrainingError(
            "no training records: the dataset is empty (check the snapshot with `tuneloop pull`)"
        )
    bad: list[str] = []
    for index, record in enumerate(records):
        problems = [
            key
            for key in ("prompt", "completion")
            if not isinstance(record.get(key), str) or not record.get(key, "").strip()
        ]
        if problems:
            bad.append(f"{record.get('id', f'row {index}')} (missing/empty {', '.join(problems)})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingError(f"{len(bad)} of {len(records)} records cannot be trained on: {shown}")


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


def check_base_model(base_model: str | os.PathLike[str]) -> None:
    """A local base model must be a directory with config.json; say how to get one if not."""
    text = str(base_model)
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TrainingError(
                f"base model directory {path} has no config.json: it is not a saved model "
                "(run `tuneloop build-model` to build the demo model there)"
            )
        return
    if path.exists():
        raise TrainingError(f"base model {path} is a file; expected a model directory")
    if _HUB_ID.match(text) and not text.startswith("."):
        return  # a hub id: transformers resolves it (needs network or a warm local cache)
    raise TrainingError(
        f"base model directory {path} does not exist: run `tuneloop build-model` "
        "(or set model.base_model to a local model directory or a hub id)"
    )


def _split_chat(tokenizer: Any, prompt: str, completion: str) -> tuple[str, str]:
    """The prompt text (through the generation prompt) and the supervised text after it."""
    messages = [{"role": "user", "content": prompt}]
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
    tokenizer: Any, records: Sequence[Mapping[str, Any]], max_seq_len: int
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
    examples: list[TokenizedExample] = []
    dropped = 0
    for record in records:
        prompt_text, answer_text = _split_chat(tokenizer, record["prompt"], record["completion"])
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


def _epoch_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: sort within chunks of 50 batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda index: lengths[index])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` -> cuda + bfloat16 when a GPU is present, else cpu + float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA GPU; use device: auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


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
    """What :func:`fit` measured."""

    losses: list[float]
    steps: int
    micro_batches: int
    micro_batches_per_epoch: int
    tokens: int
    seconds: float


def check_init_adapter(init_adapter: str | os.PathLike[str], base_model: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter to warm-start from, if it fits ``base_model``.

    Warm-starting continues training from an existing adapter (the one in production) instead
    of fresh LoRA matrices: the candidate keeps what production knows and needs fewer steps to
    learn the new data. The adapter's own rank, alpha and target modules are kept.
    """
    path = Path(init_adapter)
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"cannot warm-start from {path}: no readable adapter_config.json ({err})") from err
    if not (path / "adapter_model.safetensors").is_file():
        raise TrainingError(f"cannot warm-start from {path}: no adapter_model.safetensors")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise TrainingError(f"cannot warm-start from {path}: peft_type {config.get('peft_type')!r} is not LORA")
    trained_on = str(config.get("base_model_name_or_path") or "")
    if trained_on and Path(trained_on).name != Path(str(base_model)).name:
        raise TrainingError(
            f"cannot warm-start from {path}: it was trained on base model {trained_on!r}, "
            f"not {str(base_model)!r}; set training.init_from: none to train from scratch"
        )
    return config


def load_lora_model(
    base_model: str | os.PathLike[str],
    settings: TrainingSettings,
    device: str,
    dtype: str,
    *,
    init_adapter: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """(peft model with trainable LoRA matrices on ``device``, tokenizer) for ``base_model``.

    The LoRA matrices are fresh, or a copy of ``init_adapter``'s (see ``check_init_adapter``).
    """
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Base weights in the compute dtype on GPU (memory); fp32 on CPU. LoRA weights stay fp32.
    load_dtype = getattr(torch, dtype) if device == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=load_dtype)
    except OSError as err:
        raise TrainingError(
            f"cannot load base model {base_model!r}: {err}\n"
            "A hub id needs network access or a copy in the local cache (HF_HUB_OFFLINE=1 forbids "
            "downloads); for the demo model run `tuneloop build-model`."
        ) from err
    if init_adapter is not None:
        check_init_adapter(init_adapter, base_model)
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_model)
        peft_model.to(device)
        return peft_model, tokenizer
    alpha = settings.lora_alpha
    lora_config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise TrainingError(
            f"target_modules {settings.target_modules} do not fit this model ({err}); "
            f"its modules include {names[:30]}"
        ) from err
    # What vLLM and PeftModel.from_pretrained read to find the base model.
    peft_model.peft_config["default"].base_model_name_or_path = str(base_model)
    peft_model.to(device)
    return peft_model, tokenizer


def fit(
    model: Any,
    examples: Sequence[TokenizedExample],
    settings: TrainingSettings,
    *,
    pad_id: int,
    device: str,
    dtype: str,
    progress: ProgressSink | None = None,
) -> FitStats:
    """The training loop: AdamW on the trainable (LoRA) parameters, warmup + cosine, clip 1.0.

    Each micro-batch's loss is the sum over its supervised tokens divided by the supervised
    tokens of the whole accumulated step, so ``grad_accum`` equals one larger batch.
    """
    import torch

    micro_per_epoch = math.ceil(len(examples) / settings.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / settings.grad_accum))
    total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    warmup = max(1, round(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" and device == "cuda" else None

    tracker = Progress(label="train", every_n=settings.log_every, sink=progress)
    tracker.start(total_steps)
    model.train()
    rng = random.Random(settings.seed)
    lengths = [len(example.input_ids) for example in examples]

    def micro_batches() -> Iterator[list[int]]:
        while True:
            yield from _epoch_batches(lengths, settings.batch_size, rng)

    batches = micro_batches()
    losses: list[float] = []
    window: list[float] = []
    tokens_seen = 0
    micro_done = 0
    started = time.monotonic()
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _lr_factor(step, total_steps, warmup)
        chunk = [collate([examples[i] for i in next(batches)], pad_id) for _ in range(settings.grad_accum)]
        n_targets = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in chunk)
        step_loss = 0.0
        step_tokens = 0
        for batch in chunk:
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss = loss_sum / max(1, n_targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
            micro_done += 1
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
        tracker.update(
            step + 1, items=step_tokens, loss=sum(window) / len(window), lr=optimizer.param_groups[0]["lr"]
        )
        if (step + 1) % settings.log_every == 0:
            window = []
    tracker.finish(loss=losses[-1])
    return FitStats(
        losses=losses,
        steps=total_steps,
        micro_batches=micro_done,
        micro_batches_per_epoch=micro_per_epoch,
        tokens=tokens_seen,
        seconds=time.monotonic() - started,
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
) -> TrainResult:
    """Train a LoRA adapter on ``train_records`` and write it to ``out_dir``.

    ``dataset_hash`` identifies the data in the provenance record (default: a hash of the
    records). ``init_adapter`` warm-starts from an existing adapter's weights (default: fresh).
    ``progress`` receives one line per ``settings.log_every`` steps (default stderr).
    The adapter is written to a sibling directory first and renamed into place at the end.
    """
    validate_records(train_records)
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
    model, tokenizer = load_lora_model(base_model, settings, device, dtype, init_adapter=init_adapter)
    examples, dropped = tokenize_records(tokenizer, train_records, settings.max_seq_len)
    if dropped:
        logger.warning(
            "dropped %d of %d records longer than max_seq_len=%d tokens",
            dropped, len(train_records), settings.max_seq_len,
        )
    if not examples:
        raise TrainingError(
            f"all {len(train_records)} records are longer than max_seq_len={settings.max_seq_len} "
            "tokens; raise training.max_seq_len"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA r=%d alpha=%s on %s (%s): %d examples, batch %dx%d, %s %s, %.2f%% of %d parameters trainable",
        settings.lora_rank, settings.lora_alpha, base_model,
        f"warm start from {init_adapter}" if init_adapter else "fresh", len(examples), settings.batch_size,
        settings.grad_accum, device, dtype, 100 * trainable / total, total,
    )
    stats = fit(model, examples, settings, pad_id=pad_id, device=device, dtype=dtype, progress=progress)
    losses = stats.losses
    final_loss = sum(losses[-10:]) / len(losses[-10:])

    staging = _prepare_out_dir(out_dir)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
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
        )
        provenance = collect_provenance(
            kind="lora_adapter",
            base_model=str(base_model),
            dataset_hash=dataset_hash,
            init_from=result.init_from,
            n_records=len(train_records),
            config=settings.model_dump(mode="json"),
        )
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        (staging / "train_metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "adapter written to %s: loss %.3f -> %.3f in %.0f s (%.0f tok/s)",
        out_dir, losses[0], final_loss, result.seconds, result.tokens_per_second,
    )
    return result
