"""Dataset curation (seed Sec. 2.1) and aspect bucketing (Sec. 2.2): ``run_curation`` and ``ultraflux curate-stats``.

Variants (``data.variant``):

* ``multiaspect`` (this paper, MultiAspect-4K): flat-region detection, entropy filter, quality filter, aesthetic
  top-30% (stage 2 = aesthetic top 5%), then snap to the nearest aspect bucket, centre crop, Lanczos resize.
* ``baseline`` (the Diffusion-4K recipe the paper compares against, Table 1): its public training code resizes every
  image's short side to the training resolution and takes a random square crop: here the "1:1" bucket of the same
  table (3840x3840 at scale 1.0 (Diffusion-4K itself trained at 4096x4096; the same square as ours keeps the two
  variants at an equal pixel count per image), 480x480 in the tiny profile). No aspect buckets and none of our
  flatness / entropy / quality / aesthetic curation: only unreadable, duplicate, caption-less and too-small
  (> max_upscale) inputs are rejected. The statistics are still computed and recorded. Stage 2: a deterministic
  random ``curate.aesthetic.stage2_top`` fraction of the kept rows (see :mod:`ultraflux.data.select`).

Outputs under ``out_dir``: ``manifest.parquet`` (one row per source, rejected rows included, schema
:data:`MANIFEST_COLUMNS`), ``images/<id>.png`` (kept rows, at the bucket size), ``plots/*.png``, ``metrics.json``
and, for the procedural set, ``source/``. Per-image records and candidate images are cached under
``curate.cache_dir`` (default ``out_dir/.cache``) so an interrupted run resumes; a re-run with the same params and
seed writes an identical manifest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import scorers, synthetic
from .buckets import DEFAULT_ASPECTS
from .decode import DEFAULT_MAX_PIXELS
from .engines import run_engine
from .ingest import SourceError, list_sources
from .process import fingerprint
from .select import assign_reasons, assign_split, assign_texture_rank, stage2_from_train
from .stats import flat_summary

MANIFEST_COLUMNS = {
    "id": str, "source": str, "caption": str, "orig_width": "int64", "orig_height": "int64",
    "s_flat_fraction": float, "s_flat_mean": float, "entropy": float, "quality": float, "quality_scorer": str,
    "aesthetic": float, "aesthetic_scorer": str, "bucket": str, "width": "int64", "height": "int64", "kept": bool,
    "reason": str, "stage2": bool, "split": str, "image": str, "texture_rank": float,
    "num_patches": "int64", "upscale": float, "variant": str,
}
"""Manifest schema: the brief's columns, then num_patches, upscale (needed upscaling) and variant."""

SEED_DEFAULTS = {
    "flat": {"patch": 240, "threshold": 800.0, "max_fraction": 0.5},
    "entropy_min": 7.0,
}
"""Seed Sec. 2.1 thresholds, used when params.yaml does not give them."""


