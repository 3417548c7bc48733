"""Generation backends for evaluation: :class:`HFBackend` (transformers ``generate`` here, the chat
template applied as vLLM applies it, stopping at eos and the template's end of turn),
:class:`VllmBackend` (the running vLLM servers, the adapter under a temporary LoRA name that is
unloaded afterwards), :class:`CallableBackend` (any prompts -> completions function), and
:func:`select_backend` (``eval.backend``: auto uses vLLM when an endpoint answers and serves the
configured base model, else HF, saying why)."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import dir_digest

if TYPE_CHECKING:
    import os

    from tuneloop.config import EvalSettings, Settings
    from tuneloop.serving.vllm_client import ChatReply, Prompt, VllmClient


logger = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence["Prompt"]], Sequence[str]]
"""Prompts (a user message, or a list of chat turns) in, completions (assistant text) out, same order."""

STOP_TOKENS: tuple[str, ...] = ()
"""Extra tokens to stop at, beyond eos, ``generation_config.eos_token_id`` and the chat
template's end-of-turn token (see :func:`tuneloop.ml.chat.template_stop_tokens`); none today."""

EVAL_NAME_INFIX = "-eval-"
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


def eval_lora_name(served_name: str) -> str:
    """A fresh temporary LoRA name, ``<served>-eval-<8 hex>``: never the stable or staging name,
    and unique per evaluation, so two evaluations at once never swap each other's weights."""
    from tuneloop.serving.adapters import check_lora_name

    return check_lora_name(f"{served_name}{EVAL_NAME_INFIX}{uuid.uuid4().hex[:8]}")


