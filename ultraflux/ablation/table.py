"""The Table-1 summary of the co-design grid: one row per cell, the paper's numbers beside ours, non-additivity.

A cell's ``result`` (built by ``dvc_queue.collect``): ``status`` (success | failed | timed out | missing), optional
``reason``, ``exp_name``, ``exp_rev``, ``git_commit``, ``manifest_sha256``, ``params`` (the cell's params.yaml) and
``metrics`` = {stage: the DVC metrics of metrics/<stage>.json} (numbers only), ``val_curves`` = {stage: [(step,
val_loss), ...]}, ``eval_set_sha256`` (the curated evaluation set's identity, :func:`ultraflux.data.select.
eval_set_sha256`). FID and HPSv3 are numbers only when their weights were configured; otherwise the cell shows why
(from the cell's params), never a number.

Non-additivity (D - C) - (B - A) is a number only for a metric comparable across the cells (:func:`comparability`):
measured on the shared evaluation set (held out before either data variant's filters) with a measure that does not
depend on the cell's objective, and only when every cell's ``eval_set_sha256`` is the same; any other metric says why
it is not comparable instead.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ultraflux.codesign import CELLS, DATASETS, LETTERS, MODEL_LABELS, PAPER, ROLES
from ultraflux.io import atomic_write_text, write_json
from ultraflux.tracking import flatten

LEARNED = {"fid": "evaluate.fid_inception_weights", "hpsv3": "evaluate.hpsv3_weights"}  # metric -> weights key
IDENTITY = ("variant", "role", "dataset", "model_loss", "status", "reason", "fid", "hpsv3", "paper_fid", "paper_hpsv3",
            "exp_name", "exp_rev", "git_commit", "manifest_sha256", "eval_set_sha256")
# Metrics measured on the shared evaluation set with an objective-independent measure (prefix match on stage.metric):
# the DiT validation loss is the velocity MSE (training/validation.py), not the cell's objective; the VAE and
# generation metrics do not involve the objective at all.
COMPARABLE = ("dit_stage1.final_val_loss", "dit_stage2.final_val_loss", "vae.holdout_", "evaluate.")
OBJECTIVE = "not comparable across cells: depends on the objective (SNR-aware Huber wavelet vs latent L2)"
NOT_COMPARABLE = (  # (prefix or suffix match, why), first match wins
    ("val_objective", OBJECTIVE),
    ("dit_stage", OBJECTIVE + " and the data variant (a training loss on its own training images)"),
    ("vae.final_loss", "not comparable across cells: depends on the data variant (a training loss on its own "
                       "training images)"),
    ("curate.", "not a measurement: counts of the data variant's own curation"),
)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def _param(params: dict, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def summary_row(letter: str, result: dict) -> dict[str, Any]:
    """One Table-1 row: identity, FID / HPSv3 (or why not), then every DVC metric of the cell as ``stage.metric``."""
    variant, model = CELLS[letter]
    status = result.get("status", "missing")
    row: dict[str, Any] = {
        "variant": letter, "role": ROLES[letter], "dataset": DATASETS[variant], "model_loss": MODEL_LABELS[model],
        "status": status, "reason": result.get("reason", ""), "exp_name": result.get("exp_name", ""),
        "exp_rev": result.get("exp_rev", ""), "git_commit": result.get("git_commit", ""),
        "manifest_sha256": result.get("manifest_sha256", ""), "eval_set_sha256": result.get("eval_set_sha256", ""),
        "paper_fid": PAPER[letter]["fid"], "paper_hpsv3": PAPER[letter]["hpsv3"],
    }
    metrics = flatten(result.get("metrics") or {}) if status == "success" else {}
    for key, weights_key in LEARNED.items():
        value = metrics.pop(f"evaluate.generation_mean.{key}", None)
        if status != "success":
            row[key] = f"n/a ({status})"
        elif _num(value) is not None:
            row[key] = value
        else:
            row[key] = ("not reported" if _param(result.get("params") or {}, weights_key)
                        else f"not computed (no weights at {weights_key})")
    row.update(sorted(metrics.items()))
    return row


def summary_rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    """Rows in A..D order; a metric one cell lacks reads ``n/a (<status>)`` (failed) or ``not reported``."""
    rows = [summary_row(L, results[L]) for L in LETTERS if L in results]
    for r in rows:
        for c in _columns(rows):
            r.setdefault(c, "not reported" if r["status"] == "success" else f"n/a ({r['status']})")
    return rows


def comparability(key: str) -> str:
    """"" when ``key`` (``stage.metric``) is comparable across the cells, else why not."""
    if key.startswith(COMPARABLE):
        return ""
    return next((why for part, why in NOT_COMPARABLE if key.startswith(part) or key.endswith(part)),
                "not comparable across cells: not measured on the shared evaluation set")


def eval_set_check(rows: list[dict]) -> tuple[bool, str]:
    """(whether every successful cell measured the same evaluation set, the sentence saying so or warning)."""
    done = [r for r in rows if r["status"] == "success"]
    hashes = {r["variant"]: r.get("eval_set_sha256") or "unavailable" for r in done}
    if not done:
        return False, "No cell finished: no evaluation set to compare."
    if len(set(hashes.values())) == 1 and "unavailable" not in hashes.values():
        return True, (f"Evaluation set: every finished cell ({', '.join(hashes)}) measured the same images "
                      f"(eval_set_sha256 {next(iter(hashes.values()))}).")
    return False, ("WARNING: the cells measured different evaluation sets ("
                   + ", ".join(f"{L}: {h[:12]}" for L, h in hashes.items())
                   + "); no metric is compared across them.")


def interaction_cell(rows: list[dict], key: str, same_eval_set: bool) -> str:
    """The (D-C)-(B-A) column of ``key``: a number, blank (a cell lacks it), or why it is not comparable."""
    why = comparability(key) or ("" if same_eval_set else "not comparable: the cells' evaluation sets differ")
    if why:
        return why
    inter = interaction(rows, key) if len(rows) == 4 else None
    return "" if inter is None else f"{inter:+.4g}"


def interaction(rows: list[dict], key: str) -> float | None:
    """Non-additivity of ``key``: (D - C) - (B - A); 0 means the data and model effects simply add up."""
    by = {r["variant"]: _num(r.get(key)) for r in rows}
    if any(by.get(L) is None for L in LETTERS):
        return None
    return (by["D"] - by["C"]) - (by["B"] - by["A"])


def _fmt(v: Any) -> str:
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
              "cell says so, never a number.", ""]
    same, sentence = eval_set_check(rows)
    other = [c for c in _columns(rows) if c not in IDENTITY]
    lines += ["## Every DVC metric of the cells", "", sentence, "",
              "Non-additivity only for the metrics measured on that shared set with an objective-independent measure "
              "(validation velocity MSE, VAE reconstruction, generation metrics); the others say why not.", "",
              "| metric | " + " | ".join(r["variant"] for r in rows) + " | (D-C)-(B-A) |",
              "|---|" + "---|" * (len(rows) + 1)]
    for c in other:
        lines.append(f"| {c} | " + " | ".join(_fmt(r.get(c, "")) for r in rows) + " | "
                     + _fmt(interaction_cell(rows, c, same)) + " |")
    lines += ["", "## Provenance", "", "| variant | DVC experiment | experiment commit | git commit (baseline) | "
              "data manifest sha256 | evaluation set sha256 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {_fmt(r['exp_name'])} | {_fmt(r['exp_rev'])} | {_fmt(r['git_commit'])} | "
                     f"{_fmt(r['manifest_sha256'])} | {_fmt(r['eval_set_sha256'])} |")
    return "\n".join(lines) + "\n"


COLORS = {"A": "#9e9e9e", "B": "#64b5f6", "C": "#ffb74d", "D": "#2e7d32"}
PLOT_PANELS = [("paper_fid", "paper FID ↓ (seed Table 1)"), ("paper_hpsv3", "paper HPSv3 ↑ (seed Table 1)"),
               ("fid", "FID ↓ (ours)"), ("evaluate.generation_mean.glcm_score", "GLCM score (ours, mean over aspects)"),
               ("evaluate.vae.psnr", "VAE PSNR dB (ours)"), ("dit_stage1.final_val_loss", "stage-1 validation loss"),
               ("dit_stage2.final_val_loss", "stage-2 validation loss")]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, PLOT_PANELS):
        ax.set_title(title, fontsize=10)
        for i, r in enumerate(rows):
            v = _num(r.get(key))
            if v is None:
                label = r["status"] if r["status"] != "success" else str(r.get(key, "")).split(" (")[0]
                ax.text(i, 0.5, label.replace(" ", "\n"), ha="center", va="center", fontsize=8, color="#b71c1c",
                        transform=ax.get_xaxis_transform())
            else:
                ax.bar(i, v, color=COLORS[r["variant"]])
                ax.text(i, v, f"{v:.5g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    ax = axes.flat[-1]
    ax.axis("off")
    ax.text(0, 1, "\n".join(f"{r['variant']}: {r['role']}\n   {r['status']}" for r in rows), va="top", fontsize=9,
            transform=ax.transAxes)
    fig.suptitle("UltraFlux 2x2 data-model co-design ablation (seed Table 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_val_curves(results: dict[str, dict], path: Path) -> bool:
    """The validation-loss curves of the cells (one panel per DiT stage); False when no cell has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({s for r in results.values() for s in (r.get("val_curves") or {})})
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for L in LETTERS:
            curve = (results.get(L, {}).get("val_curves") or {}).get(stage)
            if curve:
                steps, values = zip(*curve)
                ax.plot(steps, values, "o-", color=COLORS[L], label=f"{L} ({ROLES[L]})")
        ax.set_title(f"{stage}: validation loss (held-out, fixed sigmas and noise)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_summary(results: dict[str, dict], out_dir: Path) -> tuple[list[dict], dict[str, Path]]:
    rows = summary_rows(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "table1.csv", "md": out_dir / "table1.md", "png": out_dir / "table1.png",
             "json": out_dir / "summary.json"}
    to_csv(rows, paths["csv"])
    atomic_write_text(paths["md"], to_markdown(rows))
    plot(rows, paths["png"])
    if plot_val_curves(results, out_dir / "val_loss.png"):
        paths["val_png"] = out_dir / "val_loss.png"
    same, sentence = eval_set_check(rows)
    non_additivity = {c: interaction_cell(rows, c, same) for c in _columns(rows) if c not in IDENTITY}
    write_json(paths["json"], {"rows": rows, "results": results, "same_eval_set": same, "eval_set": sentence,
                               "non_additivity": non_additivity})
    return rows, paths
