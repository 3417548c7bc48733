"""Contract tests for tuneloop.storage, run against both backends.

The S3 backend talks HTTP to moto's S3 server on loopback (``s3_server`` in conftest), one
fresh bucket per test; local tests use a temp directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import threading
import time
import tracemalloc
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.storage import (
    LocalStore,
    MissingBucketError,
    S3Store,
    StorageError,
    Store,
    StoreKeyError,
    content_hash,
    list_snapshots,
    open_store,
    open_store_from_settings,
    read_snapshot_manifest,
    write_snapshot,
)
from tuneloop.storage.base import TMP_MARK

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.unit

MIB = 1024 * 1024


def _s3_store(bucket: str, endpoint: str, prefix: str = "pfx", **kwargs: Any) -> S3Store:
    """An S3 store with a low multipart threshold and near-zero backoff, for fast tests."""
    options: dict[str, Any] = {
        "multipart_threshold": 5 * MIB,
        "multipart_chunksize": 5 * MIB,
        "backoff_base_s": 0.001,
        "backoff_cap_s": 0.01,
    }
    options.update(kwargs)
    return S3Store(bucket, prefix, endpoint_url=endpoint, **options)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same contract, once per backend."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return _s3_store(request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server"))


def _temp_files_on_disk(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(TMP_MARK)]


# -- round trips -----------------------------------------------------------------------------


def test_bytes_text_json_round_trip(store: Store) -> None:
    store.put_bytes("raw/blob.bin", bytes(range(256)))
    store.put_text("notes/readme.txt", "héllo ✓\nline two")
    record = {"z": 1, "a": [1.5, None, "ü"], "nested": {"b": True}}
    store.put_json("reports/eval.json", record)

    assert store.get_bytes("raw/blob.bin") == bytes(range(256))
    assert store.get_text("notes/readme.txt") == "héllo ✓\nline two"
    assert store.get_json("reports/eval.json") == record
    text = store.get_text("reports/eval.json")
    assert text.index('"z"') < text.index('"a"'), "keys keep the caller's order"
    assert '\n  "z": 1' in text and "ü" in text, "indent=2, utf-8 not escaped"


def test_overwrite_replaces_previous_object(store: Store) -> None:
    store.put_bytes("a/key", b"old")
    store.put_bytes("a/key", b"new")
    assert store.get_bytes("a/key") == b"new"
    assert store.list() == ["a/key"]


def test_exists_and_delete(store: Store) -> None:
    assert not store.exists("a/b.txt")
    store.put_text("a/b.txt", "x")
    assert store.exists("a/b.txt")
    assert not store.exists("a"), "a 'directory' is not an object"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing key is fine
    store.delete("never/there")
    assert store.list() == []


def test_uri_is_printable(store: Store) -> None:
    assert store.uri.startswith(("file:///", "s3://"))
    assert store.uri in repr(store)


def test_missing_key_raises_store_key_error(store: Store, tmp_path: Path) -> None:
    readers: list[Callable[[], object]] = [
        lambda: store.get_bytes("labelled/missing.jsonl"),
        lambda: store.get_text("labelled/missing.jsonl"),
        lambda: store.get_json("labelled/missing.jsonl"),
        lambda: store.get_file("labelled/missing.jsonl", tmp_path / "out.jsonl"),
    ]
    for read in readers:
        with pytest.raises(StoreKeyError) as info:
            read()
        assert isinstance(info.value, KeyError) and isinstance(info.value, StorageError)
        assert "labelled/missing.jsonl" in str(info.value)
        assert store.uri in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_invalid_json_names_the_key(store: Store) -> None:
    store.put_text("bad.json", "{not json")
    with pytest.raises(StorageError, match=r"bad\.json.*not valid JSON"):
        store.get_json("bad.json")


def test_iter_jsonl(store: Store) -> None:
    store.put_text("d/part.jsonl", '{"i": 1}\n\n{"i": 2}\n')
    assert list(store.iter_jsonl("d/part.jsonl")) == [{"i": 1}, {"i": 2}]
    store.put_text("d/broken.jsonl", '{"i": 1}\n{oops\n')
    with pytest.raises(StorageError, match=r"d/broken\.jsonl.*line 2"):
        list(store.iter_jsonl("d/broken.jsonl"))


BAD_KEYS = ["", "/abs/key", "a/../b", "..", "a\\b", "a//b", "a/", "./a", f"x/{TMP_MARK}1"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_by_every_operation(store: Store, key: str, tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.put_if_absent(key, b"x"),
        lambda: store.put_file(key, source),
        lambda: store.get_file(key, tmp_path / "g"),
    ]
    for operation in operations:
        with pytest.raises(ValueError, match="invalid store key") as info:
            operation()
        assert repr(key) in str(info.value)
    assert store.list() == []


# -- listing ---------------------------------------------------------------------------------


def test_list_is_recursive_sorted_and_relative(store: Store) -> None:
    keys = ["b/2.txt", "a/z/deep.txt", "a/1.txt", "top.txt", "a/0.txt"]
    for key in keys:
        store.put_bytes(key, b"x")
    assert store.list() == sorted(keys)
    assert store.list("a") == ["a/0.txt", "a/1.txt", "a/z/deep.txt"]
    assert store.list("a/") == store.list("a"), "a trailing slash is optional"
    assert store.list("a/z") == ["a/z/deep.txt"]


def test_list_prefix_has_directory_semantics(store: Store) -> None:
    store.put_bytes("labelled/x.jsonl", b"1")
    store.put_bytes("labelled_old/y.jsonl", b"2")
    assert store.list("labelled") == ["labelled/x.jsonl"]
    assert store.list("label") == []
    assert store.list("nowhere") == []
    assert store.list("labelled/x.jsonl") == [], "an object is not a directory"


def test_list_dirs(store: Store) -> None:
    for key in ["m/v2/w.bin", "m/v1/w.bin", "m/v1/sub/c.json", "m/file.txt"]:
        store.put_bytes(key, b"x")
    assert store.list_dirs("m") == ["v1", "v2"]
    assert store.list_dirs() == ["m"]
    assert store.list_dirs("nowhere") == []
    store.delete("m/v2/w.bin")
    assert store.list_dirs("m") == ["v1"], "a directory without objects is not listed"


def test_list_partitions_sorted_and_skips_malformed(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    for name in [
        "dt=2026-01-03",
        "dt=2026-01-01",
        "dt=2025-12-31",
        "dt=2026-13-01",
        "dt=yesterday",
        "other",
    ]:
        store.put_bytes(f"labelled/{name}/part-00000.jsonl", b"{}\n")
    store.put_bytes("labelled/dt=2026-02-01", b"an object, not a partition")
    with caplog.at_level(logging.WARNING, logger="tuneloop.storage"):
        partitions = store.list_partitions("labelled")
    assert partitions == [dt.date(2025, 12, 31), dt.date(2026, 1, 1), dt.date(2026, 1, 3)]
    warned = caplog.text
    assert "dt=2026-13-01" in warned and "dt=yesterday" in warned and "other" in warned
    assert store.list_partitions("nothing-here") == []


# -- put_if_absent ---------------------------------------------------------------------------


def test_put_if_absent_never_overwrites(store: Store) -> None:
    assert store.put_if_absent("registry/aliases/prod/0001.json", b"first") is True
    assert store.put_if_absent("registry/aliases/prod/0001.json", b"second") is False
    assert store.get_bytes("registry/aliases/prod/0001.json") == b"first"
    store.put_bytes("plain", b"x")
    assert store.put_if_absent("plain", b"y") is False
    assert store.get_bytes("plain") == b"x"
    assert store.list() == ["plain", "registry/aliases/prod/0001.json"]


def test_put_if_absent_concurrent_writers_exactly_one_wins(store: Store) -> None:
    writers = 8
    barrier = threading.Barrier(writers)
    results: dict[int, bool] = {}

    def write(index: int) -> None:
        barrier.wait()
        results[index] = store.put_if_absent("lock/owner", f"writer-{index}".encode())

    threads = [threading.Thread(target=write, args=(index,)) for index in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [index for index, won in results.items() if won]
    assert len(results) == writers and len(winners) == 1
    assert store.get_bytes("lock/owner") == f"writer-{winners[0]}".encode()


# -- files and directories -------------------------------------------------------------------


def test_big_file_round_trip(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    payload = os.urandom(11 * MIB)
    source.write_bytes(payload)
    store.put_file("models/v1/model.safetensors", source)
    target = tmp_path / "down" / "nested" / "model.safetensors"
    store.get_file("models/v1/model.safetensors", target)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert store.list("models") == ["models/v1/model.safetensors"]
    assert sorted(path.name for path in target.parent.iterdir()) == ["model.safetensors"]
    if isinstance(store, S3Store):  # 11 MiB over a 5 MiB threshold: a 3-part upload
        head = store._client.head_object(Bucket=store.bucket, Key="pfx/models/v1/model.safetensors")
        assert head["ETag"].strip('"').endswith("-3")


def test_local_file_copies_stream(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(16 * MIB))
    tracemalloc.start()
    try:
        store.put_file("big.bin", source)
        store.get_file("big.bin", tmp_path / "back.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MIB, f"copying 16 MiB peaked at {peak / MIB:.1f} MiB: not streaming"
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_put_dir_get_dir_round_trip(store: Store, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 1000)
    (adapter / "sub" / "extra.txt").write_text("x")
    keys = store.put_dir("adapters/abc", adapter)
    assert keys == [
        "adapters/abc/adapter_config.json",
        "adapters/abc/adapter_model.safetensors",
        "adapters/abc/sub/extra.txt",
    ]
    assert store.list("adapters/abc") == keys
    paths = store.get_dir("adapters/abc", tmp_path / "restored")
    assert sorted(p.relative_to(tmp_path / "restored").as_posix() for p in paths) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/extra.txt",
    ]
    for relative in ["adapter_config.json", "adapter_model.safetensors", "sub/extra.txt"]:
        assert (tmp_path / "restored" / relative).read_bytes() == (adapter / relative).read_bytes()
    with pytest.raises(StoreKeyError, match="adapters/nope"):
        store.get_dir("adapters/nope", tmp_path / "none")


def test_no_temp_files_visible_after_writes(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"y" * 1000)
    store.put_bytes("d/a", b"1")
    store.put_bytes("d/a", b"2")
    store.put_if_absent("d/b", b"3")
    store.put_if_absent("d/b", b"4")
    store.put_file("d/c", source)
    store.put_json("d/e.json", {"k": 1})
    assert store.list() == ["d/a", "d/b", "d/c", "d/e.json"]
    if isinstance(store, LocalStore):
        assert _temp_files_on_disk(store.root) == []


# -- crashes mid-write -----------------------------------------------------------------------


def test_local_failed_write_keeps_old_value_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("labelled/x.jsonl", b"old")

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match=r"put labelled/x\.jsonl to file://.*No space left"):
        store.put_bytes("labelled/x.jsonl", b"new-but-never-visible")
    monkeypatch.undo()
    assert store.get_bytes("labelled/x.jsonl") == b"old"
    assert store.list() == ["labelled/x.jsonl"]
    assert _temp_files_on_disk(store.root) == []


def test_local_killed_writer_leaves_invisible_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed between write and rename leaves its temp file behind: readers and
    listings must not see it, and ``clean_temp_files`` removes it."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("labelled/dt=2026-01-03/part-00000.jsonl", b"old")

    class Killed(BaseException):
        pass

    def killed(*_args: object) -> None:
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(os, "link", killed)
    monkeypatch.setattr(
        os, "unlink", lambda *_args: None
    )  # no cleanup: the process is gone
    for write in (
        lambda: store.put_bytes("labelled/dt=2026-01-03/part-00000.jsonl", b"half"),
        lambda: store.put_if_absent("labelled/dt=2026-01-04/part-00000.jsonl", b"half"),
    ):
        with pytest.raises(Killed):
            write()
    monkeypatch.undo()

    assert len(_temp_files_on_disk(store.root)) == 2
    assert store.list() == ["labelled/dt=2026-01-03/part-00000.jsonl"]
    assert store.get_bytes("labelled/dt=2026-01-03/part-00000.jsonl") == b"old"
    assert store.list_partitions("labelled") == [dt.date(2026, 1, 3)]
    assert store.list_dirs("labelled") == ["dt=2026-01-03"]
    assert store.clean_temp_files(max_age_s=3600) == 0, "recent temp files may be in flight"
    assert store.clean_temp_files(max_age_s=0) == 2
    assert _temp_files_on_disk(store.root) == []


def test_local_store_persists_across_instances(tmp_path: Path) -> None:
    LocalStore(tmp_path / "store").put_text("k/v.txt", "kept")
    assert LocalStore(tmp_path / "store").get_text("k/v.txt") == "kept"


def test_s3_failed_put_keeps_old_value(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    store = _s3_store(s3_bucket, s3_server, max_attempts=2)
    store.put_bytes("labelled/x.jsonl", b"old")
    real_put = store._client.put_object

    def failing_put(**kwargs: Any) -> Any:
        raise ClientError(
            {
                "Error": {"Code": "InternalError", "Message": "boom"},
                "ResponseMetadata": {"HTTPStatusCode": 500},
            },
            "PutObject",
        )

    monkeypatch.setattr(store._client, "put_object", failing_put)
    with pytest.raises(StorageError, match="after 2 attempts"):
        store.put_bytes("labelled/x.jsonl", b"new")
    monkeypatch.setattr(store._client, "put_object", real_put)
    assert store.get_bytes("labelled/x.jsonl") == b"old"
    assert store.list() == ["labelled/x.jsonl"]


# -- snapshots -------------------------------------------------------------------------------


def test_content_hash_is_deterministic_and_unambiguous() -> None:
    files = {"train.jsonl": b"a\n", "eval.jsonl": b"b\n"}
    digest = content_hash(files)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert content_hash(dict(reversed(list(files.items())))) == digest
    assert content_hash({**files, "eval.jsonl": b"c\n"}) != digest
    assert content_hash({"ab": b"c"}) != content_hash({"a": b"bc"})
    assert content_hash({"a": b"", "b": b""}) != content_hash({"a": b"b"})


def test_write_snapshot_is_idempotent_and_records_a_manifest(store: Store) -> None:
    files = {"train.jsonl": b'{"x": 1}\n', "eval.jsonl": b'{"x": 2}\n'}
    first = write_snapshot(
        store, "datasets", files, {"rows": 2, "source": "labelled/dt=2026-01-03"}
    )
    manifest_bytes = store.get_bytes(f"datasets/{first}/manifest.json")
    second = write_snapshot(store, "datasets", dict(reversed(list(files.items()))), {"rows": 999})
    assert second == first == content_hash(files)
    assert store.get_bytes(f"datasets/{first}/manifest.json") == manifest_bytes, (
        "first manifest kept"
    )

    manifest = read_snapshot_manifest(store, "datasets", first)
    assert manifest["hash"] == first
    assert manifest["rows"] == 2 and manifest["source"] == "labelled/dt=2026-01-03"
    assert manifest["files"] == [
        {"name": name, "size": len(files[name]), "sha256": hashlib.sha256(files[name]).hexdigest()}
        for name in sorted(files)
    ]
    dt.datetime.fromisoformat(manifest["created_at"])
    assert store.list("datasets") == [
        f"datasets/{first}/{name}" for name in ["eval.jsonl", "manifest.json", "train.jsonl"]
    ]
    assert store.get_bytes(f"datasets/{first}/train.jsonl") == files["train.jsonl"]


def test_write_snapshot_writes_manifest_last(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    for method in ("put_bytes", "put_if_absent", "put_file"):
        original = getattr(store, method)

        def spy(key: str, *args: Any, _original: Any = original) -> Any:
            written.append(key)
            return _original(key, *args)

        monkeypatch.setattr(store, method, spy)
    digest = write_snapshot(store, "snap", {"b.txt": b"b", "a.txt": b"a", "c/d.txt": b"d"}, {})
    assert written[-1] == f"snap/{digest}/manifest.json"
    assert sorted(written[:-1]) == [
        f"snap/{digest}/{name}" for name in ["a.txt", "b.txt", "c/d.txt"]
    ]


def test_list_snapshots_returns_only_complete_ones(store: Store) -> None:
    complete = write_snapshot(store, "datasets", {"f": b"1"}, {})
    other = write_snapshot(store, "datasets", {"f": b"2"}, {})
    incomplete = content_hash({"f": b"3"})
    store.put_bytes(f"datasets/{incomplete}/f", b"3")  # a writer died before the manifest
    store.put_bytes("datasets/not-a-hash/manifest.json", b"{}")
    assert list_snapshots(store, "datasets") == sorted([complete, other])
    assert list_snapshots(store, "empty") == []
    with pytest.raises(StoreKeyError, match=incomplete):
        read_snapshot_manifest(store, "datasets", incomplete)


def test_write_snapshot_rejects_reserved_names(store: Store) -> None:
    with pytest.raises(ValueError, match="reserved"):
        write_snapshot(store, "s", {"manifest.json": b"x"}, {})
    with pytest.raises(ValueError, match="reserved"):
        write_snapshot(store, "s", {"f": b"x"}, {"hash": "mine"})
    with pytest.raises(ValueError, match="invalid store key"):
        write_snapshot(store, "s", {"../escape": b"x"}, {})
    with pytest.raises(ValueError, match="invalid snapshot hash"):
        read_snapshot_manifest(store, "s", "../../etc")
    assert store.list() == []


# -- S3 specifics: prefix, retries, missing bucket --------------------------------------------


def test_s3_store_keeps_to_its_prefix(s3_bucket: str, s3_server: str, s3_client: Any) -> None:
    store = _s3_store(s3_bucket, s3_server, prefix="team/tuneloop")
    assert store.uri == f"s3://{s3_bucket}/team/tuneloop"
    store.put_bytes("a/b.txt", b"x")
    s3_client.put_object(Bucket=s3_bucket, Key="team/other/c.txt", Body=b"y")
    s3_client.put_object(
        Bucket=s3_bucket, Key="team/tuneloop/folder/", Body=b""
    )  # console "folder"
    raw = s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert "team/tuneloop/a/b.txt" in {item["Key"] for item in raw}
    assert store.list() == ["a/b.txt"]
    assert _s3_store(s3_bucket, s3_server, prefix="").list() == [
        "team/other/c.txt",
        "team/tuneloop/a/b.txt",
    ]


def _throttled(operation: str) -> Any:
    from botocore.exceptions import ClientError

    return ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        operation,
    )


def test_s3_retries_throttling_then_succeeds(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    store = _s3_store(s3_bucket, s3_server, max_attempts=5)
    with Stubber(store._client) as stub:
        for _ in range(4):
            stub.add_client_error("put_object", "SlowDown", "Please reduce your request rate.", 503)
        stub.add_response(
            "put_object", {"ETag": '"e"'}, {"Bucket": s3_bucket, "Key": "pfx/k.txt", "Body": b"v"}
        )
        stub.add_client_error("get_object", "InternalError", "try again", 500)
        stub.add_client_error("get_object", "ServiceUnavailable", "try again", 503)
        stub.add_response(
            "get_object",
            {"Body": StreamingBody(io.BytesIO(b"v"), 1)},
            {"Bucket": s3_bucket, "Key": "pfx/k.txt"},
        )
        store.put_bytes("k.txt", b"v")
        assert store.get_bytes("k.txt") == b"v"
        stub.assert_no_pending_responses()
    assert len(sleeps) == 6


def test_s3_clear_error_after_attempts_are_exhausted(s3_bucket: str, s3_server: str) -> None:
    from botocore.stub import Stubber

    store = _s3_store(s3_bucket, s3_server, max_attempts=3)
    with Stubber(store._client) as stub:
        for _ in range(3):
            stub.add_client_error("put_object", "SlowDown", "Please reduce your request rate.", 503)
        with pytest.raises(StorageError) as info:
            store.put_bytes("labelled/x.jsonl", b"v")
        stub.assert_no_pending_responses()
    message = str(info.value)
    assert message.startswith(
        f"S3 put labelled/x.jsonl to s3://{s3_bucket}/pfx failed after 3 attempts: SlowDown"
    )
    assert s3_server in message
    assert type(info.value.__cause__).__name__ == "ClientError"


def test_s3_non_retryable_error_fails_at_once(s3_bucket: str, s3_server: str) -> None:
    from botocore.stub import Stubber

    store = _s3_store(s3_bucket, s3_server, max_attempts=5)
    with Stubber(store._client) as stub:
        stub.add_client_error("get_object", "AccessDenied", "Access Denied", 403)
        with pytest.raises(StorageError, match=r"get secret from .* after 1 attempt: AccessDenied"):
            store.get_bytes("secret")
        stub.assert_no_pending_responses()


def test_s3_botocore_retries_count_against_the_same_budget(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Throttle real HTTP calls: botocore's adaptive retries absorb a few, and the total
    never exceeds max_attempts sends."""
    from botocore.awsrequest import AWSResponse
    from botocore.retries import adaptive, standard

    # Keep botocore's own backoff and adaptive rate limiting out of the test's wall time.
    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    monkeypatch.setattr(adaptive.ClientRateLimiter, "on_sending_request", lambda self, **_kw: None)
    store = _s3_store(s3_bucket, s3_server, max_attempts=4)
    store.put_bytes("k", b"v")  # bucket check and connection warm-up outside the count
    sends = {"n": 0, "throttle": 2}

    class _Raw:
        def stream(self, **_kwargs: Any) -> Any:
            yield b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def throttle(request: Any, **_kwargs: Any) -> AWSResponse | None:
        sends["n"] += 1
        if sends["n"] <= sends["throttle"]:
            return AWSResponse(request.url, 503, {}, _Raw())
        return None

    store._client.meta.events.register("before-send.s3", throttle)
    assert store.get_bytes("k") == b"v"
    assert sends["n"] == 3

    sends.update(n=0, throttle=100)
    with pytest.raises(StorageError, match="after 4 attempts: SlowDown"):
        store.get_bytes("k")
    assert sends["n"] == 4


