"""The store's contract (:class:`Store`), its errors and key rules; backends in ``local`` and ``s3``."""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import builtins
    from collections.abc import Iterable, Iterator


log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_NAME = "manifest.json"
# Temp files of in-flight local writes start with this; keys may not, listings skip them.
TMP_MARK = ".tuneloop-tmp-"
_COPY_CHUNK = 1024 * 1024
_PARTITION_RE = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_MANIFEST_FIELDS = ("hash", "created_at", "files")


class StorageError(RuntimeError):
    """A storage operation failed; the message names operation, key, store URI and cause."""


class StoreKeyError(StorageError, KeyError):
    """The key does not exist in the store (also a ``KeyError`` for ``except KeyError``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingBucketError(StorageError):
    """The S3 bucket does not exist: tuneloop never creates buckets on its own."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid relative POSIX key, else raise ``ValueError``.

    Rejected: empty keys, absolute keys, backslashes, NUL, empty/``.``/``..`` segments (so
    ``a//b`` and ``a/`` too) and segments starting with the reserved temp-file mark.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid store key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"invalid store key {key!r}: must be relative, not absolute")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"invalid store key {key!r}: backslashes and NUL are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid store key {key!r}: empty, '.' or '..' path segment")
        if part.startswith(TMP_MARK):
            raise ValueError(f"invalid store key {key!r}: {TMP_MARK!r} is reserved for temp files")
    return key


def _check_prefix(prefix: str) -> str:
    """Normalise a listing prefix: ``""`` is the root; one trailing slash is optional."""
    if prefix == "":
        return ""
    return check_key(prefix[:-1] if prefix.endswith("/") else prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class Store(abc.ABC):
    """The storage contract both backends fulfil; helpers on top are shared.

    ``list(prefix)`` has directory semantics: it returns every key *under* ``prefix/``
    (recursively, sorted, relative to the store root), so ``labelled`` does not match
    ``labelled_old/x``.
    """

    uri: str

    # -- primitives each backend implements ------------------------------------------
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically, replacing any previous object."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the object's bytes; :class:`StoreKeyError` if it does not exist."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """All keys under ``prefix`` (recursive, sorted, relative to the store root)."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate sub-"directories" of ``prefix`` holding at least one key."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file, streaming (never whole in memory), atomically."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Download ``key`` to ``path`` (parents created), streaming; a reader of ``path``
        never sees a partial file."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` only if ``key`` does not exist: True if written, False if it
        existed. Never overwrites; safe against concurrent writers."""

    # -- shared helpers ------------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        """``key`` as a binary file to read in chunks, never whole in memory. The default
        downloads it (:meth:`get_file`: retried, ranged on S3) to a temporary file that is
        removed afterwards; :class:`LocalStore` opens the object itself."""
        with tempfile.TemporaryDirectory(prefix="tuneloop-read-") as scratch:
            path = Path(scratch) / "object"
            self.get_file(key, path)
            with open(path, "rb") as handle:
                yield handle

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def links(self, key: str, *, expires_s: int = 0, session_token: bool = True) -> builtins.list[str]:
        """Where a person can open ``key``: its URI first (``file://`` or ``s3://``), then,
        for S3 and ``expires_s > 0``, a presigned HTTPS URL a browser can open (never logged:
        it grants access). ``session_token=False`` leaves out a presigned URL that would carry
        the session token of temporary credentials."""
        return [f"{self.uri}/{check_key(key)}"]

    def put_text(self, key: str, text: str) -> None:
        """Write ``text`` as UTF-8."""
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        """Read a UTF-8 object."""
        data = self.get_bytes(key)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise StorageError(f"get {key} from {self.uri}: not valid UTF-8: {err}") from err

    def put_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as pretty JSON (UTF-8, indent=2, keys in the caller's order)."""
        self.put_text(key, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")

    def get_json(self, key: str) -> Any:
        """Read a JSON object; invalid JSON is a :class:`StorageError` naming the key."""
        text = self.get_text(key)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise StorageError(f"get {key} from {self.uri}: not valid JSON: {err}") from err

    def put_jsonl(self, key: str, rows: Iterable[Any]) -> None:
        """Write ``rows`` as JSON lines (UTF-8, one object per line), through a local temp file:
        the rows are never all in memory."""
        import tempfile

        with tempfile.NamedTemporaryFile("wb", prefix="tuneloop-jsonl-", suffix=".jsonl") as handle:
            for row in rows:
                handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            handle.flush()
            self.put_file(key, handle.name)

    def iter_jsonl(self, key: str) -> Iterator[Any]:
        """Yield the records of a JSON-lines object, skipping blank lines."""
        for number, line in enumerate(self.get_text(key).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise StorageError(
                    f"read {key} from {self.uri}: line {number} is not valid JSON: {err}"
                ) from err

    def put_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; returns the
        keys written. Not atomic as a whole: write a marker object last if readers need it."""
        prefix = _check_prefix(prefix)
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"put_dir {prefix} to {self.uri}: {root} is not a directory")
        keys = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                key = _join(prefix, path.relative_to(root).as_posix())
                self.put_file(key, path)
                keys.append(key)
        return keys

    def get_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> builtins.list[Path]:
        """Download every key under ``prefix`` into ``local_dir`` (same relative layout);
        :class:`StoreKeyError` if nothing is stored under ``prefix``."""
        prefix = _check_prefix(prefix)
        keys = self.list(prefix)
        if not keys:
            raise StoreKeyError(f"get_dir {prefix}/ from {self.uri}: no objects under this prefix")
        root = Path(local_dir)
        paths = []
        for key in keys:
            path = root.joinpath(*key[len(prefix) :].lstrip("/").split("/"))
            self.get_file(key, path)
            paths.append(path)
        return paths

    def list_partitions(self, prefix: str) -> builtins.list[dt.date]:
        """Dates of the ``<prefix>/dt=YYYY-MM-DD/`` partitions holding data, sorted.

        Malformed partition names are skipped with a warning rather than failing the run.
        """
        dates = []
        for name in self.list_dirs(prefix):
            match = _PARTITION_RE.match(name)
            try:
                if match is None:
                    raise ValueError("expected dt=YYYY-MM-DD")
                dates.append(dt.date.fromisoformat(match.group(1)))
            except ValueError as err:
                log.warning(
                    "skipping malformed partition %s/%s in %s: %s", prefix, name, self.uri, err
                )
        return sorted(dates)


# ---------------------------------------------------------------------------------------
# Local directory
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# S3 and S3-compatible servers
# ---------------------------------------------------------------------------------------




# ---------------------------------------------------------------------------------------
# Opening a store
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Content-addressed snapshots
# ---------------------------------------------------------------------------------------


