"""A directory on this machine as a store: writes go to a temporary file that is fsynced and
renamed into place (hard-linked for conditional writes), so a reader never sees half an object."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tuneloop.storage.base import (
    _COPY_CHUNK,
    TMP_MARK,
    StorageError,
    Store,
    StoreKeyError,
    _check_prefix,
    check_key,
    log,
)

if TYPE_CHECKING:
    import builtins
    from collections.abc import Callable, Iterator


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

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # closed by the with-block below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise StoreKeyError(f"key {key} not found in {self.uri}") from err
        except OSError as err:
            raise self._fail("get", key, err) from err
        with handle:
            yield handle

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

    def links(self, key: str, *, expires_s: int = 0, session_token: bool = True) -> builtins.list[str]:
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
