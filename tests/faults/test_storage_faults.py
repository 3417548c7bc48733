"""Faults of the store, each ending in a state the loop can go on from: an interrupted multipart
upload of a large adapter, a full disk, a machine clock S3 refuses, and intake over S3 with
hostile rows. S3 is moto's server over HTTP; faults are injected into botocore's own request
pipeline (``before-send``), so retries, transfers and error parsing are the real ones."""

from __future__ import annotations

import errno
import json
import os
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop.config import TaskSettings
from tuneloop.intake.pull import pull_snapshot
from tuneloop.provenance import dir_digest
from tuneloop.registry import Registry
from tuneloop.storage import LocalStore, S3Store, StorageError
from tuneloop.storage import local as local_store
from tuneloop.tasks import TaskSpec

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.unit, pytest.mark.faults]

MiB = 1024 * 1024


def _fail_on(store: S3Store, operation: str, respond: Callable[[Any], Any]) -> None:
    """Answer every ``operation`` request of ``store``'s client with ``respond(request)`` (None: send it)."""
    store._client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: respond(request))


def _aws_error(status: int, code: str, message: str) -> Any:
    from botocore.awsrequest import AWSResponse

    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()

    class Raw:
        def stream(self, **_: Any) -> Any:
            yield body

    return AWSResponse("https://s3.test/", status, {"Content-Type": "application/xml"}, Raw())


def _adapter(directory: Path, weights_mib: int, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(weights_mib * MiB) if seed else bytes(weights_mib * MiB))
    return directory


