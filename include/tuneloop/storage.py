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

import abc
import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Iterator, Mapping

    from tuneloop.config import Settings, StoreSettings

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
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def links(self, key: str, *, expires_s: int = 0) -> builtins.list[str]:
        """Where a person can open ``key``: its URI first (``file://`` or ``s3://``), then,
        for S3 and ``expires_s > 0``, a presigned HTTPS URL a browser can open."""
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


class LocalStore(Store):
    """A persistent local directory. Writes go to a temp file in the target's directory,
    are fsynced, then ``os.replace``d (or hard-linked for :meth:`put_if_absent`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create local store directory {self.root}: {err}") from err
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _fail(self, op: str, key: str, err: BaseException) -> StorageError:
        prep = "to" if op.startswith("put") else "from" if op.startswith("get") else "in"
        return StorageError(f"local {op} {key} {prep} {self.uri} failed: {err}")

    def _write_atomic(
        self, key: str, op: str, write: Callable[[IO[bytes]], None], *, exclusive: bool = False
    ) -> bool:
        """Write through a temp file; replace (or link, when ``exclusive``) it into place."""
        path = self._path(key)
        tmp = path.with_name(f"{TMP_MARK}{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as handle:
                    write(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                if exclusive:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, path)
            finally:
                # After replace this is a no-op; after a failure it removes the temp file.
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            _fsync_dir(path.parent)
            return True
        except OSError as err:
            raise self._fail(op, key, err) from err

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomic(key, "put", lambda handle: _write_all(handle, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if self._path(key).exists():
            return False
        return self._write_atomic(
            key, "put_if_absent", lambda handle: _write_all(handle, data), exclusive=True
        )

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        try:
            source = open(path, "rb")  # closed by the with-block below
        except OSError as err:
            raise self._fail("put_file", key, err) from err
        with source:
            self._write_atomic(
                key, "put_file", lambda handle: shutil.copyfileobj(source, handle, _COPY_CHUNK)
            )

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise StoreKeyError(f"key {key} not found in {self.uri}") from err
        except OSError as err:
            raise self._fail("get", key, err) from err

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        source_path = self._path(key)
        target = Path(path)
        tmp = target.with_name(f"{TMP_MARK}{uuid.uuid4().hex}")
        try:
            with open(source_path, "rb") as source:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(tmp, "xb") as handle:
                        shutil.copyfileobj(source, handle, _COPY_CHUNK)
                    os.replace(tmp, target)
                finally:
                    try:
                        os.unlink(tmp)
                    except FileNotFoundError:
                        pass
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            if not source_path.is_file():
                raise StoreKeyError(f"key {key} not found in {self.uri}") from err
            raise self._fail("get_file", key, err) from err
        except OSError as err:
            raise self._fail("get_file", key, err) from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def links(self, key: str, *, expires_s: int = 0) -> builtins.list[str]:
        return [self._path(key).as_uri()]

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise self._fail("delete", key, err) from err

    def list(self, prefix: str = "") -> builtins.list[str]:
        prefix = _check_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [name for name in dirnames if not name.startswith(TMP_MARK)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.startswith(TMP_MARK):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        prefix = _check_prefix(prefix)
        base = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        try:
            entries = sorted(os.scandir(base), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False)
            and not entry.name.startswith(TMP_MARK)
            and _holds_object(Path(entry.path))
        ]

    def clean_temp_files(self, max_age_s: float = 3600.0) -> int:
        """Remove temp files left by writers that crashed; returns how many were removed.

        Only files older than ``max_age_s`` go, so in-flight writes are left alone.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = Path(dirpath, name)
                try:
                    if name.startswith(TMP_MARK) and path.stat().st_mtime <= cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
        if removed:
            log.info("removed %d stale temp file(s) from %s", removed, self.uri)
        return removed


def _write_all(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)


def _holds_object(directory: Path) -> bool:
    """Whether ``directory`` holds at least one object (temp files do not count)."""
    for _dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [name for name in dirnames if not name.startswith(TMP_MARK)]
        if any(not name.startswith(TMP_MARK) for name in filenames):
            return True
    return False


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# S3 and S3-compatible servers
# ---------------------------------------------------------------------------------------

THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
    }
)
TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException"}
)
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

_session_lock = threading.Lock()
_shared_session: Any = None


