"""Object storage: one contract (:class:`Store`), a local directory and an S3 backend.

Every artifact tuneloop produces (labelled data partitions, dataset snapshots, adapters,
eval reports, the registry) goes through this module, so the rest of the package never
cares whether it runs against a laptop directory, MinIO, moto or AWS.

Keys are POSIX-style relative strings (``labelled/dt=2026-01-03/part-00000.jsonl``).
Writes of single objects are atomic on both backends: a reader sees the old object or the
new one, never half of one. Groups of objects are made "atomic" by writing a marker last
(see :func:`write_snapshot`, whose ``manifest.json`` marks a complete snapshot).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote, urlsplit

from tuneloop.storage.base import (
    MANIFEST_NAME,
    MissingBucketError,
    StorageError,
    Store,
    StoreKeyError,
    check_key,
)
from tuneloop.storage.local import LocalStore
from tuneloop.storage.s3 import S3Store
from tuneloop.storage.snapshots import (
    content_hash,
    list_snapshots,
    read_snapshot_manifest,
    write_snapshot,
    write_snapshot_files,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tuneloop.config import Settings, StoreSettings


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    max_attempts: int = 8,
    credentials: Mapping[str, str | None] | None = None,
) -> Store:
    """Open ``uri``: a plain path or ``file:///abs`` -> :class:`LocalStore`,
    ``s3://bucket/optional/prefix`` -> :class:`S3Store` (``credentials``: explicit keys instead
    of boto3's default chain)."""
    if "://" not in uri:
        return LocalStore(Path(uri))
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        return LocalStore(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"store URI {uri!r}: s3:// URIs need a bucket (s3://bucket/prefix)")
        return S3Store(
            parts.netloc,
            unquote(parts.path).strip("/"),
            endpoint_url=endpoint_url,
            region=region,
            max_attempts=max_attempts,
            credentials=credentials,
        )
    raise ValueError(f"store URI {uri!r}: only local paths, file:// and s3:// are supported")


def open_store_from_settings(settings: Settings | StoreSettings, *, credentials: Mapping[str, str | None] | None = None) -> Store:
    """Open the store configured in ``settings.store`` (or a ``StoreSettings`` itself)."""
    store = cast("StoreSettings", getattr(settings, "store", settings))
    return open_store(
        store.uri,
        endpoint_url=store.endpoint_url,
        region=store.region,
        max_attempts=store.max_attempts,
        credentials=credentials,
    )


__all__ = [
    "MANIFEST_NAME",
    "LocalStore",
    "MissingBucketError",
    "S3Store",
    "StorageError",
    "Store",
    "StoreKeyError",
    "check_key",
    "content_hash",
    "list_snapshots",
    "open_store",
    "open_store_from_settings",
    "read_snapshot_manifest",
    "write_snapshot",
    "write_snapshot_files",
]
