"""Cache entries that carry their owners: pruning touches only what this pipeline wrote and no one else uses.

A cache root (``curate.cache_dir``) may be shared with the user's own folders (12-hex names included), with other
tools, and with other pipelines (another clone, another output folder), even while they run. So:

* An ENTRY is a folder ``<root>/<name>`` that ultraflux created. Before anything goes in, it gets the marker
  ``.ultraflux-cache.json`` (``{"tool": "ultraflux", "kind": ..., "name": ...}``). A folder without it is not ours.
* Each pipeline that uses an entry records itself in ``<entry>/.ultraflux-users/<pipeline id>.json`` (the id
  hashes the pipeline's identity, e.g. its output folder, which the file names).
* While a run uses an entry it holds a :class:`filelock.FileLock` on ``<entry>/.ultraflux-runs/<run id>.lock``; the
  operating system releases it when the process dies, so a live run is told from a killed one.
* :meth:`CacheEntries.prune` (after a successful run) looks only at marked entries of the kinds this run opened
  that name THIS pipeline as a user, that the run did not open and that no other live run holds: it removes this
  pipeline's user record, and the folder itself when no other pipeline is recorded.
* :meth:`CacheEntries.alone` says whether no other live run uses an entry (only then may a run sweep the
  temporaries that killed workers left there: a live run's temporaries are work in progress).

Every change of markers, records and folders happens under the root's lock ``<root>/.ultraflux-cache.lock``.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from ultraflux.io import atomic_write_text, sha256_text

MARKER = ".ultraflux-cache.json"
USERS = ".ultraflux-users"
RUNS = ".ultraflux-runs"
ROOT_LOCK = ".ultraflux-cache.lock"
RESERVED = frozenset({MARKER, USERS, RUNS})
"""Names inside an entry that hold the bookkeeping (never swept as temporaries)."""


def read_marker(entry: Path) -> dict | None:
    """The marker of an entry, or None for a folder that ultraflux did not create."""
    try:
        marker = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "ultraflux" else None


def _live(lock_file: Path) -> bool:
    """Whether a live process holds this run lock (a stale one, left by a killed run, is removed)."""
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    lock_file.unlink(missing_ok=True)
    return False


class CacheEntries:
    """One run's view of a shared cache root; use as a context manager (releases the run's locks)."""

    def __init__(self, root: str | Path, pipeline: str):
        self.root = Path(root)
        self.pipeline = pipeline
        self.pipeline_id = sha256_text(pipeline)[:16]
        self.run_id = uuid.uuid4().hex
        self.opened: dict[str, str] = {}   # entry name -> kind
        self._locks: list[FileLock] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_lock = FileLock(self.root / ROOT_LOCK)

    def open(self, name: str, kind: str) -> Path:
        """The entry ``name`` (created and marked if new), recorded as used by this pipeline and this live run."""
        entry = self.root / name
        with self._root_lock:
            marker = read_marker(entry)
            if marker is None:
                if entry.exists() and any(entry.iterdir()):
                    raise FileExistsError(f"cache folder {entry} exists but ultraflux did not create it (no {MARKER}): "
                                          "it is left as it is; move it or choose another curate.cache_dir")
                entry.mkdir(parents=True, exist_ok=True)
                atomic_write_text(entry / MARKER, json.dumps({"tool": "ultraflux", "kind": kind, "name": name}))
            elif marker.get("kind") != kind:
                raise FileExistsError(f"cache folder {entry} holds a {marker.get('kind')!r} entry, not {kind!r}")
            atomic_write_text(entry / USERS / f"{self.pipeline_id}.json", json.dumps({"pipeline": self.pipeline}))
            (entry / RUNS).mkdir(exist_ok=True)
            lock = FileLock(entry / RUNS / f"{self.run_id}.lock")
            lock.acquire()
            self._locks.append(lock)
        self.opened[name] = kind
        return entry

    def _other_runs(self, entry: Path) -> bool:
        runs = entry / RUNS
        return runs.is_dir() and any(_live(f) for f in runs.iterdir() if f.name != f"{self.run_id}.lock")

    def alone(self, entry: Path) -> bool:
        """True when no other live run uses ``entry``; the answer holds while the caller keeps the root lock
        (``with entries.lock: ...``), since a run opens an entry only under it."""
        return not self._other_runs(entry)

    @property
    def lock(self) -> FileLock:
        return self._root_lock

    def prune(self) -> list[str]:
        """Drop this pipeline from its entries (of the kinds opened) that this run did not open; delete an entry
        left without users and live runs. Returns the names of the deleted folders."""
        kinds, deleted = set(self.opened.values()), []
        with self._root_lock:
            candidates = (p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())
            for entry in sorted(p for p in candidates if p.name not in self.opened):
                marker = read_marker(entry)
                record = entry / USERS / f"{self.pipeline_id}.json"
                if marker is None or marker.get("kind") not in kinds or not record.is_file() or self._other_runs(entry):
                    continue
                record.unlink()
                if not any((entry / USERS).iterdir()):
                    shutil.rmtree(entry)
                    deleted.append(entry.name)
        return deleted

    def close(self) -> None:
        for lock in self._locks:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
        self._locks = []

    def __enter__(self) -> "CacheEntries":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
