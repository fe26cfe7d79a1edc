"""The run report: one self-contained HTML file (images embedded) a person opens after `dvc repro`."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ultraflux.io import atomic_path, sha256_json

STAGES = ["curate", "vae", "diagnostics", "dit_stage1", "dit_stage2", "sample", "evaluate", "judge", "report"]


def _img(path: Path, width: int = 480) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" width="{width}"><figcaption>{html.escape(path.name)}' \
           f'</figcaption></figure>'


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p><em>no data</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(d: dict) -> str:
    """A one-record dict as a two-column table (wide records stay readable)."""
    return _table([{"metric": k, "value": v} for k, v in d.items() if not isinstance(v, dict)])


def _split_learned(row: dict) -> dict:
    """Collapse the 'not computed (no weights at ...)' entries of a metrics row into one column."""
    missing = [k for k, v in row.items() if isinstance(v, str) and v.startswith("not computed")]
    out = {k: v for k, v in row.items() if k not in missing}
    if missing:
        out["not computed (no local weights)"] = ", ".join(missing)
    return out


def _load(metrics_dir: Path, stage: str) -> dict:
    p = metrics_dir / f"{stage}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def write_report(params: dict, metrics_dir: Path, outputs: Path, out_path: Path, timings_dir: Path = Path("timings")) -> Path:
    m = {s: _load(metrics_dir, s) for s in STAGES}
    t = {s: _load(timings_dir, s) for s in STAGES}
    parts = ["<html><head><meta charset='utf-8'><title>UltraFlux run report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 8px}figure{display:inline-block;margin:4px}</style></head><body>",
             "<h1>UltraFlux run report</h1>",
             f"<p>params digest <code>{sha256_json(params)[:16]}</code> &middot; data.variant "
             f"<b>{html.escape(str(params['data']['variant']))}</b> &middot; objective <b>{params['objective']}</b>"
             f" &middot; rope.kind <b>{params['rope']['kind']}</b> &middot; seed {params['seed']}</p>"]

    parts.append("<h2>Curation (seed Sec. 2.1)</h2>")
    parts.append(_kv(m["curate"]))
    for png in sorted((outputs / "curated" / "plots").glob("*.png")):
        parts.append(_img(png, 420))

    vae = m["evaluate"].get("vae", {})
    parts.append("<h2>VAE reconstruction (seed Table 2 columns)</h2>")
    parts.append(_table([_split_learned({"model": "this run's F16 VAE", **vae})]))
    parts.append("<p>Paper (Aesthetic-4K@4096): UltraFlux-F16-VAE rFID 0.547, NMSE 0.00657, PSNR 30.70, SSIM 0.852, "
                 "LPIPS 0.102.</p>")

    parts.append("<h2>Generation per aspect ratio (seed Table 5 columns + Diffusion-4K detail metrics)</h2>")
    gen = m["evaluate"].get("generation", {})
    parts.append(_table([_split_learned({"aspect": a.replace("x", ":"), **v}) for a, v in gen.items()]))

    parts.append("<h2>Samples (stage 2 model; seed/prompt fixed)</h2>")
    for grid in sorted((outputs / "samples" / "dit_stage2").glob("grid_*.png")):
        parts.append(f"<h3>{grid.stem[5:].replace('x', ':')}</h3>" + _img(grid, 900))

    parts.append("<h2>Diagnostics (seed Figs. 1-3)</h2>")
    parts.append(_kv(m["diagnostics"]) if m["diagnostics"] else "<p><em>not run</em></p>")
    for png in sorted((outputs / "diagnostics").glob("*.png")):
        parts.append(_img(png, 560))

    parts.append("<h2>Gemini pairwise preference (seed Sec. 11): stage 2 (A) vs stage 1 (B)</h2>")
    parts.append(_kv(m["judge"]) if m["judge"] else "<p><em>not run</em></p>")

    parts.append("<h2>Training</h2>")
    parts.append(_table([{"stage": s, **{k: v for k, v in m[s].items() if not isinstance(v, dict)}}
                         for s in ("vae", "dit_stage1", "dit_stage2")]))
    parts.append("<h2>Per-stage wall time (s)</h2>")
    parts.append("<p>From the last execution of each stage in this workspace (DVC skips unchanged stages).</p>")
    parts.append(_table([{"stage": s, **(t[s] or {"wall_time_s": "not run here"})} for s in STAGES[:-1]]))
    parts.append("</body></html>")
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text("\n".join(parts))
    return out_path
