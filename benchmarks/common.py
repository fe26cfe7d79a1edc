"""Shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""
from __future__ import annotations

import threading
import time


def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn``."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def peak_rss_growth(fn, every_s: float = 0.002):
    """(result of ``fn()``, seconds, peak RSS growth in bytes above the RSS at the call), RSS polled every 2 ms."""
    import psutil

    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], [False]

    def poll():
        while not stop[0]:
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(every_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t
        stop[0] = True
        thread.join()
    return out, seconds, peak[0]
