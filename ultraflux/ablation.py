"""The 2x2 data-model co-design ablation (seed Table 1) as four DVC experiments, run and summarised by one command.

    ultraflux ablation [-j JOBS] [--timeout S] [--out outputs/ablation] [-S KEY=VALUE ...] [--suffix TAG]

  A  baseline      Diffusion-4K recipe (data.variant=baseline)    + Flux, latent L2 (objective=l2, rope.kind=flux)
  B  data only     MultiAspect recipe  (data.variant=multiaspect) + Flux, latent L2
  C  model only    Diffusion-4K recipe                            + UltraFlux (objective=ultraflux,
                                                                               rope.kind=resonance_yarn)
  D  co-design     MultiAspect recipe                             + UltraFlux

Steps: (1) remove earlier experiments of the same names on this commit (MLflow keeps their runs), (2) queue the four
cells with ``dvc exp run --queue -n co-design-<L> -S ...`` in the order A, B, C, D, (3) ``dvc queue start -j JOBS``,
(4) poll ``dvc queue status`` until all four tasks ended or ``--timeout`` passed (then the unfinished ones are killed),
(5) read everything back from ``dvc exp show --json`` and ``dvc queue logs`` and write the Table-1 summary (CSV,
Markdown, PNG) and log it to MLflow.

Shared stages are not recomputed: DVC's run cache restores a stage whose command, deps and params were already run, so
curate/vae run once per dataset variant (A computes them for ``baseline``, B for ``multiaspect``; C and D restore
them). With ``-j 2`` the FIFO order A, B, C, D keeps that property; with ``-j 3`` or more C can start before A has
finished curating and then computes the same stages again (correct, only slower).

MLflow: each cell is a parent run of the pipeline (``ultraflux.tracking``); ``run_tags`` adds ``ablation=co-design``
and ``variant=<L>`` from the DVC experiment name (:func:`ablation_tags`; DVC sets ``DVC_EXP_NAME`` in every stage of
a queued experiment). The name is the marker rather than an environment variable because a queue worker that is
already running would not see a variable set for ``dvc queue start``, and other experiments in the same queue must not
be tagged. The summary step then completes each cell's parent run (experiment commit, data manifest sha256, status,
the final metrics so the UI's compare view shows them side by side) and creates it if no stage ran at all (every
stage restored from the run cache, or the cell failed before its first stage).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

PREFIX = "co-design"
ABLATION_TAG = "co-design"
LETTERS = ("A", "B", "C", "D")
DATASETS = {"baseline": "Diffusion-4K recipe (data.variant=baseline)",
            "multiaspect": "MultiAspect recipe (data.variant=multiaspect)"}
MODELS: dict[str, dict[str, str]] = {
    "flux_l2": {"objective": "l2", "rope.kind": "flux"},
    "ultraflux": {"objective": "ultraflux", "rope.kind": "resonance_yarn"},
}
MODEL_LABELS = {"flux_l2": "Flux, latent L2", "ultraflux": "UltraFlux (SNR-aware Huber wavelet + Resonance RoPE-YaRN)"}
CELLS: dict[str, tuple[str, str]] = {  # letter -> (data.variant, model)
    "A": ("baseline", "flux_l2"),
    "B": ("multiaspect", "flux_l2"),
    "C": ("baseline", "ultraflux"),
    "D": ("multiaspect", "ultraflux"),
}
ROLES = {"A": "baseline", "B": "data only", "C": "model only", "D": "data + model"}
# Seed Table 1, for reference beside our numbers.
PAPER = {
    "A": {"dataset": "Diffusion-4K-v2", "model": "Flux, latent L2", "fid": 152.09, "hpsv3": 8.57},
    "B": {"dataset": "MultiAspect-4K-1M", "model": "Flux, latent L2", "fid": 151.41, "hpsv3": 9.17},
    "C": {"dataset": "Diffusion-4K-v2", "model": "UltraFlux", "fid": 147.41, "hpsv3": 10.03},
    "D": {"dataset": "MultiAspect-4K-1M", "model": "UltraFlux", "fid": 145.81, "hpsv3": 10.78},
}
NAME_RE = re.compile(rf"^{re.escape(PREFIX)}-([ABCD])(?:-([A-Za-z0-9][A-Za-z0-9._]*))?$")
MANIFEST = "manifest.parquet"
CURATED = "outputs/curated"


# ----------------------------------------------------------------------------------------------- names and tags
def exp_name(letter: str, suffix: str = "") -> str:
    return f"{PREFIX}-{letter}" + (f"-{suffix}" if suffix else "")


def cell_sets(letter: str) -> list[str]:
    """The ``-S`` overrides that make params.yaml the cell ``letter`` (data side and model side)."""
    variant, model = CELLS[letter]
    return [f"data.variant={variant}", *(f"{k}={v}" for k, v in MODELS[model].items())]


def model_of(params: dict) -> str:
    """``flux_l2`` / ``ultraflux`` when objective and rope.kind form one of the paper's two model sides, else mixed."""
    got = {"objective": str(params.get("objective")), "rope.kind": str((params.get("rope") or {}).get("kind"))}
    return next((m for m, want in MODELS.items() if want == got), "mixed")


