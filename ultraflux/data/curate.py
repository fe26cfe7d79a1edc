"""Dataset curation (seed Sec. 2.1) and aspect bucketing (Sec. 2.2): ``run_curation``, the `curate` stage's work.

Variants (``data.variant``):

* ``multiaspect`` (this paper, MultiAspect-4K): flat-region detection, entropy filter, quality filter, aesthetic
  top-30% (stage 2 = aesthetic top 5%), then snap to the nearest aspect bucket, centre crop, resize.
* ``baseline`` (the Diffusion-4K recipe the paper compares against, Table 1): its public training code resizes every
  image's short side to the training resolution and takes a random square crop: here the "1:1" bucket of the same
  table (3840x3840 at scale 1.0 (Diffusion-4K itself trained at 4096x4096; the same square as ours keeps the two
  variants at an equal pixel count per image), 480x480 in the tiny profile). No aspect buckets and none of our
  flatness / entropy / quality / aesthetic curation: only unreadable, duplicate, caption-less and too-small
  (> max_upscale) inputs are rejected. The statistics are still computed and recorded. Stage 2: a deterministic
  random ``curate.aesthetic.stage2_top`` fraction of the kept rows (see :mod:`ultraflux.data.select`).

The least work per image (:mod:`ultraflux.data.process`): pass 1 reads every source once, decodes it in GRAY and
computes the statistics (plus ~512-px stand-in scores for the survivors of the cheap filters); this process then
scores the candidates with the learned scorers (batched, reduced decodes) and makes EVERY selection; pass 2
decodes, crops, resizes and encodes the kept images only; this process writes them into WebDataset shards in
manifest order (:mod:`ultraflux.data.shards`), so the local and the Ray engine give byte-identical outputs.

Outputs under ``out_dir``: ``manifest.parquet`` (one row per source path, rejected rows included, schema
:data:`MANIFEST_COLUMNS`; kept rows name ``shard``, ``key``, ``offset``, ``nbytes``), ``shards/train-*.tar`` and
``shards/holdout-*.tar``, ``plots/*.png``, ``metrics.json`` and, for the procedural set, ``source/``. The per-image
cache lives under ``curate.cache_dir`` (outside DVC outputs) so an interrupted run resumes; a re-run with the same
params and seed writes identical outputs.

After the selection, :func:`check_minimums` stops the run (:class:`TooFewImages`, naming the key) when fewer than
``curate.min_train_images`` training or ``curate.min_holdout_images`` held-out images remain.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ultraflux.io import atomic_path, write_json

from . import metadata, process, released, scorers, synthetic
from .advice import relax_advice
from .buckets import DEFAULT_ASPECTS, bucket_table
from .decode import DEFAULT_MAX_PIXELS, BadImage, dct_reduction, decode_rgb, read_header
from .engines import run_engine
from .ingest import SourceError, list_sources
from .select import assign_reasons, assign_split, assign_texture_rank, stage2_from_train
from .shards import ShardWriter

MANIFEST_COLUMNS = {
    "id": str, "source": str, "caption": str, "orig_width": "int64", "orig_height": "int64",
    "s_flat_fraction": float, "s_flat_mean": float, "entropy": float, "quality": float, "quality_scorer": str,
    "aesthetic": float, "aesthetic_scorer": str, "bucket": str, "width": "int64", "height": "int64", "kept": bool,
    "reason": str, "stage2": bool, "split": str, "shard": str, "key": str, "offset": "int64", "nbytes": "int64",
    "texture_rank": float, "num_patches": "int64", "upscale": float, "variant": str,
    **released.RELEASED_COLUMNS,  # released scores and attribution (data/released.py); NaN / "" for other sources
}
"""Manifest schema. A kept row's image is ``nbytes`` bytes at ``offset`` of ``shard`` (member ``<key>.jpg|png``);
read it with :func:`ultraflux.data.shards.open_image`. Rejected rows have ``shard == ""``."""

SEED_DEFAULTS = {"flat": {"patch": 240, "threshold": 800.0, "max_fraction": 0.5}, "entropy_min": 7.0}
"""Seed Sec. 2.1 thresholds, used when params.yaml does not give them."""
REJECT_KEYS = ("unreadable", "decompression_bomb", "duplicate", "no_caption", "bad_caption", "too_small", "flat",
               "low_entropy", "low_quality", "low_aesthetic", "failed")
LEARNED_MIN_SIDE = 2048
"""Learned scorers see a DCT-reduced decode of the stored pixels whose long side stays >= 2048 px: Q-Align pads to a
square and resizes to 448 px, ArtiMuse resizes to 448x448, so a full 4K decode would only add time (their own
antialiased resize then starts from 2048 instead of 4096 px)."""


class TooFewImages(RuntimeError):
    """Curation left fewer images than ``curate.min_train_images`` / ``curate.min_holdout_images``."""


def worker_config(params: dict, cache_root: Path) -> dict:
    """The plain, picklable settings both passes need (params are validated by ``ultraflux.schema`` before this)."""
    data = params.get("data", {}) or {}
    curate = params.get("curate", {}) or {}
    flat = {**SEED_DEFAULTS["flat"], **(curate.get("flat", {}) or {})}
    buckets = curate.get("buckets", {}) or {}
    variant = data.get("variant", "multiaspect")
    qcfg, acfg = curate.get("quality", {}) or {}, curate.get("aesthetic", {}) or {}
    cheap = variant == "multiaspect"
    cfg = {
        "variant": variant,
        "seed": int(params.get("seed", 0)),
        "patch": int(flat["patch"]),
        "flat_threshold": float(flat["threshold"]),
        "flat_max_fraction": float(flat["max_fraction"]),
        "entropy_min": float(curate.get("entropy_min", SEED_DEFAULTS["entropy_min"])),
        "gray": curate.get("gray", "luma"),
        "scale": float(buckets.get("scale", 1.0)),
        "aspects": list(buckets.get("aspects") or DEFAULT_ASPECTS),
        "max_upscale": float(curate.get("max_upscale", 1.5)),
        "max_pixels": int(curate.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
        "quality_standin": scorers.QUALITY_STANDIN if cheap and not qcfg.get("weights")
        and qcfg.get("source") != "released" else "",
        "aesthetic_standin": scorers.AESTHETIC_STANDIN if cheap and not acfg.get("weights")
        and acfg.get("source") != "released" else "",
        "image_format": curate.get("image_format", "jpeg"),
        "image_quality": int(curate.get("image_quality", 95)),
        "shard_max_bytes": int(curate.get("shard_max_mb", 1024)) << 20,
        "min_train_images": int(curate.get("min_train_images", 1)),
        "min_holdout_images": int(curate.get("min_holdout_images", 0)),
    }
    bucket_table(cfg["scale"], cfg["aspects"])  # a bad table fails here, before any work
    cfg["scan_dir"] = str(cache_root / process.scan_fingerprint(cfg))
    cfg["render_dir"] = str(cache_root / process.render_fingerprint(cfg))
    return cfg


def resolve_source(params: dict, out_dir: Path) -> Path:
    """The source folder/table, generating the procedural set under out_dir/source when data.source is ""."""
    data = params.get("data", {}) or {}
    source = data.get("source", "") or ""
    if source and metadata.is_metadata_source(source):  # the released metadata: curate what the download fetched
        return released.download_output(out_dir)
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


# ------------------------------------------------------------------------------------------------ rows, scores


def build_rows(items, records, cfg: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per source from the ingest items and the pass-1 summaries; bucket and upscale decided here."""
    table = bucket_table(cfg["scale"], cfg["aspects"])
    patch_hist = np.zeros(len(process.PLOT_BINS) - 1, np.int64)
    rows = []
    for item, rec in zip(items, records):
        if rec["patch_hist"]:
            patch_hist += np.asarray(rec["patch_hist"], np.int64)
        row = {k: rec[k] for k in ("id", "error", "orig_width", "orig_height", "s_flat_fraction", "s_flat_mean",
                                   "num_patches", "entropy", "quality", "aesthetic", "cache_hit")}
        row.update({"source": item.path, "caption": item.caption, "caption_error": item.caption_error,
                    "bucket": "", "width": 0, "height": 0, "upscale": float("nan"), "box": None})
        if not rec["error"]:
            bucket, box = process.select_box(rec["orig_width"], rec["orig_height"], table, cfg, rec["id"])
            bw, bh = table[bucket]
            upscale = max(bw / (box[2] - box[0]), bh / (box[3] - box[1]))
            row.update({"bucket": bucket, "width": bw, "height": bh, "upscale": upscale, "box": list(box)})
            if upscale > cfg["max_upscale"] + 1e-9:
                row["error"] = "too_small"
        rows.append(row)
    frame = pd.concat([pd.DataFrame(rows), released.released_columns(items)], axis=1)
    for col in ("quality", "aesthetic", "entropy", "upscale", "s_flat_fraction", "s_flat_mean"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame, patch_hist


def _learned_inputs(path: str) -> np.ndarray:
    data = released.read_source_bytes(path)
    header = read_header(data)
    reduce = dct_reduction(header.width, header.height, LEARNED_MIN_SIDE) if header.fast_jpeg else 1
    return decode_rgb(data, header, reduce=reduce, orient=False)  # stored orientation, as the public tool


def score_learned(rows: pd.DataFrame, candidates: pd.Series, kind: str, qcfg: dict, cache_dir: Path,
                  workers: int, progress: bool) -> str:
    """Batched learned scoring of the candidates in this process (GPU when present), from reduced decodes that a
    thread pool prepares one batch ahead; scores appended to ``scores-<scorer>.jsonl`` in the cache (resumable)."""
    from tqdm.auto import tqdm

    scorer = scorers.make_scorer(kind, qcfg)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scorer.name)
    cache_file = cache_dir / f"scores-{safe}.jsonl"
    cached: dict[str, float] = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            try:
                cached.update(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
    firsts = rows[candidates].drop_duplicates("id")
    todo = [(i, p) for i, p in zip(firsts["id"], firsts["source"]) if i not in cached]
    batches = [todo[s : s + scorer.batch_size] for s in range(0, len(todo), scorer.batch_size)]

    def load(batch):
        out = []
        for image_id, path in batch:
            try:
                out.append((image_id, _learned_inputs(path)))
            except (BadImage, OSError):
                out.append((image_id, None))
        return out

    cache_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, workers)) as pool, open(cache_file, "a") as log:
        pending = pool.submit(load, batches[0]) if batches else None
        for b in tqdm(range(len(batches)), desc=f"{kind} ({scorer.name})", disable=not progress):
            loaded = pending.result()
            pending = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
            good = [(i, im) for i, im in loaded if im is not None]
            scores = dict(zip([i for i, _ in good], scorer.score([im for _, im in good]))) if good else {}
            scores.update({i: float("nan") for i, im in loaded if im is None})
            cached.update(scores)
            log.write(json.dumps(scores) + "\n")
            log.flush()
    rows[kind] = rows["id"].map(lambda i: cached.get(i, float("nan"))).astype(float)
    rows.loc[~candidates, kind] = float("nan")
    return scorer.name