def _new_s3_client(endpoint_url: str | None, region: str, max_attempts: int) -> Any:
    """An S3 client from one shared boto3 session (10x cheaper than a session per client)."""
    global _shared_session
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "region_name": region,
        "retries": {"mode": "adaptive", "total_max_attempts": max_attempts},
        "connect_timeout": 10,
        "read_timeout": 60,
        # requests are SigV4 anyway; this makes presigned URLs SigV4 too (not legacy SigV2)
        "signature_version": "s3v4",
    }
    if endpoint_url:
        # S3-compatible servers (MinIO, moto, Ceph...) want path-style addressing, and some
        # reject the default CRC checksums newer botocore sends on every request.
        options["s3"] = {"addressing_style": "path"}
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    with _session_lock:  # creating clients from one session is not thread-safe
        if _shared_session is None:
            _shared_session = boto3.session.Session()
        return _shared_session.client("s3", endpoint_url=endpoint_url, config=Config(**options))


class S3Store(Store):
    """Objects under ``s3://bucket/prefix`` on AWS or any S3-compatible ``endpoint_url``.

    Retries: ``max_attempts`` bounds the HTTP attempts per operation. botocore's adaptive
    mode retries each request (and slows the client down when throttled); on top, every
    operation runs in a retry loop with exponential backoff and full jitter that covers
    what botocore cannot (interrupted body reads, transfers, custom clients), counting the
    attempts botocore already made against the same budget.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        max_attempts: int = 8,
        client: Any = None,
        *,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 10.0,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix.strip("/"))
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._owns_client = client is None
        self._client = (
            client if client is not None else _new_s3_client(endpoint_url, region, max_attempts)
        )
        self._bucket_checked = False
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    # -- plumbing ------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def _base(self, prefix: str) -> str:
        """The full S3 prefix (ending in ``/`` unless it is the bucket root) for a listing."""
        sub = _check_prefix(prefix)
        full = _join(self.prefix, sub) if sub else self.prefix
        return f"{full}/" if full else ""

    def _endpoint(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def _missing_bucket(self) -> MissingBucketError:
        flag = f" --endpoint-url {self.endpoint_url}" if self.endpoint_url else ""
        return MissingBucketError(
            f"S3 bucket {self.bucket!r} does not exist at {self._endpoint()} (store {self.uri}); "
            f"tuneloop does not create buckets: create it (`aws s3 mb s3://{self.bucket}{flag}`) "
            f"or point store.uri at an existing bucket"
        )

    def _check_bucket(self) -> None:
        """Raise :class:`MissingBucketError` if the bucket is gone (checked once per store)."""
        if self._bucket_checked:
            return
        try:
            self._call("head_bucket", "", lambda: self._client.head_bucket(Bucket=self.bucket))
        except StorageError as err:
            cause = err.__cause__
            if _error_code(cause) in ("404", "NoSuchBucket") or _status(cause) == 404:
                raise self._missing_bucket() from cause
            raise
        self._bucket_checked = True

    def _is_retryable(self, err: BaseException, op: str) -> bool:
        from botocore.exceptions import (
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
        )

        if isinstance(err, (ConnectionError, HTTPClientError, IncompleteReadError)):
            return True
        code, status = _error_code(err), _status(err)
        if code == "ConditionalRequestConflict" and op == "put_if_absent":
            return True  # a concurrent conditional write is in flight: AWS says retry
        return code in THROTTLING_CODES or code in TRANSIENT_CODES or status in TRANSIENT_STATUS

    def _attempts_spent(self, err: BaseException) -> int:
        """HTTP attempts one failed call used: botocore's own retries count too."""
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

        response = getattr(_client_error(err), "response", None) or {}
        retried = response.get("ResponseMetadata", {}).get("RetryAttempts")
        if isinstance(retried, int):
            return 1 + retried
        if self._owns_client and isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            return self.max_attempts  # botocore already retried connecting max_attempts times
        return 1

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on throttling/transient errors; wrap failures in
        :class:`StorageError` naming op, key, store and cause (the original is ``__cause__``)."""
        spent = 0
        retry = 0
        while True:
            try:
                return fn()
            except Exception as err:
                if isinstance(err, StorageError):
                    raise
                spent += self._attempts_spent(err)
                retryable = self._is_retryable(err, op)
                if not retryable or spent >= self.max_attempts:
                    prep = (
                        "to" if op.startswith("put") else "from" if op.startswith("get") else "in"
                    )
                    what = f" {key}" if key else ""
                    tries = f"after {spent} attempt{'s' if spent != 1 else ''}"
                    raise StorageError(
                        f"S3 {op}{what} {prep} {self.uri} failed {tries}: {_describe(err)}"
                        f" (endpoint {self._endpoint()})"
                    ) from (_client_error(err) or err)
                delay = random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**retry))
                retry += 1
                log.warning(
                    "S3 %s %s in %s: %s; retry %d in %.2fs (%d/%d attempts used)",
                    op,
                    key,
                    self.uri,
                    _describe(err),
                    retry,
                    delay,
                    spent,
                    self.max_attempts,
                )
                time.sleep(delay)

    def _translate_missing(self, err: StorageError, key: str) -> StorageError:
        """Turn 'no such key'/'no such bucket' failures into their precise error types."""
        cause = err.__cause__
        code = _error_code(cause)
        if code == "NoSuchBucket":
            return self._missing_bucket()
        if code in ("NoSuchKey", "404") or _status(cause) == 404:
            self._check_bucket()  # a 404 on HEAD has no body: tell bucket and key apart
            return StoreKeyError(f"key {key} not found in {self.uri}")
        return err

    # -- contract ------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self._call(
                "put", key, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data)
            )
        except StorageError as err:
            raise self._translate_missing(err, key) from err.__cause__

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        try:
            self._call(
                "put_if_absent",
                key,
                lambda: self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*"
                ),
            )
        except StorageError as err:
            cause = err.__cause__
            if _error_code(cause) == "PreconditionFailed" or _status(cause) == 412:
                # A lost reply: botocore retried a put that had landed, and the retry found our own
                # object. The same bytes mean the write is ours; anything else is another writer's.
                try:
                    return self.get_bytes(key) == data
                except StorageError:
                    return False
            raise self._translate_missing(err, key) from cause
        return True

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        from boto3.s3.transfer import TransferConfig

        full = self._key(key)
        source = Path(path)
        if not source.is_file():
            raise StorageError(f"S3 put_file {key} to {self.uri}: {source} is not a file")
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=4,
        )
        try:
            self._call(
                "put_file",
                key,
                lambda: self._client.upload_file(str(source), self.bucket, full, Config=config),
            )
        except StorageError as err:
            raise self._translate_missing(err, key) from err.__cause__

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        try:
            return self._call("get", key, fetch)
        except StorageError as err:
            raise self._translate_missing(err, key) from err.__cause__

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full = self._key(key)
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"S3 get_file {key} from {self.uri}: {err}") from err
        # s3transfer writes to a temp name next to ``target`` and renames it when complete.
        try:
            self._call(
                "get_file",
                key,
                lambda: self._client.download_file(self.bucket, full, str(target)),
            )
        except StorageError as err:
            raise self._translate_missing(err, key) from err.__cause__

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._call(
                "exists", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
            )
        except StorageError as err:
            cause = err.__cause__
            if _error_code(cause) in ("404", "NoSuchKey") or _status(cause) == 404:
                self._check_bucket()
                return False
            raise self._translate_missing(err, key) from cause
        return True

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._call(
                "delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full)
            )
        except StorageError as err:
            raise self._translate_missing(err, key) from err.__cause__

    def _paginate(self, op: str, prefix: str, **kwargs: Any) -> builtins.list[dict[str, Any]]:
        def pages() -> builtins.list[dict[str, Any]]:
            paginator = self._client.get_paginator("list_objects_v2")
            return list(paginator.paginate(Bucket=self.bucket, Prefix=self._base(prefix), **kwargs))

        try:
            return self._call(op, prefix or "(root)", pages)
        except StorageError as err:
            raise self._translate_missing(err, prefix) from err.__cause__

    def list(self, prefix: str = "") -> builtins.list[str]:
        root = self._base("")
        keys = []
        for page in self._paginate("list", prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(root) :]
                if name and not name.endswith("/"):  # skip "folder" marker objects
                    keys.append(name)
        return sorted(keys)

    def links(self, key: str, *, expires_s: int = 0) -> builtins.list[str]:
        """The ``s3://`` URI, then a presigned GET URL valid ``expires_s`` seconds (SigV4
        allows at most 7 days) that makes the browser show the object inline with a content
        type from its name. Signing is local; without credentials there is no second link."""
        from botocore.exceptions import BotoCoreError

        full = self._key(key)
        found = [f"s3://{self.bucket}/{full}"]
        if expires_s <= 0:
            return found
        params = {"Bucket": self.bucket, "Key": full, "ResponseContentDisposition": "inline"}
        content_type = _content_type(key)
        if content_type:
            params["ResponseContentType"] = content_type
        try:
            found.append(
                self._client.generate_presigned_url(
                    "get_object", Params=params, ExpiresIn=min(int(expires_s), 7 * 24 * 3600)
                )
            )
        except BotoCoreError as err:  # NoCredentialsError and friends
            log.warning("no presigned URL for %s/%s: %s", self.uri, key, err)
        return found

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        base = self._base(prefix)
        names = set()
        for page in self._paginate("list_dirs", prefix, Delimiter="/"):
            for item in page.get("CommonPrefixes", []):
                name = item["Prefix"][len(base) :].rstrip("/")
                if name:
                    names.add(name)
        return sorted(names)


def _content_type(key: str) -> str | None:
    """The MIME type a browser needs to show ``key`` (HTML and Markdown as UTF-8 text)."""
    import mimetypes

    if key.endswith(".md"):
        return "text/markdown; charset=utf-8"
    guessed, _ = mimetypes.guess_type(key)
    if guessed and guessed.startswith("text/"):
        return f"{guessed}; charset=utf-8"
    return guessed


def _client_error(err: BaseException | None) -> Any:
    """The botocore ``ClientError`` behind ``err`` (boto3's transfer errors wrap it)."""
    from botocore.exceptions import ClientError

    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, ClientError):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _error_code(err: BaseException | None) -> str:
    client_error = _client_error(err)
    if client_error is None:
        return ""
    return str(client_error.response.get("Error", {}).get("Code", ""))


