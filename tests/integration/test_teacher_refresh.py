"""Distillation end to end: ``tuneloop_refresh`` with ``data.label_source: teacher`` and no
labelled rows at all in the store, against real local servers.

The teacher is a LoRA adapter served by the real vLLM OpenAI server (CPU build) under its own
name, trained beforehand on human-labelled support tickets (the tickets example, a 6-label
classifier); the student is a fresh adapter on the same tiny base model. The DAG's first task
asks the teacher to label the traffic window, intake checks those labels like any labelled
rows, the student trains on them, the evaluation scores it against the bare base model on the
human-labelled held-out sets, the gate measures the student's score as a share of the
teacher's (``teacher_retention``, with a bar) and promotes, and the deploy hot-swaps the
student into the same vLLM server and verifies it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from processes import free_port, load_dag, run_checked

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TUNELOOP = Path(sys.executable).parent / "tuneloop"
TEACHER = "ticket-teacher"


def _run(*command: str, env: dict[str, str], timeout: float = 900) -> str:
    return run_checked(*command, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory, airflow_db: str) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("distil")
    port = free_port()
    env = {
        "TUNELOOP_HOME": str(root),
        "TUNELOOP_CONFIG": str(ROOT / "examples/tickets/tuneloop.yaml"),
        "HF_HUB_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TUNELOOP__STORE__URI": str(root / "store"),
        "TUNELOOP__MODEL__BASE_MODEL": str(root / "model"),
        "TUNELOOP__VLLM__ENDPOINTS": f"[http://127.0.0.1:{port}]",
        "TUNELOOP__VLLM__ADAPTER_DIR": str(root / "served-adapters"),
        "TUNELOOP__DATA__LABEL_SOURCE": "teacher",
        "TUNELOOP__TEACHER__ENDPOINT": f"http://127.0.0.1:{port}/v1",
        "TUNELOOP__TEACHER__MODEL": TEACHER,
        "TUNELOOP__TEACHER__MAX_TOKENS": "16",
        "TUNELOOP__TEACHER__SAMPLE_ROWS": "300",
        "TUNELOOP__TEACHER__CONSISTENCY_SAMPLE": "10",
        "TUNELOOP__TEACHER__DATA_RESIDENCY": "local_only",
        "TUNELOOP__TEACHER__PRICE_PER_1K_PROMPT_TOKENS": "0.5",
        "TUNELOOP__TEACHER__PRICE_PER_1K_COMPLETION_TOKENS": "1.5",
        "TUNELOOP__GATE__SUITE_BARS__MIN_TEACHER_RETENTION": "0.5",
        "TUNELOOP__GATE__MIN_EXAMPLES": "10",
        "TUNELOOP__GATE__BOOTSTRAP_SAMPLES": "1000",
        "TUNELOOP__DATA__MIN_ACCEPTED_ROWS": "20",
        "TUNELOOP__TRAINING__MAX_STEPS": "150",
        "TUNELOOP__TRAINING__BATCH_SIZE": "8",
        "TUNELOOP__TRAINING__LEARNING_RATE": "0.005",
        "TUNELOOP__EVAL__CONSISTENCY_PROMPTS": "3",
        "TUNELOOP__EVAL__CONSISTENCY_SAMPLES": "2",
        "TUNELOOP__EVAL__LATENCY_REQUESTS": "3",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        full_env = dict(os.environ)
        _run(str(TUNELOOP), "build-model", "--preset", "tiny", "--out", str(root / "model"), "-q", env=full_env)
        _run(str(TUNELOOP), "demo-world", "--example", "tickets", "--days", "10", "--labelled-per-day", "40", "--traffic-per-day", "60", "--heldout-per-slice", "24", "--bad-row-rate", "0", "-q", env=full_env)
        # The teacher learns from the human labels; then every human label but the held-out sets
        # leaves the store: the student can only learn from what the teacher says.
        human = root / "human.jsonl"
        with human.open("w") as out:
            for part in sorted((root / "store/labelled").rglob("*.jsonl")):
                out.write(part.read_text())
        shutil.rmtree(root / "store/labelled")
        teacher_dir = root / "teacher-adapter"
        _run(str(TUNELOOP), "train", "--snapshot", str(human), "--version", "v900", "--out", str(teacher_dir), "--no-upload", "--max-steps", "200", "-q", env=full_env)
        serve = ["bash", "scripts/serve.sh"]
        server_args = ["--port", str(port), "--model", str(root / "model"), "--run-dir", str(root / "vllm")]
        _run(*serve, "start", *server_args, env=full_env, timeout=400)
        try:
            from tuneloop.serving.vllm_client import VllmClient

            VllmClient(f"http://127.0.0.1:{port}").load_adapter(TEACHER, str(teacher_dir), inplace=False)
            yield {"root": root, "port": port, "env": full_env}
        finally:
            subprocess.run([*serve, "stop", *server_args], env=full_env, cwd=ROOT, timeout=120, check=False)


def _dag(dag_id: str) -> Any:
    return load_dag(ROOT / "dags", dag_id)


def test_the_refresh_labels_with_the_teacher_trains_gates_on_retention_and_swaps(distilled: dict[str, Any]) -> None:
    from tuneloop.registry import Registry
    from tuneloop.serving.vllm_client import VllmClient
    from tuneloop.storage import open_store

    store = open_store(os.environ["TUNELOOP__STORE__URI"])
    assert not [k for k in store.list("labelled/") if not k.rsplit("/", 1)[-1].startswith("teacher-")], "no human labels before the run"

    run = _dag("tuneloop_refresh").test(logical_date=datetime(2026, 1, 11, tzinfo=UTC), run_conf={"force": True})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "success", states
    for task_id in ("label", "pull", "validate", "train", "evaluate", "gate", "deploy", "verify", "record"):
        assert "success" in states[task_id].lower(), (task_id, states)

    # the teacher's labels: one partition of the window's last day, with an account of the run
    teacher_parts = [k for k in store.list("labelled/") if k.endswith(".jsonl")]
    assert teacher_parts and all(k.rsplit("/", 1)[-1].startswith("teacher-") for k in teacher_parts)
    summaries = [k for k in store.list("labelling/") if k.endswith("summary.json")]
    assert len(summaries) == 1
    summary = store.get_json(summaries[0])
    account = summary["account"]
    assert account["requests"] > 0 and account["cost"] > 0
    assert summary["labelled"] >= 20 and summary["teacher"]["model"] == TEACHER, summary
    labelled_rows = [row for key in teacher_parts for row in store.iter_jsonl(key)]
    assert len(labelled_rows) == summary["labelled"]

    # the gate: student vs the bare base model on the human held-out sets, and vs the teacher
    registry = Registry(store)
    version = registry.aliases()["production"]
    assert version == "v1"
    gate = store.get_json(f"reports/{version}/gate.json")
    assert gate["promote"] is True, gate["reasons"]
    retention = gate["teacher_retention"]
    assert retention["teacher_model"] == TEACHER and retention["n"] > 0
    assert retention["retention"] >= 0.5, json.dumps(retention)[:2000]
    latency = retention["latency"]  # before the first promotion the served side is the base model's name
    assert latency["student"]["model"] == "tuneloop-base" and latency["student"]["requests"] > 0 and latency["latency_ratio"] > 0, latency
    assert latency["teacher"]["cost_per_1k_requests"] > 0 and latency["cost_ratio"] == 0.0
    assert any(check["suite"] == "teacher_retention" and check["passed"] for check in gate["suite_checks"]), gate["suite_checks"]

    # the student serves under the stable name on the same server as the teacher
    served = {m["id"]: m for m in VllmClient(f"http://127.0.0.1:{distilled['port']}").models()}
    assert Path(served["tuneloop"]["root"]).name == version
    assert TEACHER in served
    # the figures the README's distillation table quotes (pytest -s shows them)
    print("DISTILLATION", json.dumps({"labelling": {k: summary[k] for k in ("labelled", "quarantined", "quarantine_reasons", "consistency", "account")},
                                      "retention": retention, "gate_slices": gate["slices"]}))
