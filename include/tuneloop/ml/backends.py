"""Generation backends for evaluation: :class:`HFBackend` (transformers ``generate`` here, the chat
template applied as vLLM applies it, stopping at eos and the template's end of turn),
``VllmBackend`` (in :mod:`tuneloop.ml.vllm_backend`: the running vLLM servers, the adapter under
a temporary LoRA name that is unloaded afterwards), :class:`CallableBackend` (any prompts ->
completions function), and :func:`select_backend` (``eval.backend``: auto uses vLLM when an
endpoint answers and serves the configured base model, else HF, saying why)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.progress import Progress, ProgressSink

if TYPE_CHECKING:
    import os

    from tuneloop.config import EvalSettings, Settings
    from tuneloop.serving.vllm_client import Prompt


logger = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence["Prompt"]], Sequence[str]]
"""Prompts (a user message, or a list of chat turns) in, completions (assistant text) out, same order."""

STOP_TOKENS: tuple[str, ...] = ()
"""Extra tokens to stop at, beyond eos, ``generation_config.eos_token_id`` and the chat
template's end-of-turn token (see :func:`tuneloop.ml.chat.template_stop_tokens`); none today."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class EvaluationError(ValueError):
    """Records or predictions cannot be scored; the message says which and why."""


class BackendUnavailable(RuntimeError):
    """The requested generation backend cannot be used (server down, wrong base model...)."""


@dataclass


class Generation:
    """What one backend call produced: answers in prompt order, wall time, request latencies."""

    texts: list[str]
    seconds: float
    latencies_s: list[float] | None = None
    """Per-request wall times (vLLM); None where prompts are answered in batches (HF)."""
    tokens: int | None = None
    """Generated tokens as the server counted them (vLLM's ``usage``); None: count them here."""


class GenerationBackend(Protocol):
    """Something that answers prompts; see :class:`HFBackend` and :class:`VllmBackend`."""

    name: str
    latency_reason: str | None
    """Why there are no per-request latencies (None when the backend measures them)."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def generate(self, prompts: Sequence[Prompt], *, temperature: float = 0.0, seed: int | None = None) -> Generation: ...

    def describe(self) -> dict[str, Any]: ...


def _device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_for_generation(base_model: str | os.PathLike[str], adapter_dir: str | os.PathLike[str] | None) -> tuple[Any, Any, str]:
    """Tokenizer (left padding) and eval-mode model, the adapter merged in for speed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = _device()
    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to(device)
    model.eval()
    return tokenizer, model, device


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, the model's
    ``generation_config.eos_token_id`` (int or list), and the end-of-turn token the chat
    template writes after an assistant message (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``...)."""
    from tuneloop.ml.chat import template_stop_tokens

    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(token_id) for token_id in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in (*template_stop_tokens(tokenizer), *STOP_TOKENS) if token in vocab)
    return sorted(ids)


class HFBackend:
    """transformers ``generate`` on this machine, batched with left padding.

    The model is loaded once (on the first call or :meth:`open`) and kept for every pass.
    Prompts are sorted by length so each batch pads little; answers come back in input order.
    ``temperature > 0`` samples (plain temperature sampling, no top-k/top-p, as vLLM does
    by default) after seeding torch with ``seed``.
    """

    name = "hf"

    def __init__(
        self,
        base_model: str | os.PathLike[str],
        adapter_dir: str | os.PathLike[str] | None,
        settings: EvalSettings,
        *,
        progress: ProgressSink | None = None,
        reason: str | None = None,
    ) -> None:
        self.base_model = base_model
        self.adapter_dir = adapter_dir
        self.settings = settings
        self.progress = progress
        self.reason = reason
        self.latency_reason: str | None = (
            f"HF generate answers in batches of {settings.batch_size}, so a request has no latency of "
            "its own; evaluate with --backend vllm to measure the served adapter's"
        )
        self._loaded: tuple[Any, Any, str] | None = None

    def open(self) -> None:
        if self._loaded is None:
            self._loaded = load_for_generation(self.base_model, self.adapter_dir)

    def close(self) -> None:
        self._loaded = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self._loaded[2] if self._loaded else None,
            "batch_size": self.settings.batch_size,
            "selected": self.reason,
        }

    def generate(self, prompts: Sequence[Prompt], *, temperature: float = 0.0, seed: int | None = None) -> Generation:
        import torch

        from tuneloop.serving.vllm_client import as_messages

        started = time.monotonic()
        if not prompts:
            return Generation([], 0.0)
        self.open()
        assert self._loaded is not None
        tokenizer, model, device = self._loaded
        settings = self.settings
        stop_ids = _stop_ids(tokenizer, model)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            torch.manual_seed(seed if seed is not None else 0)
        texts = [
            tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
            for prompt in prompts
        ]
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        outputs: list[str] = [""] * len(texts)
        tracker = Progress(label="generate", every_s=10.0, sink=self.progress, unit="new tok")
        n_batches = (len(order) + settings.batch_size - 1) // settings.batch_size
        tracker.start(n_batches, step_name="batch")
        for number, start in enumerate(range(0, len(order), settings.batch_size), 1):
            indices = order[start : start + settings.batch_size]
            encoded = tokenizer([texts[i] for i in indices], add_special_tokens=False, padding=True, return_tensors="pt")
            encoded = {key: value.to(device) for key, value in encoded.items()}
            with torch.inference_mode():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            n_new = 0
            for row, index in enumerate(indices):
                tokens = new_tokens[row].tolist()
                cut = next((pos for pos, token in enumerate(tokens) if token in stop_ids), len(tokens))
                n_new += cut
                outputs[index] = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
            tracker.update(number, items=n_new)
        tracker.finish()
        return Generation(outputs, time.monotonic() - started)


def generate_hf(
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    prompts: Sequence[Prompt],
    settings: EvalSettings,
    *,
    progress: ProgressSink | None = None,
) -> list[str]:
    """Greedy completions for ``prompts`` with transformers (loads the model for this call)."""
    return HFBackend(base_model, adapter_dir, settings, progress=progress).generate(prompts).texts


class CallableBackend:
    """A plain ``prompts -> completions`` function as a backend (an oracle, a test double).

    It cannot sample: every pass calls the function as it is, whatever the temperature.
    """

    def __init__(self, name: str, generate: GenerateFn) -> None:
        self.name = name
        self._generate = generate
        self.latency_reason: str | None = f"backend {name!r} is a plain function: no per-request latency"

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def generate(self, prompts: Sequence[Prompt], *, temperature: float = 0.0, seed: int | None = None) -> Generation:
        started = time.monotonic()
        texts = list(self._generate(prompts))
        return Generation(texts, time.monotonic() - started)


def has_torch() -> bool:
    """Whether HF generate can run here (torch, transformers and peft importable)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "peft"))


