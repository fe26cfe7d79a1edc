"""The `download` stage: released metadata -> the ORIGINAL image bytes in WebDataset shards, one status row per URL.

``run_download(params, out_dir)``, when ``data.source`` is the released metadata (:mod:`ultraflux.data.metadata`;
for any other source it writes an empty table and says so):

1. **spool**: stream the records (field mapping resolved first: a missing required field stops before any work),
   keep the ``data.metadata.max_records`` subset, and write each canonical record to the cache
   (``download.cache_dir``/``<key[:2]>/<key>.meta.json``, ``key`` = 16 hex digits of sha256(url)). A URL listed
   twice is fetched once (its last record is kept; ``duplicate_urls`` counts the repeats). Only the keys stay in
   memory: 8 bytes per URL (``array('Q')``, then sorted unique ``uint64``; the keys still to fetch likewise).
2. **fetch** every key that has no result yet (:class:`ultraflux.data.fetch.Fetcher`: bounded concurrency in total
   (``download.workers`` threads) and per host, retries, caps and checks), writing ``<key>.img`` (original bytes)
   then ``<key>.res.json`` (status, attempts, ...), each atomically. A run killed with ``kill -9`` resumes by
   fetching only the keys without a result (and, with ``download.retry_transient``, those whose last result was a
   transient failure: timeout, 429, 5xx, truncated, connection error; force the stage: ``dvc repro -f -s download``).
   A tqdm bar shows rate, ETA and the counts per status.
   With ``download.engine: ray`` the fetching is spread over Ray workers (:func:`fetch_all`); the rest is the same.
3. **write** in key order (not completion order, so every engine and every resumed run gives the same bytes):
   ``shards/download-NNNNNN.tar`` with ``<key>.<ext>`` (original bytes), ``<key>.txt`` (English caption) and
   ``<key>.json`` (canonical fields, attribution, the original record) for each ``ok`` URL; ``status.parquet``
   (:data:`STATUS_COLUMNS`, one row per unique URL); ``problems.jsonl`` (files/records skipped and why); and the
   summary returned to the stage glue (counts per status and per problem).

Outputs are a function of the metadata and the server's responses; a re-run over a complete cache makes no request.
"""
from __future__ import annotations

import json
import os
import time
from array import array
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ultraflux.io import atomic_path, atomic_write_bytes, key_file, read_bytes, sha256_bytes

from . import metadata
from .fetch import TRANSIENT, Fetcher
from .shards import ShardWriter

STATUS_COLUMNS = ("key", "url", "status", "detail", "attempts", "http_status", "content_type", "nbytes", "sha256",
                  "shard", "offset", "file")
SAMPLE_FIELDS = metadata.FIELDS + ("key", "file")
RAY_BATCH = 256  # keys per Ray task
TABLE_BATCH = 2048  # status rows held before a parquet row group is written


def download_config(params: dict) -> dict:
    """The ``download`` section (validated by the schema) as a plain dict."""
    return dict(params["download"])


# --------------------------------------------------------------------------------------------------- 1. spool
def spool(records: Iterable[dict], cache: Path) -> tuple[np.ndarray, int]:
    """Write each record's canonical JSON to the cache (when it changed); return the sorted unique keys and how many
    records repeated a URL (the last record of a repeated URL is the one kept)."""
    keys = array("Q")
    for record in records:
        keys.append(int(record["key"], 16))
        payload = json.dumps({k: v for k, v in record.items() if k != "group"}, sort_keys=True).encode()
        path = key_file(cache, record["key"], "meta.json")
        if not os.path.isfile(path) or read_bytes(path) != payload:
            atomic_write_bytes(path, payload)
    unique = np.unique(np.frombuffer(keys, dtype=np.uint64)) if keys else np.zeros(0, np.uint64)
    return unique, len(keys) - len(unique)


def key_strings(keys: np.ndarray) -> Iterator[str]:
    for value in keys:
        yield f"{int(value):016x}"


