"""Evaluation through the running vLLM servers: :class:`VllmBackend` (the adapter under a
temporary LoRA name, unloaded afterwards), :func:`probe_vllm` (which endpoints can evaluate) and
:func:`eval_fleet` (``eval.endpoints``, or the serving fleet under the ``eval.production_*``
bounds, so that the loop's own evaluation never crowds out production traffic)."""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.ml.backends import ADAPTER_FILES, BackendUnavailable, Generation
from tuneloop.progress import Progress, ProgressSink
from tuneloop.provenance import dir_digest

if TYPE_CHECKING:
    import os
    from collections.abc import Iterable, Sequence

    from tuneloop.config import Settings
    from tuneloop.serving.vllm_client import ChatReply, Prompt, VllmClient

logger = logging.getLogger(__name__)

EVAL_NAME_INFIX = "-eval-"


def eval_lora_name(served_name: str, *, now: float | None = None) -> str:
    """A fresh temporary LoRA name, ``<served>-eval-<8 hex: start time><6 hex: random>``: never
    the stable or staging name, unique per evaluation (two evaluations at once never swap each
    other's weights), and dated, so ``reconcile`` can unload one a killed evaluation left."""
    from tuneloop.serving.adapters import check_lora_name

    stamp = int(time.time() if now is None else now)
    return check_lora_name(f"{served_name}{EVAL_NAME_INFIX}{stamp:08x}{uuid.uuid4().hex[:6]}")


def stale_eval_names(names: Iterable[str], served_name: str, *, max_age_s: float, now: float | None = None) -> list[str]:
    """The evaluation names among ``names`` older than ``max_age_s``: left by an evaluation that
    was killed before it unloaded its name (each holds a LoRA slot). Undated names (an older
    tuneloop's) are left alone: their age is unknown."""
    clock = time.time() if now is None else now
    pattern = re.compile(re.escape(served_name + EVAL_NAME_INFIX) + r"([0-9a-f]{8})[0-9a-f]{6}")
    stale = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and clock - int(match.group(1), 16) > max_age_s:
            stale.append(name)
    return sorted(stale)


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
        max_rps: float | None = None,
        fetch_version: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        request_timeout_s: float = 600.0,
        progress: ProgressSink | None = None,
        reason: str | None = None,
    ) -> None:
        if not endpoints:
            raise BackendUnavailable("no vLLM endpoints configured (eval.endpoints or vllm.endpoints)")
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.served_name = served_name
        self.base_model = base_model
        self.adapter_dir = adapter_dir
        self.max_lora_rank = max_lora_rank
        self.adapter_root = adapter_root
        self.max_tokens = max_tokens
        self.concurrency = max(1, concurrency)
        self.max_rps = max_rps
        self.fetch_version = fetch_version
        """With ``vllm.adapter_source: store``: the registered version each server fetches itself."""
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
            VllmClient(url, api_key=self.api_key, timeout_s=self.timeout_s, max_connections=self.concurrency, max_rps=self.max_rps)
            for url in self.endpoints
        ]
        if self.adapter_dir is None:
            self.model = base_name(self.served_name)
            return
        try:
            validate_adapter(self.adapter_dir, base_model_dir_or_id=self.base_model, max_lora_rank=self.max_lora_rank)
            if self.fetch_version is None:
                path = str(materialize_eval_adapter(self.adapter_dir, self.adapter_root))
            name = eval_lora_name(self.served_name)
            self.lora_name = name
            for client in self._clients:
                if self.fetch_version is not None:  # vllm.adapter_source: store: the server's own copy
                    from tuneloop.serving.store_resolver import fetch_on_server

                    path = fetch_on_server(client, self.served_name, self.fetch_version)
                self.served_path = path
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
            "max_rps_per_endpoint": self.max_rps,
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
        counted = [r.completion_tokens for r in finished]
        tokens = sum(n for n in counted if n is not None) if all(n is not None for n in counted) else None
        return Generation([r.text for r in finished], time.monotonic() - started, [r.seconds for r in finished], tokens)


@dataclass(frozen=True)
class EvalFleet:
    """Where evaluation sends its requests, and how hard."""

    endpoints: list[str]
    serving: bool
    """True: the servers that serve production (``eval.endpoints`` empty), so the bounds apply."""
    concurrency: int
    max_rps: float | None

    def describe(self) -> str:
        if not self.serving:
            return f"evaluation endpoints (eval.endpoints), {self.concurrency} in flight each"
        rate = f"{self.max_rps:g} req/s" if self.max_rps else "no rate bound"
        return (
            f"the serving fleet, bounded to {self.concurrency} in flight and {rate} per endpoint "
            "(eval.production_*; set eval.endpoints to evaluate on servers of their own)"
        )


def eval_fleet(settings: Settings) -> EvalFleet:
    """``eval.endpoints`` when set (full ``eval.batch_size`` concurrency), else the serving
    fleet ``vllm.endpoints`` under ``eval.production_concurrency`` and ``eval.production_max_rps``:
    the loop's own evaluation must never crowd out production traffic."""
    cfg = settings.eval
    if cfg.endpoints:
        return EvalFleet(list(cfg.endpoints), False, cfg.batch_size, None)
    return EvalFleet(list(settings.vllm.endpoints), True, min(cfg.batch_size, cfg.production_concurrency), cfg.production_max_rps)