def removal_counts(rows: pd.DataFrame) -> dict[str, int]:
    reasons = rows.loc[~rows["kept"], "reason"].str.split(":").str[0].str.strip()
    return {key: int((reasons == key).sum()) for key in REJECT_KEYS}


def check_minimums(rows: pd.DataFrame, cfg: dict, curate: dict) -> None:
    """Raise :class:`TooFewImages`, naming the key(s), what each filter removed and, per filter, the key and value
    that would have kept more images (:func:`ultraflux.data.advice.relax_advice`), when too few images remain."""
    kept = rows[rows["kept"]]
    n_train, n_holdout = int((kept["split"] == "train").sum()), int((kept["split"] == "holdout").sum())
    problems = []
    if n_train < cfg["min_train_images"]:
        problems.append(f"curate.min_train_images = {cfg['min_train_images']} but {n_train} training image(s) remain")
    if n_holdout < cfg["min_holdout_images"]:
        problems.append(f"curate.min_holdout_images = {cfg['min_holdout_images']} but {n_holdout} held-out "
                        "image(s) remain")
    if problems:
        removed = ", ".join(f"{k} {v}" for k, v in removal_counts(rows).items() if v)
        hf = min(max(float(curate["holdout_fraction"]), 1e-3), 1 - 1e-3)  # a kept image is held out with this odds
        wanted = max(math.ceil(max(0, cfg["min_train_images"] - n_train) / (1 - hf)),
                     math.ceil(max(0, cfg["min_holdout_images"] - n_holdout) / hf), 1)
        advice = "".join(f"\n  - {line}" for line in relax_advice(rows, curate, wanted))
        raise TooFewImages(
            f"curation kept too few images to train on: {'; '.join(problems)}. Of {len(rows)} source(s), the filters "
            f"removed: {removed or 'none'}; kept {len(kept)} (train {n_train}, holdout {n_holdout}). Add images to "
            f"data.source, lower the minimum, or relax a filter (about {wanted} more kept images needed):{advice}")


