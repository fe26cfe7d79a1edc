"""Shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""
from __future__ import annotations

import time


def timed(fn, reps: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn``."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
