"""Stand-ins for the refresh DAG's ML steps, for DAG tests that exercise the gate and what
follows it (approval, notifications) without training or evaluating a model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from processes import free_port


def paired_scores(gain: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Production and candidate on 30 + 30 held-out rows: the candidate gains on `drifted`."""
    baseline, candidate = [], []
    for name, delta in (("drifted", gain), ("original", 0.0)):
        for i in range(30):
            base = (i % 4) / 6
            baseline.append({"id": f"{name}-{i}", "slice": name, "score": base})
            candidate.append({"id": f"{name}-{i}", "slice": name, "score": base + (delta if i % 3 else 0.0)})
    return baseline, candidate


def train_step(loop: Any, snapshot: str, *, move_candidate: bool = False) -> dict[str, Any]:
    """Register the next version as if it had been trained on ``snapshot``."""
    version = loop.registry.next_version()
    loop.registry.register(version, adapter_key=f"adapters/{version}", snapshot=snapshot, base_model="demo", run_id=loop.run_id)
    if move_candidate:
        loop.registry.move_aliases({"candidate": version}, reason="trained", run_id=loop.run_id)
    return {"version": version, "snapshot": snapshot}


def evaluate_step(gain: float) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    """An evaluate step that stores :func:`paired_scores` for production v1 and the candidate."""

    def step(loop: Any, train: dict[str, Any]) -> dict[str, Any]:
        baseline, candidate = paired_scores(gain)
        prefix = f"evals/{train['version']}/{loop.run_key}"
        for role, rows in (("production", baseline), ("candidate", candidate)):
            loop.store.put_text(f"{prefix}/{role}/scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return {
            "version": train["version"],
            "snapshot": train["snapshot"],
            "production": "v1",
            "candidate_eval": {"scores_key": f"{prefix}/candidate/scores.jsonl"},
            "production_eval": {"scores_key": f"{prefix}/production/scores.jsonl"},
        }

    return step


def refresh_steps(gain: float, *, intake: bool = False) -> dict[str, Any]:
    """{``module.step``: stand-in} for the refresh's ML and vLLM steps (gate and record stay
    real); with ``intake``, pull and validate too. Tests set each with monkeypatch.setattr."""
    found: dict[str, Any] = {
        "tuneloop.steps.train.train_step": train_step,
        "tuneloop.steps.evaluate.evaluate_step": evaluate_step(gain),
        "tuneloop.steps.serve.reconcile_step": lambda loop: {"production": loop.registry.aliases()["production"]},
        "tuneloop.steps.serve.deploy_step": lambda loop, version, **_: {"version": version, "previous": loop.registry.aliases()["production"]},
        "tuneloop.steps.serve.verify_step": lambda loop, version: {"version": version},
    }
    if intake:
        found["tuneloop.steps.intake.pull_step"] = lambda loop, **_: {"partitions": []}
        found["tuneloop.steps.intake.validate_step"] = lambda loop, plan: {"snapshot": "0" * 64, "counts": {}}
    return found


def refresh_env(root: Path) -> dict[str, str]:
    """The settings of a stand-in refresh as a user sets them: home and a local store under
    ``root``, a vLLM endpoint nobody listens on (its steps are stand-ins), a gate that asks the
    candidate to improve on ``drifted`` with small samples."""
    return {
        "TUNELOOP_HOME": str(root),
        "TUNELOOP__STORE__URI": str(root / "store"),
        "TUNELOOP__VLLM__ENDPOINTS": f"[http://127.0.0.1:{free_port()}]",
        "TUNELOOP__GATE__IMPROVE_SLICES": "[drifted]",
        "TUNELOOP__GATE__MIN_EXAMPLES": "10",
        "TUNELOOP__GATE__BOOTSTRAP_SAMPLES": "300",
    }
