"""Replay: `tuneloop train` mixes a share of production's own training rows into a refresh."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import TrainingSettings
from tuneloop.registry import Registry
from tuneloop.steps.train import replay_mix
from tuneloop.storage import LocalStore

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def _rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "prompt": f"prompt {prefix} {i}", "completion": "{}"} for i in range(n)]


def _put_snapshot(store: LocalStore, name: str, rows: list[dict[str, Any]]) -> None:
    store.put_bytes(f"snapshots/{name}/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    _put_snapshot(store, "old", _rows("old", 40))
    registry = Registry(store)
    registry.register("v1", adapter_key="adapters/v1", snapshot="old", base_model="base")
    registry.move_aliases({"production": "v1"}, reason="test")
    return store


def test_replay_mixes_the_production_snapshot_into_the_new_rows(store: LocalStore) -> None:
    lines: list[str] = []
    new = _rows("new", 30)
    mixed, trained_on, n = replay_mix(store, new, "fresh", TrainingSettings(replay_fraction=0.25), lines.append)
    assert n == 10 and len(mixed) == 40 and mixed[:30] == new
    assert all(row["id"].startswith("old-") for row in mixed[30:])
    assert trained_on == "fresh+replay-old-10"  # the adapter's provenance names what it saw
    assert "replay: 10 rows of production v1's snapshot old (25% of 40)" in lines


def test_no_replay_when_off_or_nothing_earlier(store: LocalStore, tmp_path: Path) -> None:
    new = _rows("new", 30)
    assert replay_mix(store, new, "fresh", TrainingSettings(), print) == (new, "fresh", 0)
    assert replay_mix(store, new, "old", TrainingSettings(replay_fraction=0.25), print) == (new, "old", 0)
    empty = LocalStore(tmp_path / "empty")
    assert replay_mix(empty, new, "fresh", TrainingSettings(replay_fraction=0.25), print) == (new, "fresh", 0)