def test_an_interrupted_multipart_upload_leaves_no_version_and_the_retry_completes(
    s3_bucket: str, s3_server: str, s3_client: Any, tmp_path: Path
) -> None:
    """A 12 MiB adapter goes up in three 5 MiB parts; part 2 fails on every attempt. The upload
    is aborted (no object, no orphaned multipart upload), nothing is registered, and the retry
    uploads it whole; the registry pins its hash."""
    store = S3Store(s3_bucket, "tl", endpoint_url=s3_server, max_attempts=2, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    adapter = _adapter(tmp_path / "v1", 12, seed=1)
    parts: list[int] = []

    def break_part_two(request: Any) -> Any:
        number = int(request.url.split("partNumber=")[1].split("&")[0])
        parts.append(number)
        return _aws_error(500, "InternalError", "injected: the connection dropped") if number == 2 else None

    _fail_on(store, "UploadPart", break_part_two)
    with pytest.raises(StorageError) as caught:
        store.put_dir("adapters/v1", adapter)
    assert "adapters/v1/adapter_model.safetensors" in str(caught.value) and "InternalError" in str(caught.value)
    assert parts.count(2) >= 2, "the failing part was retried"
    assert not store.exists("adapters/v1/adapter_model.safetensors")
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == [], "the multipart upload was not aborted"

    retry = S3Store(s3_bucket, "tl", endpoint_url=s3_server, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    retry.put_dir("adapters/v1", adapter)
    pinned = dir_digest(adapter, suffixes=("adapter_config.json", "adapter_model.safetensors"))
    Registry(retry).register("v1", adapter_key="adapters/v1", snapshot=None, base_model="base", adapter_hash=pinned)
    back = retry.get_dir("adapters/v1", tmp_path / "back")
    assert len(back) == 2 and dir_digest(tmp_path / "back", suffixes=("adapter_config.json", "adapter_model.safetensors")) == pinned


def test_a_full_disk_leaves_the_old_object_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half-way through a write, and while downloading into a full disk: the error names
    key and cause; the previous object and the previous local file stay whole."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("registry/registry.json", b'{"versions": {}}')
    real = local_store._write_all

    def half_then_full(handle: Any, data: bytes) -> None:
        real(handle, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_store, "_write_all", half_then_full)
    with pytest.raises(StorageError, match=r"put registry/registry.json to .* No space left on device"):
        store.put_bytes("registry/registry.json", b'{"versions": {"v1": {}}}' * 100)
    monkeypatch.undo()
    assert store.get_bytes("registry/registry.json") == b'{"versions": {}}'
    assert sorted(p.name for p in (tmp_path / "store" / "registry").iterdir()) == ["registry.json"]

    target = tmp_path / "served" / "adapter_model.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"the weights vLLM serves now")
    store.put_bytes("adapters/v2/adapter_model.safetensors", b"x" * MiB)
    real_copy = local_store.shutil.copyfileobj

    def full_disk(source: Any, dest: Any, length: int = 0) -> None:
        dest.write(source.read(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_store.shutil, "copyfileobj", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        store.get_file("adapters/v2/adapter_model.safetensors", target)
    monkeypatch.setattr(local_store.shutil, "copyfileobj", real_copy)
    assert target.read_bytes() == b"the weights vLLM serves now"
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter_model.safetensors"]


def test_a_skewed_clock_is_named_with_what_to_do(s3_bucket: str, s3_server: str) -> None:
    """S3 refuses requests signed more than 15 minutes off its clock (403 RequestTimeTooSkewed)."""
    store = S3Store(s3_bucket, "tl", endpoint_url=s3_server, max_attempts=3)
    _fail_on(store, "PutObject", lambda _: _aws_error(403, "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."))
    with pytest.raises(StorageError) as caught:
        store.put_bytes("drift/checks/x.json", b"{}")
    message = str(caught.value)
    assert "RequestTimeTooSkewed" in message and "clock" in message and "NTP" in message
    assert "\n" not in message


def _rows(n: int, day: int) -> list[bytes]:
    lines = [json.dumps({"id": f"d{day}-{i}", "prompt": f"Which team owns service {i} on day {day}?", "completion": f"team-{i % 5}"}).encode() for i in range(n)]
    hostile = [b'{"id": "bad-1", "prompt": "\\ud800", "completion": "x"}', b"[" * 30_000 + b"]" * 30_000, b"\xff\xfe not utf-8", b'{"id": "dup", "id": "dup", "prompt": "p", "completion": "c"}', b"", b'{"id": "n", "prompt": "p", "completion": 1e999}']
    return lines + hostile


def test_intake_over_s3_accounts_for_every_line_and_matches_a_local_store(s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    """The same partitions (with hostile lines) pulled from S3 and from a local directory give
    the same snapshot hash and counts; every line is accepted or quarantined."""
    spec = TaskSpec(TaskSettings(format="prompt_completion"))
    s3 = S3Store(s3_bucket, "tl", endpoint_url=s3_server)
    local = LocalStore(tmp_path / "store")
    total = 0
    for day in (1, 2):
        lines = _rows(40, day)
        total += len(lines)
        for store in (s3, local):
            store.put_bytes(f"labelled/dt=2026-03-0{day}/part-0.jsonl", b"\r\n".join(lines) + b"\n")
    on_s3 = pull_snapshot(s3, spec=spec, eval_fraction=0.25)
    on_disk = pull_snapshot(local, spec=spec, eval_fraction=0.25)
    counts = on_s3["counts"]
    assert counts["total"] == total == 2 * 46 and counts["accepted"] + counts["quarantined"] == total
    assert counts["accepted"] == 80 and on_s3["snapshot"] == on_disk["snapshot"] and on_s3["counts"] == on_disk["counts"]
    assert s3.exists(f"snapshots/{on_s3['snapshot']}/manifest.json")
    quarantined = [json.loads(line) for line in s3.get_text(f"snapshots/{on_s3['snapshot']}/quarantine.jsonl").splitlines()]
    assert len(quarantined) == 12 and all(q["reasons"] and q["source"].startswith("labelled/dt=2026-03-0") for q in quarantined)
    assert pull_snapshot(s3, spec=spec, eval_fraction=0.25, since=date(2026, 3, 1))["snapshot"] == on_s3["snapshot"]
