"""Driving DVC for the ablation: queue the cells, run the workers, wait, and read results back.

Steps: (1) remove earlier experiments of the same names on this commit (MLflow keeps their runs), (2) queue the four
cells with ``dvc exp run --queue -n co-design-<L> -S ...`` in the order A, B, C, D, (3) ``dvc queue start -j JOBS``,
(4) poll ``dvc queue status`` until all tasks ended or the timeout passed, (5) read everything back: metrics and
params from ``dvc exp show --json``, failure reasons from ``dvc queue logs``, the curated manifest and the
validation-loss curves through ``dvc.api`` at the experiment's commit.

Shared stages are not recomputed: DVC's run cache restores a stage whose command, deps and params were already run, so
curate/vae run once per dataset variant (A computes them for ``baseline``, B for ``multiaspect``; C and D restore
them). With ``-j 2`` the FIFO order A, B, C, D keeps that property; with ``-j 3`` or more C can start before A has
finished curating and then computes the same stages again (correct, only slower). The output of ``dvc queue status``
is parsed (DVC has no JSON for it): the pinned DVC range in pyproject.toml is the one these patterns were read from.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ultraflux.codesign import cell_sets, exp_name
from ultraflux.io import atomic_write_text

MANIFEST = "outputs/curated/manifest.parquet"
VAL_CURVES = {"dit_stage1": "outputs/dit_stage1/val_loss.csv", "dit_stage2": "outputs/dit_stage2/val_loss.csv"}


class DvcError(RuntimeError):
    pass


def _dvc(args: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.exists() else "dvc", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise DvcError(f"{' '.join(['dvc', *args])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


STATUS_RE = re.compile(r"^([0-9a-f]{7})\s+(\S+)\s+.*?\s(\w+)\s*$")
WORKERS_RE = re.compile(r"Worker status:\s*(\d+) active,\s*(\d+) idle")


def parse_queue_status(text: str) -> tuple[dict[str, tuple[str, str]], int]:
    """``dvc queue status`` output -> ({short task id: (name, status)}, number of workers).

    Status is Queued | Running | Success | Failed."""
    rows = {}
    for line in text.splitlines()[1:]:
        m = STATUS_RE.match(line.strip())
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    w = WORKERS_RE.search(text)
    return rows, (int(w.group(1)) + int(w.group(2))) if w else -1


def _dvc_read(args: list[str], repo: Path, attempts: int = 5, pause: float = 2.0,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """A read-only dvc command, retried: DVC itself fails now and then while a queue worker rewrites a task's state
    file ("unexpected error - Expecting value"); the last attempt's failure raises DvcError."""
    for attempt in range(attempts):
        proc = _dvc(args, repo, check=attempt == attempts - 1, timeout=timeout)
        if proc.returncode == 0:
            return proc
        time.sleep(pause)
    raise AssertionError("unreachable")


def read_queue_status(repo: Path) -> tuple[dict[str, tuple[str, str]], int]:
    return parse_queue_status(_dvc_read(["queue", "status"], repo).stdout)


def queue_status(repo: Path) -> dict[str, tuple[str, str]]:
    return read_queue_status(repo)[0]


def start_workers(repo: Path, jobs: int) -> None:
    """``dvc queue start -j JOBS``. The worker is a daemon that inherits our stdout/stderr: hand it a log file, not
    a pipe, or this call would block until the worker exits."""
    log = repo / ".dvc" / "tmp" / "ultraflux-ablation-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    dvc = Path(sys.executable).with_name("dvc")
    with open(log, "ab") as fh:
        subprocess.run([str(dvc) if dvc.exists() else "dvc", "queue", "start", "-j", str(jobs)], cwd=repo,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"}, stdin=subprocess.DEVNULL, stdout=fh,
                       stderr=subprocess.STDOUT, check=True, timeout=300)


def exp_show(repo: Path) -> list[dict]:
    return json.loads(_dvc_read(["exp", "show", "--json"], repo, timeout=900).stdout)


def experiments(show: list[dict], baseline: str) -> list[dict]:
    """Flatten ``dvc exp show --json`` for one baseline commit: name, rev, task_id, state, data, error."""
    out = []
    for base in show:
        if base.get("rev") != baseline:
            continue
        for e in base.get("experiments") or []:
            rev = (e.get("revs") or [{}])[0]
            ex = e.get("executor") or {}
            out.append({"name": e.get("name") or rev.get("name"), "rev": rev.get("rev"),
                        "task_id": ((ex.get("local") or {}).get("task_id")), "state": ex.get("state"),
                        "data": rev.get("data") or {}, "error": rev.get("error")})
    return out


