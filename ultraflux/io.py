"""Small I/O helpers, the package's one home for atomic writes and content hashes.

Writes: :func:`atomic_path` (yield a temporary path beside the target, rename it over the target on success: for
writers that need a path, files or directories) and :func:`atomic_write_bytes` / :func:`atomic_write_text` /
:func:`write_json` built on it (flushed and fsynced before the rename). Every temporary lives in its own
``mkdtemp`` folder beside the target, so concurrent writers (threads or processes) never share a temporary name.

A full disk: :class:`DiskFull` (an ENOSPC that names the path being written, in one line) and
:func:`naming_disk_full` (turns an ENOSPC inside a block into it).

Hashes: sha256 hex digests of bytes, text (UTF-8), a file (streamed) and a JSON-able object (sorted keys).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# ----------------------------------------------------------------------------------------------------------- writes
@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / (path.name + suffix)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a fresh temporary beside it, fsync, rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys (non-JSON values as ``str``), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------- full disk
class DiskFull(OSError):
    """No space left on the device (ENOSPC) while writing ``path``; ``str()`` is one line naming it."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device (ENOSPC) while writing {self.filename}: free space there and rerun"


@contextmanager
def naming_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ENOSPC from inside the block as :class:`DiskFull` naming ``path`` (or the file the error names)."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskFull(err.filename or path) from err


# ----------------------------------------------------------------------------------------------------------- hashes
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))
