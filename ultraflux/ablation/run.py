"""``run_ablation``: queue the co-design cells, run them, collect, summarise, log (see the package docstring)."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from ultraflux.ablation import dvc_queue
from ultraflux.codesign import LETTERS, exp_name
from ultraflux.ablation.table import write_summary
from ultraflux.io import write_json


class Interrupted(Exception):
    """SIGINT/SIGTERM while the cells run: stop the workers, mark what did not finish, still write the table."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (the default handlers would exit at once and
    leave DVC's queue worker running)."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _ignoring_signals(fn, *args):
    """Run a clean-up step to its end: a second Ctrl-C or SIGTERM must not leave the queue half stopped."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return fn(*args)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


SUFFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._]*")   # an experiment-name suffix DVC accepts


def run_ablation(repo: Path, jobs: int = 1, timeout: float = 7200, poll: float = 10, out: str = "outputs/ablation",
                 suffix: str = "", common: list[str] | None = None, per_cell: dict[str, list[str]] | None = None,
                 letters: str = "ABCD", mlflow: bool = True, log=print) -> tuple[int, dict[str, dict], list[dict]]:
    """Returns (exit code: 0 all succeeded, 1 some failed, 3 timed out, 128 + signal number when stopped by SIGINT /
    SIGTERM; results per cell; Table-1 rows). A stop kills our queue tasks and DVC's queue workers first, then the
    partial table is written and logged like a finished one (the unfinished cells marked ``interrupted``)."""
    from ultraflux import tracking
    from ultraflux.config import load_validated

    repo = Path(repo).resolve()
    params = load_validated(repo / "params.yaml", check_paths=False)   # ParamsError naming the file: nothing queued
    if suffix and not SUFFIX_RE.fullmatch(suffix):
        raise ValueError(f"the suffix must be letters, digits, '.' or '_' (got {suffix!r})")
    try:
        baseline = dvc_queue._git(["rev-parse", "HEAD"], repo)
    except subprocess.CalledProcessError:
        raise dvc_queue.DvcError("DVC experiments need a git commit; commit the project first") from None
    letters = [L for L in LETTERS if L in letters]
    names = [exp_name(L, suffix) for L in letters]
    out_dir = repo / out
    t_start = time.monotonic()
    invocation = time.strftime("%Y%m%d-%H%M%S")
    if mlflow:  # create the store before any worker starts: parallel first opens would race on its schema
        import os

        os.environ.setdefault("DVC_ROOT", str(repo))
        tracking.ensure_store()
    log(f"[ablation] commit {baseline[:12]}: queueing {', '.join(names)}")
    dvc_queue.prepare_names(repo, names, baseline)
    ids: dict[str, str] = {}
    stopped = None
    try:
        with _stop_on_signals():
            ids = dvc_queue.queue_cells(repo, letters, suffix, common or [], per_cell or {}, ids)
            dvc_queue.start_workers(repo, jobs)
            states = dvc_queue.wait(repo, ids, timeout, poll, jobs, log)
    except Interrupted as e:
        stopped = e
        log(f"[ablation] {e} received: stopping the queue workers and the unfinished cells")
        states = _ignoring_signals(dvc_queue.stop_all, repo, ids)
    unfinished = [t for L, t in ids.items() if states.get(L) in ("Queued", "Running")]
    if unfinished and stopped is None:
        log(f"[ablation] --timeout {timeout:.0f}s passed; killing {', '.join(unfinished)}")
        for L, t in ids.items():
            if states.get(L) in ("Queued", "Running"):
                dvc_queue._dvc(["queue", "kill" if states[L] == "Running" else "remove", t], repo, check=False)
    wall = time.monotonic() - t_start
    shutil.rmtree(out_dir / "logs", ignore_errors=True)  # failure logs of an earlier invocation
    why = f"interrupted by {stopped} after {wall:.0f}s; killed" if stopped else None
    results = dvc_queue.collect(repo, ids, states, suffix, baseline, out_dir, unfinished_reason=why)
    for L in letters:  # stopped before every cell was queued
        results.setdefault(L, {"exp_name": exp_name(L, suffix), "task_id": "", "git_commit": baseline,
                               "status": "interrupted", "reason": f"not queued when {why}"})
    rows, paths = write_summary(results, out_dir)
    write_json(out_dir / "timing.json", {"wall_time_s": round(wall, 1), "jobs": jobs})
    paths["timing"] = out_dir / "timing.json"
    if mlflow:
        from ultraflux.ablation.mlflow_log import log_to_mlflow

        experiment = params["tracking"]["experiment"]
        run_ids = log_to_mlflow(repo, results, rows, paths, t_start, experiment, invocation)
        log(f"[ablation] MLflow: experiment {experiment!r}, summary run {run_ids['summary']}")
    for r in rows:
        log(f"[ablation] {r['variant']} {r['exp_name']}: {r['status']}" + (f" ({r['reason']})" if r['reason'] else ""))
    log(f"[ablation] {wall:.0f}s; summary: {paths['md'].relative_to(repo)}, {paths['csv'].relative_to(repo)}, "
        f"{paths['png'].relative_to(repo)}")
    if stopped is not None:
        return 128 + stopped.signum, results, rows
    code = 0 if all(r["status"] == "success" for r in results.values()) else (3 if unfinished else 1)
    return code, results, rows