def prepare_names(repo: Path, names: list[str], baseline: str) -> None:
    """Make the names free: earlier experiments of these names on this commit are removed (their MLflow runs stay);
    finished or failed queue entries of these names are dropped. Running or queued ones are an error."""
    for e in experiments(exp_show(repo), baseline):
        if e["name"] not in names:
            continue
        if e["state"] in ("queued", "running"):
            raise DvcError(f"experiment {e['name']} is {e['state']} in the DVC queue; wait for it or "
                           f"`dvc queue kill {e['name']}` first")
        if e["state"] in ("failed", "success") and e["task_id"]:
            _dvc(["queue", "remove", e["task_id"]], repo, check=False)
        if e["state"] != "failed":
            _dvc(["exp", "remove", e["name"]], repo, check=False)


def queue_cells(repo: Path, letters: Iterable[str], suffix: str, common: list[str],
                per_cell: dict[str, list[str]], ids: dict[str, str] | None = None) -> dict[str, str]:
    """Queue one experiment per cell; returns {letter: short task id}, filled into ``ids`` as the cells are queued
    (a stop half-way then knows which cells are in the queue)."""
    before = set(queue_status(repo))
    ids = {} if ids is None else ids
    for L in letters:
        sets = [*cell_sets(L), *common, *per_cell.get(L, [])]
        args = ["exp", "run", "--queue", "-n", exp_name(L, suffix)]
        for s in sets:
            args += ["-S", s]
        _dvc(args, repo)
        new = {t: v for t, v in queue_status(repo).items() if t not in before and v[0] == exp_name(L, suffix)}
        if len(new) != 1:
            raise DvcError(f"could not find the queue entry of {exp_name(L, suffix)} (found {new})")
        ids[L] = next(iter(new))
        before.add(ids[L])
    return ids


MISSING_POLLS = 3
"""Polls a task must be absent from ``dvc queue status`` before it counts as gone: a task moving from Queued to
Running can be missing from one listing (seen in the grid test: D read 'missing' the moment C finished)."""


def wait(repo: Path, ids: dict[str, str], timeout: float, poll: float, jobs: int = 1, log=print) -> dict[str, str]:
    """Poll ``dvc queue status`` until every task is Success/Failed or ``timeout`` seconds passed. Should every
    worker be gone while our tasks are still queued (a worker died, or another user's ``dvc queue stop``), new
    workers are started."""
    t0, last, idle_polls, missing = time.monotonic(), None, 0, dict.fromkeys(ids, 0)
    while True:
        st, workers = read_queue_status(repo)
        states = {L: st.get(t, ("", "missing"))[1] for L, t in ids.items()}
        missing = {L: missing[L] + 1 if s == "missing" else 0 for L, s in states.items()}
        idle_polls = idle_polls + 1 if workers == 0 and "Queued" in states.values() else 0
        if idle_polls >= 3:
            log("[ablation] no queue worker left while experiments are queued; starting workers again")
            start_workers(repo, jobs)
            idle_polls = 0
        if states != last:
            log(f"[ablation] {time.monotonic() - t0:6.0f}s  " + "  ".join(f"{L}:{s}" for L, s in states.items()))
            last = states
        if all(s in ("Success", "Failed") or missing[L] >= MISSING_POLLS for L, s in states.items()):
            return states
        if time.monotonic() - t0 > timeout:  # elapsed time, whatever the system clock does
            return states
        time.sleep(poll)


def stop_all(repo: Path, ids: dict[str, str], settle: float = 60.0, poll: float = 1.0) -> dict[str, str]:
    """Stop the grid: remove our queued tasks, kill our running ones, stop DVC's queue workers (``dvc queue stop
    --kill``) unless other experiments of this repository are queued or running (those are not ours to stop), and
    wait up to ``settle`` seconds until ours are gone. Returns each cell's last queue state."""
    current = queue_status(repo)   # one `dvc queue status` for all cells (each call is a dvc process)
    states = {L: current.get(t, ("", "missing"))[1] for L, t in ids.items()}
    for L, t in ids.items():
        if states[L] == "Queued":
            _dvc(["queue", "remove", t], repo, check=False)
    running = [t for L, t in ids.items() if states[L] == "Running"]
    if running:
        _dvc(["queue", "kill", "--force", *running], repo, check=False)
    others = [t for t, (_, state) in current.items() if t not in ids.values() and state in ("Queued", "Running")]
    if others:
        print(f"[ablation] DVC's queue workers keep running: {len(others)} other experiment(s) of this repository "
              "are queued or running (`dvc queue stop` when they are done)", file=sys.stderr, flush=True)
    else:
        _dvc(["queue", "stop", "--kill"], repo, check=False)
    t0 = time.monotonic()
    while time.monotonic() - t0 < settle:
        st, workers = read_queue_status(repo)
        if (workers <= 0 or others) and not any(st.get(t, ("", ""))[1] == "Running" for t in ids.values()):
            break
        time.sleep(poll)
    return states