def worker_config(params: dict, cache_dir: Path) -> dict:
    """The plain, picklable settings the per-image function needs."""
    data = params.get("data", {}) or {}
    curate = params.get("curate", {}) or {}
    flat = {**SEED_DEFAULTS["flat"], **(curate.get("flat", {}) or {})}
    buckets = curate.get("buckets", {}) or {}
    variant = data.get("variant", "multiaspect")
    if variant not in ("multiaspect", "baseline"):
        raise ValueError(f"data.variant must be 'multiaspect' or 'baseline', got {variant!r}")
    qcfg, acfg = curate.get("quality", {}) or {}, curate.get("aesthetic", {}) or {}
    cheap = variant == "multiaspect"
    cfg = {
        "variant": variant,
        "seed": int(params.get("seed", 0)),
        "patch": int(flat["patch"]),
        "flat_threshold": float(flat["threshold"]),
        "flat_max_fraction": float(flat["max_fraction"]),
        "entropy_min": float(curate.get("entropy_min", SEED_DEFAULTS["entropy_min"])),
        "scale": float(buckets.get("scale", 1.0)),
        "aspects": list(buckets.get("aspects") or DEFAULT_ASPECTS),
        "max_upscale": float(curate.get("max_upscale", 1.5)),
        "max_pixels": int(curate.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
        "quality_standin": scorers.QUALITY_STANDIN if cheap and not qcfg.get("weights") else "",
        "aesthetic_standin": scorers.AESTHETIC_STANDIN if cheap and not acfg.get("weights") else "",
    }
    cfg["cache_dir"] = str(cache_dir / fingerprint(cfg))
    return cfg


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_source(params: dict, out_dir: Path) -> Path:
    """The source folder/table, generating the procedural set under out_dir/source when data.source is ""."""
    data = params.get("data", {}) or {}
    source = data.get("source", "") or ""
    if source:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"data.source = {source!r} does not exist")
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise SourceError(f"data.source = {source!r} is not readable")
        return path
    syn = data.get("synthetic", {}) or {}
    return synthetic.generate(out_dir / "source", int(syn.get("num_images", 40)), int(syn.get("long_side", 768)),
                              int(params.get("seed", 0)))


def _score_learned(rows: pd.DataFrame, candidates: pd.Series, kind: str, cfg: dict, cache_dir: Path,
                   progress: bool) -> str:
    """Batched learned scoring of the candidate images (main process, GPU when present); scores cached per id."""
    from PIL import Image
    from tqdm.auto import tqdm

    scorer = scorers.make_scorer(kind, cfg)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scorer.name)
    cache_file = cache_dir / f"scores-{kind}-{safe}.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    todo = [i for i in rows.loc[candidates, "id"].unique() if i not in cached]
    for start in tqdm(range(0, len(todo), scorer.batch_size), desc=f"{kind} ({scorer.name})", disable=not progress):
        batch = todo[start : start + scorer.batch_size]
        images = [np.asarray(Image.open(cache_dir / "images" / f"{i}.png").convert("RGB")) for i in batch]
        cached.update(zip(batch, scorer.score(images)))
        _atomic_write_text(cache_file, json.dumps(cached))
    rows[kind] = rows["id"].map(lambda i: cached.get(i, float("nan"))).astype(float)
    rows.loc[~candidates, kind] = float("nan")
    return scorer.name


def _materialize_images(rows: pd.DataFrame, out_dir: Path, cache_dir: Path) -> None:
    """images/<id>.png for kept rows (hard link to the cached candidate, else copy); stale files removed."""
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    wanted = {f"{i}.png" for i in rows.loc[rows["kept"], "id"]}
    for name in sorted(wanted):
        dst, src = images / name, cache_dir / "images" / name
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        tmp = images / f".{name}.tmp"
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    for path in images.iterdir():
        if path.name not in wanted:
            path.unlink()
    rows["image"] = np.where(rows["kept"], "images/" + rows["id"] + ".png", "")