# --------------------------------------------------------------------------------------------------- 2. fetch
def _store(cache: Path, key: str, url: str, fetched) -> dict:
    result = {"key": key, "url": url, "status": fetched.status, "detail": fetched.detail,
              "attempts": fetched.attempts, "http_status": fetched.http_status,
              "content_type": fetched.content_type, "nbytes": len(fetched.data), "ext": fetched.ext,
              "sha256": sha256_bytes(fetched.data) if fetched.data else ""}
    if fetched.status == "ok":
        atomic_write_bytes(key_file(cache, key, "img"), fetched.data)
    atomic_write_bytes(key_file(cache, key, "res.json"), json.dumps(result, sort_keys=True).encode())
    return result


def _fetch_one(fetcher: Fetcher, cache: Path, key: str) -> dict:
    url = json.loads(read_bytes(key_file(cache, key, "meta.json")))["url"]
    return _store(cache, key, url, fetcher.fetch(url))


def fetch_batch(task: dict) -> dict:
    """One engine task (Ray): fetch ``task["keys"]`` with this worker's own thread pool; counts per status."""
    return {"counts": dict(fetch_missing(task["keys"], Path(task["cache"]), task["cfg"], progress=False))}


def fetch_all(todo: np.ndarray, cache: Path, cfg: dict, progress: bool) -> Counter:
    """``download.engine``: ``local`` = one thread pool here; ``ray`` = batches of :data:`RAY_BATCH` keys over
    ``download.engine_workers`` Ray workers (:func:`ultraflux.data.engines.run_engine`), each with ``workers``
    threads and its own per-host limit. The cache must be on a filesystem every node mounts (as curation's)."""
    if cfg["engine"] == "local" or not len(todo):
        return fetch_missing(todo, cache, cfg, progress)
    from .engines import run_engine

    tasks = [{"keys": list(key_strings(todo[i:i + RAY_BATCH])), "cache": str(cache.resolve()), "cfg": cfg}
             for i in range(0, len(todo), RAY_BATCH)]
    total: Counter = Counter()
    for result in run_engine(cfg["engine"], fetch_batch, tasks, cfg["engine_workers"], progress, desc="download"):
        total.update(result["counts"])
    return total


def missing_keys(keys: np.ndarray, cache: Path, retry_transient: bool = False) -> np.ndarray:
    """Keys without a result (8 bytes each); with ``retry_transient`` also those whose last result was transient."""
    def needed(key: str) -> bool:
        path = key_file(cache, key, "res.json")
        return not os.path.isfile(path) or (retry_transient and json.loads(read_bytes(path))["status"] in TRANSIENT)

    return keys[np.fromiter((needed(k) for k in key_strings(keys)), bool, len(keys))]


def fetch_missing(todo, cache: Path, cfg: dict, progress: bool) -> Counter:
    """Fetch the keys in ``todo`` with ``download.workers`` threads (at most 2x that many queued); counts per status."""
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    fetcher = Fetcher(cfg)
    window = 2 * int(cfg["workers"])
    pending: set = set()
    try:
        with ThreadPoolExecutor(int(cfg["workers"])) as pool, \
                tqdm(total=len(todo), desc="download", unit="url", disable=not progress) as bar:
            def drain(block: bool) -> None:
                done, rest = wait(pending, return_when=FIRST_COMPLETED) if block else (set(), pending)
                pending.intersection_update(rest)
                for future in done:
                    counts[future.result()["status"]] += 1
                    bar.update()
                    bar.set_postfix(dict(sorted(counts.items())), refresh=False)

            for key in (key_strings(todo) if isinstance(todo, np.ndarray) else todo):
                while len(pending) >= window:
                    drain(True)
                pending.add(pool.submit(_fetch_one, fetcher, cache, key))
            while pending:
                drain(True)
    finally:
        fetcher.close()
    return counts


# --------------------------------------------------------------------------------------------------- 3. write
def sample_json(meta: dict, result: dict, mapping: dict) -> bytes:
    """The ``<key>.json`` beside each image: canonical fields, where they came from, the original record."""
    sample = {k: meta.get(k) for k in SAMPLE_FIELDS}
    sample.update({"status": result["status"], "sha256": result["sha256"], "nbytes": result["nbytes"],
                   "content_type": result["content_type"], "fields": mapping, "record": meta.get("record")})
    return json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()