def cell_of(params: dict) -> str | None:
    """The Table 1 letter that ``params`` are, or None (e.g. objective=l2 with resonance RoPE)."""
    key = (str((params.get("data") or {}).get("variant")), model_of(params))
    return next((L for L, cell in CELLS.items() if cell == key), None)


def ablation_tags(params: dict, exp: str | None) -> dict[str, str]:
    """Tags for ``tracking.run_tags``: non-empty only for experiments named ``co-design-<L>[-suffix]``."""
    m = NAME_RE.match(exp or "")
    if not m:
        return {}
    tags = {"ablation": ABLATION_TAG, "variant": m.group(1), "ablation.model": model_of(params),
            "ablation.dataset": str((params.get("data") or {}).get("variant"))}
    if cell_of(params) != m.group(1):  # e.g. a --set-variant override moved this cell off the grid
        tags["ablation.params_match"] = "false"
    return tags


# ----------------------------------------------------------------------------------------------- summary (pure)
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def _aggregate(values: list[Any]) -> Any:
    """Mean over aspect ratios when every value is a number; else the first explanation string (never invented)."""
    nums = [_num(v) for v in values]
    if values and all(n is not None for n in nums):
        return sum(nums) / len(nums)
    strings = [v for v in values if isinstance(v, str)]
    return strings[0] if strings else "not reported"


