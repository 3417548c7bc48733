"""The plain steps in sequence through the one CLI, as a user runs them from the README:
demo-world -> build-model (tiny preset) -> pull -> train -> evaluate (base and adapter).

Runs from the orchestration env's console script (`.venv/bin/tuneloop`), so it also checks
that ML subcommands hand themselves over to `.venv-ml`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TUNELOOP = Path(sys.executable).parent / "tuneloop"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("steps")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TUNELOOP_HOME": str(root),
        "TUNELOOP_CONFIG": str(ROOT / "examples/invoices/tuneloop.yaml"),
        "TUNELOOP__MODEL__BASE_MODEL": str(root / "tiny-model"),
        "TUNELOOP__TRAINING__BATCH_SIZE": "8",
        "TUNELOOP__EVAL__MAX_NEW_TOKENS": "64",
    }
    return {"root": root, "env": env}


def tuneloop(workspace: dict[str, Any], *args: str) -> dict[str, Any]:
    result = subprocess.run([str(TUNELOOP), *args, "--json"], capture_output=True, text=True, env=workspace["env"], cwd=workspace["root"], timeout=600)
    assert result.returncode == 0, f"tuneloop {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def test_steps_in_sequence(workspace: dict[str, Any]) -> None:
    root = workspace["root"]
    world = tuneloop(workspace, "demo-world", "--days", "6", "--labelled-per-day", "40", "--traffic-per-day", "60", "--heldout-per-slice", "12", "--bad-row-rate", "0.05")
    assert world["heldout"] == {"original": 12, "drifted": 12}
    assert (root / ".tuneloop/store/labelled/dt=2026-01-06/part-00000.jsonl").is_file()

    model = tuneloop(workspace, "build-model", "--preset", "tiny", "--out", str(root / "tiny-model"))
    assert Path(model["model_dir"]) == root / "tiny-model"
    assert (root / "tiny-model/model.safetensors").is_file()

    snapshot = tuneloop(workspace, "pull")
    counts = snapshot["counts"]
    assert counts["total"] == 6 * 40
    assert counts["quarantined"] > 0 and counts["train"] + counts["eval"] + counts["quarantined"] == counts["total"]
    assert tuneloop(workspace, "pull")["snapshot"] == snapshot["snapshot"], "same partitions, same hash"

    trained = tuneloop(workspace, "train", "--snapshot", "latest", "--version", "v1", "--max-steps", "12")
    adapter = root / ".tuneloop/adapters/v1"
    assert trained["snapshot"] == snapshot["snapshot"]
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin"))
    provenance = json.loads((adapter / "provenance.json").read_text())
    assert provenance["dataset_hash"] == snapshot["snapshot"]
    assert (root / ".tuneloop/store/adapters/v1/adapter_config.json").is_file(), "adapter copied into the store"

    from tuneloop.registry import Registry
    from tuneloop.storage import LocalStore

    Registry(LocalStore(root / ".tuneloop/store")).register("v1", adapter_key="adapters/v1", snapshot=snapshot["snapshot"], base_model="demo")
    weights = (root / ".tuneloop/store/adapters/v1/adapter_model.safetensors").read_bytes()
    again = subprocess.run(
        [str(TUNELOOP), "train", "--snapshot", "latest", "--version", "v1", "--max-steps", "1"],
        capture_output=True, text=True, env=workspace["env"], cwd=root, check=False,
    )  # fmt: skip
    assert again.returncode == 2 and "v1 is registered" in again.stderr and "a version's weights never change" in again.stderr
    assert (root / ".tuneloop/store/adapters/v1/adapter_model.safetensors").read_bytes() == weights, "a registered version was overwritten"

    base = tuneloop(workspace, "evaluate", "--adapter", "none", "--limit", "4")
    tuned = tuneloop(workspace, "evaluate", "--adapter", "v1", "--limit", "4", "--upload", "evals/v1/test")
    for summary in (base, tuned):
        assert set(summary["slices"]) == {"original", "drifted"}
        assert summary["n"] == 8
    rows = [json.loads(line) for line in (root / ".tuneloop/store/evals/v1/test/scores.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(0.0 <= row["score"] <= 1.0 and row["slice"] in {"original", "drifted"} for row in rows)


def test_ml_step_without_ml_env_says_what_to_do(workspace: dict[str, Any], tmp_path: Path) -> None:
    env = {**workspace["env"], "TUNELOOP_ML_PYTHON": str(tmp_path / "missing-python")}
    result = subprocess.run([str(TUNELOOP), "train", "--version", "v9"], capture_output=True, text=True, env=env, cwd=workspace["root"])
    assert result.returncode == 2
    assert "make setup" in result.stderr and "TUNELOOP_ML_PYTHON" in result.stderr
