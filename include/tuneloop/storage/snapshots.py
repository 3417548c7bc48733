"""Content-addressed dataset snapshots: the data files' hash is the snapshot's name, the manifest
is written last (a snapshot without one is incomplete and never read)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import TYPE_CHECKING, Any

from tuneloop.storage.base import (
    _HASH_RE,
    _RESERVED_MANIFEST_FIELDS,
    MANIFEST_NAME,
    StorageError,
    Store,
    _check_prefix,
    _join,
    check_key,
    log,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from pathlib import Path


def content_hash(files: Mapping[str, bytes]) -> str:
    """SHA-256 (hex) over the sorted file names and contents, length-prefixed so that
    ``{"ab": b"c"}`` and ``{"a": b"bc"}`` differ. Independent of the mapping's order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        _hash_entry(digest, name, len(files[name]), [files[name]])
    return digest.hexdigest()


def content_hash_of_files(paths: Mapping[str, Path]) -> str:
    """:func:`content_hash` of local files, read 1 MiB at a time."""
    digest = hashlib.sha256()
    for name in sorted(paths):
        _hash_entry(digest, name, paths[name].stat().st_size, _blocks(paths[name]))
    return digest.hexdigest()


def _hash_entry(digest: Any, name: str, size: int, blocks: Iterable[bytes]) -> None:
    encoded = name.encode("utf-8")
    digest.update(f"{len(encoded)}:".encode())
    digest.update(encoded)
    digest.update(f"{size}:".encode())
    for block in blocks:
        digest.update(block)


def _blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            yield block


def _check_hash(snapshot_hash: str) -> str:
    if not _HASH_RE.match(snapshot_hash):
        raise ValueError(
            f"invalid snapshot hash {snapshot_hash!r}: expected 64 lowercase hex digits"
        )
    return snapshot_hash


def write_snapshot(
    store: Store, prefix: str, files: Mapping[str, bytes], manifest: Mapping[str, Any]
) -> str:
    """Write ``files`` under ``prefix/<hash>/`` then ``manifest.json`` last; return the hash.

    The manifest marks the snapshot complete and records the hash, each file's name, size
    and sha256, a ``created_at`` timestamp and the caller's fields. Writing the same
    content again is a no-op returning the same hash (the first manifest is kept).
    """
    _check_files(prefix, files, manifest)
    entries = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    return _write(store, prefix, content_hash(files), entries, lambda key, name: store.put_bytes(key, files[name]), manifest)


def write_snapshot_files(
    store: Store, prefix: str, paths: Mapping[str, Path], manifest: Mapping[str, Any]
) -> str:
    """:func:`write_snapshot` from local files, never held in memory whole (uploads stream;
    large files go up in parts). Same hash and manifest as the bytes would give."""
    _check_files(prefix, paths, manifest)
    entries = {}
    for name, path in paths.items():
        digest = hashlib.sha256()
        for block in _blocks(path):
            digest.update(block)
        entries[name] = (path.stat().st_size, digest.hexdigest())
    return _write(store, prefix, content_hash_of_files(paths), entries, lambda key, name: store.put_file(key, paths[name]), manifest)


def _check_files(prefix: str, files: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    _check_prefix(prefix)
    if not files:
        raise ValueError("a snapshot needs at least one file")
    for name in files:
        check_key(name)
        if name == MANIFEST_NAME:
            raise ValueError(f"file name {MANIFEST_NAME!r} is reserved for the snapshot manifest")
    clashes = sorted(set(manifest) & set(_RESERVED_MANIFEST_FIELDS))
    if clashes:
        raise ValueError(f"manifest fields {clashes} are reserved: tuneloop sets them")


def _write(
    store: Store,
    prefix: str,
    snapshot_hash: str,
    entries: Mapping[str, tuple[int, str]],
    put: Callable[[str, str], None],
    manifest: Mapping[str, Any],
) -> str:
    base = _join(_check_prefix(prefix), snapshot_hash)
    manifest_key = f"{base}/{MANIFEST_NAME}"
    if store.exists(manifest_key):
        log.info("snapshot %s already complete in %s", base, store.uri)
        return snapshot_hash
    for name in sorted(entries):
        put(f"{base}/{name}", name)
    record = {
        "hash": snapshot_hash,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": [{"name": name, "size": entries[name][0], "sha256": entries[name][1]} for name in sorted(entries)],
        **manifest,
    }
    body = (json.dumps(record, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode(
        "utf-8"
    )
    if not store.put_if_absent(manifest_key, body):
        log.info(
            "snapshot %s completed concurrently in %s; keeping the first manifest", base, store.uri
        )
    return snapshot_hash


def read_snapshot_manifest(store: Store, prefix: str, snapshot_hash: str) -> dict[str, Any]:
    """The manifest of a complete snapshot; :class:`StoreKeyError` if it is not complete."""
    key = f"{_join(_check_prefix(prefix), _check_hash(snapshot_hash))}/{MANIFEST_NAME}"
    manifest = store.get_json(key)
    if not isinstance(manifest, dict):
        raise StorageError(f"snapshot manifest {key} in {store.uri} is not a JSON object")
    return manifest


def list_snapshots(store: Store, prefix: str) -> list[str]:
    """Hashes of the complete snapshots under ``prefix`` (those with a manifest), sorted."""
    prefix = _check_prefix(prefix)
    offset = len(prefix) + 1 if prefix else 0
    hashes = []
    for key in store.list(prefix):
        parts = key[offset:].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST_NAME and _HASH_RE.match(parts[0]):
            hashes.append(parts[0])
    return sorted(hashes)
