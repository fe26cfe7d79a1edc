"""A view of ``dvc exp show`` that fits a terminal: ``ultraflux exp show``.

``dvc exp show`` prints every param, metric and dependency hash (hundreds of columns); its ``--drop``/``--keep`` take
regexes matched against whole column names, which carry file prefixes where names repeat
(``metrics/dit_stage1.json:final_val_loss``). This view reads ``dvc exp show --json`` instead and prints:

* the default: one row per experiment (and the workspace / baseline commit), the co-design axes and the headline
  numbers under short names (:data:`HEADLINE_COLUMNS`), at most :data:`WIDTH` characters wide;
* ``--changed``: every param and metric whose value differs between the rows, never the dependency hashes.
"""
from __future__ import annotations

import math

import pandas as pd

from ultraflux.tracking import flatten

WIDTH = 120
# short name -> (source, dotted key): the co-design axes (seed Table 1) and the headline numbers of the stages
HEADLINE_COLUMNS: dict[str, tuple[str, str]] = {
    "data": ("params", "data.variant"),
    "objective": ("params", "objective"),
    "rope": ("params", "rope.kind"),
    "s1_val": ("metrics/dit_stage1.json", "final_val_loss"),
    "s2_val": ("metrics/dit_stage2.json", "final_val_loss"),
    "vae_psnr": ("metrics/evaluate.json", "vae.psnr"),
    "glcm": ("metrics/evaluate.json", "generation_mean.glcm_score"),
    "fd8": ("metrics/evaluate.json", "generation_mean.standin_fd_thumb8"),
    "kept": ("metrics/curate.json", "num_kept"),
}
ROPE_SHORT = {"resonance_yarn": "res_yarn"}


def rows_of(show: list[dict]) -> list[dict]:
    """``dvc exp show --json`` -> [{"exp": name, "params": {dotted: value}, "metrics": {file: {dotted: value}}}]."""
    out = []
    for base in show:
        for rev, name in [(base, "workspace" if base.get("rev") == "workspace" else (base.get("rev") or "")[:7]),
                          *(((e.get("revs") or [{}])[0], e.get("name")) for e in base.get("experiments") or [])]:
            data = rev.get("data") or {}
            if not data:
                continue
            params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
            metrics = {f: flatten((m or {}).get("data") or {}) for f, m in (data.get("metrics") or {}).items()}
            out.append({"exp": name or (rev.get("rev") or "")[:7], "params": params, "metrics": metrics})
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(ROPE_SHORT.get(v, v)) if isinstance(v, str) else str(v)


def headline_table(rows: list[dict]) -> pd.DataFrame:
    table = {"exp": [r["exp"] for r in rows]}
    for col, (src, key) in HEADLINE_COLUMNS.items():
        table[col] = [_fmt(r["params"].get(key) if src == "params" else r["metrics"].get(src, {}).get(key))
                      for r in rows]
    return pd.DataFrame(table)


def changed_table(rows: list[dict]) -> pd.DataFrame:
    """Every param (``p:key``) and metric (``<stage>:key``) whose value is not the same in every row."""
    cols: dict[str, list] = {"exp": [r["exp"] for r in rows]}
    keys = sorted({k for r in rows for k in r["params"]})
    for k in keys:
        cols[f"p:{k}"] = [_fmt(r["params"].get(k)) for r in rows]
    files = sorted({f for r in rows for f in r["metrics"]})
    for f in files:
        stage = f.rsplit("/", 1)[-1].removesuffix(".json")
        for k in sorted({k for r in rows for k in r["metrics"].get(f, {})}):
            cols[f"{stage}:{k}"] = [_fmt(r["metrics"].get(f, {}).get(k)) for r in rows]
    df = pd.DataFrame(cols)
    return df[[c for c in df.columns if c == "exp" or df[c].nunique() > 1]]


def render(df: pd.DataFrame) -> str:
    return df.to_string(index=False, max_colwidth=20)
