"""Adapter registry in the store: immutable version records and atomically moved aliases.

Layout::

    registry/versions/<version>.json       one immutable record per adapter version
    registry/aliases/<generation>.json     one immutable record per alias move (the history)
    registry/aliases.json                  a copy of the newest generation, for humans/tools

Aliases (``production``, ``previous``, ``candidate``) move together in one generation file
written with a conditional put (``put_if_absent``): two writers racing for the same
generation cannot both win, and no reader ever sees half a move. The newest generation is
the state; earlier generations are the full history with reasons and run ids.

Writes are idempotent for a retried task: registering the version a run already registered,
or moving the aliases where the same run already moved them, returns the record written the
first time instead of failing (Airflow's rule: a re-run gives the same outcome).
"""

from __future__ import annotations

import reprlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from tuneloop.storage import Store

ALIASES = ("production", "previous", "candidate")
VERSION_RE = layout.VERSION_RE


UNCHECKED = "<unchecked>"
"""``promote(expect_production=...)`` default: no check (not a version name, so never a real value)."""


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


class RegistryConflictError(RegistryError):
    """Someone else moved the aliases first (optimistic concurrency lost)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """Adapter versions and their aliases, stored under ``prefix`` in a :class:`Store`."""

    def __init__(self, store: Store, prefix: str = layout.REGISTRY) -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    # --- versions -----------------------------------------------------------------------

    def _version_key(self, version: str) -> str:
        return f"{self.prefix}/versions/{version}.json"

    def versions(self) -> list[dict[str, Any]]:
        """All version records, oldest first."""
        keys = [k for k in self.store.list(f"{self.prefix}/versions/") if k.endswith(".json")]
        records = [self._read_version(k) for k in keys]
        return sorted(records, key=lambda r: _version_number(r["version"]))

    def next_version(self) -> str:
        numbers = [_version_number(r["version"]) for r in self.versions()]
        return f"v{max(numbers, default=0) + 1}"

    def register(
        self,
        version: str,
        *,
        adapter_key: str,
        snapshot: str | None,
        base_model: str,
        metrics: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        run_id: str | None = None,
        adapter_hash: str | None = None,
    ) -> dict[str, Any]:
        """Record a new adapter version; a version is written once and never changed.
        ``adapter_hash`` (``provenance.dir_digest`` of its config and weights) pins the
        version to its bytes: a copy that differs is refused before it is served."""
        if not VERSION_RE.match(version):
            raise RegistryError(f"version {version!r} must look like v1, v2, ...")
        record = {
            "version": version,
            "created_at": _now(),
            "adapter_key": adapter_key,
            "snapshot": snapshot,
            "base_model": base_model,
            "metrics": metrics or {},
            "provenance": provenance or {},
            "run_id": run_id,
            "adapter_hash": adapter_hash,
        }
        import json

        if not self.store.put_if_absent(self._version_key(version), json.dumps(record, indent=2).encode()):
            existing = self.get(version)
            same = {k: existing.get(k) for k in ("adapter_key", "snapshot", "run_id")} == {k: record[k] for k in ("adapter_key", "snapshot", "run_id")}
            if run_id is not None and same:
                return existing  # this run registered it before a retry: the same outcome
            raise RegistryError(f"version {version} is already registered in {self.store.uri}; versions are immutable")
        return record

    def registered_by(self, run_id: str) -> dict[str, Any] | None:
        """The version a run registered, if it did (a retried train step finds its own)."""
        found = [record for record in self.versions() if record.get("run_id") == run_id]
        return found[-1] if found else None

    def get(self, version: str) -> dict[str, Any]:
        from tuneloop.storage import StoreKeyError

        if not (isinstance(version, str) and VERSION_RE.match(version)):
            raise RegistryError(f"{reprlib.repr(version)} is not a version (v1, v2, ...) nor an alias ({', '.join(ALIASES)})")
        try:
            return self._read_version(self._version_key(version))
        except StoreKeyError:
            known = ", ".join(r["version"] for r in self.versions()) or "none"
            raise RegistryError(f"no adapter version {version!r} in {self.store.uri} (known: {known})") from None

    def resolve(self, name: str) -> dict[str, Any]:
        """A version record by version name or alias (``production``...)."""
        if name in ALIASES:
            version = self.aliases().get(name)
            if version is None:
                raise RegistryError(f"alias {name!r} points at no version yet in {self.store.uri}")
            return self.get(version)
        return self.get(name)

    # --- aliases ------------------------------------------------------------------------

    def _generations(self) -> list[str]:
        return sorted(k for k in self.store.list(f"{self.prefix}/aliases/") if k.endswith(".json"))

    def state(self) -> dict[str, Any]:
        """The newest alias generation (generation 0 with no aliases when empty)."""
        generations = self._generations()
        if not generations:
            return {"generation": 0, "aliases": dict.fromkeys(ALIASES)}
        return self._read_generation(generations[-1])

    def aliases(self) -> dict[str, str | None]:
        return dict(self.state()["aliases"])

    def history(self) -> list[dict[str, Any]]:
        """Every alias move, oldest first, with its reason and run id."""
        return [self._read_generation(k) for k in self._generations()]

    # --- reading: every record is checked before a name in it becomes a key or a path ---------

    def _read(self, key: str) -> Any:
        import json

        raw = self.store.get_bytes(key)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise self._corrupt(key, f"it is not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None

    def _corrupt(self, key: str, why: str) -> RegistryError:
        if key.startswith(f"{self.prefix}/aliases/"):
            fix = (
                "restore it from a backup or an earlier object version, or delete it so that the generation "
                "before it is the aliases' state again (`tuneloop status` shows them)"
            )
        else:
            fix = "restore it from a backup or an earlier object version (a version record is written once, never edited)"
        return RegistryError(f"registry file {self.store.uri}/{key} is corrupt: {why}. Nothing was changed; {fix}")

    def _read_version(self, key: str) -> dict[str, Any]:
        """A version record, checked: an object whose ``version`` is a version name matching its key."""
        record = self._read(key)
        if not isinstance(record, dict):
            raise self._corrupt(key, f"it holds a JSON {type(record).__name__}, not an object")
        version = record.get("version")
        if not (isinstance(version, str) and VERSION_RE.match(version)):
            raise self._corrupt(key, f"its version {reprlib.repr(version)} is not a version name (v1, v2, ...)")
        if key != self._version_key(version):
            raise self._corrupt(key, f"it records {version}, whose record is {self._version_key(version)}")
        return dict(record)

    def _read_generation(self, key: str) -> dict[str, Any]:
        """An alias generation, checked: its number matches its key, each alias is None or a version name."""
        state = self._read(key)
        if not isinstance(state, dict):
            raise self._corrupt(key, f"it holds a JSON {type(state).__name__}, not an object")
        generation, aliases = state.get("generation"), state.get("aliases")
        if not isinstance(generation, int) or isinstance(generation, bool) or key != f"{self.prefix}/aliases/{generation:08d}.json":
            raise self._corrupt(key, f"its generation {reprlib.repr(generation)} does not match its name")
        if not isinstance(aliases, dict):
            raise self._corrupt(key, f"its aliases are {reprlib.repr(aliases)}, not an object of alias -> version")
        for alias in ALIASES:
            value = aliases.get(alias)
            if value is not None and not (isinstance(value, str) and VERSION_RE.match(value)):
                raise self._corrupt(key, f"alias {alias} points at {reprlib.repr(value)}, which is not a version name (v1, v2, ...)")
        return dict(state)

    def move_aliases(
        self, changes: dict[str, str | None], *, reason: str, run_id: str | None = None, expect: dict[str, str | None] | None = None
    ) -> dict[str, Any]:
        """Move several aliases in one atomic step; raises RegistryConflictError on a race.

        ``expect`` (alias -> version) refuses the move unless those aliases still point where the
        caller saw them (compare-and-swap: the generation write below makes it atomic)."""
        import json

        unknown = set(changes) - set(ALIASES)
        if unknown:
            raise RegistryError(f"unknown alias(es) {sorted(unknown)}; aliases are {ALIASES}")
        for version in changes.values():
            if version is not None:
                self.get(version)  # must exist
        current = self.state()
        if self._already_moved(current, changes, run_id):
            return current
        moved = {k: (v, current["aliases"].get(k)) for k, v in (expect or {}).items() if current["aliases"].get(k) != v}
        if moved:
            raise RegistryConflictError(
                "; ".join(f"{k} moved from {was or 'none'} to {now or 'none'}" for k, (was, now) in moved.items())
                + f" (generation {current['generation']} by run {current.get('run_id')}: {current.get('reason')}) "
                f"since this run read it: not moving {sorted(changes)}"
            )
        aliases = {**current["aliases"], **changes}
        generation = int(current["generation"]) + 1
        record = {
            "generation": generation,
            "aliases": aliases,
            "changed": {k: {"from": current["aliases"].get(k), "to": v} for k, v in changes.items()},
            "reason": reason,
            "run_id": run_id,
            "at": _now(),
        }
        body = json.dumps(record, indent=2).encode()
        if not self.store.put_if_absent(f"{self.prefix}/aliases/{generation:08d}.json", body):
            newest = self.state()
            if self._already_moved(newest, changes, run_id):
                return newest
            raise RegistryConflictError(
                f"alias generation {generation} was written by someone else while this run moved {sorted(changes)}; "
                "re-read the registry and retry"
            )
        self.store.put_bytes(f"{self.prefix}/aliases.json", body)
        return record

    @staticmethod
    def _already_moved(state: dict[str, Any], changes: dict[str, str | None], run_id: str | None) -> bool:
        """The newest generation is this run's move with these changes (a retry after it landed)."""
        return run_id is not None and state.get("run_id") == run_id and all(state["aliases"].get(k) == v for k, v in changes.items())

    def promote(self, version: str, *, reason: str, run_id: str | None = None, expect_production: str | None = UNCHECKED) -> dict[str, Any]:
        """production <- version, previous <- the old production, candidate cleared.

        ``expect_production=vN`` (or None: no production yet) refuses unless production is still
        what the caller deployed over: a rollback that ran meanwhile wins over this promote."""
        state = self.state()
        current = dict(state["aliases"])
        if current.get("production") == version:
            if run_id is not None and state.get("run_id") == run_id:
                return state  # this run promoted it before a retry
            raise RegistryError(f"{version} is already production")
        expect = None if expect_production == UNCHECKED else {"production": expect_production}
        return self.move_aliases(
            {"production": version, "previous": current.get("production"), "candidate": None},
            reason=reason,
            run_id=run_id,
            expect=expect,
        )


def _version_number(version: str) -> int:
    match = VERSION_RE.match(version)
    return int(match.group(1)) if match else -1
