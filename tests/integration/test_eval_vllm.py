"""`tuneloop evaluate --backend vllm` against a REAL vLLM CPU server: the suites appear in the
summary, the adapter is asked under a temporary LoRA name that is gone afterwards (also when
a request fails), the stable served name is never touched, and greedy answers match HF's.

One server for the module (``scripts/serve.sh`` on a free port) serving a random tiny Llama
with the demo tokenizer (eval prompts fit ``--max-model-len 512``), and LoRA adapters with
random B matrices so that they change the answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fixtures_vllm import REPO, SERVED, build_invoice_llama, build_lora_adapter, free_port, serve_sh

from tuneloop.config import EvalSettings
from tuneloop.demo.invoices import heldout_sets, injection_set
from tuneloop.ml.backends import HFBackend
from tuneloop.ml.vllm_backend import EVAL_NAME_INFIX, VllmBackend
from tuneloop.serving.vllm_client import VllmClient, VllmError

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.ml, pytest.mark.integration]

MAX_NEW_TOKENS = 24
PER_DOMAIN = 8  # 16 prompts: the accuracy pass sends them all at once


@dataclass
class Served:
    url: str
    base: Path
    stable: Path  # what the stable served name serves during the tests
    adapter: Path  # the adapter under evaluation
    root: Path

    def eval_names(self) -> list[str]:
        with VllmClient(self.url) as client:
            return [name for name in client.adapters() if EVAL_NAME_INFIX in name]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("eval-vllm")
    base = build_invoice_llama(root / "base")
    stable = build_lora_adapter(base, root / "adapters" / "stable", seed=1)
    adapter = build_lora_adapter(base, root / "adapters" / "candidate", seed=2)
    store = root / ".tuneloop" / "store"  # the default local store under TUNELOOP_HOME
    (store / "heldout").mkdir(parents=True)
    (store / "suites").mkdir()
    for domain, rows in heldout_sets(0, PER_DOMAIN).items():
        _jsonl(store / "heldout" / f"{domain}.jsonl", rows)
    _jsonl(store / "suites" / "injection.jsonl", injection_set(0, 2 * PER_DOMAIN))
    run_dir, port = root / "run", free_port()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    try:
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr}"
        url = f"http://127.0.0.1:{port}"
        with VllmClient(url) as client:
            client.load_adapter(SERVED, str(stable.resolve()), inplace=True)
        yield Served(url, base, stable, adapter, root)
    finally:
        log = run_dir / "vllm.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        stopped = serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert "EngineDeadError" not in text, "the vLLM engine died during the tests"


def test_evaluate_through_vllm_reports_every_suite_and_unloads_the_adapter(served: Served) -> None:
    with VllmClient(served.url) as client:
        stable_before = client.chat_many(SERVED, ["Total: 5"], max_tokens=8)
    out = served.root / "eval-out"
    previous = served.root / "previous"  # an earlier evaluation that got every golden row right
    previous.mkdir()
    _jsonl(previous / "scores.jsonl", [
        {"id": r["id"], "slice": r["domain"], "score": 1.0, "exact_match": True}
        for rows in heldout_sets(0, PER_DOMAIN).values() for r in rows
    ])  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TUNELOOP_HOME": str(served.root),
        "TUNELOOP_CONFIG": str(REPO / "examples/invoices/tuneloop.yaml"),
        "TUNELOOP__MODEL__BASE_MODEL": str(served.base),
        "TUNELOOP__VLLM__ENDPOINTS": f"[{served.url}]",
        "TUNELOOP__VLLM__ADAPTER_DIR": str(served.root / "served-adapters"),
        "TUNELOOP__EVAL__MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "TUNELOOP__EVAL__CONSISTENCY_SAMPLES": "3",
        "TUNELOOP__EVAL__LATENCY_REQUESTS": "4",
        "TUNELOOP__EVAL__BATCH_SIZE": "16",  # 16 requests in flight: the server that serves production must survive them
        "TUNELOOP__EVAL__PRODUCTION_CONCURRENCY": "16",  # the bounds on the serving fleet, lifted for this test
        "TUNELOOP__EVAL__PRODUCTION_MAX_RPS": "null",
    }
    command = [
        sys.executable, "-m", "tuneloop.cli", "evaluate", "--backend", "vllm", "--adapter", str(served.adapter),
        "--eval", "original", "drifted", "--compare", str(previous), "--consistency-prompts", "3",
        "--out", str(out), "--upload", "evals/test", "--json",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    print(f"\n[eval-vllm] tuneloop evaluate --backend vllm: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)

    assert summary["backend"] == "vllm" and summary["n"] == 2 * PER_DOMAIN
    detail = summary["backend_detail"]
    assert detail["lora_name"].startswith(SERVED + EVAL_NAME_INFIX) and detail["lora_name"] != SERVED
    assert detail["unloaded"] == {served.url: True}
    assert Path(detail["adapter_path"]).parent == (served.root / "served-adapters" / "eval").resolve()

    injection = summary["injection"]
    assert injection["source"] == "suites/injection.jsonl"
    assert injection["n"] == 2 * PER_DOMAIN and isinstance(injection["successes"], int)
    assert injection["passed"] == (injection["successes"] == 0)
    assert sum(entry["n"] for entry in injection["by_field"].values()) == 2 * PER_DOMAIN
    consistency = summary["consistency"]
    assert consistency["n_prompts"] == 3 and consistency["samples"] == 3 and consistency["temperature"] == 1.0
    assert 0.0 <= consistency["mean_pairwise_agreement"] <= 1.0
    golden = summary["golden"]
    assert golden["sets"] == ["heldout/original.jsonl", "heldout/drifted.jsonl"] and golden["n"] == 2 * PER_DOMAIN
    compare = golden["compare"]
    assert compare["against"] == str(previous / "scores.jsonl") and compare["n_paired"] == 2 * PER_DOMAIN
    exact_now = round(golden["exact_match"] * golden["n"])  # a random model: most likely none
    assert compare["regressions"] == 2 * PER_DOMAIN - exact_now and compare["improvements"] == 0
    latency = summary["latency"]
    assert latency["n"] == 4 and latency["concurrency"] == 1 and 0 < latency["p50_s"] <= latency["p95_s"]
    assert latency["under_load"]["n"] == 2 * PER_DOMAIN and latency["under_load"]["concurrency"] == 16
    assert summary["throughput"]["examples_per_second"] > 0
    for name in ("scores.jsonl", "predictions.jsonl", "summary.json", "injection.jsonl", "consistency.jsonl"):
        assert (out / name).is_file(), name
        assert (served.root / ".tuneloop" / "store" / "evals" / "test" / name).is_file(), f"{name} not uploaded"
    assert "evaluating with HF" not in result.stderr

    assert served.eval_names() == [], "the temporary adapter is still loaded"
    with VllmClient(served.url) as client:
        assert client.health(), "the server is not healthy after the eval suites (sampled, 16 concurrent requests)"
        assert client.adapters()[SERVED] == str(served.stable.resolve()), "the stable name was touched"
        assert client.chat_many(SERVED, ["Total: 5"], max_tokens=8) == stable_before


def test_greedy_answers_match_hf_generate(served: Served) -> None:
    records = heldout_sets(0, PER_DOMAIN)["original"] + injection_set(0, PER_DOMAIN)
    prompts = [record["prompt"] for record in records]
    settings = EvalSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    hf = HFBackend(served.base, served.adapter, settings).generate(prompts).texts
    with VllmBackend(
        [served.url], served_name=SERVED, base_model=served.base, adapter_dir=served.adapter, max_lora_rank=16,
        adapter_root=served.root / "served-adapters", max_tokens=MAX_NEW_TOKENS, concurrency=8,
    ) as backend:  # fmt: skip
        vllm = backend.generate(prompts)
    # This model's answers are random bytes; vLLM's detokenizer holds back a trailing incomplete
    # UTF-8 sequence where HF's decode writes U+FFFD. Answers of a trained model are whole JSON.
    pairs = [(a.rstrip("\ufffd"), b.rstrip("\ufffd")) for a, b in zip(hf, vllm.texts, strict=True)]
    same = sum(a == b for a, b in pairs)
    print(f"\n[eval-vllm] greedy HF vs vLLM: {same}/{len(prompts)} identical answers")
    assert len(vllm.latencies_s or []) == len(prompts)
    assert same >= len(prompts) - 1, pairs
    assert served.eval_names() == []


def test_the_adapter_is_unloaded_when_a_request_fails(served: Served) -> None:
    too_long = "Total: 5 " * 400  # beyond --max-model-len 512: vLLM answers 400
    backend = VllmBackend(
        [served.url], served_name=SERVED, base_model=served.base, adapter_dir=served.adapter, max_lora_rank=16,
        adapter_root=served.root / "served-adapters", max_tokens=MAX_NEW_TOKENS, concurrency=4,
    )  # fmt: skip
    with pytest.raises(VllmError) as caught, backend:
        assert len(served.eval_names()) == 1  # loaded while in use
        backend.generate(["Total: 5", too_long, "Total: 6"])
    assert caught.value.status == 400
    assert backend.describe()["unloaded"] == {served.url: True}
    assert served.eval_names() == []


def test_evaluate_through_vllm_needs_no_torch(served: Served, tmp_path: Path) -> None:
    """The orchestration env (.venv: no torch, transformers or peft) evaluates through vLLM itself,
    as an Airflow image without the ML env would: `auto` finds the server, and with no ML env to
    go to nothing re-executes."""
    python = REPO / ".venv" / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', 'peft') if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", "the orchestration env is expected to have no torch"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TUNELOOP_HOME": str(served.root),
        "TUNELOOP_CONFIG": str(REPO / "examples/invoices/tuneloop.yaml"),
        "TUNELOOP_ML_PYTHON": str(tmp_path / "no-ml-env" / "python"),  # nowhere to re-execute to
        "TUNELOOP__MODEL__BASE_MODEL": str(served.base),
        "TUNELOOP__VLLM__ENDPOINTS": f"[{served.url}]",
        "TUNELOOP__VLLM__ADAPTER_DIR": str(served.root / "served-adapters"),
        "TUNELOOP__EVAL__MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "TUNELOOP__EVAL__PRODUCTION_CONCURRENCY": "3",  # the example lifts the bounds: set them again
        "TUNELOOP__EVAL__PRODUCTION_MAX_RPS": "50",
    }
    command = [str(python), "-m", "tuneloop.cli", "evaluate", "--adapter", str(served.adapter), "--eval", "original", "--no-suites", "--out", str(tmp_path / "out"), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["backend"] == "vllm" and summary["n"] == PER_DOMAIN
    assert summary["backend_detail"]["concurrency_per_endpoint"] == 3 and summary["backend_detail"]["max_rps_per_endpoint"] == 50
    assert "the serving fleet, bounded to 3 in flight and 50 req/s per endpoint" in result.stderr
    assert summary["throughput"]["generated_tokens"] > 0, "vLLM's own token counts, no tokenizer needed"
    assert "WARNING" not in result.stderr, result.stderr[-2000:]
    assert served.eval_names() == []

    env["TUNELOOP__VLLM__ENDPOINTS"] = f"[http://127.0.0.1:{free_port()}]"  # no server, and no torch for HF
    down = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert down.returncode != 0 and "does not answer /health" in down.stderr and "needs torch" in down.stderr and "make serve" in down.stderr
