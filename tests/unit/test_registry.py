"""Registry: immutable versions, atomic alias moves with history, races lose cleanly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.registry import Registry, RegistryConflictError, RegistryError
from tuneloop.storage import LocalStore, S3Store, Store

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, "tl", endpoint_url=endpoint)


def _register(registry: Registry, version: str, **metrics: Any) -> None:
    registry.register(version, adapter_key=f"adapters/{version}", snapshot="abc", base_model="demo", metrics=metrics)


def test_versions_are_numbered_immutable_and_listed_in_order(store: Store) -> None:
    registry = Registry(store)
    assert registry.next_version() == "v1"
    for number in range(1, 12):
        _register(registry, f"v{number}", score=number / 20)
    assert registry.next_version() == "v12"
    assert [r["version"] for r in registry.versions()][:3] == ["v1", "v2", "v3"]
    with pytest.raises(RegistryError, match="already registered"):
        _register(registry, "v3")
    assert registry.get("v3")["metrics"] == {"score": 0.15}
    with pytest.raises(RegistryError, match="must look like v1"):
        registry.register("latest", adapter_key="x", snapshot=None, base_model="demo")


def test_promote_moves_production_and_previous_together_with_history(store: Store) -> None:
    registry = Registry(store)
    _register(registry, "v1")
    _register(registry, "v2")
    registry.move_aliases({"candidate": "v1"}, reason="trained")
    registry.promote("v1", reason="bootstrap", run_id="run-1")
    assert registry.aliases() == {"production": "v1", "previous": None, "candidate": None}
    registry.promote("v2", reason="gate passed", run_id="run-2")
    assert registry.aliases() == {"production": "v2", "previous": "v1", "candidate": None}
    assert registry.resolve("previous")["version"] == "v1"
    history = registry.history()
    assert [h["generation"] for h in history] == [1, 2, 3]
    assert history[-1]["changed"]["production"] == {"from": "v1", "to": "v2"}
    assert history[-1]["run_id"] == "run-2"
    assert store.get_json("registry/aliases.json")["generation"] == 3


def test_alias_to_unknown_version_or_unknown_alias_is_refused(store: Store) -> None:
    registry = Registry(store)
    with pytest.raises(RegistryError, match="no adapter version 'v9'"):
        registry.move_aliases({"production": "v9"}, reason="x")
    _register(registry, "v1")
    with pytest.raises(RegistryError, match="unknown alias"):
        registry.move_aliases({"staging": "v1"}, reason="x")
    with pytest.raises(RegistryError, match="points at no version"):
        registry.resolve("production")
    assert registry.history() == []


def test_concurrent_alias_move_loses_cleanly(store: Store) -> None:
    first, second = Registry(store), Registry(store)
    _register(first, "v1")
    _register(first, "v2")
    stale_state = second.state()
    first.promote("v1", reason="first writer")
    # The second writer computed its move from the old state: its generation is taken.
    second.state = lambda: stale_state  # type: ignore[method-assign]
    with pytest.raises(RegistryConflictError, match="generation 1"):
        second.promote("v2", reason="second writer")
    assert Registry(store).aliases()["production"] == "v1"
