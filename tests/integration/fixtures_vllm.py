"""Builders for the vLLM swap tests: a tiny random Llama, LoRA adapters, broken adapters.

Everything is made locally (``tokenizers`` + ``transformers`` + ``peft``, no hub) in seconds on
a CPU. The base model is initialised with a large weight scale so that greedy decoding has clear
winners: a random model with the default 0.02 scale produces near-tied logits, and then a
different batch composition on the server can flip a token, which would make answer
comparisons flaky for reasons that have nothing to do with adapter swaps.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processes import (
    free_port as free_port,  # re-exported: the tests and benches import it from here
)

if TYPE_CHECKING:
    from collections.abc import Callable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CORPUS = [
    "invoice number 12345 total 99.50 EUR due 2026-01-31 customer ACME GmbH",
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
    "extract the total amount and the currency from this invoice as JSON",
    '{"invoice": "INV-0042", "total": 1200.00, "currency": "USD"}',
    "please summarise the delivery note for order 7781 shipped to Berlin",
] * 20
# What the swap tests and bench/swap_under_load.py serve and ask.
REPO = Path(__file__).resolve().parents[2]
SERVED, STAGING = "tuneloop", "tuneloop-staging"
PROMPTS = [
    "extract the total amount from invoice 12345",
    "summarise the delivery note for order 7781",
    "the quick brown fox",
    "what currency is INV-0042 in?",
]
MAX_TOKENS = 12
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (hidden 128) with a byte-level BPE tokenizer and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, BOS, EOS, USER, ASSISTANT, END, "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, END, "<|system|>"],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOS, PAD)}
    return _save_random_llama(out_dir, fast, tokenizer.get_vocab_size(), ids[BOS], ids[EOS], ids[PAD], ids[EOS], seed)


def _save_random_llama(
    out_dir: Path, tokenizer: Any, vocab_size: int, bos: int, eos: int, pad: int, stop: int | list[int], seed: int
) -> Path:
    """A random 2-layer Llama (hidden 128, large init: clear greedy winners) saved with ``tokenizer``;
    generation stops at ``stop``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=stop, pad_token_id=pad)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_invoice_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128) with the demo model's tokenizer and chat template.

    The tokenizer is trained on the demo world's invoices (as ``tuneloop build-model`` does), so
    eval prompts stay around 300 tokens, within the server's ``--max-model-len 512``; the
    weights are random with a large scale (clear greedy winners), and nothing is pre-trained,
    so it builds in seconds. Its answers are noise: for plumbing and backend agreement only.
    """
    from tuneloop.demo.basemodel import (
        BOS_TOKEN,
        END_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
        train_tokenizer,
        wrap_tokenizer,
    )
    from tuneloop.demo.invoices import pretraining_corpus

    tokenizer = train_tokenizer(pretraining_corpus(seed, 400), 600)
    ids = {token: tokenizer.token_to_id(token) for token in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, END_TOKEN)}
    return _save_random_llama(
        out_dir, wrap_tokenizer(tokenizer, 512), tokenizer.get_vocab_size(),
        ids[BOS_TOKEN], ids[EOS_TOKEN], ids[PAD_TOKEN], [ids[EOS_TOKEN], ids[END_TOKEN]], seed,
    )  # fmt: skip


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    seed: int = 1,
    b_std: float = 0.3,
    target_modules: list[str] | None = None,
) -> Path:
    """Save a peft LoRA adapter for ``base_dir`` whose B matrices are random (not zero).

    peft initialises B to zero (the adapter starts as a no-op); random B makes each adapter
    change the greedy answers, and different seeds give adapters that answer differently.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=target_modules or TARGET_MODULES,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def corrupt_safetensors(good_adapter: Path, out_dir: Path) -> Path:
    """A copy of ``good_adapter`` whose safetensors header claims more bytes than the file has."""
    shutil.copytree(good_adapter, out_dir)
    weights = out_dir / "adapter_model.safetensors"
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    name = next(key for key in header if key != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10_000_000]
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    weights.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + raw[8 + header_len :])
    return out_dir


