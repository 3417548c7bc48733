"""Teacher labelling against the REAL vLLM OpenAI server (CPU build) as the teacher, behind a
fault-injecting proxy: 429 and 500 answers are retried and never become a label or lose a row;
a re-run pays for no prompt twice (every answer from the cache, nothing reaches the server);
``data_residency: local_only`` refuses a non-local teacher before anything is sent.

The teacher here is a tiny random Llama: its answers are not good, but they are a real model's
answers through a real server, which is what the client must cope with."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from fixtures_vllm import SERVED, FaultProxy, build_invoice_llama, free_port, serve_sh

from tuneloop.config import TaskSettings, TeacherSettings
from tuneloop.intake.teacher import TeacherError, label_rows
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.ml, pytest.mark.integration]

SPEC = TaskSpec(TaskSettings(name="notes", metric="text", slice_field="kind", system_prompt="Answer briefly."))
ROWS = [{"prompt": f"Invoice {i}: total {10 * i}.00 EUR from vendor number {i}", "kind": "invoice" if i % 3 else "receipt"} for i in range(12)]


@pytest.fixture(scope="module")
def vllm_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("teacher-vllm")
    base = build_invoice_llama(root / "base")
    run_dir, port = root / "run", free_port()
    result = serve_sh("start", "--port", str(port), "--model", str(base), "--name", SERVED, "--run-dir", str(run_dir))
    try:
        assert result.returncode == 0, f"serve.sh start failed:\n{result.stderr}"
        yield f"http://127.0.0.1:{port}"
    finally:
        stopped = serve_sh("stop", "--run-dir", str(run_dir), timeout=60)
        assert stopped.returncode == 0, stopped.stderr


def _teacher_model(url: str) -> str:
    import httpx

    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


def test_faults_are_retried_a_rerun_is_free_and_local_only_refuses_a_remote_teacher(vllm_teacher: str, tmp_path: Path) -> None:
    model = _teacher_model(vllm_teacher)
    faults = {"left": 6}

    def fault(method: str, path: str, body: dict[str, Any]) -> tuple[str, float] | None:
        if path == "/v1/chat/completions" and faults["left"] > 0:
            faults["left"] -= 1
            return ("status", 429 if faults["left"] % 2 else 500)
        return None

    with FaultProxy(vllm_teacher, fault) as proxy:
        cfg = TeacherSettings(
            endpoint=f"{proxy.url}/v1", model=model, max_tokens=16, max_concurrency=2, max_retries=6, consistency_sample=3,
            consistency_temperature=0.8,
        )
        run = label_rows(ROWS, SPEC, cfg, cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
        injected = [entry for entry in proxy.seen if entry[3].startswith("injected")]
        answered = [entry for entry in proxy.seen if entry[1] == "/v1/chat/completions" and entry[3] == "200"]
        assert len(injected) == 6 and {e[3] for e in injected} == {"injected 429", "injected 500"}
        assert len(run.labelled) + len(run.quarantined) == len(ROWS) and not any(r.startswith("teacher_unavailable") for _, r in run.quarantined)
        assert all(row["completion"] and "injected" not in row["completion"] for row in run.labelled), "no error became a label"
        assert run.account.retries == 6 and run.account.requests == len(answered) == len(ROWS) + 2 * 3
        assert run.consistency is not None and run.consistency["n"] == 3

        seen_before = len(proxy.seen)
        again = label_rows(ROWS, SPEC, cfg, cache_dir=tmp_path / "cache", near_duplicate_jaccard=None)
        assert len(proxy.seen) == seen_before, "a re-run sent nothing to the teacher"
        assert again.account.requests == 0 and again.account.cache_hits == len(ROWS) + 2 * 3
        assert [r["completion"] for r in again.labelled] == [r["completion"] for r in run.labelled]

        remote = cfg.model_copy(update={"endpoint": "https://teacher.example.com/v1", "data_residency": "local_only"})
        with pytest.raises(TeacherError, match="teacher.data_residency=local_only refuses"):
            label_rows(ROWS, SPEC, remote, cache_dir=tmp_path / "cache2")
        assert len(proxy.seen) == seen_before
    summary = json.dumps(run.summary())
    assert '"requests": 18' in summary