def _status(err: BaseException | None) -> int | None:
    client_error = _client_error(err)
    if client_error is None:
        return None
    status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _describe(err: BaseException) -> str:
    client_error = _client_error(err)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code", "?")
        return f"{code} (HTTP {status}): {error.get('Message', '') or client_error}"
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------
# Opening a store
# ---------------------------------------------------------------------------------------


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    max_attempts: int = 8,
) -> Store:
    """Open ``uri``: a plain path or ``file:///abs`` -> :class:`LocalStore`,
    ``s3://bucket/optional/prefix`` -> :class:`S3Store`."""
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
        )
    raise ValueError(f"store URI {uri!r}: only local paths, file:// and s3:// are supported")


def open_store_from_settings(settings: Settings | StoreSettings) -> Store:
    """Open the store configured in ``settings.store`` (or a ``StoreSettings`` itself)."""
    store = cast("StoreSettings", getattr(settings, "store", settings))
    return open_store(
        store.uri,
        endpoint_url=store.endpoint_url,
        region=store.region,
        max_attempts=store.max_attempts,
    )


# ---------------------------------------------------------------------------------------
# Content-addressed snapshots
# ---------------------------------------------------------------------------------------


def content_hash(files: Mapping[str, bytes]) -> str:
    """SHA-256 (hex) over the sorted file names and contents, length-prefixed so that
    ``{"ab": b"c"}`` and ``{"a": b"bc"}`` differ. Independent of the mapping's order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        encoded = name.encode("utf-8")
        data = files[name]
        digest.update(f"{len(encoded)}:".encode())
        digest.update(encoded)
        digest.update(f"{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


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
    prefix = _check_prefix(prefix)
    if not files:
        raise ValueError("a snapshot needs at least one file")
    for name in files:
        check_key(name)
        if name == MANIFEST_NAME:
            raise ValueError(f"file name {MANIFEST_NAME!r} is reserved for the snapshot manifest")
    clashes = sorted(set(manifest) & set(_RESERVED_MANIFEST_FIELDS))
    if clashes:
        raise ValueError(f"manifest fields {clashes} are reserved: tuneloop sets them")
    snapshot_hash = content_hash(files)
    base = _join(prefix, snapshot_hash)
    manifest_key = f"{base}/{MANIFEST_NAME}"
    if store.exists(manifest_key):
        log.info("snapshot %s already complete in %s", base, store.uri)
        return snapshot_hash
    for name in sorted(files):
        store.put_bytes(f"{base}/{name}", files[name])
    record = {
        "hash": snapshot_hash,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": [
            {
                "name": name,
                "size": len(files[name]),
                "sha256": hashlib.sha256(files[name]).hexdigest(),
            }
            for name in sorted(files)
        ],
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
]
