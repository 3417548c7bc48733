"""One step, one implementation: ``tuneloop drift`` (no windows) and ``tuneloop gate --version``
reach the same decision as the DAG's tasks (``tuneloop_airflow.tasks``) on the same store.
The tasks' loop comes from Airflow at run time; here it is the test's loop."""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.cli import main
from tuneloop.demo.invoices import generate_world
from tuneloop.steps.loop import open_loop
from tuneloop_airflow import tasks

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit

START = date(2026, 1, 5)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tuneloop.yaml"
    path.write_text(
        f"store:\n  uri: {tmp_path / 'store'}\ntask:\n  slice_field: domain\n"
        "drift:\n  current_days: 3\n  performance: false\ngate:\n  bootstrap_samples: 500\n  min_examples: 10\n  margin: 0.3\n"
    )
    return path


def _as_dag_task(monkeypatch: pytest.MonkeyPatch, config: Path, run_id: str) -> None:
    monkeypatch.setattr(tasks, "task_loop", lambda: open_loop(str(config), run_id=run_id, progress=lambda _m: None))
    monkeypatch.setattr(tasks, "notify", lambda *_a, **_k: {})


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main([*argv, "--json", "-q"]) in (0, 1)
    return dict(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("as_of_offset", [20, 33])  # calm traffic, then drifted traffic
def test_drift_cli_and_dag_task_decide_alike(
    as_of_offset: int, config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = open_loop(str(config), run_id="setup", progress=lambda _m: None)
    generate_world(loop.store, START, 38, drift_start=START + timedelta(days=28), traffic_per_day=40, labelled_per_day=12)
    as_of = (START + timedelta(days=as_of_offset)).isoformat()
    cli = _cli(capsys, "drift", "--config", str(config), "--as-of", as_of)
    _as_dag_task(monkeypatch, config, "scheduled__dag")
    dag = tasks.check_drift({"as_of": as_of})
    for key in ("drift", "emit", "decision", "p_value", "statistic", "n_reference", "n_current", "drift_slices"):
        assert cli[key] == dag[key], key
    assert dag["drift"] is (as_of_offset == 33)


def _scores(means: dict[str, float], seed: int, n: int = 40) -> str:
    noise = random.Random(seed)
    rows = [
        {"id": f"{name}-{i}", "slice": name, "score": float(random.Random(f"{name}{i}").random() + noise.uniform(-0.1, 0.1) < mean)}
        for name, mean in means.items() for i in range(n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize(("candidate", "promote"), [({"original": 0.8, "drifted": 0.9}, True), ({"original": 0.5, "drifted": 0.35}, False)])
def test_gate_cli_and_dag_task_decide_alike(
    candidate: dict[str, float], promote: bool, config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = open_loop(str(config), run_id="setup", progress=lambda _m: None)
    for version in ("v1", "v2"):
        loop.registry.register(version, adapter_key=f"adapters/{version}", snapshot="ab" * 32, base_model="demo", run_id="setup")
    loop.registry.promote("v1", reason="bootstrap", run_id="setup")
    prefix = "evals/v2/refresh"
    loop.store.put_text(f"{prefix}/production/scores.jsonl", _scores({"original": 0.8, "drifted": 0.3}, seed=1))
    loop.store.put_text(f"{prefix}/candidate/scores.jsonl", _scores(candidate, seed=2))
    evaluation = {
        "version": "v2", "snapshot": "ab" * 32, "production": "v1",
        "production_eval": {"adapter": "v1", "scores_key": f"{prefix}/production/scores.jsonl"},
        "candidate_eval": {"adapter": "v2", "scores_key": f"{prefix}/candidate/scores.jsonl", "suites": {}},
    }  # fmt: skip
    loop.store.put_json(f"{prefix}/evaluation.json", evaluation)
    # what the drift monitor found: the gate's `auto` improves where drift was found
    loop.store.put_json("drift/checks/2026-02-20__m.json", {"as_of": "2026-02-20", "emit": True, "drift_slices": ["drifted"], "drift": True})
    cli = _cli(capsys, "gate", "--config", str(config), "--version", "v2")
    _as_dag_task(monkeypatch, config, "scheduled__dag")
    dag = tasks.gate(evaluation)
    assert cli["promote"] is dag["promote"] is promote
    assert cli["reasons"] == dag["reasons"] and cli["improve_slices"] == dag["improve_slices"] == ["drifted"]
    assert cli["slices"] == dag["slices"]
    assert loop.store.exists("reports/v2/gate.json")
