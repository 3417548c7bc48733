"""A retried task leaves the same state as one that never failed: register, the alias moves,
record (promote), train and rollback, each re-run after its side effect landed; and a
conditional S3 write whose reply was lost is told apart from another writer's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.registry import Registry, RegistryConflictError, RegistryError
from tuneloop.steps.loop import open_loop
from tuneloop.steps.serve import record_step, rollback_step
from tuneloop.steps.train import train_step
from tuneloop.storage import LocalStore, S3Store

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.unit


def _register(registry: Registry, version: str, run_id: str | None, snapshot: str = "snap") -> dict[str, Any]:
    return registry.register(version, adapter_key=f"adapters/{version}", snapshot=snapshot, base_model="demo", run_id=run_id)


def test_register_retried_by_the_same_run_returns_the_first_record(tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path))
    first = _register(registry, "v1", "run-a")
    assert _register(registry, "v1", "run-a") == first
    with pytest.raises(RegistryError, match="already registered"):
        _register(registry, "v1", "run-b")
    with pytest.raises(RegistryError, match="already registered"):
        _register(registry, "v1", "run-a", snapshot="other")
    with pytest.raises(RegistryError, match="already registered"):
        _register(registry, "v1", None)
    assert registry.registered_by("run-a") == first and registry.registered_by("run-b") is None


def test_alias_moves_and_promote_retried_after_they_landed_change_nothing(tmp_path: Path) -> None:
    registry = Registry(LocalStore(tmp_path))
    _register(registry, "v1", "run-a")
    _register(registry, "v2", "run-b")
    registry.promote("v1", reason="bootstrap", run_id="run-a")
    moved = registry.move_aliases({"candidate": "v2"}, reason="trained", run_id="run-b")
    assert registry.move_aliases({"candidate": "v2"}, reason="trained", run_id="run-b") == moved
    promoted = registry.promote("v2", reason="gate passed", run_id="run-b")
    assert registry.promote("v2", reason="gate passed", run_id="run-b") == promoted
    assert len(registry.history()) == 3
    assert registry.aliases() == {"production": "v2", "previous": "v1", "candidate": None}
    with pytest.raises(RegistryError, match="already production"):
        registry.promote("v2", reason="again", run_id="run-c")


def test_a_lost_race_is_still_a_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(LocalStore(tmp_path))
    _register(registry, "v1", "run-a")
    other = Registry(LocalStore(tmp_path))
    original_state = Registry.state

    def stale_then_fresh(self: Registry) -> dict[str, Any]:
        state = original_state(self)
        if self is registry and not getattr(self, "_raced", False):
            self._raced = True  # type: ignore[attr-defined]
            other.move_aliases({"candidate": "v1"}, reason="other writer", run_id="run-other")
        return state

    monkeypatch.setattr(Registry, "state", stale_then_fresh)
    with pytest.raises(RegistryConflictError):
        registry.move_aliases({"production": "v1"}, reason="mine", run_id="run-mine")


def test_s3_put_if_absent_after_a_lost_reply_is_ours_only_with_the_same_bytes(s3_server: str, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "tl", endpoint_url=s3_server)
    assert store.put_if_absent("k.json", b"mine") is True
    assert store.put_if_absent("k.json", b"mine") is True, "the same bytes: our own write whose reply was lost"
    assert store.put_if_absent("k.json", b"theirs") is False


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TUNELOOP__STORE__URI", str(tmp_path / "store"))
    monkeypatch.setenv("TUNELOOP__VLLM__ADAPTER_DIR", str(tmp_path / "served"))  # not the checkout's (make demo fills it)
    return open_loop(None, run_id="scheduled__2026-03-01", progress=lambda _m: None)


def test_train_retried_after_register_trains_nothing_again(loop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_ml(_loop: Any, args: list[str]) -> dict[str, Any]:
        calls.append(args)
        return {"final_loss": 0.5, "steps": 10, "base_model": "demo", "loss_history": [1.0, 0.5]}

    monkeypatch.setattr("tuneloop.steps.loop.Loop.run_ml", fake_ml)
    first = train_step(loop, "snap123")
    # the task dies after register, before the candidate alias moved: Airflow retries it
    loop.registry.move_aliases({"candidate": None}, reason="simulated crash before the alias move", run_id="someone-else")
    again = train_step(loop, "snap123")
    assert len(calls) == 1, "the retry must not train (and allocate) another version"
    assert again["version"] == first["version"] == "v1"
    assert loop.registry.next_version() == "v2"
    assert loop.registry.aliases()["candidate"] == "v1"


def test_record_retried_after_the_promote_landed_succeeds(loop: Any) -> None:
    _register(loop.registry, "v1", loop.run_id)
    first = record_step(loop, "v1")
    again = record_step(loop, "v1")
    assert again["aliases"] == first["aliases"] == {"production": "v1", "previous": None, "candidate": None}
    assert len(loop.registry.history()) == 1


def test_record_after_a_rollback_that_ran_meanwhile_refuses_and_the_rollback_wins(loop: Any) -> None:
    """The refresh deployed v3 over v2; before its record, an operator rolled back to v1. The
    record must not promote v3 over the rollback (the teardown then reconciles to v1)."""
    from tuneloop.registry import RegistryConflictError

    for version in ("v1", "v2", "v3"):
        _register(loop.registry, version, "earlier")
    loop.registry.promote("v1", reason="bootstrap", run_id="earlier-1")
    loop.registry.promote("v2", reason="refresh", run_id="earlier-2")
    loop.registry.move_aliases({"production": "v1", "previous": "v2"}, reason="rollback: v2 misbehaves", run_id="rollback-run")
    with pytest.raises(RegistryConflictError) as caught:
        record_step(loop, "v3", deployed_over="v2")
    assert "production moved from v2 to v1" in str(caught.value) and "rollback-run" in str(caught.value)
    assert loop.registry.aliases() == {"production": "v1", "previous": "v2", "candidate": None}
    first = record_step(loop, "v3", deployed_over="v1")  # deployed over what production is: fine
    again = record_step(loop, "v3", deployed_over="v1")  # and its retry, after the promote landed
    assert first["aliases"] == again["aliases"] == {"production": "v3", "previous": "v1", "candidate": None}


def test_rollback_retried_after_the_alias_move_does_not_undo_it(loop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in ("v1", "v2"):
        _register(loop.registry, version, "earlier")
    loop.registry.promote("v1", reason="bootstrap", run_id="earlier-1")
    loop.registry.promote("v2", reason="refresh", run_id="earlier-2")
    served: list[str] = []
    monkeypatch.setattr("tuneloop.steps.serve.deploy_step", lambda _loop, version, **_kw: served.append(version) or {"version": version})
    monkeypatch.setattr("tuneloop.steps.serve.verify_step", lambda _loop, version: {"version": version})
    monkeypatch.setattr("tuneloop.steps.serve.reconcile_step", lambda _loop: served.append("reconcile") or {})
    first = rollback_step(loop)
    assert first["version"] == "v1" and loop.registry.aliases()["production"] == "v1"
    again = rollback_step(loop)  # a retry: `previous` now names v2, which would undo the rollback
    assert again["version"] == "v1" and again["from"] == "v2"
    assert loop.registry.aliases() == {"production": "v1", "previous": "v2", "candidate": None}
    assert served == ["v1", "reconcile"]


def test_a_version_is_pinned_to_its_bytes(loop: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry record holds the adapter's content hash; a copy in the store that differs
    (a half-finished upload, weights written again under the same name) is never served."""
    from tuneloop.provenance import dir_digest
    from tuneloop.steps.serve import materialize_adapter

    adapter = tmp_path / "v1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights-v1")
    loop.store.put_dir("adapters/v1", adapter)
    loop.registry.register("v1", adapter_key="adapters/v1", snapshot="s", base_model="demo", run_id="r", adapter_hash=dir_digest(adapter))
    assert (materialize_adapter(loop, "v1") / "adapter_model.safetensors").read_bytes() == b"weights-v1"
    loop.store.put_bytes("adapters/v1/adapter_model.safetensors", b"other weights")
    monkeypatch.setattr(loop.settings.vllm, "adapter_dir", str(tmp_path / "another-host"))
    with pytest.raises(RuntimeError, match="does not match its registry record"):
        materialize_adapter(loop, "v1")
