"""S3 (or any S3-compatible API: MinIO, moto) as a store, through boto3: retries with backoff on
throttling and 5xx, multipart uploads for large files, conditional writes (If-None-Match) that
tell their own lost write from another writer's, and presigned HTTPS links."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.storage.base import (
    MissingBucketError,
    StorageError,
    Store,
    StoreKeyError,
    T,
    _check_prefix,
    _join,
    check_key,
    log,
)

if TYPE_CHECKING:
    import builtins
    import os
    from collections.abc import Callable, Mapping


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


def _new_s3_client(endpoint_url: str | None, region: str, max_attempts: int, credentials: Mapping[str, str | None] | None = None) -> Any:
    """An S3 client from one shared boto3 session (10x cheaper than a session per client);
    ``credentials`` (``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``)
    instead of boto3's default chain, e.g. from an Airflow AWS connection."""
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
        return _shared_session.client("s3", endpoint_url=endpoint_url, config=Config(**options), **(credentials or {}))


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
        credentials: Mapping[str, str | None] | None = None,
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
            client if client is not None else _new_s3_client(endpoint_url, region, max_attempts, credentials)
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

    def links(self, key: str, *, expires_s: int = 0, session_token: bool = True) -> builtins.list[str]:
        """The ``s3://`` URI, then a presigned GET URL valid ``expires_s`` seconds (SigV4
        allows at most 7 days) that makes the browser show the object inline with a content
        type from its name. Signing is local; without credentials there is no second link.
        Under temporary credentials (STS, an instance or pod role) the URL carries their session
        token; ``session_token=False`` leaves such a URL out. Never log the URL."""
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
            url = self._client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=min(int(expires_s), 7 * 24 * 3600)
            )
        except BotoCoreError as err:  # NoCredentialsError and friends
            log.warning("no presigned URL for %s/%s: %s", self.uri, key, err)
            return found
        if not session_token and carries_session_token(url):
            log.info("no presigned URL for %s/%s: the credentials are temporary and it would carry their session token", self.uri, key)
            return found
        found.append(url)
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


def carries_session_token(url: str) -> bool:
    """Whether a presigned URL carries a session token (``X-Amz-Security-Token``, SigV4 or SigV2)."""
    from urllib.parse import parse_qsl, urlsplit

    return any(name.lower() == "x-amz-security-token" for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True))


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


HINTS = {
    "RequestTimeTooSkewed": "the clock of this machine is more than 15 minutes off S3's: sync it (NTP: chronyd, systemd-timesyncd) and retry",
    "SignatureDoesNotMatch": "the secret key does not match the access key id: check the credentials (or the machine's clock)",
    "InvalidAccessKeyId": "S3 does not know this access key id: check the credentials boto3 found (env, profile, role)",
}
"""What to do about S3 errors whose message does not say it."""


def _describe(err: BaseException) -> str:
    client_error = _client_error(err)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        status = client_error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code", "?")
        hint = f"; {HINTS[code]}" if code in HINTS else ""
        return f"{code} (HTTP {status}): {error.get('Message', '') or client_error}{hint}"
    return f"{type(err).__name__}: {err}"