class TableWriter:
    """``status.parquet`` written in batches (bounded memory), atomically."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.schema = pa.schema([(c, pa.int64() if c in ("attempts", "http_status", "nbytes", "offset")
                                  else pa.string()) for c in STATUS_COLUMNS])
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._writer, self._rows = None, []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= TABLE_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._atomic.__exit__(None, None, None)


def write_outputs(keys: np.ndarray, cache: Path, out_dir: Path, cfg: dict, mapping: dict, progress: bool) -> Counter:
    """Shards of the ``ok`` images and the status table, both in key order; returns counts per status."""
    from tqdm.auto import tqdm

    counts: Counter = Counter()
    table = TableWriter(out_dir / "status.parquet")
    with ShardWriter(out_dir / "shards", "download", out_dir, max_bytes=int(cfg["shard_max_mb"]) << 20) as writer:
        for key in tqdm(key_strings(keys), total=len(keys), desc="shards", unit="url", disable=not progress):
            meta = json.loads(read_bytes(key_file(cache, key, "meta.json")))
            result = json.loads(read_bytes(key_file(cache, key, "res.json")))
            row = {c: result.get(c, "") for c in STATUS_COLUMNS} | {"shard": "", "offset": 0, "file": meta["file"]}
            if result["status"] == "ok":
                data = read_bytes(key_file(cache, key, "img"))
                location = writer.write(key, {result["ext"]: data, "txt": meta["caption"].encode(),
                                              "json": sample_json(meta, result, mapping)})
                row.update({"shard": location.shard, "offset": location.offset})
            counts[result["status"]] += 1
            table.add(row)
    table.close()
    return counts


# --------------------------------------------------------------------------------------------------- the stage
class ProblemLog:
    """``problems.jsonl``: one line per skipped file or record, written as they come, renamed into place at the end."""

    def __init__(self, path: Path):
        self._atomic = atomic_path(path)
        self._fh = open(self._atomic.__enter__(), "w", encoding="utf-8")
        self.counts: Counter = Counter()

    def add(self, problem: metadata.Problem) -> None:
        self.counts[problem.reason.split(":")[0]] += 1
        self._fh.write(json.dumps(problem.__dict__, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._fh.close()
        self._atomic.__exit__(None, None, None)


def run_download(params: dict, out_dir: Path, progress: bool = True) -> dict:
    """The stage's work (module docstring); returns the flat summary for the stage glue."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    data, cfg = params["data"], download_config(params)
    source = data["source"]
    meta_cfg = data["metadata"]
    if not metadata.is_metadata_source(source):
        out_dir.mkdir(parents=True, exist_ok=True)
        TableWriter(out_dir / "status.parquet").close()
        return {"source_is_metadata": False, "num_urls": 0, "num_ok": 0}
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = ProblemLog(out_dir / "problems.jsonl")
    try:
        mapping, records = metadata.iter_records(source, meta_cfg["fields"], problems.add)  # may stop: no work yet
        subset = metadata.select_subset(records, int(meta_cfg["max_records"]), bool(meta_cfg["balance_aspects"]))
        cache = Path(cfg["cache_dir"])
        keys, duplicates = spool(subset, cache)
    finally:
        problems.close()
    todo = missing_keys(keys, cache, bool(cfg["retry_transient"]))
    fetched = fetch_all(todo, cache, cfg, progress)
    counts = write_outputs(keys, cache, out_dir, cfg, mapping, progress)
    summary = {"source_is_metadata": True, "num_urls": int(len(keys)), "num_ok": int(counts.get("ok", 0)),
               "ok_fraction": counts.get("ok", 0) / max(1, len(keys)), "duplicate_urls": duplicates,
               **{f"status_{k}": int(v) for k, v in sorted(counts.items())},
               **{f"problem_{k}": int(v) for k, v in sorted(problems.counts.items())},
               **{f"field_{k}": v or "" for k, v in mapping.items()}}
    elapsed = time.perf_counter() - started
    summary["_timing"] = {"download_seconds": round(elapsed, 3), "fetched_this_run": int(len(todo)),
                          "fetched_statuses": dict(fetched), "urls_per_s": round(len(todo) / max(elapsed, 1e-9), 3)}
    if progress:
        print("download: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no URLs")
    return summary
