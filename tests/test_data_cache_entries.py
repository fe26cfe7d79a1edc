"""Cache entries carry their owners: pruning removes only this pipeline's unused, marked entries; user folders,
other tools' folders, other pipelines' entries and entries a live run uses are never touched."""
from __future__ import annotations

import json

from ultraflux.data.cache_entries import MARKER, RUNS, USERS, CacheEntries, read_marker


def user_files(root):
    """A user's own folders in the cache dir, 12-hex names included (what the old pruning deleted)."""
    files = {root / "0123456789ab" / "thesis.txt": "chapter 1", root / "deadbeefcafe" / "data.csv": "a,b\n1,2\n",
             root / "notes" / "todo.md": "- backup", root / "scan-0123456789ab" / "x.json": "{}"}
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_prune_touches_only_this_pipelines_unused_entries(tmp_path):
    root = tmp_path / "cache"
    mine = user_files(root)
    with CacheEntries(root, "pipeline-A") as a:
        old = a.open("render-aaaaaaaaaaaa", "curate-render")
        shared = a.open("scan-bbbbbbbbbbbb", "curate-scan")
        (old / "image.jpg").write_bytes(b"cached")
    with CacheEntries(root, "pipeline-B") as b:
        b.open("scan-bbbbbbbbbbbb", "curate-scan")
        theirs = b.open("render-cccccccccccc", "curate-render")
    assert read_marker(old) == {"tool": "ultraflux", "kind": "curate-render", "name": "render-aaaaaaaaaaaa"}
    with CacheEntries(root, "pipeline-A") as a:  # A's settings changed: it now uses another render entry
        a.open("scan-bbbbbbbbbbbb", "curate-scan")
        a.open("render-dddddddddddd", "curate-render")
        assert a.prune() == ["render-aaaaaaaaaaaa"]
    assert not old.exists() and shared.is_dir() and theirs.is_dir()
    assert all(path.read_text() == text for path, text in mine.items())   # the user's files, untouched
    with CacheEntries(root, "pipeline-B") as b:  # B moves on too: the scan entry is now unused by both
        b.open("scan-eeeeeeeeeeee", "curate-scan")
        b.open("render-cccccccccccc", "curate-render")
        assert b.prune() == []  # A still records the shared scan entry
    assert shared.is_dir()
    assert json.loads(next((shared / USERS).iterdir()).read_text()) == {"pipeline": "pipeline-A"}


def test_an_entry_a_live_run_uses_is_neither_pruned_nor_swept(tmp_path):
    root = tmp_path / "cache"
    with CacheEntries(root, "pipeline-A") as a:
        entry = a.open("scan-aaaaaaaaaaaa", "curate-scan")
        with CacheEntries(root, "pipeline-B") as b:   # a concurrent run of another pipeline, same entry
            b.open("scan-aaaaaaaaaaaa", "curate-scan")
            with a.lock:
                assert not a.alone(entry) and not b.alone(entry)
        with a.lock:
            assert a.alone(entry)  # B finished
    (entry / RUNS / ("0" * 32 + ".lock")).write_text("")  # a killed run's lock: nobody holds it
    with CacheEntries(root, "pipeline-A") as a:
        a.open("scan-aaaaaaaaaaaa", "curate-scan")
        with a.lock:
            assert a.alone(entry)
        assert [p.name for p in (entry / RUNS).iterdir()] == [f"{a.run_id}.lock"]  # the stale lock is gone
    with CacheEntries(root, "pipeline-A") as a, CacheEntries(root, "pipeline-A") as live:
        a.open("scan-ffffffffffff", "curate-scan")
        live.open("scan-aaaaaaaaaaaa", "curate-scan")   # the same pipeline's other, still running, process
        assert a.prune() == []
    assert (entry / MARKER).is_file() and (entry / USERS / f"{a.pipeline_id}.json").is_file()  # still A's


def test_a_folder_it_did_not_create_is_never_taken_over(tmp_path):
    root = tmp_path / "cache"
    (root / "scan-aaaaaaaaaaaa").mkdir(parents=True)
    (root / "scan-aaaaaaaaaaaa" / "mine.txt").write_text("keep")
    with CacheEntries(root, "pipeline-A") as a:
        try:
            a.open("scan-aaaaaaaaaaaa", "curate-scan")
        except FileExistsError as err:
            assert "ultraflux did not create it" in str(err) and "scan-aaaaaaaaaaaa" in str(err)
        else:
            raise AssertionError("an unmarked folder was taken over")
    assert (root / "scan-aaaaaaaaaaaa" / "mine.txt").read_text() == "keep"
