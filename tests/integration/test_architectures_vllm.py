"""Each model family on the REAL vLLM CPU server: the tiny model of ``tests/tiny_models.py``
(its own tokenizer and chat template) is served with ``--enable-lora``, an adapter trained with
the project's trainer (default ``target_modules: [all-linear]``) is loaded at runtime through
``POST /v1/load_lora_adapter``, and a chat completion to the adapter's name answers.

One server per family (``scripts/serve.sh`` on a free port), started once and stopped after
the family's test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fixtures_vllm import free_port, serve_sh
from tests.tiny_models import FAMILIES, build_tiny_model, chat_records

from tuneloop.config import TrainingSettings
from tuneloop.serving.adapters import validate_adapter

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.ml, pytest.mark.integration, pytest.mark.slow]

SERVED = "tiny"
ADAPTER = "tiny-lora"
RANK = 8
TRAIN = {"max_steps": 3, "batch_size": 4, "max_seq_len": 256, "log_every": 1, "learning_rate": 5e-3, "lora_rank": RANK, "lora_alpha": 16}
UNSUPPORTED: dict[str, str] = {}
"""Families vLLM CPU cannot serve, with the reason (none today)."""


def _family_params() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.skip(reason=UNSUPPORTED[name])) if name in UNSUPPORTED else name
        for name in sorted(FAMILIES)
    ]


@pytest.fixture(scope="module", params=_family_params())
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(family, server URL, trained adapter dir) with the family's tiny model being served."""
    from tuneloop.ml.train import train_lora

    family = str(request.param)
    root = tmp_path_factory.mktemp(f"vllm-{family}")
    base = build_tiny_model(family, root / "base")
    adapter = root / "adapters" / "v1"
    train_lora(base, chat_records(12), adapter, TrainingSettings(**TRAIN), progress=lambda _: None)
    validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=RANK)
    run_dir, port = root / "run", free_port()
    started = time.monotonic()
    result = serve_sh(
        "start", "--port", str(port), "--model", str(base), "--name", SERVED,
        "--run-dir", str(run_dir), "--max-lora-rank", str(RANK), timeout=240,
    )  # fmt: skip
    print(f"\n[{family}] vLLM start: {time.monotonic() - started:.1f} s")
    try:
        assert result.returncode == 0, f"serve.sh start failed for {family}:\n{result.stderr[-4000:]}"
        yield family, f"http://127.0.0.1:{port}", adapter
    finally:
        log = run_dir / "vllm.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        stopped = serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert "EngineDeadError" not in text, f"the vLLM engine died serving {family}"


def test_runtime_loaded_adapter_answers_a_chat(served: tuple[str, str, Path]) -> None:
    import httpx

    family, url, adapter = served
    with httpx.Client(base_url=url, timeout=120) as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": ADAPTER, "lora_path": str(adapter.resolve())})
        assert loaded.status_code == 200, f"{family}: load_lora_adapter answered {loaded.status_code}: {loaded.text[:2000]}"
        models = {model["id"] for model in http.get("/v1/models").json()["data"]}
        assert {ADAPTER, f"{SERVED}-base"} <= models
        for model in (ADAPTER, f"{SERVED}-base"):
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [
                        {"role": "system", "content": "answer with one word"},
                        {"role": "user", "content": "ticket 123: the customer reports a refund. category?"},
                    ],
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert reply.status_code == 200, f"{family} ({model}): chat answered {reply.status_code}: {reply.text[:2000]}"
            choice = reply.json()["choices"][0]
            assert isinstance(choice["message"]["content"], str)
            assert choice["finish_reason"] in ("stop", "length")
