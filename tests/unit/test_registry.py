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


# -- a corrupt or hostile registry ------------------------------------------------------------

BAD_NAMES = ["../../etc", "v1/../../x", "", "v1\n", "V1", "v１", "v-1", "latest", 5, ["v1"], {"v": 1}, True]


def _generation(store: Store, aliases: dict[str, Any], generation: int = 1) -> str:
    import json

    key = f"registry/aliases/{generation:08d}.json"
    store.put_bytes(key, json.dumps({"generation": generation, "aliases": aliases, "reason": "hand-written"}).encode())
    return key


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_an_alias_that_is_no_version_name_is_refused_naming_the_file(tmp_path: Path, name: Any) -> None:
    store = LocalStore(tmp_path / "store")
    registry = Registry(store)
    _register(registry, "v1")
    key = _generation(store, {"production": name, "previous": "v1", "candidate": None})
    for read in (registry.aliases, registry.state, registry.history, lambda: registry.resolve("production"), lambda: registry.promote("v1", reason="x")):
        with pytest.raises(RegistryError) as caught:
            read()
        message = str(caught.value)
        assert f"registry file {store.uri}/{key} is corrupt: alias production points at" in message
        assert "is not a version name" in message and "restore it from a backup" in message and len(message) < 600


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "it is not valid JSON"),
        (b"\xff\xfe\x00", "it is not valid JSON (UnicodeDecodeError"),
        (b"[" * 100_000 + b"]" * 100_000, "it is not valid JSON (RecursionError"),
        (b'["production", "v1"]', "it holds a JSON list, not an object"),
        (b'{"generation": 1}', "its aliases are None, not an object"),
        (b'{"generation": 1, "aliases": ["v1"]}', "its aliases are ['v1'], not an object"),
        (b'{"generation": "1", "aliases": {}}', "its generation '1' does not match its name"),
        (b'{"generation": 7, "aliases": {}}', "its generation 7 does not match its name"),
    ],
    ids=["not-json", "not-utf8", "too-deep", "a-list", "no-aliases", "aliases-a-list", "generation-a-string", "generation-elsewhere"],
)
def test_a_corrupt_alias_file_is_one_clear_error(tmp_path: Path, content: bytes, why: str) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("registry/aliases/00000001.json", content)
    with pytest.raises(RegistryError) as caught:
        Registry(store).aliases()
    message = str(caught.value)
    assert message.startswith(f"registry file {store.uri}/registry/aliases/00000001.json is corrupt: {why}"), message
    assert "or delete it so that the generation before it is the aliases' state again" in message and len(message) < 600


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "it is not valid JSON"),
        (b"42", "it holds a JSON int, not an object"),
        (b'{"version": "../../etc"}', "its version '../../etc' is not a version name"),
        (b'{"adapter_key": "adapters/v1"}', "its version None is not a version name"),
        (b'{"version": "v2"}', "it records v2, whose record is registry/versions/v2.json"),
    ],
)
def test_a_corrupt_version_record_is_one_clear_error(tmp_path: Path, content: bytes, why: str) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("registry/versions/v1.json", content)
    for read in (Registry(store).versions, lambda: Registry(store).get("v1"), Registry(store).next_version):
        with pytest.raises(RegistryError, match="restore it from a backup") as caught:
            read()
        assert str(caught.value).startswith(f"registry file {store.uri}/registry/versions/v1.json is corrupt: {why}")


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_name_that_is_no_version_never_becomes_a_key_or_a_path(tmp_path: Path, name: Any) -> None:
    from tuneloop import layout

    with pytest.raises(RegistryError, match="is not a version"):
        Registry(LocalStore(tmp_path / "store")).get(name)
    for to_key in (layout.adapter, layout.report, layout.evaluations, layout.gate_decision, layout.adapter_provenance):
        with pytest.raises(ValueError, match=r"is not a version name \(v1, v2, ...\)"):
            to_key(name)


def test_materialize_refuses_a_version_that_would_name_a_directory_elsewhere(tmp_path: Path) -> None:
    import types

    from tuneloop.steps.serve import materialize_adapter

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")  # an adapter directory an attacker prepared
    served = tmp_path / "served"
    served.mkdir()
    loop = types.SimpleNamespace(registry=Registry(LocalStore(tmp_path / "store")), settings=types.SimpleNamespace(vllm=types.SimpleNamespace(adapter_dir=str(served))))
    with pytest.raises(ValueError, match="'../outside' is not a version name"):
        materialize_adapter(loop, "../outside")  # type: ignore[arg-type]


def test_the_cli_reports_a_corrupt_registry_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tuneloop.cli import main

    store = LocalStore(tmp_path / "store")
    key = _generation(store, {"production": "../../etc"})
    monkeypatch.setenv("TUNELOOP__STORE__URI", str(tmp_path / "store"))
    assert main(["status", "--no-vllm"]) == 1
    assert main(["rollback", "--to", "production", "-q"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(f"RegistryError: registry file {store.uri}/{key} is corrupt: alias production points at '../../etc'" in line for line in err), err
    assert main(["deploy", "--version", "../../etc", "-q"]) == 1
    assert "RegistryError: '../../etc' is not a version (v1, v2, ...) nor an alias" in capsys.readouterr().err