def summary_row(letter: str, result: dict) -> dict[str, Any]:
    """One Table-1 row from one cell's result.

    ``result``: ``status`` (success | failed | timed out | queued | running | missing), optional ``reason``,
    ``exp_name``, ``exp_rev``, ``git_commit``, ``manifest_sha256`` and ``metrics`` = {"evaluate": {...}, "vae": {...},
    ...} (the metrics/<stage>.json contents).
    """
    variant, model = CELLS[letter]
    m = result.get("metrics") or {}
    ev, vae = m.get("evaluate") or {}, m.get("vae") or {}
    gen = ev.get("generation") or {}
    aspects = sorted(gen)
    row: dict[str, Any] = {
        "variant": letter, "role": ROLES[letter], "dataset": DATASETS[variant], "model_loss": MODEL_LABELS[model],
        "status": result.get("status", "missing"), "reason": result.get("reason", ""),
        "exp_name": result.get("exp_name", ""), "exp_rev": result.get("exp_rev", ""),
        "git_commit": result.get("git_commit", ""), "manifest_sha256": result.get("manifest_sha256", ""),
        "paper_fid": PAPER[letter]["fid"], "paper_hpsv3": PAPER[letter]["hpsv3"],
    }
    ok = row["status"] == "success"
    na = f"n/a ({row['status']})"
    for key in ("fid", "hpsv3"):
        row[key] = _aggregate([gen[a].get(key, "not reported") for a in aspects]) if ok and aspects else na
    # every other generation metric evaluate.json reports (learned scorers, stand-ins, GLCM, compression ratio):
    # the mean over aspect ratios, then one column per aspect ratio
    seen = {k for a in aspects for k in gen[a]} - {"fid", "hpsv3", "num_images"}
    keys = [k for k in ("glcm_score", "compression_ratio") if k in seen] + sorted(
        seen - {"glcm_score", "compression_ratio"}) if ok else ["glcm_score", "compression_ratio"]
    for key in keys:
        row[f"{key}_mean"] = _aggregate([gen[a].get(key, "not reported") for a in aspects]) if ok and aspects else na
        for a in aspects:
            row[f"{key}_{a}"] = gen[a].get(key, "not reported") if ok else na
    for key in ("psnr", "ssim", "nmse", "lpips", "rfid"):
        row[f"vae_{key}"] = (ev.get("vae") or {}).get(key, "not reported") if ok else na
    row["vae_train_final_loss"] = vae.get("final_loss", "not reported") if ok else na
    for stage in ("dit_stage1", "dit_stage2"):
        row[f"{stage}_final_loss"] = (m.get(stage) or {}).get("final_loss", "not reported") if ok else na
    row["curate_num_kept"] = (m.get("curate") or {}).get("num_kept", "not reported") if ok else na
    return row


def summary_rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    return [summary_row(L, results.get(L, {"status": "missing", "reason": "not run"})) for L in LETTERS if
            L in results]


def interaction(rows: list[dict], key: str) -> float | None:
    """Non-additivity of ``key``: (D - C) - (B - A); 0 means the data and model effects simply add up."""
    by = {r["variant"]: _num(r.get(key)) for r in rows}
    if any(by.get(L) is None for L in LETTERS):
        return None
    return (by["D"] - by["C"]) - (by["B"] - by["A"])


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def to_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_columns(rows), restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def to_markdown(rows: list[dict], title: str = "Data-model co-design ablation (seed Table 1)") -> str:
    lines = [f"# {title}", "",
             "| Variant | Dataset | Model / Loss | FID ↓ | HPSv3 ↑ | paper FID ↓ | paper HPSv3 ↑ | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append("| " + " | ".join(_fmt(x) for x in (f"{r['variant']} ({r['role']})", r["dataset"], r["model_loss"],
                                                         r["fid"], r["hpsv3"], r["paper_fid"], r["paper_hpsv3"],
                                                         status)) + " |")
    paper_i = {k: (PAPER["D"][k] - PAPER["C"][k]) - (PAPER["B"][k] - PAPER["A"][k]) for k in ("fid", "hpsv3")}
    lines += ["", "Paper: non-additivity (D - C) - (B - A): FID "
              f"{paper_i['fid']:+.2f}, HPSv3 {paper_i['hpsv3']:+.2f}. FID and HPSv3 are computed only with their "
              "weights configured (`evaluate.fid_inception_weights`, `evaluate.hpsv3_weights`); otherwise the "
              "cell shows the reason from metrics/evaluate.json, never a number.", ""]
    other = [c for c in _columns(rows) if c not in (
        "variant", "role", "dataset", "model_loss", "status", "reason", "fid", "hpsv3", "paper_fid", "paper_hpsv3",
        "exp_name", "exp_rev", "git_commit", "manifest_sha256")]
    lines += ["## Other metrics", "", "| metric | " + " | ".join(r["variant"] for r in rows) + " | (D-C)-(B-A) |",
              "|---|" + "---|" * (len(rows) + 1)]
    for c in other:
        inter = interaction(rows, c) if len(rows) == 4 else None
        lines.append(f"| {c} | " + " | ".join(_fmt(r.get(c, "")) for r in rows) + " | "
                     + ("" if inter is None else f"{inter:+.4g}") + " |")
    lines += ["", "## Provenance", "", "| variant | DVC experiment | experiment commit | git commit (baseline) | "
              "data manifest sha256 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {_fmt(r['exp_name'])} | {_fmt(r['exp_rev'])} | {_fmt(r['git_commit'])} | "
                     f"{_fmt(r['manifest_sha256'])} |")
    return "\n".join(lines) + "\n"


