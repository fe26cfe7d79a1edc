"""ultraflux.io: the package's one atomic writer family and hashing helpers."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from ultraflux import io


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "a.json"
    io.atomic_write_text(target, "first \u00e9\n")
    io.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_write_fsyncs_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    io.atomic_write_text(target, "old")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    io.atomic_write_text(target, "new")
    assert target.read_text() == "new" and len(synced) == 1

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(target, "lost")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    target = tmp_path / "shared.txt"
    texts = [f"writer {i} " * 1000 for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for f in [pool.submit(io.atomic_write_text, target, t) for t in texts]:
            f.result()  # a writer that lost its temporary to another would raise here
    assert target.read_text() in texts and [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_write_json_format(tmp_path):
    obj = {"b": 1, "a": [1.5, None], "p": tmp_path}
    io.write_json(tmp_path / "m.json", obj)
    assert (tmp_path / "m.json").read_text() == json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def test_hashes(tmp_path):
    assert io.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert io.sha256_text("\u00e9") == hashlib.sha256("\u00e9".encode("utf-8")).hexdigest()
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert io.sha256_file(tmp_path / "f", chunk=7) == io.sha256_bytes(b"abc" * 1000)
    assert io.sha256_json({"b": 1, "a": "\u00e9"}) == io.sha256_text('{"a": "\\u00e9", "b": 1}')
