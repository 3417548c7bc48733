"""The demo base model: a small Llama built and pre-trained locally on CPU, no hub needed.

``build_demo_model`` trains a byte-level BPE tokenizer (digits split one by one, so the model
can copy and reformat numbers) on ``world.pretraining_corpus``, pre-trains a ``LlamaForCausalLM``
on the same corpus as a plain causal LM, and saves a directory that ``transformers`` and the vLLM
CPU server both load (safetensors, a chat template, ``generation_config.json``). The corpus holds
invoice documents and JSON objects but never the document -> JSON mapping: that is what a LoRA
adapter has to learn. Builds are cached by a hash of their recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import collect_provenance

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from tuneloop.config import Settings

logger = logging.getLogger(__name__)

RECIPE_FILE = "tuneloop_model.json"
# Bump when the build procedure changes in a way the preset fields do not capture.
RECIPE_VERSION = 1

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)

# User/system turns end with <|end|>, assistant turns with the eos token, so generation stops
# at eos; the generation prompt is "<|assistant|>\n". Roles other than these three are refused.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class BuildError(RuntimeError):
    """The demo model could not be built (bad preset, empty corpus...)."""


@dataclass(frozen=True)


class ModelPreset:
    """Size of the demo model and of its pre-training run."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    n_documents: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.1
    head_dim: int = 64
    copy_fraction: float = 0.5
    # generic extraction examples (tuneloop.demo.curriculum) mixed into the corpus, in chat form
    n_extraction: int = 0
    # copy rows (tuneloop.demo.copying): steps on them before the corpus, the first
    # copy_uniform_steps of random tokens only; then every copy_every-th corpus step is one
    copy_steps: int = 0
    copy_uniform_steps: int = 0
    copy_every: int = 0
    copy_batch_size: int = 16
    copy_seq_len: int = 256
    tie_embeddings: bool = False
    cpu_bf16: bool = False  # bf16 autocast on the CPU too (1.5x faster there)


PRESETS: dict[str, ModelPreset] = {
    # Seconds on 2 CPU cores; for tests and CI. Learns the corpus' surface, nothing more.
    "tiny": ModelPreset(
        name="tiny",
        vocab_size=600,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        intermediate_size=352,
        max_position_embeddings=512,
        n_documents=400,
        seq_len=128,
        batch_size=16,
        steps=60,
        learning_rate=3e-3,
        warmup_steps=6,
    ),
    # A few minutes on 2 CPU cores; the demo's model. It cannot copy values from its context,
    # so its adapters learn the answer's schema and the per-domain constants, not the values.
    "demo": ModelPreset(
        name="demo",
        vocab_size=2000,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=704,
        max_position_embeddings=512,
        n_documents=6000,
        seq_len=512,
        batch_size=8,
        # ~3.5 min on 2 cores. A longer run on this corpus alone lowers the loss but does not
        # teach it to copy values from its context (copy rows do: the "copy" preset below).
        steps=200,
        # 3e-3 trains the documents fine but never the attention that copies; 1e-3 does.
        learning_rate=1e-3,
        warmup_steps=20,
    ),
}

# The demo's architecture taught to copy: copy rows first (tuneloop.demo.copying) give it
# induction heads, and an adapter of a few hundred steps then copies names and numbers from the
# document (docs/benchmarks.md, "A base model that copies"). ~20 minutes on 2 CPU cores, so a
# checkout ships it (models/copy-base) and `build-model --preset copy` copies it.
PRESETS["copy"] = replace(
    PRESETS["demo"],
    name="copy",
    steps=600,
    warmup_steps=50,
    weight_decay=0.0,
    n_extraction=12000,
    copy_steps=1600,
    copy_uniform_steps=1000,
    copy_every=4,
    copy_batch_size=16,
    copy_seq_len=256,
    tie_embeddings=True,
    cpu_bf16=True,
)


