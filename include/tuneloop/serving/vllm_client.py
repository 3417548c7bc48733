"""A small synchronous client for one vLLM OpenAI-compatible server (httpx, no vLLM import).

It covers what tuneloop needs: health, the model list, runtime LoRA load/unload, chat
completions (one, or many in threads for batched evaluation) and Prometheus metrics. Every
failure becomes a :class:`VllmError` that names the endpoint and carries the server's own reply:
vLLM answers a successful load with plain text (``Success: LoRA adapter 'x' added
successfully.``) and errors with JSON (``{"error": {"message", "type", "code"}}``), while
FastAPI's own 404 for a route that does not exist is ``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

START_HINT = "start it with `make serve`"


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the assistant text, the request's wall time and token usage."""

    text: str
    seconds: float
    completion_tokens: int | None = None
    finish_reason: str | None = None
    model: str | None = None  # the name that answered (behind a gateway alias: the version name)


class VllmError(RuntimeError):
    """A request to a vLLM server failed; ``status`` is the HTTP status (None: no reply)."""

    def __init__(self, message: str, *, endpoint: str, status: int | None = None, reply: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.reply = reply


class VllmDownError(VllmError):
    """Nothing answers at the endpoint (connection refused, DNS, unreachable)."""


def _reply_text(response: httpx.Response) -> str:
    """The server's message: ``error.message`` of a vLLM JSON error, FastAPI's ``detail``, or the text."""
    text = response.text.strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            kind = f"{error['type']}: " if error.get("type") else ""
            return f"{kind}{error['message']}"
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])
    return text[:2000]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A plain string becomes one user message; a list of messages is passed through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