def build_rows(items, records, cfg: dict) -> tuple[pd.DataFrame, list[float]]:
    """One row per source from the ingest items and the per-image records (before selection)."""
    rows, patch_values = [], []
    for item, rec in zip(items, records):
        fraction, mean = flat_summary(rec.get("s_flat", []), cfg["flat_threshold"])
        has_stats = bool(rec.get("s_flat"))
        if has_stats:
            patch_values.extend(rec["s_flat"])
        rows.append({
            "id": rec["id"], "source": item.path, "caption": item.caption, "caption_error": item.caption_error,
            "error": rec.get("error", ""), "orig_width": rec.get("orig_width", 0),
            "orig_height": rec.get("orig_height", 0),
            "s_flat_fraction": fraction if has_stats else float("nan"),
            "s_flat_mean": mean if has_stats else float("nan"),
            "num_patches": len(rec.get("s_flat", [])),
            "entropy": rec.get("entropy", float("nan")),
            "quality": rec.get("quality", float("nan")), "aesthetic": rec.get("aesthetic", float("nan")),
            "bucket": rec.get("bucket", ""), "width": rec.get("width", 0), "height": rec.get("height", 0),
            "upscale": rec.get("upscale", float("nan")), "cache_hit": rec.get("cache_hit", False),
        })
    frame = pd.DataFrame(rows)
    for col in ("quality", "aesthetic", "entropy", "upscale"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame, patch_values


def run_curation(params: dict, out_dir: Path, progress: bool = True) -> dict:
    """Curate ``data.source`` (or the procedural set) into ``out_dir``; returns a flat dict of metrics."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    data = params.get("data", {}) or {}
    curate = params.get("curate", {}) or {}
    qcfg, acfg = curate.get("quality", {}) or {}, curate.get("aesthetic", {}) or {}
    variant = data.get("variant", "multiaspect")
    if variant == "multiaspect":  # fail fast, before any work
        scorers.check_weights("quality", qcfg.get("weights", "") or "")
        scorers.check_weights("aesthetic", acfg.get("weights", "") or "")
    if data.get("source"):  # a bad source raises, naming data.source, before any work or output
        items = list_sources(resolve_source(params, out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        items = list_sources(resolve_source(params, out_dir))

    cache_root = Path(curate.get("cache_dir") or out_dir / ".cache")
    cfg = worker_config(params, cache_root)
    cache_dir = Path(cfg["cache_dir"])
    (cache_dir / "images").mkdir(parents=True, exist_ok=True)
    tasks = [{"path": it.path, "caption_error": it.caption_error, "cfg": cfg} for it in items]
    records = run_engine(curate.get("engine", "local"), tasks, curate.get("workers", 0), progress)
    rows, patch_values = build_rows(items, records, cfg)

    quality_name = aesthetic_name = "none"
    quality_learned = False
    if variant == "multiaspect":
        cheap_ok = ((rows["error"] == "") & (rows["caption_error"] == "")
                    & ~(rows["s_flat_fraction"] > cfg["flat_max_fraction"])
                    & (rows["entropy"] >= cfg["entropy_min"]))
        cheap_ok &= rows["id"].map(lambda i: (cache_dir / "images" / f"{i}.png").is_file())
        quality_name = scorers.scorer_name("quality", qcfg)
        aesthetic_name = scorers.scorer_name("aesthetic", acfg)
        quality_learned = bool(qcfg.get("weights"))
        if quality_learned:
            quality_name = _score_learned(rows, cheap_ok, "quality", qcfg, cache_dir, progress)
        if acfg.get("weights"):
            aesthetic_name = _score_learned(rows, cheap_ok, "aesthetic", acfg, cache_dir, progress)
    else:
        rows["quality"] = float("nan")
        rows["aesthetic"] = float("nan")
    rows["quality_scorer"] = quality_name
    rows["aesthetic_scorer"] = aesthetic_name

    used = assign_reasons(rows, curate, variant, quality_learned)
    assign_split(rows, cfg["seed"], float(curate.get("holdout_fraction", 0.1)))
    stage2_from_train(rows, variant)
    assign_texture_rank(rows)
    _materialize_images(rows, out_dir, cache_dir)
    rows["variant"] = variant
    cache_hits = int(rows["cache_hit"].sum())

    manifest = rows[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    tmp = out_dir / ".manifest.parquet.tmp"
    manifest.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / "manifest.parquet")

    from .plots import write_histograms

    write_histograms(out_dir / "plots", manifest, patch_values, cfg["flat_threshold"], cfg["flat_max_fraction"],
                     cfg["entropy_min"])
    for stale in cache_root.iterdir():  # the cache only holds the current settings
        if (stale.is_dir() and stale.name != cache_dir.name and len(stale.name) == 12
                and all(c in "0123456789abcdef" for c in stale.name)):
            shutil.rmtree(stale, ignore_errors=True)

    metrics = summarize(manifest, used, cfg, curate)
    _atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    # Run-dependent figures go under "_timing" (ultraflux.stage pops it), so the metrics stay a function of params.
    metrics["_timing"] = {"curate_seconds": round(time.perf_counter() - started, 3), "cache_hits": cache_hits,
                          "images_per_s": round(len(manifest) / max(time.perf_counter() - started, 1e-9), 3)}
    return metrics


def summarize(manifest: pd.DataFrame, used: dict, cfg: dict, curate: dict) -> dict:
    """Flat metrics dict: counts per outcome, scorer names, thresholds used."""
    kept = manifest[manifest["kept"]]
    metrics = {
        "variant": cfg["variant"],
        "engine": str(curate.get("engine", "local")),
        "num_sources": int(len(manifest)),
        "num_kept": int(len(kept)),
        "num_stage2": int(manifest["stage2"].sum()),
        "num_holdout": int((kept["split"] == "holdout").sum()),
        "num_train": int((kept["split"] == "train").sum()),
        "kept_fraction": float(len(kept) / max(1, len(manifest))),
        "quality_scorer": str(manifest["quality_scorer"].iloc[0]) if len(manifest) else "none",
        "aesthetic_scorer": str(manifest["aesthetic_scorer"].iloc[0]) if len(manifest) else "none",
        "mean_entropy": float(manifest["entropy"].mean()) if manifest["entropy"].notna().any() else float("nan"),
        "mean_s_flat_fraction": float(manifest["s_flat_fraction"].mean())
        if manifest["s_flat_fraction"].notna().any() else float("nan"),
    }
    reasons = manifest.loc[~manifest["kept"], "reason"].str.split(":").str[0].str.strip()
    for key in ("unreadable", "decompression_bomb", "duplicate", "no_caption", "bad_caption", "too_small", "flat",
                "low_entropy", "low_quality", "low_aesthetic", "failed"):
        metrics[f"rejected_{key}"] = int((reasons == key).sum())
    for name, count in kept["bucket"].value_counts().sort_index().items():
        metrics[f"bucket_{name}"] = int(count)
    for key, value in used.items():
        metrics[key] = float(value)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _load_params(path: Path = Path("params.yaml")) -> dict:
    if path.is_file():
        from ultraflux.config import parse_yaml

        return parse_yaml(path.read_text()) or {}
    return {}


def image_stats(path: str, params: dict) -> dict:
    """The curate-stats record of one image file (multi-aspect checks that need no other image)."""
    from .process import analyze, read_source

    cfg = worker_config(params, Path("."))
    record = {"path": path}
    data, image_id, error = read_source(path)
    rec = {"error": error} if data is None else analyze(data, image_id, cfg, "", None)
    if data is not None:
        fraction, _ = flat_summary(rec["s_flat"], cfg["flat_threshold"]) if rec["s_flat"] else (None, None)
    else:
        fraction = None
    reason = rec["error"]
    entropy = rec.get("entropy")
    entropy = None if entropy is None or not math.isfinite(entropy) else round(float(entropy), 4)
    if not reason and fraction is not None and fraction > cfg["flat_max_fraction"]:
        reason = "flat"
    if not reason and entropy is not None and entropy < cfg["entropy_min"]:
        reason = "low_entropy"
    record.update({"s_flat_fraction": fraction, "entropy": entropy, "bucket": rec.get("bucket") or None,
                   "kept": not reason, "reason": reason})
    return record


def cli_curate_stats(argv: list[str]) -> int:
    """``ultraflux curate-stats IMAGE...``: one JSON object per image (flatness, entropy, bucket, keep decision).

    Thresholds come from ./params.yaml when present, else the seed defaults (Sec. 2.1). Learned/percentile filters
    (quality, aesthetic) need the whole set and are not applied here. Exit status 2 on usage errors, else 0.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="ultraflux curate-stats",
                                     description="Per-image curation statistics (seed Sec. 2.1) as JSON lines.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml if present)")
    args = parser.parse_args(argv)
    params = _load_params(Path(args.params))
    for path in args.images:
        print(json.dumps(image_stats(path, params)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli_curate_stats(sys.argv[1:]))