def _corpus_sha256(corpus: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for document in corpus:
        digest.update(hashlib.sha256(document.encode()).digest())
    return digest.hexdigest()


def _recipe(preset: ModelPreset, seed: int, corpus_sha256: str) -> dict[str, Any]:
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "preset": asdict(preset),
        "seed": seed,
        "corpus_sha256": corpus_sha256,
        "special_tokens": list(SPECIAL_TOKENS),
        "chat_template": CHAT_TEMPLATE,
    }
    recipe["recipe_hash"] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return recipe


def read_model_record(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``tuneloop_model.json`` of a built demo model, or None if there is none."""
    path = Path(model_dir) / RECIPE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_built(model_dir: Path, recipe_hash: str) -> bool:
    record = read_model_record(model_dir)
    return (
        record is not None
        and record.get("recipe_hash") == recipe_hash
        and (model_dir / "model.safetensors").is_file()
        and (model_dir / "tokenizer.json").is_file()
    )


@contextlib.contextmanager


def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise concurrent builds of one directory (two Airflow tasks on one worker)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with open(lock_path, "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, the atomic rename still protects readers
            pass
        yield


def train_tokenizer(corpus: Sequence[str], vocab_size: int) -> Any:
    """Byte-level BPE with every digit its own token; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def wrap_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """A ``PreTrainedTokenizerFast`` with the special tokens and the chat template set."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
        model_max_length=max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_text(user: str, answer: str) -> str:
    """One user turn and its answer as the chat template renders them (``_pack`` adds bos/eos)."""
    return f"{USER_TOKEN}\n{user}{END_TOKEN}\n{ASSISTANT_TOKEN}\n{answer}"


def default_corpus(spec: ModelPreset, seed: int) -> list[str]:
    """The demo model's corpus: raw invoices and unpaired invoice-shaped JSON
    (``invoices.pretraining_corpus``) plus ``spec.n_extraction`` generic extraction examples
    from :mod:`tuneloop.demo.curriculum` (other document kinds, never an invoice)."""
    from tuneloop.demo.curriculum import curriculum
    from tuneloop.demo.invoices import pretraining_corpus

    corpus = pretraining_corpus(seed, spec.n_documents)
    corpus += [chat_text(user, answer) for user, answer in curriculum(seed, spec.n_extraction)]
    return corpus


def add_copy_tasks(token_lists: Sequence[list[int]], fraction: float, seed: int) -> list[list[list[int]]]:
    """Group tokenised documents into units packed side by side; some documents come twice.

    A tiny model pre-trained for minutes on documents alone barely learns to copy from its
    context (real LLMs do, from scale), and then a LoRA adapter cannot teach it extraction.
    Repeating ``fraction`` of the documents right after themselves makes copying pay off in
    pre-training. It teaches copying in general; the document -> JSON mapping stays unseen.
    """
    rng = random.Random(f"copy|{seed}")
    return [[tokens, tokens] if tokens and rng.random() < fraction else [tokens] for tokens in token_lists]


def _units(token_lists: Sequence[list[int]], chat: Sequence[bool], fraction: float, seed: int) -> list[list[list[int]]]:
    """Copy tasks for the plain documents; chat examples (already a copy task) go in once."""
    plain = add_copy_tasks([t for t, is_chat in zip(token_lists, chat, strict=True) if not is_chat], fraction, seed)
    return plain + [[t] for t, is_chat in zip(token_lists, chat, strict=True) if is_chat]


def _pack(
    units: Sequence[Sequence[list[int]]], seq_len: int, bos: int, eos: int, seed: int
) -> Any:
    """Concatenate ``bos text eos`` unit by unit in a shuffled order; cut rows of ``seq_len``."""
    import torch

    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for index in order:
        for token_ids in units[index]:
            stream.append(bos)
            stream.extend(token_ids)
            stream.append(eos)
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise BuildError(f"corpus too small: {len(stream)} tokens for one row of {seq_len}")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def _pick_device(cpu_bf16: bool = False) -> tuple[str, Any]:
    """cuda with bf16 autocast, else the CPU: float32, or bf16 autocast where the preset asks
    (1.5x faster on this kind of machine)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.bfloat16 if cpu_bf16 else None


def _lr_at(step: int, total: int, warmup: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _copy_batch_at(preset: ModelPreset, step: int) -> bool:
    """Whether corpus-phase ``step`` (0-based) is one of the copy batches mixed in."""
    return bool(preset.copy_every) and step % preset.copy_every == preset.copy_every - 1


def pretrain(
    model: Any, rows: Any, preset: ModelPreset, seed: int, progress: Progress, copy_rows: dict[str, Any] | None = None
) -> list[float]:
    """Causal-LM pre-training on packed rows, after ``preset.copy_steps`` on copy rows
    (:mod:`tuneloop.demo.copying`; ``copy_rows``: their vocabulary, digit ids and token stream)
    and with every ``copy_every``-th step one; returns the loss of every step."""
    import torch

    from tuneloop.demo.copying import copy_batch

    device, autocast_dtype = _pick_device(preset.cpu_bf16)
    model.to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.learning_rate,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    copying = random.Random(f"copy-rows|{seed}")
    copy_steps = preset.copy_steps if copy_rows is not None else 0
    progress.start(copy_steps + preset.steps, label=f"pretrain[{preset.name}]")
    order = torch.randperm(rows.shape[0], generator=generator)
    cursor = 0
    for step in range(-copy_steps, preset.steps):
        if step < 0:  # copy rows first: constant rate after warmup
            uniform = step < preset.copy_uniform_steps - copy_steps
            batch, labels = copy_batch(  # uniform: twice the rows, half as long (the same tokens)
                copying,
                preset.copy_batch_size * (2 if uniform else 1),
                preset.copy_seq_len // (2 if uniform else 1),
                mixed=not uniform,
                **(copy_rows or {}),
            )
            lr = preset.learning_rate * min(1.0, (step + copy_steps + 1) / max(1, preset.warmup_steps))
        elif copy_rows is not None and _copy_batch_at(preset, step):
            batch, labels = copy_batch(copying, preset.copy_batch_size, preset.copy_seq_len, mixed=True, **copy_rows)
            lr = _lr_at(step, preset.steps, preset.warmup_steps, preset.learning_rate)
        else:
            if cursor + preset.batch_size > len(order):
                order = torch.randperm(rows.shape[0], generator=generator)
                cursor = 0
            batch = labels = rows[order[cursor : cursor + preset.batch_size]]
            cursor += preset.batch_size
            lr = _lr_at(step, preset.steps, preset.warmup_steps, preset.learning_rate)
        batch, labels = batch.to(device), labels.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        progress.update(step + copy_steps + 1, items=batch.numel(), loss=losses[-1])
    progress.finish(loss=losses[-1])
    model.to("cpu")
    model.eval()
    return losses


MODELS_DIR = Path(__file__).resolve().parents[3] / "models"
"""Where a repository checkout ships prebuilt presets, ``<preset>-base`` (``copy``: about 20
minutes to pre-train on two cores, 15 MB). Absent from an installed wheel, which builds instead."""


def shipped_dir(preset: str) -> Path:
    """Where a checkout ships a preset's prebuilt model (it may not exist)."""
    return MODELS_DIR / f"{preset}-base"


def _file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file a model directory needs (not the record or the model card)."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in (RECIPE_FILE, "README.md")
    }


def shipped_model(recipe_hash: str, shipped: Path | None) -> Path | None:
    """The shipped model directory if it was built from this recipe and its files are intact.

    A checkout without Git LFS, a hand-edited file or a model from an older recipe is refused
    (with a warning naming the cause), and the caller builds instead.
    """
    if shipped is None or not shipped.is_dir():
        return None
    record = read_model_record(shipped)
    if record is None or record.get("recipe_hash") != recipe_hash:
        logger.warning("the shipped model in %s is from another recipe; building instead", shipped)
        return None
    expected = record.get("files") or {}
    found = _file_hashes(shipped)
    if not expected or found != expected:
        bad = sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))
        logger.warning("the shipped model in %s does not match its record (files %s); building instead", shipped, bad)
        return None
    return shipped