def materialize_eval_adapter(adapter_dir: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """Copy an adapter's config and weights to ``root/eval/<content hash>/`` for the servers to read.

    ``root`` is ``vllm.adapter_dir`` (a shared volume in production). The directory is written
    under a temporary name and renamed into place, and is never changed afterwards: the same
    adapter always lands in the same directory, and a directory vLLM may still hold in its
    cache never changes under it.
    """
    source = Path(adapter_dir)
    digest = dir_digest(source, suffixes=ADAPTER_FILES)
    target = Path(root).resolve() / "eval" / digest[:16]
    if all((target / name).is_file() for name in ADAPTER_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for name in ADAPTER_FILES:
            shutil.copy2(source / name, staging / name)
        try:
            staging.rename(target)
        except OSError:
            if not all((target / name).is_file() for name in ADAPTER_FILES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def probe_vllm(
    endpoints: Sequence[str],
    *,
    served_name: str,
    base_model: str | os.PathLike[str],
    api_key: str | None = None,
    timeout_s: float = 10.0,
) -> tuple[list[str], list[str]]:
    """Which endpoints can evaluate: healthy, serving ``<served>-base`` from the configured base
    model. Returns (usable endpoints, one problem per endpoint that cannot)."""
    from tuneloop.serving.adapters import compare_base_models
    from tuneloop.serving.verify import base_name
    from tuneloop.serving.vllm_client import VllmClient, VllmError

    base = base_name(served_name)
    usable, problems = [], []
    for url in endpoints:
        with VllmClient(url, api_key=api_key, timeout_s=min(timeout_s, 10.0)) as client:
            if not client.health():
                problems.append(f"vLLM at {client.base_url} does not answer /health")
                continue
            try:
                models = {str(m["id"]): m for m in client.models()}
            except VllmError as err:
                problems.append(str(err))
                continue
        if base not in models:
            problems.append(f"vLLM at {url} does not serve {base} (it serves {sorted(models)})")
            continue
        root = str(models[base].get("root") or "")
        same, _ = compare_base_models(root, str(base_model))
        if not same:
            problems.append(f"vLLM at {url} serves {base} from {root}, not the configured base model {base_model}")
            continue
        usable.append(url.rstrip("/"))
    return usable, problems


class VllmBackend:
    """The running vLLM servers, through a temporary LoRA name (or ``<served>-base``).

    :meth:`open` checks every endpoint (healthy, serves the configured base model), validates
    the adapter as a deploy does (:func:`tuneloop.serving.adapters.validate_adapter`), copies it where the
    servers read adapters (:func:`materialize_eval_adapter`) and loads it under a fresh
    :func:`eval_lora_name` on each endpoint. :meth:`close` unloads it wherever it was loaded
    and checks it is gone; a failed unload is reported in :meth:`describe` (``unloaded``) and
    logged, and does not hide an earlier error. Use as a context manager.

    :meth:`generate` sends ``concurrency`` requests at a time to each endpoint (prompts spread
    round-robin) and keeps each request's wall time. A generation request may wait behind the
    others in the server's batch, so it gets ``request_timeout_s`` (``eval.request_timeout_s``)
    instead of the ``timeout_s`` (``vllm.timeout_s``) of health checks, loads and unloads. vLLM unloads free the name, not the
    worker's adapter cache; the cache (``--max-cpu-loras``) evicts old entries by LRU.
    """

    name = "vllm"
    latency_reason: str | None = None

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        served_name: str,
        base_model: str | os.PathLike[str],
        adapter_dir: str | os.PathLike[str] | None,
        max_lora_rank: int,
        adapter_root: str | os.PathLike[str],
        max_tokens: int,
        concurrency: int = 32,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        request_timeout_s: float = 600.0,
        progress: ProgressSink | None = None,
        reason: str | None = None,
    ) -> None:
        if not endpoints:
            raise BackendUnavailable("no vLLM endpoints configured (vllm.endpoints)")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.served_name = served_name
        self.base_model = base_model
        self.adapter_dir = adapter_dir
        self.max_lora_rank = max_lora_rank
        self.adapter_root = adapter_root
        self.max_tokens = max_tokens
        self.concurrency = max(1, concurrency)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self.progress = progress
        self.reason = reason
        self.model: str | None = None
        self.lora_name: str | None = None
        self.served_path: str | None = None
        self.unloaded: dict[str, bool | str] = {}
        self._clients: list[VllmClient] = []
        self._loaded: list[VllmClient] = []

    def __enter__(self) -> VllmBackend:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        else:
            logger.info("%s", message)

    def open(self) -> None:
        """Preflight, validate, materialise and load; on any failure unload what was loaded."""
        from tuneloop.serving.adapters import validate_adapter
        from tuneloop.serving.verify import base_name
        from tuneloop.serving.vllm_client import VllmClient

        if self.model is not None:
            return
        usable, problems = probe_vllm(
            self.endpoints, served_name=self.served_name, base_model=self.base_model, api_key=self.api_key, timeout_s=self.timeout_s
        )
        if problems:
            raise BackendUnavailable("cannot evaluate through vLLM: " + "; ".join(problems) + " (start it with `make serve`)")
        self._clients = [
            VllmClient(url, api_key=self.api_key, timeout_s=self.timeout_s, max_connections=self.concurrency) for url in self.endpoints
        ]
        if self.adapter_dir is None:
            self.model = base_name(self.served_name)
            return
        try:
            validate_adapter(self.adapter_dir, base_model_dir_or_id=self.base_model, max_lora_rank=self.max_lora_rank)
            path = str(materialize_eval_adapter(self.adapter_dir, self.adapter_root))
            name = eval_lora_name(self.served_name)
            self.lora_name, self.served_path = name, path
            for client in self._clients:
                # Counted as loaded before the request: a load that timed out may still have happened.
                self._loaded.append(client)
                self.unloaded[client.base_url] = False
                client.load_adapter(name, path, inplace=False)
                listed = client.adapters().get(name)
                if listed != path:
                    raise BackendUnavailable(f"vLLM at {client.base_url} lists {name} -> {listed!r} after loading {path}")
            self._say(f"vllm: loaded {self.adapter_dir} as {name} on {len(self._clients)} endpoint(s)")
        except BaseException:
            self.close()
            raise
        self.model = name

    def close(self) -> None:
        """Unload the temporary name wherever it was loaded; close the connections."""
        from tuneloop.serving.vllm_client import VllmError

        for client in self._loaded:
            assert self.lora_name is not None
            try:
                try:
                    client.unload_adapter(self.lora_name)
                except VllmError as err:
                    if err.status != 404:  # 404: the name is not loaded (its load never happened)
                        raise
                if self.lora_name in client.adapters():
                    raise VllmError(f"{self.lora_name} is still listed after unloading it", endpoint=client.base_url)
                self.unloaded[client.base_url] = True
            except VllmError as err:
                self.unloaded[client.base_url] = f"unload failed: {err}"
                logger.error("vLLM at %s: could not unload the eval adapter %s: %s", client.base_url, self.lora_name, err)
                self._say(f"vllm: WARNING could not unload {self.lora_name} from {client.base_url}: {err}")
        if self._loaded:
            done = sum(value is True for value in self.unloaded.values())
            self._say(f"vllm: unloaded {self.lora_name} from {done} of {len(self._loaded)} endpoint(s)")
        self._loaded = []
        for client in self._clients:
            client.close()
        self._clients = []
        self.model = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "endpoints": list(self.endpoints),
            "lora_name": self.lora_name,
            "adapter_path": self.served_path,
            "unloaded": dict(self.unloaded) if self.lora_name else None,
            "concurrency_per_endpoint": self.concurrency,
            "selected": self.reason,
        }

    def generate(
        self, prompts: Sequence[Prompt], *, temperature: float = 0.0, seed: int | None = None, concurrency: int | None = None
    ) -> Generation:
        """Answers in prompt order, ``concurrency`` (default: the backend's) requests at a time per
        endpoint; raises the first request failure (requests not yet sent are dropped).

        ``seed`` is never sent: vLLM's CPU build kills its engine when a seeded request is
        discarded (``CPU Generator does not use offset``), and that server may serve production.
        Sampled passes are therefore not reproducible through vLLM."""
        from tuneloop.serving.vllm_client import VllmError

        if self.model is None:
            raise BackendUnavailable("VllmBackend.generate before open()")
        started = time.monotonic()
        if not prompts:
            return Generation([], 0.0, [])
        model, clients = self.model, self._clients
        workers = max(1, concurrency or self.concurrency) * len(clients)
        replies: list[ChatReply | None] = [None] * len(prompts)
        tracker = Progress(label="vllm", every_s=10.0, sink=self.progress, unit="new tok")
        tracker.start(len(prompts), step_name="answer")

        def ask(index: int) -> int:
            client = clients[index % len(clients)]
            replies[index] = client.chat_reply(
                model, prompts[index], max_tokens=self.max_tokens, temperature=temperature,
                seed=None, timeout_s=self.request_timeout_s,
            )
            return index

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-eval") as pool:
            pending = {pool.submit(ask, index) for index in range(len(prompts))}
            done_count = 0
            while pending:
                done, pending = wait(pending, timeout=5.0, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        answered = sum(reply is not None for reply in replies)
                        if isinstance(error, VllmError):
                            raise VllmError(
                                f"{error} (after {answered} of {len(prompts)} answers)",
                                endpoint=error.endpoint, status=error.status, reply=error.reply,
                            ) from error
                        raise error
                    done_count += 1
                    reply = replies[future.result()]
                    tracker.update(done_count, items=(reply.completion_tokens or 0) if reply else 0)
        tracker.finish()
        finished = [reply for reply in replies if reply is not None]
        return Generation([r.text for r in finished], time.monotonic() - started, [r.seconds for r in finished])


def select_backend(
    requested: str,
    settings: Settings,
    *,
    base_model: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | None,
    progress: ProgressSink | None = None,
) -> GenerationBackend:
    """The backend for ``requested`` (``hf``, ``vllm`` or ``auto``), built from ``settings``.

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
    cfg = settings.vllm
    api_key = cfg.key
    usable, problems = probe_vllm(
        cfg.endpoints, served_name=settings.model.served_model_name, base_model=base_model, api_key=api_key, timeout_s=cfg.timeout_s
    )
    if requested == "vllm" and problems:
        raise BackendUnavailable("--backend vllm: " + "; ".join(problems) + " (start it with `make serve`)")
    if not usable:
        reason = "; ".join(problems)
        say(f"backend auto: evaluating with HF generate because {reason}")
        return HFBackend(base_model, adapter_dir, settings.eval, progress=progress, reason=f"auto: {reason}")
    reason = f"{requested}: vLLM answers at {', '.join(usable)}" + (f" (not used: {'; '.join(problems)})" if problems else "")
    say(f"backend {reason}")
    return VllmBackend(
        usable,
        served_name=settings.model.served_model_name,
        base_model=base_model,
        adapter_dir=adapter_dir,
        max_lora_rank=cfg.max_lora_rank,
        adapter_root=cfg.adapter_dir,
        max_tokens=settings.eval.max_new_tokens,
        concurrency=settings.eval.batch_size,
        api_key=api_key,
        timeout_s=cfg.timeout_s,
        request_timeout_s=settings.eval.request_timeout_s,
        progress=progress,
        reason=reason,
    )
