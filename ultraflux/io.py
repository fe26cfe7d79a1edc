"""Small I/O helpers, the package's one home for atomic writes and content hashes.

Writes: :func:`atomic_path` (yield a temporary path beside the target, rename it over the target on success: for
writers that need a path, files or directories) and :func:`atomic_write_bytes` / :func:`atomic_write_text` /
:func:`write_json` built on the same mechanism (flushed and fsynced before the rename). Every temporary lives in
its own ``mkdtemp`` folder beside the target, so concurrent writers (threads or processes) never share a temporary
name. :func:`read_bytes` and :func:`key_file`: per-item reads and cache names in plain strings.

Hashes: sha256 hex digests of bytes, text (UTF-8), a file (streamed) and a JSON-able object (sorted keys).

Failures a stage reports as one line (``ultraflux.stage.run_stage`` prints them without a traceback and exits 1):
:class:`StageFailure`, and :class:`DiskFullError` for ENOSPC, which :func:`naming_disk_full` raises in place of the
writer's own error (torch's ``unexpected pos``, SQLite's ``database or disk is full``), naming the path.
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
from typing import Any, Callable, Iterator


# ----------------------------------------------------------------------------------------------------------- writes
@contextmanager
def _temporary_beside(path: str, suffix: str = "") -> Iterator[str]:
    """The one mechanism of the atomic writers, in plain ``os.path`` strings: ``pathlib`` interns every path part it
    parses (``sys.intern``, never freed), so a writer called once per image or URL would grow the process by
    ~0.5 KB per item (measured: 780 B per URL in the download stage)."""
    parent, name = os.path.split(path.rstrip(os.sep) or os.sep)
    parent = parent or "."
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        tmp = os.path.join(folder, name + suffix)
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or directory)."""
    with _temporary_beside(os.fspath(path), suffix) as tmp:
        yield Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a fresh temporary beside it, fsync, rename."""
    with _temporary_beside(os.fspath(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file (no ``pathlib`` object: see :func:`_temporary_beside`)."""
    with open(path, "rb") as f:
        return f.read()


def key_file(directory: str | os.PathLike, key: str, ext: str) -> str:
    """``directory/<key[:2]>/<key>.<ext>``, a per-item cache file (download, curation) as a plain string."""
    return os.path.join(directory, key[:2], f"{key}.{ext}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys (non-JSON values as ``str``), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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


# --------------------------------------------------------------------------------------------------------- failures
class StageFailure(RuntimeError):
    """An expected failure whose message says everything (what, where, what to do): printed as one line."""


class DiskFullError(StageFailure):
    """ENOSPC while writing ``path`` (``what`` says which output)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        try:
            free = f"{shutil.disk_usage(_existing(self.path)).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        super().__init__(f"ENOSPC (no space left on device) writing {what} at {self.path} ({free}); nothing "
                         "half-written was kept: free space there and re-run")


_DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "os error 28", "disk quota exceeded")


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Did ``exc`` (or an exception it chains) come from a full disk? errno ENOSPC/EDQUOT, the texts of SQLite and
    Rust, or torch's zip writer (``unexpected pos``: it drops the errno) failing on a filesystem with < 1 MiB free."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _DISK_FULL_TEXT):
            return True
        if path is not None and ("unexpected pos" in text or "pytorchstreamwriter" in text):
            try:
                return shutil.disk_usage(_existing(Path(path))).free < (1 << 20)
            except OSError:
                return False
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(exc: BaseException, what: str) -> str:
    """One line for a full disk that no :func:`naming_disk_full` block caught: the file the OS named, if any."""
    seen, where = set(), None
    while exc is not None and id(exc) not in seen and where is None:
        seen.add(id(exc))
        where = getattr(exc, "filename", None)
        exc = exc.__cause__ or exc.__context__
    return (f"ENOSPC (no space left on device) writing {what}" + (f" at {where}" if where else "") +
            ": free space there and re-run (the outputs of earlier stages are kept)")


@contextmanager
def naming_disk_full(path: str | os.PathLike, what: str = "output",
                     cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Re-raise a full-disk failure inside the block as one :class:`DiskFullError` naming ``path``. ``cleanup`` runs
    on any failure (interrupts included) after the failure is classified and before the error is raised, so the free
    space the error reports is what a re-run will have."""
    try:
        yield
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e, path)
        if cleanup is not None:
            cleanup()
        if full:
            raise DiskFullError(path, what) from e
        raise


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what ``shutil.disk_usage`` can ask about)."""
    return next(p for p in (path, *path.parents) if p.exists())