def build_demo_model(
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "demo",
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    force: bool = False,
    progress: ProgressSink | None = None,
    shipped: Path | None | Literal["preset"] = "preset",
) -> Path:
    """Build (or reuse) the demo base model in ``out_dir`` and return that path.

    ``corpus`` defaults to :func:`default_corpus`. If ``out_dir`` already holds a model built
    from the same recipe (preset, seed, corpus hash), it is returned at once unless ``force``.
    Otherwise a copy shipped in ``shipped`` (default: :func:`shipped_dir` of the preset) with the same recipe and intact files is copied in
    (seconds), and only without one is the model pre-trained here (``force`` always trains).
    Both write to a sibling directory and rename it into place.
    """
    if preset not in PRESETS:
        raise BuildError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    if corpus is None:
        corpus = default_corpus(spec, seed)
    corpus = [document for document in corpus if document.strip()]
    if not corpus:
        raise BuildError("the pre-training corpus is empty")
    recipe = _recipe(spec, seed, _corpus_sha256(corpus))
    if not force and _is_built(out_dir, recipe["recipe_hash"]):
        logger.info("demo model %s is up to date (recipe %s)", out_dir, recipe["recipe_hash"][:12])
        return out_dir
    tracker = Progress(every_s=15.0, sink=progress)
    with _build_lock(out_dir):
        if not force and _is_built(out_dir, recipe["recipe_hash"]):  # built while we waited
            return out_dir
        if shipped == "preset":
            shipped = shipped_dir(preset)
        source = None if force or shipped is None or shipped.resolve() == out_dir.resolve() else shipped_model(recipe["recipe_hash"], shipped)
        staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if source is not None:
                shutil.copytree(source, staging)
                logger.info("copied the shipped %s model from %s (recipe %s; `tuneloop build-model --rebuild` trains it here)", preset, source, recipe["recipe_hash"][:12])
            else:
                staging.mkdir(parents=True)
                _build_into(staging, spec, seed, corpus, recipe, tracker)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _build_into(
    directory: Path,
    spec: ModelPreset,
    seed: int,
    corpus: Sequence[str],
    recipe: dict[str, Any],
    progress: Progress,
) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, set_seed

    started = time.monotonic()
    set_seed(seed)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    fast = wrap_tokenizer(tokenizer, spec.max_position_embeddings)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    token_lists = [encoding.ids for encoding in tokenizer.encode_batch(list(corpus), add_special_tokens=False)]
    units = _units(token_lists, [text.startswith(USER_TOKEN) for text in corpus], spec.copy_fraction, seed)
    rows = _pack(units, spec.seq_len, ids[BOS_TOKEN], ids[EOS_TOKEN], seed)
    logger.info(
        "tokenizer: %d tokens; corpus: %d documents, %d tokens, %d rows of %d",
        tokenizer.get_vocab_size(), len(corpus), rows.numel(), rows.shape[0], spec.seq_len,
    )
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    copy_rows = None
    if spec.copy_steps or spec.copy_every:
        digits = [tokenizer.token_to_id(c) for c in "0123456789-/.,"]
        copy_rows = {
            "vocab": range(len(SPECIAL_TOKENS), tokenizer.get_vocab_size()),
            "bos": ids[BOS_TOKEN],
            "eos": ids[EOS_TOKEN],
            "digit_ids": [d for d in digits if d is not None],
            "stream": rows.flatten().tolist(),
        }
    losses = pretrain(model, rows, spec, seed, progress, copy_rows)
    corpus_losses = [loss for step, loss in enumerate(losses[spec.copy_steps if copy_rows else 0 :]) if not (copy_rows and _copy_batch_at(spec, step))]
    final_loss = sum(corpus_losses[-10:]) / len(corpus_losses[-10:])

    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids[END_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
    )
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        **recipe,
        "name": f"tuneloop-demo-{spec.name}",
        "n_documents": len(corpus),
        "corpus_tokens": int(rows.numel()),
        "vocab_size": tokenizer.get_vocab_size(),
        "parameters": n_params,
        "final_loss": round(final_loss, 4),
        "loss_history": [round(loss, 4) for loss in losses[:: max(1, len(losses) // 50)]],
        "build_seconds": round(time.monotonic() - started, 1),
        "provenance": collect_provenance(preset=spec.name, seed=seed),
    }
    record["files"] = _file_hashes(directory)
    (directory / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(model_card(record), encoding="utf-8")
    logger.info(
        "built demo model %s: %.2fM parameters, final loss %.3f, %.0f s",
        spec.name, n_params / 1e6, final_loss, record["build_seconds"],
    )


def model_card(record: dict[str, Any]) -> str:
    """A Hugging Face style model card for a built demo model: what it is and what it has seen."""
    preset = record["preset"]
    extraction = (
        f"- {preset['n_extraction']:,} generic extraction examples in the chat format (`tuneloop.demo.curriculum`):\n"
        "  delivery notes, purchase orders, payslips, hotel bookings and bank transfers in five languages\n"
        "  and four layouts, each with an instruction naming the keys and a JSON answer.\n"
        if preset.get("n_extraction")
        else ""
    )
    copying = (
        f"- copy rows (`tuneloop.demo.copying`): {preset['copy_steps']:,} steps before the corpus (the first\n"
        f"  {preset['copy_uniform_steps']:,} of random tokens, then random tokens, digit strings and stretches of\n"
        "  this corpus), each span followed by its copy, the loss on the copy only"
        + (f"; then one such batch every {preset['copy_every']} corpus steps" if preset.get("copy_every") else "")
        + ". They teach\n  copying from the context in general and pair no document with its fields.\n"
        if preset.get("copy_steps")
        else ""
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [tuneloop, demo, llama]
---
# {record["name"]}

A small Llama ({record["parameters"] / 1e6:.1f}M parameters: {preset["num_layers"]} layers, hidden size
{preset["hidden_size"]}, {preset["num_heads"]} heads, byte-level BPE of {record["vocab_size"]} tokens with every digit
its own token) that tuneloop's demo uses as its base model. Built by `tuneloop build-model --preset
{preset["name"]} --seed {record["seed"]} --rebuild` (`include/tuneloop/demo/basemodel.py`), no download.

## What it has seen
Pre-trained as a causal LM, {preset["steps"]} steps of {preset["batch_size"]} x {preset["seq_len"]} tokens,
on {record["corpus_tokens"]:,} tokens (recipe hash `{record["recipe_hash"][:16]}`, corpus sha256
`{record["corpus_sha256"][:16]}`):

- {preset["n_documents"] // 2:,} raw invoice documents of both demo domains (US/UK and continental Europe),
  {preset["copy_fraction"]:.0%} of them repeated right after themselves (a span-copy task);
- {preset["n_documents"] - preset["n_documents"] // 2:,} invoice-shaped JSON objects, never paired with
  the document they came from;
{extraction}{copying}
No invoice is ever paired with its fields: that mapping is what the adapter learns.

None of the demo's held-out or training rows is in the corpus: they come from other seeds of the
same generator.

Final training loss {record["final_loss"]}; build time {record["build_seconds"]:.0f} s on the machine in
`tuneloop_model.json` (provenance, loss history and the sha256 of every file).
"""


def resolve_base_model(settings: Settings, *, progress: ProgressSink | None = None) -> str:
    """The base model to load: the demo model (built on first use) or the configured path/id.

    ``model.base_model == "demo"`` builds ``model.demo_model_dir`` if needed. Anything else is a
    local directory or a hub id and is returned as-is (a hub id needs network or a warm cache).
    """
    if settings.model.base_model == "demo":
        return str(build_demo_model(Path(settings.model.demo_model_dir), progress=progress))
    return settings.model.base_model