def failure_reason(repo: Path, task: str) -> tuple[str, str]:
    """(one-line reason, full log) of a failed queue task from ``dvc queue logs``."""
    proc = _dvc(["queue", "logs", task], repo, check=False)
    text = (proc.stdout or "") + (proc.stderr or "")
    return reason_from_log(text), text


def reason_from_log(text: str) -> str:
    """The informative lines of a failed experiment's log: the stage's own message, a traceback's last line, and
    DVC's first ERROR line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    stage_err = [ln for ln in lines if re.match(r"^\[\w+\]", ln)]  # run_stage prints "[stage] params.yaml: ..."
    errors = list(dict.fromkeys(ln for ln in lines if ln.startswith("ERROR")))
    tb = [ln for ln in lines if re.match(r"^\w+(Error|Exception)\b", ln)]
    reason = "; ".join(dict.fromkeys([*stage_err[-1:], *tb[-1:], *errors[:1]])) or (lines[-1] if lines else
                                                                                      "no log")
    return reason[:1000]


def manifest_identity(repo: Path, rev: str) -> tuple[str, str]:
    """(sha256 of the curated manifest, sha256 of its evaluation set's ids) of the experiment commit ``rev``, read
    through DVC's public API; "unavailable" for what cannot be read (an older manifest has no ``eval`` column)."""
    import dvc.api
    import pandas as pd

    from ultraflux.data.select import eval_set_sha256

    try:
        with dvc.api.open(MANIFEST, repo=str(repo), rev=rev, mode="rb") as fh:
            data = fh.read()
    except Exception:  # noqa: BLE001 - dvc raises many kinds (missing cache, path not tracked at that rev)
        return "unavailable", "unavailable"
    try:
        eval_sha = eval_set_sha256(pd.read_parquet(io.BytesIO(data), columns=["id", "eval"]))
    except Exception:  # noqa: BLE001 - not parquet, or no eval column
        eval_sha = "unavailable"
    return hashlib.sha256(data).hexdigest(), eval_sha


def val_curves(repo: Path, rev: str) -> dict[str, list[tuple[int, float]]]:
    """{stage: [(step, mean validation loss)]} from the experiment's val_loss.csv plots (git-tracked at ``rev``)."""
    out = {}
    for stage, path in VAL_CURVES.items():
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        if proc.returncode == 0:
            rows = list(csv.DictReader(io.StringIO(proc.stdout)))
            if rows and "val_loss" in rows[0]:
                out[stage] = [(int(r["step"]), float(r["val_loss"])) for r in rows]
    return out


def collect(repo: Path, ids: dict[str, str], states: dict[str, str], suffix: str, baseline: str,
            out_dir: Path, unfinished_reason: str | None = None) -> dict[str, dict]:
    """Everything the summary needs, per cell, from ``dvc exp show --json`` and ``dvc queue logs``.
    ``unfinished_reason``: the grid was stopped (SIGINT/SIGTERM): cells still queued or running are ``interrupted``."""
    exps = experiments(exp_show(repo), baseline)
    results: dict[str, dict] = {}
    for L, task in ids.items():
        name = exp_name(L, suffix)
        mine = [e for e in exps if (e["task_id"] or "").startswith(task)] or [e for e in exps if e["name"] == name]
        e = mine[-1] if mine else None
        state = states.get(L, "missing")
        res: dict[str, Any] = {"exp_name": name, "task_id": task, "git_commit": baseline}
        if state == "Success" and e is not None:
            data = e["data"]
            res.update(status="success", exp_rev=e["rev"],
                       params=((data.get("params") or {}).get("params.yaml") or {}).get("data", {}),
                       metrics={Path(k).stem: (v or {}).get("data", {}) for k, v in (data.get("metrics") or {})
                                .items()},
                       val_curves=val_curves(repo, e["rev"]))
            res["manifest_sha256"], res["eval_set_sha256"] = manifest_identity(repo, e["rev"])
        elif state == "Failed":
            reason, log_text = failure_reason(repo, task)
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "logs" / f"{name}.log", log_text)
            res.update(status="failed", reason=reason)
        elif state in ("Queued", "Running") and unfinished_reason:
            res.update(status="interrupted", reason=f"{state.lower()} when {unfinished_reason}")
        elif state in ("Queued", "Running"):
            res.update(status="timed out", reason=f"still {state.lower()} when --timeout passed; killed")
        else:
            res.update(status="missing", reason=f"queue state {state!r}")
        results[L] = res
    return results