def select_backend(
    requested: str,
    settings: Settings,
    *,
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    progress: ProgressSink | None = None,
    version: str | None = None,
) -> GenerationBackend:
    """The backend for ``requested`` (``hf``, ``vllm`` or ``auto``), built from ``settings``.
    ``version``: the registered version ``adapter_dir`` holds, which servers fetch from the
    store themselves under ``vllm.adapter_source: store``.

    ``vllm`` needs every configured endpoint healthy and serving the configured base model
    (:class:`BackendUnavailable` otherwise). ``auto`` uses the endpoints that pass that check
    and falls back to HF when none does, with a progress line saying why.
    """

    def say(message: str) -> None:
        if progress is not None:
            progress(message)
        else:
            logger.info("%s", message)

    if requested not in ("auto", "hf", "vllm"):
        raise EvaluationError(f"unknown backend {requested!r}; choose auto, hf or vllm")
    if requested == "hf":
        return HFBackend(base_model, adapter_dir, settings.eval, progress=progress, reason="requested")
    from tuneloop.ml.vllm_backend import VllmBackend, eval_fleet, probe_vllm

    cfg, fleet = settings.vllm, eval_fleet(settings)
    api_key = cfg.key
    usable, problems = probe_vllm(
        fleet.endpoints, served_name=settings.model.served_model_name, base_model=base_model, api_key=api_key, timeout_s=cfg.timeout_s
    )
    if requested == "vllm" and problems:
        raise BackendUnavailable("--backend vllm: " + "; ".join(problems) + " (start it with `make serve`)")
    if not usable:
        reason = "; ".join(problems)
        if not has_torch():
            raise BackendUnavailable(
                f"backend auto: {reason}; and HF generate, the fallback, needs torch, transformers and peft, "
                "which this Python lacks: start vLLM (`make serve`) or run `make setup` for the ML env"
            )
        say(f"backend auto: evaluating with HF generate because {reason}")
        return HFBackend(base_model, adapter_dir, settings.eval, progress=progress, reason=f"auto: {reason}")
    reason = f"{requested}: vLLM answers at {', '.join(usable)}" + (f" (not used: {'; '.join(problems)})" if problems else "")
    say(f"backend {reason}; {fleet.describe()}")
    return VllmBackend(
        usable,
        served_name=settings.model.served_model_name,
        base_model=base_model,
        adapter_dir=adapter_dir,
        max_lora_rank=cfg.max_lora_rank,
        adapter_root=cfg.adapter_dir,
        max_tokens=settings.eval.max_new_tokens,
        concurrency=fleet.concurrency,
        max_rps=fleet.max_rps,
        fetch_version=version if cfg.adapter_source == "store" and adapter_dir is not None else None,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        request_timeout_s=settings.eval.request_timeout_s,
        progress=progress,
        reason=reason,
    )
