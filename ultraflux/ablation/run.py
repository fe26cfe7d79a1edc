"""``run_ablation``: queue the co-design cells, run them, collect, summarise, log (see the package docstring)."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from ultraflux.ablation import dvc_queue
from ultraflux.codesign import LETTERS, exp_name
from ultraflux.ablation.table import write_summary
from ultraflux.io import write_json


def run_ablation(repo: Path, jobs: int = 1, timeout: float = 7200, poll: float = 10, out: str = "outputs/ablation",
                 suffix: str = "", common: list[str] | None = None, per_cell: dict[str, list[str]] | None = None,
                 letters: str = "ABCD", mlflow: bool = True, log=print) -> tuple[int, dict[str, dict], list[dict]]:
    """Returns (exit code: 0 all succeeded, 1 some failed, 3 timed out; results per cell; Table-1 rows)."""
    from ultraflux import tracking
    from ultraflux.config import load_params

    repo = Path(repo).resolve()
    if suffix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", suffix):
        raise SystemExit(f"--suffix must be letters, digits, '.' or '_' (got {suffix!r})")
    try:
        baseline = dvc_queue._git(["rev-parse", "HEAD"], repo)
    except subprocess.CalledProcessError:
        raise SystemExit("ultraflux ablation: DVC experiments need a git commit; commit the project first")
    params = load_params(repo / "params.yaml")
    letters = [L for L in LETTERS if L in letters]
    names = [exp_name(L, suffix) for L in letters]
    out_dir = repo / out
    t_start = time.time()
    invocation = time.strftime("%Y%m%d-%H%M%S", time.localtime(t_start))
    if mlflow:  # create the store before any worker starts: parallel first opens would race on its schema
        import os

        os.environ.setdefault("DVC_ROOT", str(repo))
        tracking.ensure_store()
    log(f"[ablation] commit {baseline[:12]}: queueing {', '.join(names)}")
    dvc_queue.prepare_names(repo, names, baseline)
    ids = dvc_queue.queue_cells(repo, letters, suffix, common or [], per_cell or {})
    dvc_queue.start_workers(repo, jobs)
    states = dvc_queue.wait(repo, ids, timeout, poll, jobs, log)
    unfinished = [t for L, t in ids.items() if states.get(L) in ("Queued", "Running")]
    if unfinished:
        log(f"[ablation] --timeout {timeout:.0f}s passed; killing {', '.join(unfinished)}")
        for L, t in ids.items():
            if states.get(L) in ("Queued", "Running"):
                dvc_queue._dvc(["queue", "kill" if states[L] == "Running" else "remove", t], repo, check=False)
    wall = time.time() - t_start
    shutil.rmtree(out_dir / "logs", ignore_errors=True)  # failure logs of an earlier invocation
    results = dvc_queue.collect(repo, ids, states, suffix, baseline, out_dir)
    rows, paths = write_summary(results, out_dir)
    write_json(out_dir / "timing.json", {"wall_time_s": round(wall, 1), "jobs": jobs})
    paths["timing"] = out_dir / "timing.json"
    if mlflow:
        from ultraflux.ablation.mlflow_log import log_to_mlflow

        experiment = (params.get("tracking") or {}).get("experiment", "ultraflux")
        run_ids = log_to_mlflow(repo, results, rows, paths, t_start, experiment, invocation)
        log(f"[ablation] MLflow: experiment {experiment!r}, summary run {run_ids['summary']}")
    for r in rows:
        log(f"[ablation] {r['variant']} {r['exp_name']}: {r['status']}" + (f" ({r['reason']})" if r['reason'] else ""))
    log(f"[ablation] {wall:.0f}s; summary: {paths['md'].relative_to(repo)}, {paths['csv'].relative_to(repo)}, "
        f"{paths['png'].relative_to(repo)}")
    code = 0 if all(r["status"] == "success" for r in results.values()) else (3 if unfinished else 1)
    return code, results, rows