# ------------------------------------------------------------------------------------------------ pass 2, shards


def render_kept(rows: pd.DataFrame, cfg: dict, engine: str, workers, progress: bool) -> int:
    """Pass 2 over the kept rows; a row whose colour decode fails is rejected with its reason. Returns cache hits."""
    kept = rows[rows["kept"]]
    tasks = [{"path": r.source, "id": r.id, "box": r.box, "size": [int(r.width), int(r.height)], "cfg": cfg}
             for r in kept.itertuples()]
    results = run_engine(engine, process.render_one, tasks, workers, progress, desc="render")
    for idx, res in zip(kept.index, results):
        if res["error"]:
            rows.loc[idx, ["kept", "stage2", "reason"]] = [False, False, res["error"]]
    return sum(r["cache_hit"] for r in results)


def _sample_meta(row) -> bytes:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    meta = {k: clean(getattr(row, k)) for k in ("id", "caption", "bucket", "width", "height", "split", "stage2",
                                                "quality", "aesthetic", "s_flat_fraction", "entropy", "texture_rank")}
    meta["stage2"] = bool(meta["stage2"])
    return json.dumps(meta, sort_keys=True).encode()


def write_shards(rows: pd.DataFrame, out_dir: Path, cfg: dict, progress: bool) -> list[Path]:
    """Copy the kept images into ``shards/<split>-NNNNNN.tar`` in manifest order; fill shard/key/offset/nbytes."""
    from tqdm.auto import tqdm

    shard_dir = out_dir / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    ext = "jpg" if cfg["image_format"] == "jpeg" else "png"
    rows["shard"], rows["key"], rows["offset"], rows["nbytes"] = "", "", 0, 0
    paths = []
    for split in ("train", "holdout"):
        part = rows[rows["kept"] & (rows["split"] == split)]
        if not len(part):
            continue
        locations = []
        with ShardWriter(shard_dir, split, out_dir, max_bytes=cfg["shard_max_bytes"]) as writer:
            for row in tqdm(part.itertuples(), total=len(part), desc=f"shards ({split})", disable=not progress):
                image = process.cache_file(cfg["render_dir"], row.id, ext).read_bytes()
                loc = writer.write(row.id, {ext: image, "txt": row.caption.encode(), "json": _sample_meta(row)})
                locations.append(loc)
        paths += writer.paths
        for col in ("shard", "key", "offset", "nbytes"):
            rows.loc[part.index, col] = [getattr(loc, col) for loc in locations]
    return paths