PLOT_PANELS = [("paper_fid", "paper FID ↓ (seed Table 1)"), ("paper_hpsv3", "paper HPSv3 ↑ (seed Table 1)"),
               ("fid", "FID ↓ (ours)"), ("glcm_score_mean", "GLCM score (ours, mean over aspects)"),
               ("compression_ratio_mean", "compression ratio (ours, mean)"), ("vae_psnr", "VAE PSNR dB (ours)"),
               ("dit_stage2_final_loss", "DiT stage-2 final loss (ours)")]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    colors = {"A": "#9e9e9e", "B": "#64b5f6", "C": "#ffb74d", "D": "#2e7d32"}
    for ax, (key, title) in zip(axes.flat, PLOT_PANELS):
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(rows):
            v = _num(r.get(key))
            if v is None:
                label = r["status"] if r["status"] != "success" else str(r.get(key, "")).split(" (")[0]
                ax.text(i, 0.5, label.replace(" ", "\n"), ha="center", va="center", fontsize=8, color="#b71c1c",
                        transform=ax.get_xaxis_transform())
            else:
                ax.bar(i, v, color=colors[r["variant"]])
                ax.text(i, v, f"{v:.5g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    ax = axes.flat[-1]
    ax.axis("off")
    ax.text(0, 1, "\n".join(f"{r['variant']}: {r['role']}\n   {r['status']}" for r in rows), va="top", fontsize=9,
            transform=ax.transAxes)
    fig.suptitle("UltraFlux 2x2 data-model co-design ablation (seed Table 1)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_summary(results: dict[str, dict], out_dir: Path) -> tuple[list[dict], dict[str, Path]]:
    rows = summary_rows(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "table1.csv", "md": out_dir / "table1.md", "png": out_dir / "table1.png",
             "json": out_dir / "summary.json"}
    to_csv(rows, paths["csv"])
    paths["md"].write_text(to_markdown(rows))
    plot(rows, paths["png"])
    paths["json"].write_text(json.dumps({"rows": rows, "results": results}, indent=2, sort_keys=True, default=str)
                             + "\n")
    return rows, paths


# ----------------------------------------------------------------------------------------------- DVC driving
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


def queue_status(repo: Path) -> dict[str, tuple[str, str]]:
    return parse_queue_status(_dvc(["queue", "status"], repo).stdout)[0]


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
    return json.loads(_dvc(["exp", "show", "--json"], repo, timeout=900).stdout)


def _experiments(show: list[dict], baseline: str) -> list[dict]:
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
    for e in _experiments(exp_show(repo), baseline):
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
                per_cell: dict[str, list[str]]) -> dict[str, str]:
    """Queue one experiment per cell; returns {letter: short task id}."""
    before = set(queue_status(repo))
    ids: dict[str, str] = {}
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


def wait(repo: Path, ids: dict[str, str], timeout: float, poll: float, jobs: int = 1, log=print) -> dict[str, str]:
    """Poll ``dvc queue status`` until every task is Success/Failed or ``timeout`` seconds passed. Should every
    worker be gone while our tasks are still queued (a worker died, or another user's ``dvc queue stop``), new
    workers are started."""
    t0, last, idle_polls = time.time(), None, 0
    while True:
        st, workers = parse_queue_status(_dvc(["queue", "status"], repo).stdout)
        states = {L: st.get(t, ("", "missing"))[1] for L, t in ids.items()}
        idle_polls = idle_polls + 1 if workers == 0 and "Queued" in states.values() else 0
        if idle_polls >= 3:
            log("[ablation] no queue worker left while experiments are queued; starting workers again")
            start_workers(repo, jobs)
            idle_polls = 0
        if states != last:
            log(f"[ablation] {time.time() - t0:6.0f}s  " + "  ".join(f"{L}:{s}" for L, s in states.items()))
            last = states
        if all(s in ("Success", "Failed", "missing") for s in states.values()):
            return states
        if time.time() - t0 > timeout:
            return states
        time.sleep(poll)


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


def manifest_sha256(repo: Path, curated_hash: str | None) -> str:
    """sha256 of outputs/curated/manifest.parquet of an experiment, read from the DVC cache via its .dir object."""
    if not curated_hash or not curated_hash.endswith(".dir"):
        return "unavailable"
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    try:
        listing = json.loads((cache / curated_hash[:2] / curated_hash[2:]).read_text())
        md5 = next(e["md5"] for e in listing if e["relpath"] == MANIFEST)
        h = hashlib.sha256()
        with open(cache / md5[:2] / md5[2:], "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except (OSError, StopIteration, ValueError, KeyError):
        return "unavailable"


def collect(repo: Path, ids: dict[str, str], states: dict[str, str], suffix: str, baseline: str,
            out_dir: Path) -> dict[str, dict]:
    """Everything the summary needs, per cell, from ``dvc exp show --json`` and ``dvc queue logs``."""
    exps = _experiments(exp_show(repo), baseline)
    results: dict[str, dict] = {}
    for L, task in ids.items():
        name = exp_name(L, suffix)
        mine = [e for e in exps if (e["task_id"] or "").startswith(task)] or [e for e in exps if e["name"] == name]
        e = mine[-1] if mine else None
        state = states.get(L, "missing")
        res: dict[str, Any] = {"exp_name": name, "task_id": task, "git_commit": baseline}
        if state == "Success" and e is not None:
            data = e["data"]
            res.update(status="success", exp_rev=e["rev"], params=(data.get("params") or {}).get("params.yaml", {})
                       .get("data", {}),
                       metrics={Path(k).stem: (v or {}).get("data", {}) for k, v in (data.get("metrics") or {})
                                .items()},
                       manifest_sha256=manifest_sha256(repo, ((data.get("outs") or {}).get(CURATED) or {})
                                                      .get("hash")))
        elif state == "Failed":
            reason, log_text = failure_reason(repo, task)
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            (out_dir / "logs" / f"{name}.log").write_text(log_text)
            res.update(status="failed", reason=reason)
        elif state in ("Queued", "Running"):
            res.update(status="timed out", reason=f"still {state.lower()} when --timeout passed; killed")
        else:
            res.update(status="missing", reason=f"queue state {state!r}")
        results[L] = res
    return results


# ----------------------------------------------------------------------------------------------- MLflow
def log_to_mlflow(repo: Path, results: dict[str, dict], rows: list[dict], paths: dict[str, Path], t_start: float,
                  experiment: str, invocation: str) -> dict[str, str]:
    """Complete (or create) each cell's parent run and log the summary run; returns {letter: parent run id}."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    from ultraflux import tracking

    os.environ.setdefault("DVC_ROOT", str(repo))
    client = MlflowClient(tracking.tracking_uri())
    exp_id = tracking._experiment_id(client, experiment)
    run_ids: dict[str, str] = {}
    ts = int(time.time() * 1000)
    for row in rows:
        L = row["variant"]
        res = results[L]
        name = res["exp_name"]
        found = client.search_runs(
            [exp_id], filter_string=f"tags.dvc_exp_name = '{name}' and tags.`{tracking.ROLE_TAG}` = 'parent' and "
                                    f"attributes.start_time >= {int(t_start * 1000)}",
            order_by=["attributes.start_time DESC"], max_results=1)
        tags = {"ablation": ABLATION_TAG, "variant": L, "dvc_exp_name": name, "git_commit": res.get("git_commit", ""),
                "dvc_exp_rev": res.get("exp_rev", ""), "data.manifest_sha256": res.get("manifest_sha256", ""),
                "ablation.status": res["status"], "ablation.reason": res.get("reason", "")[:4000],
                "ablation.invocation": invocation, "data.variant": CELLS[L][0], "ablation.model": CELLS[L][1]}
        if found:
            run_id = found[0].info.run_id
        else:  # no stage ran in this invocation: all restored from the run cache, or failed before the first stage
            run = client.create_run(exp_id, run_name=name, tags={tracking.ROLE_TAG: "parent", MLFLOW_RUN_NAME: name,
                                                                 "ultraflux.restored": "run-cache"
                                                                 if res["status"] == "success" else "none"})
            run_id = run.info.run_id
            if res.get("params"):
                tracking.StageLogger(client, run_id).log_params(res["params"])
            client.set_terminated(run_id, status="FINISHED" if res["status"] == "success" else "FAILED")
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
        metrics = [Metric(f"ablation.{k}", v, ts, 0) for k, v in row.items() if _num(v) is not None]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        run_ids[L] = run_id
    summary = client.create_run(exp_id, run_name=f"{PREFIX}-summary", tags={
        "ablation": ABLATION_TAG, tracking.ROLE_TAG: "summary", "ablation.invocation": invocation,
        "git_commit": next((r.get("git_commit") for r in results.values()), ""),
        MLFLOW_RUN_NAME: f"{PREFIX}-summary",
        **{f"ablation.status.{L}": r["status"] for L, r in results.items()},
        **{f"ablation.run.{L}": rid for L, rid in run_ids.items()}})
    sid = summary.info.run_id
    client.log_batch(sid, params=[Param(f"exp_name.{L}", r["exp_name"]) for L, r in results.items()])
    batch = [Metric(f"{row['variant']}.{k}", v, ts, 0) for row in rows for k, v in row.items()
             if _num(v) is not None]
    for i in range(0, len(batch), 500):
        client.log_batch(sid, metrics=batch[i:i + 500])
    for p in paths.values():
        client.log_artifact(sid, str(p))
    if (paths["csv"].parent / "logs").is_dir():
        client.log_artifacts(sid, str(paths["csv"].parent / "logs"), "logs")
    failed = any(r["status"] != "success" for r in results.values())
    client.set_terminated(sid, status="FAILED" if failed else "FINISHED")
    run_ids["summary"] = sid
    return run_ids


# ----------------------------------------------------------------------------------------------- command
def _parse_cell_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        letter, sep, kv = item.partition(":")
        if not sep or letter not in CELLS or "=" not in kv:
            raise SystemExit(f"--set-variant expects LETTER:KEY=VALUE with LETTER in ABCD, got {item!r}")
        out.setdefault(letter, []).append(kv)
    return out


def run_ablation(repo: Path, jobs: int = 1, timeout: float = 7200, poll: float = 10, out: str = "outputs/ablation",
                 suffix: str = "", common: list[str] | None = None, per_cell: dict[str, list[str]] | None = None,
                 letters: str = "ABCD", mlflow: bool = True, log=print) -> tuple[int, dict[str, dict], list[dict]]:
    from ultraflux.config import load_params

    repo = Path(repo).resolve()
    if suffix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", suffix):
        raise SystemExit(f"--suffix must be letters, digits, '.' or '_' (got {suffix!r})")
    try:
        baseline = _git(["rev-parse", "HEAD"], repo)
    except subprocess.CalledProcessError:
        raise SystemExit("ultraflux ablation: DVC experiments need a git commit; commit the project first")
    params = load_params(repo / "params.yaml")
    letters = [L for L in LETTERS if L in letters]
    names = [exp_name(L, suffix) for L in letters]
    out_dir = repo / out
    t_start = time.time()
    invocation = time.strftime("%Y%m%d-%H%M%S", time.localtime(t_start))
    log(f"[ablation] commit {baseline[:12]}: queueing {', '.join(names)}")
    prepare_names(repo, names, baseline)
    ids = queue_cells(repo, letters, suffix, common or [], per_cell or {})
    start_workers(repo, jobs)
    states = wait(repo, ids, timeout, poll, jobs, log)
    unfinished = [t for L, t in ids.items() if states.get(L) in ("Queued", "Running")]
    if unfinished:
        log(f"[ablation] --timeout {timeout:.0f}s passed; killing {', '.join(unfinished)}")
        for L, t in ids.items():
            if states.get(L) in ("Queued", "Running"):
                _dvc(["queue", "kill" if states[L] == "Running" else "remove", t], repo, check=False)
    wall = time.time() - t_start
    shutil.rmtree(out_dir / "logs", ignore_errors=True)  # failure logs of an earlier invocation
    results = collect(repo, ids, states, suffix, baseline, out_dir)
    rows, paths = write_summary(results, out_dir)
    (out_dir / "timing.json").write_text(json.dumps({"wall_time_s": round(wall, 1), "jobs": jobs}) + "\n")
    paths["timing"] = out_dir / "timing.json"
    if mlflow:
        experiment = (params.get("tracking") or {}).get("experiment", "ultraflux")
        run_ids = log_to_mlflow(repo, results, rows, paths, t_start, experiment, invocation)
        log(f"[ablation] MLflow: experiment {experiment!r}, summary run {run_ids['summary']}")
    for r in rows:
        log(f"[ablation] {r['variant']} {r['exp_name']}: {r['status']}" + (f" ({r['reason']})" if r['reason'] else ""))
    log(f"[ablation] {wall:.0f}s; summary: {paths['md'].relative_to(repo)}, {paths['csv'].relative_to(repo)}, "
        f"{paths['png'].relative_to(repo)}")
    code = 0 if all(r["status"] == "success" for r in results.values()) else (3 if unfinished else 1)
    return code, results, rows


def cli_ablation(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="ultraflux ablation",
        description="Run the 2x2 data-model co-design ablation (seed Table 1) as four queued DVC experiments "
                    "co-design-A..D, wait for them, and write the Table-1 summary (CSV, Markdown, PNG; logged to "
                    "MLflow). Exit status: 0 all four succeeded, 1 some failed, 3 --timeout passed.")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1; 2 keeps the "
                    "run-cache sharing of curate/vae, more may recompute them)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds to wait for the four experiments; "
                    "unfinished ones are then killed and reported (default 7200)")
    ap.add_argument("--poll", type=float, default=10, help="seconds between `dvc queue status` polls (default 10)")
    ap.add_argument("--out", default="outputs/ablation", help="summary folder (default outputs/ablation)")
    ap.add_argument("--suffix", default="", help="name the experiments co-design-<L>-SUFFIX (keeps an earlier "
                    "grid of the plain names); re-running with the same names replaces those experiments")
    ap.add_argument("-S", "--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="extra params override for all four cells, as `dvc exp run -S` (repeatable)")
    ap.add_argument("--set-variant", action="append", default=[], metavar="L:KEY=VALUE",
                    help="params override for one cell only, e.g. B:dit_stage1.steps=100 (repeatable)")
    ap.add_argument("--variants", default="ABCD", help="subset of cells to run (default ABCD)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the summary to MLflow")
    ap.add_argument("--repo", default=".", help="repository root (default: current directory)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if not set(args.variants) <= set(LETTERS) or not args.variants:
        ap.error("--variants must be letters from ABCD")
    try:
        code, _, _ = run_ablation(Path(args.repo), jobs=args.jobs, timeout=args.timeout, poll=args.poll,
                                  out=args.out, suffix=args.suffix, common=args.common,
                                  per_cell=_parse_cell_sets(args.set_variant), letters=args.variants,
                                  mlflow=not args.no_mlflow)
    except DvcError as e:
        print(f"ultraflux ablation: {e}", file=sys.stderr)
        return 2
    return code
