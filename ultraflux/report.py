"""The run report: one self-contained HTML file (every picture embedded, nothing fetched) a researcher opens first.

Sections, in reading order: what this run is (experiment, commit, data source, the params that differ from the
committed params.yaml), the headline numbers, the training curves (VAE loss and held-out PSNR, DiT loss and
validation loss per timestep), curation (counts per reason, kept and rejected examples with their scores, the
statistics' histograms), the VAE (reconstruction metrics, input vs reconstruction crops), the samples with their
prompts, the generation metrics per aspect ratio, the diagnostics (seed Figs. 1-3), the Gemini judge, stage times.

It reads only files: ``outputs/results/<stage>.json`` (what each stage returned), ``metrics/<stage>.json`` (DVC
metrics), the loss / validation CSVs, the curated manifest and shards (example thumbnails; rejected ones from the
source files), ``outputs/evaluate/recon``, ``outputs/samples``
and ``outputs/diagnostics``. A missing part says "not run" instead of failing the report.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ultraflux.io import atomic_path

STAGES = ["download", "curate", "vae", "diagnostics", "dit_stage1", "dit_stage2", "sample", "evaluate", "judge", "report"]
THUMB = 384          # px, long side of an embedded sample / example thumbnail
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
       "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
       "figure{display:inline-block;margin:4px;vertical-align:top}"
       "figcaption{font-size:12px;color:#333;max-width:400px}h2{border-bottom:1px solid #ddd;padding-top:.6em}.muted{color:#777}"
       ".scroll{overflow-x:auto;max-width:100%}.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:6px 10px}")
FEW_IMAGES = 5       # a metric over fewer images than this gets a warning: too few to compare runs by


# ----------------------------------------------------------------------------------------------- html helpers
def _esc(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _esc(v)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p class='muted'>no data</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _kv(d: dict) -> str:
    return _table([{"key": k, "value": v} for k, v in d.items() if v is not None])


def _few(count, what: str) -> str:
    """A warning when a metric rests on fewer than FEW_IMAGES images."""
    if isinstance(count, int) and count < FEW_IMAGES:
        return (f"<p class='warn'>{_esc(what)} rest on {count} image"
                f"{'' if count == 1 else 's'}: too few to compare runs by (more held-out images: data.source, "
                f"curate.holdout_fraction).</p>")
    return ""


def _expectations(params: dict) -> str:
    """What the run can show: the embedded profile's tiny random-init models produce no recognisable images."""
    model = params["model"]
    if model["pretrained"] or model["vae_pretrained"]:
        return ""
    return ("<p class='warn'><b>Embedded CPU profile.</b> The transformer and the VAE are tiny random-initialised "
            f"models trained for {params['vae_train']['steps']} (VAE) and {params['dit_stage1']['steps']} + "
            f"{params['dit_stage2']['steps']} (DiT) steps on a few generated images. Expect the samples to look like "
            "coloured noise and the VAE reconstructions like blurred grey patches: that is what models of this size "
            "and training produce, not a fault. The run shows that every stage works end to end and that its "
            "numbers are reproducible; for images, point model.pretrained / model.vae_pretrained at local weights "
            "and apply configs/paper-4k.yaml (README).</p>")


def _data_uri(image, fmt: str = "JPEG", long_side: int | None = THUMB) -> str:
    """A PIL image (or path) as a data: URI, downscaled so the report stays small whatever the image size."""
    from PIL import Image

    im = Image.open(image) if isinstance(image, (str, Path)) else image
    im = im.convert("RGB")
    if long_side and max(im.size) > long_side:
        im.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=88) if fmt == "JPEG" else im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _figure(image, caption: str = "", width: int | None = None, fmt: str = "JPEG",
            long_side: int | None = THUMB) -> str:
    w = f" width='{width}'" if width else ""
    return (f"<figure><img src='{_data_uri(image, fmt, long_side)}'{w}>"
            f"<figcaption>{caption}</figcaption></figure>")