class RequestPacer:
    """At most ``per_second`` request starts per second, evenly spaced, across threads.

    Each :meth:`wait` takes the next free slot (``1 / per_second`` after the previous one, or
    now if that has passed) and sleeps until it; no bursts, so a server that also serves
    production sees a steady, bounded rate from an evaluation."""

    def __init__(self, per_second: float, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if not per_second > 0:
            raise ValueError(f"requests per second must be > 0, got {per_second}")
        self.interval = 1.0 / per_second
        self._clock, self._sleep = clock, sleep
        self._next = -float("inf")
        self._lock = threading.Lock()

    def wait(self) -> float:
        """Sleep until this request's slot; return the seconds slept."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            self._sleep(delay)
        return delay


class VllmClient:
    """One vLLM server at ``base_url`` (``http://host:port``), with optional bearer auth.

    Thread-safe for concurrent requests (httpx's connection pool is), which is how
    :meth:`chat_many` fans prompts out. Use as a context manager or call :meth:`close`.
    ``max_rps`` paces chat requests (:class:`RequestPacer`); None: as fast as they come.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        *,
        max_connections: int = 32,
        max_rps: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.pacer = RequestPacer(max_rps) if max_rps else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    def __enter__(self) -> VllmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"VllmClient({self.base_url!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send one request; raise :class:`VllmError` on no reply or a status >= 400."""
        what = f"{method} {path}"
        try:
            response = self._http.request(
                method,
                path,
                json=json_body,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectError as err:
            raise VllmDownError(
                f"vLLM at {self.base_url} is down ({what}: {err}): {START_HINT}",
                endpoint=self.base_url,
            ) from err
        except httpx.TimeoutException as err:
            limit = timeout_s if timeout_s is not None else self.timeout_s
            raise VllmError(
                f"vLLM at {self.base_url} did not answer {what} within {limit:g} s ({type(err).__name__})",
                endpoint=self.base_url,
            ) from err
        except httpx.HTTPError as err:
            raise VllmError(
                f"vLLM at {self.base_url}: {what} failed: {type(err).__name__}: {err}",
                endpoint=self.base_url,
            ) from err
        if response.status_code >= 400:
            reply = _reply_text(response)
            raise VllmError(
                f"vLLM at {self.base_url}: {what} -> {response.status_code}: {reply}{self._hint(path, response)}",
                endpoint=self.base_url,
                status=response.status_code,
                reply=reply,
            )
        return response

    def _hint(self, path: str, response: httpx.Response) -> str:
        """A next step for the errors whose fix is not obvious from vLLM's message."""
        if response.status_code == 401:
            return " (the server wants an API key: set TUNELOOP__VLLM__API_KEY to the server's key)"
        if response.status_code == 404 and "lora_adapter" in path:
            try:
                route_missing = response.json() == {"detail": "Not Found"}
            except ValueError:
                route_missing = False
            if route_missing:
                return (
                    " (runtime LoRA updating is off: start the server with"
                    " VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, as scripts/serve.sh does)"
                )
        return ""

    # -- server state -----------------------------------------------------------------------

    def health(self) -> bool:
        """True if ``GET /health`` answers 200; False if it errors or nothing listens."""
        try:
            return self._http.get("/health", timeout=min(5.0, self.timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    def check_health(self) -> None:
        """Raise a :class:`VllmError` naming the endpoint unless ``/health`` answers 200."""
        response = self._request("GET", "/health", timeout_s=min(10.0, self.timeout_s))
        if response.status_code != 200:  # 2xx/3xx other than 200: not a healthy vLLM
            raise VllmError(
                f"vLLM at {self.base_url} is unhealthy: /health -> {response.status_code}",
                endpoint=self.base_url,
                status=response.status_code,
            )

    def wait_healthy(self, timeout_s: float = 180.0, *, poll_s: float = 1.0) -> float:
        """Poll ``/health`` until it answers 200; return the seconds waited or raise VllmError."""
        started = time.monotonic()
        while True:
            if self.health():
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise VllmError(
                    f"vLLM at {self.base_url} did not become healthy within {timeout_s:g} s: {START_HINT}"
                    " and check its log (.tuneloop/vllm.log)",
                    endpoint=self.base_url,
                )
            time.sleep(min(poll_s, max(0.0, timeout_s - waited)))

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model(s) and every LoRA adapter (``id``, ``root``, ``parent``)."""
        body = self._request("GET", "/v1/models").json()
        return list(body.get("data", []))

    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters as ``{name: path on the server}`` (entries with a ``parent``)."""
        return {str(m["id"]): str(m.get("root", "")) for m in self.models() if m.get("parent")}

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus exposition text."""
        return self._request("GET", "/metrics").text

    # -- runtime LoRA -----------------------------------------------------------------------

    def load_adapter(self, name: str, path: str, *, inplace: bool) -> str:
        """Load the adapter at ``path`` (the server's filesystem) under ``name``; return vLLM's reply.

        ``inplace=True`` replaces the weights behind an existing name without a window in
        which the name is missing (and also works for a name that is not loaded yet).
        """
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": inplace}
        text = self._request("POST", "/v1/load_lora_adapter", json_body=body).text.strip()
        logger.info("vLLM %s: loaded %s <- %s (inplace=%s): %s", self.base_url, name, path, inplace, text)
        return text

    def unload_adapter(self, name: str) -> str:
        """Unload the adapter called ``name``; return vLLM's reply (404 -> VllmError)."""
        text = self._request("POST", "/v1/unload_lora_adapter", json_body={"lora_name": name}).text.strip()
        logger.info("vLLM %s: unloaded %s: %s", self.base_url, name, text)
        return text

    # -- generation -------------------------------------------------------------------------

    def chat(
        self,
        model: str,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        """One chat completion; returns the assistant message text (greedy by default)."""
        return self.chat_reply(model, prompt, max_tokens=max_tokens, temperature=temperature, seed=seed).text

    def chat_reply(
        self,
        model: str,
        prompt: Prompt,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> ChatReply:
        """One chat completion with its wall time (seconds, client side) and token usage;
        ``timeout_s`` replaces the client's timeout for this request (queued batch requests)."""
        body: dict[str, Any] = {
            "model": model,
            "messages": as_messages(prompt),
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        if self.pacer is not None:
            self.pacer.wait()
        started = time.perf_counter()
        reply = self._request("POST", "/v1/chat/completions", json_body=body, timeout_s=timeout_s).json()
        seconds = time.perf_counter() - started
        try:
            choice = reply["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise VllmError(
                f"vLLM at {self.base_url}: chat reply for {model!r} has no message: {str(reply)[:500]}",
                endpoint=self.base_url,
                status=200,
            ) from err
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens")
        return ChatReply(
            text=content or "",
            seconds=seconds,
            completion_tokens=tokens if isinstance(tokens, int) else None,
            finish_reason=choice.get("finish_reason") if isinstance(choice, dict) else None,
            model=reply.get("model") if isinstance(reply.get("model"), str) else None,
        )

    def chat_many(
        self,
        model: str,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        concurrency: int = 8,
    ) -> list[str]:
        """Chat completions for many prompts, ``concurrency`` at a time; answers in prompt order.

        The server batches concurrent requests, so this is the way to evaluate through vLLM.
        The first failure is raised (the other requests still finish).
        """
        if not prompts:
            return []
        workers = max(1, min(concurrency, len(prompts)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vllm-chat") as pool:
            futures = [
                pool.submit(self.chat, model, prompt, max_tokens=max_tokens, temperature=temperature)
                for prompt in prompts
            ]
            return [future.result() for future in futures]