def _remove_stale_cache(cache_root: Path, keep: set[str]) -> None:
    for stale in cache_root.iterdir():  # the cache only holds the current settings
        if (stale.is_dir() and stale.name not in keep and len(stale.name) == 12
                and all(c in "0123456789abcdef" for c in stale.name)):
            shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the stage


def run_curation(params: dict, out_dir: Path, progress: bool = True) -> dict:
    """Curate ``data.source`` (or the procedural set) into ``out_dir``; returns a flat dict of metrics.

    Raises :class:`TooFewImages` (after writing the manifest, for inspection) when the minimums are not met.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    data = params.get("data", {}) or {}
    curate = params.get("curate", {}) or {}
    qcfg, acfg = curate.get("quality", {}) or {}, curate.get("aesthetic", {}) or {}
    variant = data.get("variant", "multiaspect")
    cache_root = Path(curate.get("cache_dir") or out_dir / ".cache")
    cfg = worker_config(params, cache_root)
    engine, workers = curate.get("engine", "local"), curate.get("workers", 0)
    if variant == "multiaspect":  # fail fast, before any work
        scorers.check_weights("quality", qcfg.get("weights", "") or "")
        scorers.check_weights("aesthetic", acfg.get("weights", "") or "")
    if data.get("source"):  # a bad source raises, naming data.source, before any work or output
        items = list_sources(resolve_source(params, out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        items = list_sources(resolve_source(params, out_dir))

    if variant == "multiaspect":
        released.require_released(items, curate)
    scan_dir, render_dir = Path(cfg["scan_dir"]), Path(cfg["render_dir"])
    swept = process.sweep_temporary(scan_dir) + process.sweep_temporary(render_dir)
    tasks = [{"path": it.path, "caption_error": it.caption_error, "cfg": cfg} for it in items]
    records = run_engine(engine, process.scan_one, tasks, workers, progress, desc="scan")
    rows, patch_hist = build_rows(items, records, cfg)

    quality_name = aesthetic_name = "none"
    quality_learned = False
    if variant == "multiaspect":
        cheap_ok = ((rows["error"] == "") & (rows["caption_error"] == "")
                    & ~(rows["s_flat_fraction"] > cfg["flat_max_fraction"])
                    & (rows["entropy"] >= cfg["entropy_min"]))
        quality_name = scorers.scorer_name("quality", qcfg)
        aesthetic_name = scorers.scorer_name("aesthetic", acfg)
        quality_learned = bool(qcfg.get("weights")) or qcfg.get("source") == "released"
        n = 1 if engine != "local" else max(1, min(4, int(workers or os.cpu_count() or 1)))
        if qcfg.get("source") == "released":  # the release's Q-Align scores, labelled released:<field>
            quality_name = released.use_released(rows, "quality", items)
        elif quality_learned:
            quality_name = score_learned(rows, cheap_ok, "quality", qcfg, scan_dir, n, progress)
        if acfg.get("source") == "released":
            aesthetic_name = released.use_released(rows, "aesthetic", items)
        elif acfg.get("weights"):
            aesthetic_name = score_learned(rows, cheap_ok, "aesthetic", acfg, scan_dir, n, progress)
    else:
        rows["quality"] = float("nan")
        rows["aesthetic"] = float("nan")
    rows["quality_scorer"] = quality_name
    rows["aesthetic_scorer"] = aesthetic_name
    rows["variant"] = variant

    used = assign_reasons(rows, curate, variant, quality_learned)
    assign_split(rows, cfg["seed"], float(curate.get("holdout_fraction", 0.1)))
    stage2_from_train(rows, variant)
    assign_texture_rank(rows)
    try:
        check_minimums(rows, cfg, curate)
        render_hits = render_kept(rows, cfg, engine, workers, progress)
        check_minimums(rows, cfg, curate)  # a colour decode may still have failed
    except TooFewImages:
        rows["shard"], rows["key"], rows["offset"], rows["nbytes"] = "", "", 0, 0
        _write_manifest(rows, out_dir)
        raise
    shards = write_shards(rows, out_dir, cfg, progress)
    manifest = _write_manifest(rows, out_dir)
    if (out_dir / "images").is_dir():  # the loose-file layout of older runs
        shutil.rmtree(out_dir / "images")

    from .plots import write_histograms

    write_histograms(out_dir / "plots", manifest, (process.PLOT_BINS, patch_hist), cfg["flat_threshold"],
                     cfg["flat_max_fraction"], cfg["entropy_min"])
    _remove_stale_cache(cache_root, {scan_dir.name, render_dir.name})

    metrics = summarize(manifest, used, cfg, curate)
    metrics["num_shards"] = len(shards)
    metrics["shard_bytes"] = int(sum(p.stat().st_size for p in shards))
    write_json(out_dir / "metrics.json", metrics)
    # Run-dependent figures go under "_timing" (ultraflux.stage pops it), so the metrics stay a function of params.
    elapsed = time.perf_counter() - started
    metrics["_timing"] = {"curate_seconds": round(elapsed, 3), "cache_hits": int(rows["cache_hit"].sum()),
                          "render_cache_hits": int(render_hits), "temporary_files_swept": swept,
                          "images_per_s": round(len(manifest) / max(elapsed, 1e-9), 3)}
    return metrics


def _write_manifest(rows: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    manifest = rows[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    with atomic_path(out_dir / "manifest.parquet") as tmp:
        manifest.to_parquet(tmp, index=False)
    return manifest


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
    metrics.update({f"rejected_{k}": v for k, v in removal_counts(manifest).items()})
    if manifest[["released_flatness", "released_entropy"]].notna().any(axis=None):  # a data-integrity check
        metrics.update(released.agreement(manifest, cfg["flat_max_fraction"], cfg["entropy_min"]))
    for name, count in kept["bucket"].value_counts().sort_index().items():
        metrics[f"bucket_{name}"] = int(count)
    for key, value in used.items():
        metrics[key] = float(value)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def image_stats(path: str, params: dict) -> dict:
    """The curate-stats record of one image file (the multi-aspect checks that need no other image)."""
    cfg = worker_config(params, Path("."))
    record = {"path": path}
    data, image_id, error = process.read_source(path)
    rec = {"error": error, "s_flat": []} if data is None else process.analyze(data, image_id, cfg)[0]
    summary = process.summarize_record({"id": image_id, **rec}, cfg)
    reason, bucket = rec["error"], None
    if not reason:
        bucket, upscale = process.upscale_needed(rec["orig_width"], rec["orig_height"], cfg)
        if upscale > cfg["max_upscale"] + 1e-9:
            reason = "too_small"
    fraction = None if rec["error"] else summary["s_flat_fraction"]
    entropy = summary["entropy"]
    entropy = None if entropy is None or not math.isfinite(entropy) else round(float(entropy), 4)
    if not reason and fraction is not None and fraction > cfg["flat_max_fraction"]:
        reason = "flat"
    if not reason and entropy is not None and entropy < cfg["entropy_min"]:
        reason = "low_entropy"
    record.update({"s_flat_fraction": fraction, "entropy": entropy, "bucket": bucket, "kept": not reason,
                   "reason": reason})
    return record
