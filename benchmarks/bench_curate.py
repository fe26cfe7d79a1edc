"""Curation throughput: per-image cost of each step at 4K, as a ratio to Pillow decode time in the same run.

    python benchmarks/bench_curate.py [--repeats 3] [--images 8]

For a 4096x4096 and a 5120x2880 procedural landscape, encoded as JPEG q95 and as PNG, it times on ONE core
(OpenCV single-threaded): decode (Pillow -> RGB array), the gray conversion + flatness (per-patch S_flat) +
entropy statistics (seed Sec. 2.1), and bucket-resize (centre crop + Lanczos to the nearest 4K bucket); then the
whole per-image function (``ultraflux.data.process.analyze``: decode, statistics, stand-in scores, resize, PNG write)
in images/s on all cores with a process pool. Goal: statistics <= 0.5x decode.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ultraflux.data import synthetic
from ultraflux.data.buckets import bucket_table, nearest_bucket
from ultraflux.data.curate import worker_config
from ultraflux.data.decode import decode_rgb
from ultraflux.data.process import analyze, crop_box, init_worker
from ultraflux.data.stats import entropy_bits, patch_flatness, to_gray

SIZES = [(4096, 4096), (5120, 2880)]


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (page faults, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(arr).save(buf, "JPEG", quality=95)
    else:
        Image.fromarray(arr).save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def scene(width: int, height: int) -> np.ndarray:
    spec = {"kind": "landscape", "scene": "landscape", "aspect": width / height, "palette": "alpine",
            "sky": "noon", "seed": [0, width, height]}
    return synthetic.render(spec, max(width, height))[:height, :width]


def one_core(data: bytes, repeats: int) -> dict:
    table = bucket_table(1.0)
    rgb = decode_rgb(data)
    h, w = rgb.shape[:2]
    name = nearest_bucket(w, h, table)
    bw, bh = table[name]
    box = crop_box(w, h, bw, bh)

    def stats():
        gray = to_gray(rgb)
        patch_flatness(gray, 240)
        entropy_bits(gray)

    gray = to_gray(rgb)
    return {
        "decode": best_of(lambda: decode_rgb(data), repeats),
        "gray": best_of(lambda: to_gray(rgb), repeats),
        "flatness": best_of(lambda: patch_flatness(gray, 240), repeats),
        "entropy": best_of(lambda: entropy_bits(gray), repeats),
        "stats_total": best_of(stats, repeats),
        "bucket_resize": best_of(lambda: Image.fromarray(rgb).resize((bw, bh), Image.Resampling.LANCZOS, box=box),
                                 repeats),
        "bucket": f"{name} {bw}x{bh}",
    }


def _full(args) -> float:
    path, cfg, out = args
    start = time.perf_counter()
    data = Path(path).read_bytes()
    analyze(data, f"{abs(hash(path)) % 16**16:016x}", cfg, "", Path(out) / (Path(path).stem + ".png"))
    return time.perf_counter() - start


def all_cores(paths: list[Path], workers: int) -> float:
    cfg = worker_config({"seed": 0, "curate": {"buckets": {"scale": 1.0}}}, Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory() as out:
        jobs = [(str(p), cfg, out) for p in paths]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker) as pool:
            list(pool.map(_full, jobs[:workers]))  # warm the workers
            start = time.perf_counter()
            list(pool.map(_full, jobs))
            return len(jobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="images per all-core throughput run")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    workers = os.cpu_count() or 1
    print(f"cores: {workers}; OpenCV {cv2.__version__}; Pillow {Image.__version__} "
          f"(libjpeg-turbo: {getattr(Image.core, 'libjpeg_turbo_version', 'n/a')}); best of {args.repeats}")
    header = (f"{'image':>22} {'decode s':>9} | {'gray':>6} {'flat':>6} {'entropy':>7} {'stats':>6} "
              f"{'resize':>6}   (x decode)  | all cores img/s")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in SIZES:
            arr = scene(width, height)
            for fmt in ("JPEG", "PNG"):
                data = encode(arr, fmt)
                r = one_core(data, args.repeats)
                d = r["decode"]
                paths = []
                for i in range(args.images):
                    path = Path(tmp) / f"{width}x{height}_{i}.{fmt.lower()}"
                    path.write_bytes(data)
                    paths.append(path)
                rate = all_cores(paths, workers)
                label = f"{width}x{height} {fmt}{' q95' if fmt == 'JPEG' else ''}"
                print(f"{label:>22} {d:9.3f} | {r['gray'] / d:6.3f} {r['flatness'] / d:6.3f} {r['entropy'] / d:7.3f} "
                      f"{r['stats_total'] / d:6.3f} {r['bucket_resize'] / d:6.3f}   ({r['bucket']}) | {rate:.2f} "
                      f"({rate * d:.2f}x decode-only rate per core x {workers})")
                for path in paths:
                    path.unlink()


if __name__ == "__main__":
    main()
