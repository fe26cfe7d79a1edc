"""Download throughput and memory against the loopback fault server (tests/fault_server.py, its own process).

Bodies: 3, 4, 5, 6, 7 and 8 MB (a 4K JPEG's size; JPEG magic then random bytes: the downloader checks only the
magic, so a real encoder is not needed), every request delayed by ``--latency`` (50 ms: a distant CDN).

1. images/s and MB/s of a plain sequential urllib3 client (the baseline, same files, same run), then of the download
   stage's fetcher (:class:`ultraflux.data.fetch.Fetcher`, thread pool) at 1, 8 and 32 concurrent requests, each
   measured ``--reps`` times interleaved with the baseline; medians and the ratio to the baseline.
2. the whole stage (:func:`ultraflux.data.download.run_download`: metadata -> cache with fsync -> shards) at 32.
3. peak RSS of ``run_download`` over N and 10 N URLs of small bodies (each in a fresh process): the ratio.

Run: ``python benchmarks/bench_download.py`` (about 2 minutes on 2 cores); prints the machine load (uptime).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES_MB = (3, 4, 5, 6, 7, 8)
FIELDS = {"url": "image_url", "caption": "en_caption", "caption_zh": "", "quality": "", "aesthetic": "",
          "flatness": "", "entropy": "", "tag": "", "work_url": "", "photographer": "", "photographer_url": ""}


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split()[1])
    return proc, f"http://127.0.0.1:{port}"


def blob_urls(base: str, count: int, tag: str) -> list[str]:
    return [f"{base}/blob/{SIZES_MB[i % len(SIZES_MB)] << 20}/{tag}-{i}" for i in range(count)]


def fetcher_cfg(workers: int) -> dict:
    return {"engine": "local", "engine_workers": 1, "workers": workers, "per_host": workers, "timeout_s": 60.0,
            "retries": 0, "backoff_s": 0.1,
            "max_backoff_s": 1.0, "max_mb": 16.0, "max_redirects": 3, "retry_transient": False, "allow_private_addresses": True,
            "user_agent": "bench", "shard_max_mb": 1024, "cache_dir": ""}


def sequential(urls: list[str]) -> tuple[float, int]:
    """The baseline: one plain urllib3 client (keep-alive), one request after the other."""
    import urllib3

    t, total = time.perf_counter(), 0
    http = urllib3.PoolManager(timeout=60.0)
    for url in urls:
        response = http.request("GET", url)
        assert response.status == 200, response.status
        total += len(response.data)
    return time.perf_counter() - t, total


def concurrent(urls: list[str], workers: int) -> tuple[float, int]:
    from ultraflux.data.fetch import Fetcher

    fetcher = Fetcher(fetcher_cfg(workers))
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(fetcher.fetch, urls))
    seconds = time.perf_counter() - t
    fetcher.close()
    assert all(r.status == "ok" for r in results), {r.status for r in results}
    return seconds, sum(len(r.data) for r in results)


def metadata_folder(folder: Path, urls: list[str], per_file: int = 100) -> Path:
    """The release's layout: many JSON files, each a list of records (here ``per_file`` records each)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(urls), per_file):
        records = [{"image_url": u, "en_caption": "c"} for u in urls[start:start + per_file]]
        (folder / f"part-{start // per_file:05d}.json").write_text(json.dumps(records))
    return folder


def stage_params(source: Path, cache: Path, workers: int) -> dict:
    return {"data": {"source": str(source), "metadata": {"max_records": 0, "balance_aspects": False,
                                                          "fields": FIELDS}},
            "download": fetcher_cfg(workers) | {"cache_dir": str(cache)}}


def whole_stage(urls: list[str], workers: int) -> tuple[float, int]:
    from ultraflux.data.download import run_download

    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        params = stage_params(metadata_folder(tmp / "meta", urls), tmp / "cache", workers)
        t = time.perf_counter()
        run_download(params, tmp / "out", progress=False)
        seconds = time.perf_counter() - t
        return seconds, sum(p.stat().st_size for p in (tmp / "out" / "shards").glob("*.tar"))


def rss_child(base: str, count: int) -> None:
    """In a fresh process: peak RSS of run_download over ``count`` small bodies (printed as JSON)."""
    import psutil

    from common import peak_rss_growth
    from ultraflux.data.download import run_download

    urls = [f"{base}/blob/20000/rss{count}-{i}" for i in range(count)]
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        tmp = Path(tmp)
        params = stage_params(metadata_folder(tmp / "meta", urls), tmp / "cache", 16)
        before = psutil.Process().memory_info().rss
        _, seconds, growth = peak_rss_growth(lambda: run_download(params, tmp / "out", progress=False))
    print(json.dumps({"count": count, "seconds": seconds, "growth": growth, "peak": before + growth,
                      "end": psutil.Process().memory_info().rss}))


def rss(base: str, count: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(count), "--base", base], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--images", type=int, default=64, help="images per concurrent measurement")
    ap.add_argument("--sequential-images", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-urls", type=int, default=300)
    ap.add_argument("--rss-child", type=int, default=0)
    ap.add_argument("--base", default="")
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.base, args.rss_child)
        return
    server, base = start_server(args.latency)
    try:
        concurrent(blob_urls(base, 6, "warm"), 6)  # the server builds its bodies once
        rows: dict[str, list[tuple[float, float]]] = {}
        for rep in range(args.reps):
            seconds, nbytes = sequential(blob_urls(base, args.sequential_images, f"s{rep}"))
            rows.setdefault("sequential urllib3", []).append((args.sequential_images / seconds, nbytes / seconds))
            for workers in (1, 8, 32):
                seconds, nbytes = concurrent(blob_urls(base, args.images, f"c{workers}-{rep}"), workers)
                rows.setdefault(f"fetcher x{workers}", []).append((args.images / seconds, nbytes / seconds))
        seconds, nbytes = whole_stage(blob_urls(base, args.images, "stage"), 32)
        rows["run_download x32 (cache+fsync+shards)"] = [(args.images / seconds, nbytes / seconds)]
        small = rss(base, args.rss_urls)
        large = rss(base, 10 * args.rss_urls)
    finally:
        server.terminate()
    baseline = statistics.median(r[0] for r in rows["sequential urllib3"])
    print(f"latency {args.latency * 1000:.0f} ms, bodies {SIZES_MB[0]}-{SIZES_MB[-1]} MB, medians of {args.reps}")
    print(f"{'client':42s} {'images/s':>9s} {'MB/s':>8s} {'x sequential':>13s}")
    for name, values in rows.items():
        ips, bps = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        print(f"{name:42s} {ips:9.1f} {bps / 1e6:8.1f} {ips / baseline:13.2f}")
    print(f"peak RSS run_download: {small['count']} URLs {small['peak'] / 2**20:.0f} MiB (growth "
          f"{small['growth'] / 2**20:.1f} MiB, {small['end'] / 2**20:.0f} MiB at the end), {large['count']} URLs "
          f"{large['peak'] / 2**20:.0f} MiB (growth {large['growth'] / 2**20:.1f} MiB, {large['end'] / 2**20:.0f} MiB "
          f"at the end): ratio {large['peak'] / small['peak']:.3f}x")
    print("load:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