class FaultProxy:
    """A forwarding HTTP proxy in front of a REAL vLLM server that injects one kind of fault.

    Every request goes to the real server unchanged (method, path, body, Authorization);
    ``fault(method, path, body) -> None | ("status", code) | ("hang", seconds)`` decides per
    request: ``("status", 500)`` answers 500 *instead of* forwarding (the server never sees
    it), ``("hang", s)`` forwards, lets the server act, then holds the reply ``s`` seconds
    (a client timeout in the middle of a swap that did happen on the server).
    ``seen`` lists ``(method, path, lora_name, outcome)``.
    """

    def __init__(self, upstream: str, fault: Callable[[str, str, dict[str, Any]], tuple[str, float] | None]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        self.upstream = upstream.rstrip("/")
        self.fault = fault
        self.seen: list[tuple[str, str, str | None, str]] = []
        self.http = httpx.Client(timeout=120)  # one pool for every forwarded request (thread-safe)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                action = proxy.fault(method, self.path, body if isinstance(body, dict) else {})
                name = body.get("lora_name") if isinstance(body, dict) else None
                if action is not None and action[0] == "status":
                    proxy.seen.append((method, self.path, name, f"injected {int(action[1])}"))
                    payload = json.dumps({"error": {"message": "injected by FaultProxy", "type": "InternalServerError", "code": int(action[1])}}).encode()
                    self.send_response(int(action[1]))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                reply = proxy.http.request(method, proxy.upstream + self.path, content=raw or None, headers=headers)
                outcome = str(reply.status_code)
                if action is not None and action[0] == "hang":
                    proxy.seen.append((method, self.path, name, f"{outcome} held {action[1]:g} s"))
                    time.sleep(float(action[1]))
                else:
                    proxy.seen.append((method, self.path, name, outcome))
                try:
                    self.send_response(reply.status_code)
                    self.send_header("Content-Type", reply.headers.get("content-type", "application/json"))
                    self.send_header("Content-Length", str(len(reply.content)))
                    self.end_headers()
                    self.wfile.write(reply.content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, which is the point of a hang

            def do_GET(self) -> None:
                self.handle_one("GET")

            def do_POST(self) -> None:
                self.handle_one("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.http.close()


def on_load_of(name: str, action: tuple[str, float], *, times: int = 1) -> Callable[[str, str, dict[str, Any]], tuple[str, float] | None]:
    """A fault for :class:`FaultProxy`: ``action`` on the first ``times`` loads of LoRA ``name``."""
    left = {"n": times}

    def fault(method: str, path: str, body: dict[str, Any]) -> tuple[str, float] | None:
        if path == "/v1/load_lora_adapter" and body.get("lora_name") == name and left["n"] > 0:
            left["n"] -= 1
            return action
        return None

    return fault


def serve_sh(*args: str, timeout: float = 300, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/serve.sh`` with this Python's ML env, offline, with ``api_key`` (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "TUNELOOP__VLLM__API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TUNELOOP_ML_PYTHON=sys.executable)
    if api_key is not None:
        env["TUNELOOP__VLLM__API_KEY"] = api_key
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "serve.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def staged_answers(url: str, adapters: dict[str, Path]) -> dict[str, list[str]]:
    """Each adapter's greedy answers to PROMPTS, captured through the staging name (as an
    evaluation through vLLM would record them), plus the base model's under ``"base"``."""
    from tuneloop.serving.vllm_client import VllmClient

    answers: dict[str, list[str]] = {}
    with VllmClient(url) as client:
        for name, path in adapters.items():
            client.load_adapter(STAGING, str(path.resolve()), inplace=True)
            answers[name] = client.chat_many(STAGING, PROMPTS, max_tokens=MAX_TOKENS)
        answers["base"] = client.chat_many(f"{SERVED}-base", PROMPTS, max_tokens=MAX_TOKENS)
    return answers


def golden_of(answers: list[str]) -> list[dict[str, str]]:
    """Golden cases ``{id, prompt, expected}`` for :func:`tuneloop.serving.deploy.deploy_adapter`."""
    return [{"id": f"p{i}", "prompt": prompt, "expected": answer} for i, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True))]


def serves(url: str, api_key: str | None = None) -> str | None:
    """The directory the server's stable name (:data:`SERVED`) serves, or None."""
    from tuneloop.serving.vllm_client import VllmClient

    with VllmClient(url, api_key=api_key) as client:
        return client.adapters().get(SERVED)


def stable_answers(url: str) -> list[str]:
    """The stable name's greedy answers to :data:`PROMPTS`."""
    from tuneloop.serving.vllm_client import VllmClient

    with VllmClient(url) as client:
        return client.chat_many(SERVED, PROMPTS, max_tokens=MAX_TOKENS)


@dataclass
class GatewayLoad:
    """Clients calling the stable name through a gateway until stopped, each answer checked
    against the reference answer of the version that served it (the response's ``model``).
    ``reference(version_name, prompt_index)`` gives that answer, None for an unknown name."""

    url: str
    reference: Callable[[str, int], str | None]
    clients: int = 3
    answers: Counter[str] = field(default_factory=Counter)  # version name -> answers
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def __enter__(self) -> GatewayLoad:
        import httpx

        self._stop = threading.Event()

        def loop(index: int) -> None:
            p = index % len(PROMPTS)
            body = {"model": SERVED, "messages": [{"role": "user", "content": PROMPTS[p]}], "max_tokens": MAX_TOKENS, "temperature": 0.0}
            with httpx.Client(timeout=60) as http:
                while not self._stop.is_set():
                    try:
                        reply = http.post(self.url + "/v1/chat/completions", json=body)
                        reply.raise_for_status()
                        data = reply.json()
                    except Exception as err:  # every failure counts, whatever its kind
                        self.failures.append(f"{type(err).__name__}: {err}")
                        time.sleep(0.05)
                        continue
                    served, answer = data["model"], data["choices"][0]["message"]["content"]
                    self.answers[served] += 1
                    if self.reference(served, p) != answer:
                        self.wrong.append(f"{served} answered {answer!r}, its reference is {self.reference(served, p)!r}")

        self._threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.5)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
