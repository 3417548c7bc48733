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

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import collect_provenance

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from tuneloop.config import TrainingSettings
    from tuneloop.tasks import Example, TaskSpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
GROUP_CHUNK_BATCHES = 50  # length grouping sorts rows within chunks of this many batches
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
    packing: bool = False
    n_validation: int = 0
    eval_loss_history: list[list[float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    from tuneloop.tasks import TaskRowError

    if not records:
        raise TrainingError(
            "no training records: the dataset is empty (check the snapshot with `tuneloop pull`)"
        )
    examples, bad = [], []
    for index, record in enumerate(records):
        try:
            examples.append(spec.example(record))
        except TaskRowError as err:
            row_id = record.get(spec.settings.id_field, f"row {index}") if isinstance(record, dict) else f"row {index}"
            bad.append(f"{row_id} ({err})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingError(f"{len(bad)} of {len(records)} records cannot be trained on (task.format={spec.format}): {shown}")
    return examples


def validate_records(records: Sequence[Mapping[str, Any]], spec: TaskSpec | None = None) -> None:
    """Fail fast when the dataset is empty or rows do not fit the task."""
    read_examples(records, spec or default_spec())


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


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as torch reports it.

    Without them bf16 matrix products are emulated, so ``dtype: auto`` stays at float32 there.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` -> cuda + bfloat16 when a GPU is present, else cpu with bfloat16 autocast
    where the CPU has native bf16 and float32 where it has not."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no CUDA GPU; use device: auto")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"
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

    from tuneloop.ml.chat import resolve_target_modules

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
        target_modules=resolve_target_modules(model, settings.target_modules),
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


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of a torchrun/accelerate launch, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> bool:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1).

    Each process trains on its own share of every optimizer step's micro-batches; the LoRA
    gradients are summed across processes before the step, so N processes with ``grad_accum``
    A take the same steps as one process with ``grad_accum`` N x A. NCCL on GPUs, gloo on CPU.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return True


class Checkpointer:
    """Training state (LoRA weights, optimizer, step, RNG, early-stopping state) in one file.

    Written every ``every`` steps with write-then-rename, so a killed run leaves the previous
    checkpoint whole. A run finds a checkpoint with its own fingerprint (same data, settings,
    base model and start adapter) and continues from it; any other is ignored and replaced.
    """

    def __init__(self, path: Path | None, fingerprint: str, every: int, *, writer: bool = True) -> None:
        self.path = path if every > 0 else None
        self.fingerprint = fingerprint
        self.every = every
        self.writer = writer

    def load(self) -> dict[str, Any] | None:
        import torch

        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, say why
            logger.warning("ignoring unreadable checkpoint %s (%s); training from the start", self.path, err)
            return None
        if state.get("fingerprint") != self.fingerprint:
            logger.warning(
                "ignoring checkpoint %s: it belongs to another run (different data, settings, base model or "
                "start adapter); training from the start", self.path,
            )
            return None
        return state

    def due(self, step: int, total: int) -> bool:
        return self.path is not None and self.writer and step % self.every == 0 and step < total

    def save(self, state: dict[str, Any]) -> None:
        import torch

        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        torch.save({"fingerprint": self.fingerprint, **state}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None and self.writer:
            self.path.unlink(missing_ok=True)


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


def _fast_kernels(model: Any, device: str, *, mixed: bool) -> contextlib.ExitStack:
    """What a step needs to keep the GPU busy; numerically the same as without.

    - No cuDNN attention: for the varying shapes of packed and length-grouped batches its
      per-call planning cost ~10 ms of CPU per layer on an H100 (torch 2.11), which left the
      GPU idle most of the step; the flash and memory-efficient kernels have no such cost.
    - Under autocast, peft's cast of each LoRA layer's input to the fp32 adapter dtype is
      skipped: autocast casts it straight back to bf16 for the matmul, so the two copies of
      every activation were pure memory traffic.
    """
    stack = contextlib.ExitStack()
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    if mixed:
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:  # older peft: keep its casts
            return stack
        stack.enter_context(disable_input_dtype_casting(model))
    return stack


def _all_reduce_gradients(parameters: Sequence[Any]) -> None:
    """Sum the LoRA gradients over processes (each loss is already divided by the global
    target count, so the sum is the gradient of the whole step)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    at = 0
    for g in grads:
        g.copy_(flat[at : at + g.numel()].view_as(g))
        at += g.numel()


def _all_reduce_sum(loss: float, tokens: int, device: str) -> tuple[float, int]:
    import torch
    import torch.distributed as dist

    values = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return float(values[0]), int(values[1])


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


def _fingerprint(dataset_hash: str, settings: TrainingSettings, base_model: Any, init_adapter: Any, world: int) -> str:
    config = settings.model_dump(mode="json", exclude={"log_every", "checkpoint_every"})
    text = json.dumps([dataset_hash, config, str(base_model), str(init_adapter), world], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_path(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its resumable state (beside it, same volume)."""
    return out_dir.parent / f".{out_dir.name}.checkpoint.pt"


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