def test_s3_connection_errors_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(time, "sleep", lambda _s: None)

    class FlakyClient:
        calls = 0

        def put_object(self, **kwargs: Any) -> dict[str, Any]:
            FlakyClient.calls += 1
            if FlakyClient.calls <= 2:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            return {}

    store = S3Store("bucket", "p", client=FlakyClient(), max_attempts=3)
    store.put_bytes("k", b"v")
    assert FlakyClient.calls == 3
    FlakyClient.calls = -10
    with pytest.raises(
        StorageError,
        match=r"put k to s3://bucket/p failed after 3 attempts: EndpointConnectionError",
    ):
        store.put_bytes("k", b"v")


def test_s3_missing_bucket_is_a_clear_error(s3_server: str, tmp_path: Path) -> None:
    store = _s3_store("no-such-bucket-tuneloop", s3_server)
    source = tmp_path / "f"
    source.write_bytes(b"x")
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes("k", b"v"),
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
        lambda: store.list(),
        lambda: store.put_if_absent("k", b"v"),
        lambda: store.put_file("k", source),
        lambda: store.get_file("k", tmp_path / "g"),
    ]
    for operation in operations:
        with pytest.raises(MissingBucketError) as info:
            operation()
        message = str(info.value)
        assert "no-such-bucket-tuneloop" in message and s3_server in message
        assert "aws s3 mb s3://no-such-bucket-tuneloop" in message