def _plot(draw, width: float = 6.0, height: float = 3.6) -> str:
    """Run ``draw(ax)`` on a fresh matplotlib figure; the PNG, embedded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")   # legends sit beside the axes, not over the data
    plt.close(fig)
    buf.seek(0)
    return _figure(Image.open(buf), fmt="PNG", long_side=None)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------- header
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def committed_params(params_path: Path = Path("params.yaml")) -> dict | None:
    """params.yaml as committed at HEAD (None outside git), completed with the schema's defaults as this run's params
    are (so a key both leave to the schema is no difference); as written when this schema refuses it."""
    from ultraflux.config import ParamsError, parse_yaml, validate

    proc = subprocess.run(["git", "show", f"HEAD:{params_path.as_posix()}"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    committed = parse_yaml(proc.stdout)
    try:
        return validate(committed, f"HEAD:{params_path.as_posix()}", check_paths=False)
    except ParamsError:
        return committed


def params_diff(params: dict, committed: dict | None) -> list[dict]:
    if committed is None:
        return []
    now, then = _flatten(params), _flatten(committed)
    return [{"param": k, "committed": then.get(k, "(absent)"), "this run": now.get(k, "(absent)")}
            for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]


def _header(params: dict) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    data = params["data"]
    source = data["source"] or (f"generated procedural set ({data['synthetic']['num_images']} images, long side "
                                f"{data['synthetic']['long_side']} px)")
    exp = os.environ.get("DVC_EXP_NAME") or "workspace (dvc repro)"
    diff = params_diff(params, committed_params())
    rows = [{"experiment": exp, "git commit": commit or "unknown", "data source": source,
             "data.variant": data["variant"], "objective": params["objective"], "rope.kind": params["rope"]["kind"],
             "seed": params["seed"]}]
    out = [_table(rows), "<h3>Params that differ from the committed params.yaml</h3>"]
    out.append(_table(diff) if diff else "<p class='muted'>none: this run uses the committed params.yaml</p>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------- sections
def _curves(outputs: Path) -> str:
    import pandas as pd

    parts = []
    vae = outputs / "vae" / "loss.csv"
    if vae.is_file():
        df = pd.read_csv(vae)

        def draw_vae(ax):
            ax.plot(df["step"], df["loss"], label="training loss")
            ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title("VAE decoder post-training")
            if "holdout_psnr" in df:
                ax2 = ax.twinx()
                ok = df["holdout_psnr"].notna()
                ax2.plot(df.loc[ok, "step"], df.loc[ok, "holdout_psnr"], "o-", color="C1", label="held-out PSNR")
                ax2.set_ylabel("PSNR (dB)")
            ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1), fontsize=8)
        parts.append(_plot(draw_vae))
    for stage in ("dit_stage1", "dit_stage2"):
        loss, val = outputs / stage / "loss.csv", outputs / stage / "val_loss.csv"
        if loss.is_file():
            df = pd.read_csv(loss)

            def draw_loss(ax, df=df, stage=stage):
                ax.plot(df["step"], df["loss"], alpha=0.35, label="per step")
                ax.plot(df["step"], df["loss"].rolling(max(1, len(df) // 20), min_periods=1).mean(), label="smoothed")
                ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_title(f"{stage}: training loss")
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
            parts.append(_plot(draw_loss))
        if val.is_file():
            dv = pd.read_csv(val)

            def draw_val(ax, dv=dv, stage=stage):
                for c in [c for c in dv.columns if c not in ("step", "val_loss")]:
                    ax.plot(dv["step"], dv[c], lw=0.8, alpha=0.6, label=c)
                if "val_loss" in dv:
                    ax.plot(dv["step"], dv["val_loss"], "k-o", lw=2, label="mean")
                ax.set_xlabel("step"), ax.set_ylabel("validation loss"), ax.set_yscale("log")
                ax.set_title(f"{stage}: held-out loss at fixed sigmas and noise")
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=6)
            parts.append(_plot(draw_val))
    return "".join(parts) or "<p class='muted'>not run</p>"


def _download(results: dict) -> str:
    down = results.get("download") or {}
    if not down.get("source_is_metadata"):
        return "<p class='muted'>data.source is not the released metadata: nothing downloaded</p>"
    return ("<p>One row per URL in outputs/download/status.parquet; skipped files and records in problems.jsonl. "
            "Curation below uses scorers named released:&lt;field&gt; when curate.*.source is released, and "
            "compares the released flatness / entropy with its own (released_*_max_abs_delta, _verdict_flips).</p>"
            + _kv({k: v for k, v in down.items() if not isinstance(v, dict)}))


def _curation(results: dict, outputs: Path) -> str:
    cur = results.get("curate") or {}
    if not cur:
        return "<p class='muted'>not run</p>"
    counts = {k: v for k, v in cur.items()
              if k.startswith(("num_", "rejected_", "released_")) and isinstance(v, (int, float))}
    parts = [_kv({"quality scorer": cur.get("quality_scorer"), "aesthetic scorer": cur.get("aesthetic_scorer"),
                  **counts})]
    manifest_path = outputs / "curated" / "manifest.parquet"
    if manifest_path.is_file():
        import pandas as pd

        from ultraflux.data.examples import curation_examples

        for g in curation_examples(pd.read_parquet(manifest_path), outputs / "curated"):
            parts.append(f"<h3>{_esc(g['group'])}: {g['count']} images ({len(g['items'])} shown)</h3>")
            for it in g["items"]:
                scores = ", ".join(f"{k} {_fmt(v)}" for k, v in it["scores"].items())
                caption = f"{_esc(it['source'])}<br>{_esc(scores)}"
                if it.get("credit"):  # attribution of a released (Pexels / Unsplash) image
                    caption += f"<br>{_esc(it['credit'])}"
                if it["image"] is not None:
                    parts.append(_figure(it["image"], caption, long_side=256))
                else:
                    parts.append(f"<figure><figcaption>(no picture: {_esc(it['reason'])})<br>{caption}"
                                 "</figcaption></figure>")
    for png in sorted((outputs / "curated" / "plots").glob("*.png")):
        parts.append(_figure(png, _esc(png.stem), fmt="PNG", long_side=None, width=420))
    return "".join(parts)


def _vae(results: dict, outputs: Path) -> str:
    vae = (results.get("evaluate") or {}).get("vae") or {}
    parts = [_table([{"model": "this run's F16 VAE", **vae}]), _few(vae.get("num_images"), "These metrics"),
             "<p>Paper (Aesthetic-4K@4096, seed Table 2): UltraFlux-F16-VAE rFID 0.547, NMSE 0.00657, PSNR 30.70, "
             "SSIM 0.852, LPIPS 0.102.</p>"]
    credits = _credits(outputs / "curated" / "manifest.parquet")
    for png in sorted((outputs / "evaluate" / "recon").glob("*.png")):
        caption = f"{_esc(png.stem)}: input | reconstruction"
        if credits.get(png.stem):  # attribution of a released (Pexels / Unsplash) image
            caption += f"<br>{_esc(credits[png.stem])}"
        parts.append(_figure(png, caption, fmt="PNG", long_side=None, width=520))
    return "".join(parts)


def _credits(manifest_path: Path) -> dict:
    """{image id: "Photo: <photographer> (<work_url>)"} of the evaluation images that carry an attribution."""
    import pandas as pd
    import pyarrow.parquet as pq

    from ultraflux.data.released import attribution_line

    if not manifest_path.is_file():
        return {}
    names = pq.read_schema(manifest_path).names
    rows = pd.read_parquet(manifest_path, columns=[c for c in ("id", "eval", "photographer", "work_url") if c in names])
    rows = rows[rows["eval"]] if "eval" in rows else rows
    return {row["id"]: line for row in rows.to_dict("records") if (line := attribution_line(row))}


def _samples(params: dict, results: dict, outputs: Path) -> str:
    from PIL import Image

    samples = outputs / "samples"
    prompts = json.loads((samples / "prompts.json").read_text()) if (samples / "prompts.json").is_file() else []
    done = results.get("sample") or {}
    parts = [f"<p>Weights: {_esc(done['weights'])} (sample.weights); transformer memory mode: "
             f"{_esc(done['memory'])} (sample.memory).</p>"] if "weights" in done and "memory" in done else []
    for aspect in params["sample"]["aspects"]:
        folder = samples / "dit_stage2" / aspect.replace(":", "x")
        parts.append(f"<h3>{_esc(aspect)}</h3>")
        for img in sorted(folder.glob("*.png")):
            i = int(img.stem) if img.stem.isdigit() else -1
            prompt = prompts[i] if 0 <= i < len(prompts) else ""
            with Image.open(img) as im:
                size = f"{im.width}x{im.height}"
            parts.append(_figure(img, f"<b>{size}</b> &middot; {_esc(prompt)}"))
    return "".join(parts) or "<p class='muted'>not run</p>"


def _generation(results: dict) -> str:
    gen = (results.get("evaluate") or {}).get("generation") or {}
    rows = []
    for aspect, m in gen.items():
        missing = [k for k, v in m.items() if isinstance(v, str) and v.startswith("not computed")]
        row = {"aspect": aspect.replace("x", ":"), **{k: v for k, v in m.items() if k not in missing}}
        if missing:
            row["not computed (no local weights)"] = ", ".join(missing)
        rows.append(row)
    few = min((m.get("num_images") for m in gen.values() if isinstance(m.get("num_images"), int)), default=None)
    return _table(rows) + _few(few, "Each aspect ratio's metrics")


def _diagnostics(results: dict, outputs: Path) -> str:
    parts = [_kv(results["diagnostics"])] if results.get("diagnostics") else ["<p class='muted'>not run</p>"]
    for png in sorted((outputs / "diagnostics").glob("*.png")):
        parts.append(_figure(png, _esc(png.stem), fmt="PNG", long_side=None, width=640))
    return "".join(parts)


def write_report(params: dict, metrics_dir: Path, outputs: Path, out_path: Path,
                 timings_dir: Path = Path("timings")) -> Path:
    results = {s: _load_json(outputs / "results" / f"{s}.json") for s in STAGES}
    metrics = {s: _load_json(metrics_dir / f"{s}.json") for s in STAGES}
    timings = {s: _load_json(timings_dir / f"{s}.json") for s in STAGES}
    headline = [{"metric": f"{s}.{k}", "value": v} for s in STAGES for k, v in _flatten(metrics[s]).items()]
    judge = results.get("judge") or {}
    sections = [
        ("What this run is", _expectations(params) + _header(params)),
        ("Headline numbers (the DVC metrics)", _table(headline)),
        ("Training curves", _curves(outputs)),
        ("Download of the released metadata (MultiAspect-4K-1M)", _download(results)),
        ("Curation (seed Sec. 2.1)", _curation(results, outputs)),
        ("VAE reconstruction (seed Table 2 columns)", _vae(results, outputs)),
        ("Samples (stage-2 model; fixed prompts and seeds)", _samples(params, results, outputs)),
        ("Generation metrics per aspect ratio (seed Table 5 columns + Diffusion-4K detail metrics)",
         _generation(results)),
        ("Diagnostics (seed Figs. 1-3)", _diagnostics(results, outputs)),
        ("Gemini pairwise preference (seed Sec. 11): stage 2 (A) vs stage 1 (B)",
         _kv({k: v for k, v in judge.items() if not isinstance(v, dict)}) if judge else "<p class='muted'>not run</p>"),
        ("Stage wall times (s)", "<p class='muted'>From the last execution of each stage in this workspace (DVC "
         "skips unchanged stages).</p>" + _table([{"stage": s, **(timings[s] or {"wall_time_s": "not run here"})}
                                                 for s in STAGES[:-1]])),
    ]
    body = "".join(f"<h2>{_esc(title)}</h2>{content}" for title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>UltraFlux run report</title><style>{CSS}"
            f"</style></head><body><h1>UltraFlux run report</h1>{body}</body></html>")
    with atomic_path(out_path, ".html") as tmp:
        tmp.write_text(page)
    return out_path
