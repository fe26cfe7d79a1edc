"""Execution engines for the per-image functions (``curate.engine``): ``local`` or ``ray``.

Both passes of :mod:`ultraflux.data.process` (``scan_one``, ``render_one``) run through :func:`run_engine`, which
returns the small per-image results IN TASK ORDER, so nothing downstream depends on the engine: the main process
makes every selection and writes the manifest and the shards itself.

* ``local``: a process pool on one machine (``concurrent.futures.ProcessPoolExecutor``) with ``curate.workers``
  processes (0 = all cores); with one worker the function runs in this process (no pool). Workers are started with
  ``spawn``: forking a parent that already runs thread pools (OpenCV, torch/OpenMP, MLflow) can deadlock the child
  (seen in ``dvc repro`` inside ``cv2.setNumThreads``). A script that calls ``run_curation`` directly therefore needs
  the usual ``if __name__ == "__main__":`` guard (console entry points and pytest have one).
* ``ray``: the same function mapped over a Ray Dataset (``ray.data.from_items(...).map(...)``, one CPU per task).
  ``ray.init()`` connects to the cluster named by the ``RAY_ADDRESS`` environment variable (e.g.
  ``RAY_ADDRESS=ray://head:10001`` or ``auto`` on a cluster node), else starts a local Ray with ``curate.workers``
  CPUs. On a cluster, ``data.source`` and ``curate.cache_dir`` must be on a filesystem every node mounts at the
  same path (workers read the sources and write the cache), and ``ultraflux`` must be importable on every node
  (installed there, or shipped with ``ray.init(runtime_env={"py_modules": [ultraflux]})`` before calling
  ``run_curation``). A Ray started here is shut down at the end; one the caller started is left running.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from typing import Callable

from tqdm.auto import tqdm

from .process import init_worker


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or container allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(workers, engine: str = "local") -> int:
    """``curate.workers``: a positive count, or 0/None for every core. On this machine (the local pool, or a Ray
    started here) never more workers than cores: the paper profile's 64 would overload a laptop; only a Ray cluster
    (``RAY_ADDRESS`` set) gets the count as asked."""
    n = int(workers) if workers and int(workers) > 0 else cores()
    if n > cores() and not (engine == "ray" and os.environ.get("RAY_ADDRESS")):
        print(f"curate.workers = {n} but this machine has {cores()} cores: using {cores()} (set RAY_ADDRESS to run "
              f"curate.engine = ray on a cluster)", file=sys.stderr)
        n = cores()
    return n


def _pool_context():
    # Always spawn: forking a process that already runs thread pools (torch/OpenMP, OpenCV, MLflow's sqlite
    # threads in a DVC stage) deadlocks the child, e.g. in cv2.setNumThreads (seen in `dvc repro`).
    return get_context("spawn")


def run_local(fn: Callable[[dict], dict], tasks: list[dict], workers: int, progress: bool = True,
              desc: str = "curate") -> list[dict]:
    results = []
    with tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                results.append(fn(task))
                bar.update()
        else:
            chunk = max(1, min(16, len(tasks) // (workers * 8)))
            with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=init_worker) as pool:
                for rec in pool.map(fn, tasks, chunksize=chunk):
                    results.append(rec)
                    bar.update()
    return results


def _ray_row(fn: Callable[[dict], dict], row: dict) -> dict:
    init_worker()
    return {"index": row["index"], "record": json.dumps(fn(json.loads(row["task"])))}


def run_ray(fn: Callable[[dict], dict], tasks: list[dict], workers: int, progress: bool = True,
            desc: str = "curate") -> list[dict]:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise RuntimeError('curate.engine = "ray" needs Ray Data: pip install "ray[data]"') from err
    started_here = not ray.is_initialized()
    if started_here:
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            # address="local": always a fresh Ray of our own here, never one another process left running on this
            # machine (ray.init() would attach to it, and refuses num_cpus for an existing cluster)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        rows = [{"index": i, "task": json.dumps(task)} for i, task in enumerate(tasks)]
        records: list = [None] * len(tasks)
        if rows:
            dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), workers * 4)))
            for row in dataset.map(partial(_ray_row, fn), num_cpus=1).iter_rows():
                records[int(row["index"])] = json.loads(row["record"])
        return records
    finally:
        if started_here:
            ray.shutdown()


def run_engine(engine: str, fn: Callable[[dict], dict], tasks: list[dict], workers, progress: bool = True,
               desc: str = "curate") -> list[dict]:
    """Run ``fn`` over ``tasks`` with the named engine; results in task order."""
    n = resolve_workers(workers, engine)
    if engine == "local":
        return run_local(fn, tasks, n, progress, desc)
    if engine == "ray":
        return run_ray(fn, tasks, n, progress, desc)
    raise ValueError(f"curate.engine must be 'local' or 'ray', got {engine!r}")