def test_s3_client_uses_adaptive_retries(s3_server: str) -> None:
    store = S3Store("b", "", endpoint_url=s3_server, max_attempts=6)
    assert store._client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 6}


# -- opening stores --------------------------------------------------------------------------


def test_open_store_local(tmp_path: Path) -> None:
    plain = open_store(str(tmp_path / "a"))
    assert isinstance(plain, LocalStore) and plain.root == tmp_path / "a"
    from_uri = open_store((tmp_path / "with space").as_uri())
    assert isinstance(from_uri, LocalStore) and from_uri.root == tmp_path / "with space"
    assert from_uri.uri == (tmp_path / "with space").as_uri()


def test_open_store_s3(s3_server: str) -> None:
    store = open_store(
        "s3://bucket/some/prefix/", endpoint_url=s3_server, region="eu-west-1", max_attempts=3
    )
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == (
        "bucket",
        "some/prefix",
        "s3://bucket/some/prefix",
    )
    assert (store.endpoint_url, store.region, store.max_attempts) == (s3_server, "eu-west-1", 3)
    bare = open_store("s3://bucket", endpoint_url=s3_server)
    assert isinstance(bare, S3Store) and bare.prefix == "" and bare.uri == "s3://bucket"


@pytest.mark.parametrize(
    "uri", ["gs://bucket/x", "file://relative/path", "s3://", "s3://bucket/a/../b"]
)
def test_open_store_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(ValueError):
        open_store(uri)


def test_open_store_from_settings(s3_server: str, tmp_path: Path) -> None:
    from tuneloop.config import Settings, StoreSettings

    settings = Settings.model_validate(
        {"store": {"uri": "s3://models/tl", "endpoint_url": s3_server, "max_attempts": 4}}
    )
    store = open_store_from_settings(settings)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url, store.max_attempts) == (
        "models",
        "tl",
        s3_server,
        4,
    )
    local = open_store_from_settings(StoreSettings.model_validate({"uri": str(tmp_path / "s")}))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"


def test_json_helpers_agree_with_json_module(store: Store) -> None:
    store.put_json("x.json", [1, {"b": 2}])
    assert store.get_text("x.json") == json.dumps([1, {"b": 2}], indent=2) + "\n"
