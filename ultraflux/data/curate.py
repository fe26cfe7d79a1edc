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
params and seed writes identical outputs. The cache dir may be shared (user folders, other pipelines, concurrent
runs): its entries are marked and owned (:mod:`ultraflux.data.cache_entries`), and pruning removes only this
pipeline's stale entries (the pipeline = the resolved output folder).

A full disk while writing the shards or the manifest raises :class:`ultraflux.io.DiskFullError` naming the path; the
outputs are then left without a manifest and without shards (never a partial set that looks complete).

After the selection, :func:`check_minimums` stops the run (:class:`TooFewImages`, naming the key) when fewer than
``curate.min_train_images`` training or ``curate.min_holdout_images`` held-out images remain.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ultraflux.config import typed
from ultraflux.io import DiskFullError, atomic_path, key_file, naming_disk_full, read_bytes, write_json
from ultraflux.schema import Curate, Params

from . import metadata, process, released, scorers, synthetic
from .advice import relax_advice
from .buckets import bucket_table
from .cache_entries import CacheEntries
from .decode import BadImage, dct_reduction, decode_rgb, read_header
from .engines import cores, run_engine
from .ingest import SourceError, list_sources
from .rule import needs_too_much_upscale, texture_reason, texture_reasons
from .select import EVAL_GEOMETRY, assign_reasons, assign_split, assign_texture_rank, eval_set_sha256, stage2_from_train
from .shards import ShardWriter

MANIFEST_COLUMNS = {
    "id": str, "source": str, "caption": str, "orig_width": "int64", "orig_height": "int64",
    "s_flat_fraction": float, "s_flat_mean": float, "entropy": float, "quality": float, "quality_scorer": str,
    "aesthetic": float, "aesthetic_scorer": str, "bucket": str, "width": "int64", "height": "int64", "kept": bool,
    "reason": str, "stage2": bool, "split": str, "eval": bool, "shard": str, "key": str, "offset": "int64",
    "nbytes": "int64",
    "texture_rank": float, "num_patches": "int64", "upscale": float, "variant": str,
    **released.RELEASED_COLUMNS,  # released scores and attribution (data/released.py); NaN / "" for other sources
}
"""Manifest schema. A kept row's image is ``nbytes`` bytes at ``offset`` of ``shard`` (member ``<key>.jpg|png``);
read it with :func:`ultraflux.data.shards.open_image`. Rejected rows have ``shard == ""``."""

REJECT_KEYS = ("unreadable", "decompression_bomb", "duplicate", "no_caption", "bad_caption", "too_small", "flat",
               "low_entropy", "low_quality", "low_aesthetic", "failed")
LEARNED_MIN_SIDE = 2048
"""Learned scorers see a DCT-reduced decode of the stored pixels whose long side stays >= 2048 px: Q-Align pads to a
square and resizes to 448 px, ArtiMuse resizes to 448x448, so a full 4K decode would only add time (their own
antialiased resize then starts from 2048 instead of 4096 px)."""


class TooFewImages(RuntimeError):
    """Curation left fewer images than ``curate.min_train_images`` / ``curate.min_holdout_images``."""


def image_config(curate: Curate) -> dict:
    """The per-image settings of pass 1 and of ``curate-stats``, as plain values (they travel to Ray workers as
    JSON); a bad bucket table fails here, before any work."""
    cfg = {
        "patch": int(curate.flat.patch),
        "flat_threshold": float(curate.flat.threshold),
        "flat_max_fraction": float(curate.flat.max_fraction),
        "entropy_min": float(curate.entropy_min),
        "gray": curate.gray,
        "scale": float(curate.buckets.scale),
        "aspects": list(curate.buckets.aspects),
        "max_upscale": float(curate.max_upscale),
        "max_pixels": int(curate.max_image_pixels),
    }
    bucket_table(cfg["scale"], cfg["aspects"])
    return cfg


def worker_config(params: Params) -> dict:
    """The plain, picklable settings both passes need, from the validated params."""
    curate, variant = params.curate, params.data.variant
    cheap = variant == "multiaspect"
    return image_config(curate) | {
        "variant": variant,
        "seed": int(params.seed),
        "quality_standin": scorers.QUALITY_STANDIN if cheap and not curate.quality.weights
        and curate.quality.source != "released" else "",
        "aesthetic_standin": scorers.AESTHETIC_STANDIN if cheap and not curate.aesthetic.weights
        and curate.aesthetic.source != "released" else "",
        "image_format": curate.image_format,
        "image_quality": int(curate.image_quality),
        "shard_max_bytes": int(curate.shard_max_mb) << 20,
        "min_train_images": int(curate.min_train_images),
        "min_holdout_images": int(curate.min_holdout_images),
    }


def resolve_source(params: Params, out_dir: Path) -> Path:
    """The source folder/table, generating the procedural set under out_dir/source when data.source is ""."""
    source = params.data.source
    if source and metadata.is_metadata_source(source):  # the released metadata: curate what the download fetched
        return released.download_output(out_dir)
    if source:
        path = Path(source)
        if not path.exists():
            raise SourceError(f"data.source = {source!r} does not exist")
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise SourceError(f"data.source = {source!r} is not readable")
        return path
    syn = params.data.synthetic
    return synthetic.generate(out_dir / "source", int(syn.num_images), int(syn.long_side), int(params.seed))


# ------------------------------------------------------------------------------------------------ rows, scores


def build_rows(items, records, cfg: dict, root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per source from the ingest items and the pass-1 summaries; bucket and upscale decided here.
    ``relative`` is the source path relative to ``root`` (the source folder), as reasons name it."""
    table = bucket_table(cfg["scale"], cfg["aspects"])
    patch_hist = np.zeros(len(process.PLOT_BINS) - 1, np.int64)
    rows = []
    for item, rec in zip(items, records):
        if rec["patch_hist"]:
            patch_hist += np.asarray(rec["patch_hist"], np.int64)
        row = {k: rec[k] for k in ("id", "error", "orig_width", "orig_height", "s_flat_fraction", "s_flat_mean",
                                   "num_patches", "entropy", "quality", "aesthetic", "cache_hit")}
        row.update({"source": item.path, "relative": Path(os.path.relpath(item.path, root)).as_posix(),
                    "caption": item.caption, "caption_error": item.caption_error,
                    "bucket": "", "width": 0, "height": 0, "upscale": float("nan"), "box": None,
                    "eval_geometry": None})
        if not rec["error"]:
            row.update(_geometry(rec, table, cfg))
            row["eval_geometry"] = _geometry(rec, table, cfg | {"variant": EVAL_GEOMETRY})
            if needs_too_much_upscale(row["upscale"], cfg["max_upscale"]):
                row["error"] = "too_small"
        rows.append(row)
    frame = pd.concat([pd.DataFrame(rows), released.released_columns(items)], axis=1)
    for col in ("quality", "aesthetic", "entropy", "upscale", "s_flat_fraction", "s_flat_mean"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    return frame, patch_hist


def _geometry(rec: dict, table: dict, cfg: dict) -> dict:
    """Bucket, size, crop box and upscale factor of one decoded source under ``cfg["variant"]``'s crop rule."""
    bucket, box = process.select_box(rec["orig_width"], rec["orig_height"], table, cfg, rec["id"])
    bw, bh = table[bucket]
    return {"bucket": bucket, "width": bw, "height": bh, "upscale": max(bw / (box[2] - box[0]), bh / (box[3] - box[1])),
            "box": list(box)}


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


def check_minimums(rows: pd.DataFrame, cfg: dict, curate: Curate) -> None:
    """Raise :class:`TooFewImages`, naming the key(s), what each filter removed and, per filter, the key and value
    that would have kept more images (:func:`ultraflux.data.advice.relax_advice`), when too few images remain."""
    kept = rows[rows["kept"]]
    n_train, n_holdout = int((kept["split"] == "train").sum()), int(rows["eval"].sum())
    problems = []
    if n_train < cfg["min_train_images"]:
        problems.append(f"curate.min_train_images = {cfg['min_train_images']} but {n_train} training image(s) remain")
    if n_holdout < cfg["min_holdout_images"]:
        problems.append(f"curate.min_holdout_images = {cfg['min_holdout_images']} but {n_holdout} held-out "
                        "evaluation image(s) remain (held out before the filters: add sources or raise "
                        "curate.holdout_fraction)")
    if problems:
        removed = ", ".join(f"{k} {v}" for k, v in removal_counts(rows).items() if v)
        hf = min(max(float(curate.holdout_fraction), 1e-3), 1 - 1e-3)  # a kept image is held out with this odds
        wanted = max(math.ceil(max(0, cfg["min_train_images"] - n_train) / (1 - hf)),
                     math.ceil(max(0, cfg["min_holdout_images"] - n_holdout) / hf), 1)
        advice = "".join(f"\n  - {line}" for line in relax_advice(rows, curate, wanted))
        raise TooFewImages(
            f"curation kept too few images to train on: {'; '.join(problems)}. Of {len(rows)} source(s), the filters "
            f"removed: {removed or 'none'}; kept {len(kept)} (train {n_train}), evaluation set {n_holdout}. Add "
            "images to "
            f"data.source, lower the minimum, or relax a filter (about {wanted} more kept images needed):{advice}")


# ------------------------------------------------------------------------------------------------ pass 2, shards


def render_dir(cfg: dict, is_eval: bool) -> str:
    """The render cache of a row: evaluation rows have their own geometry (:data:`EVAL_GEOMETRY`), hence entry."""
    return cfg["eval_render_dir"] if is_eval else cfg["render_dir"]


def render_kept(rows: pd.DataFrame, cfg: dict, engine: str, workers, progress: bool) -> int:
    """Pass 2 over the kept training rows and the evaluation rows; a row whose colour decode fails is rejected (and
    leaves the evaluation set) with its reason. Returns cache hits."""
    kept = rows[(rows["kept"] & (rows["split"] == "train")) | rows["eval"]]
    tasks = [{"path": r.source, "id": r.id, "box": r.box, "size": [int(r.width), int(r.height)],
              "cfg": cfg | {"render_dir": render_dir(cfg, r.eval)}} for r in kept.itertuples()]
    results = run_engine(engine, process.render_one, tasks, workers, progress, desc="render")
    for idx, res in zip(kept.index, results):
        if res["error"]:
            rows.loc[idx, ["kept", "stage2", "eval", "reason"]] = [False, False, False, res["error"]]
    return sum(r["cache_hit"] for r in results)


def _sample_meta(row) -> bytes:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    meta = {k: clean(getattr(row, k)) for k in ("id", "caption", "bucket", "width", "height", "split", "stage2",
                                                "quality", "aesthetic", "s_flat_fraction", "entropy", "texture_rank")}
    meta["stage2"] = bool(meta["stage2"])
    return json.dumps(meta, sort_keys=True).encode()


def write_shards(rows: pd.DataFrame, out_dir: Path, cfg: dict, progress: bool) -> list[Path]:
    """Copy the kept images into ``shards/<split>-NNNNNN.tar`` in manifest order; fill shard/key/offset/nbytes.

    The previous manifest goes first (it names the old shards); on any failure the shard folder goes too, so a
    partial set never looks complete (a full disk: :class:`DiskFullError` naming the shard being written)."""
    shard_dir = out_dir / "shards"
    (out_dir / "manifest.parquet").unlink(missing_ok=True)
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    rows["shard"], rows["key"], rows["offset"], rows["nbytes"] = "", "", 0, 0
    paths: list[Path] = []
    try:
        for split in ("train", "holdout"):
            paths += _write_split(rows, split, out_dir, cfg, progress)
    except BaseException:
        shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    return paths


def _write_split(rows: pd.DataFrame, split: str, out_dir: Path, cfg: dict, progress: bool) -> list[Path]:
    from tqdm.auto import tqdm

    part = rows[rows["eval"]] if split == "holdout" else rows[rows["kept"] & (rows["split"] == "train")]
    if not len(part):
        return []
    ext = "jpg" if cfg["image_format"] == "jpeg" else "png"
    locations = []
    writer = ShardWriter(out_dir / "shards", split, out_dir, max_bytes=cfg["shard_max_bytes"])
    try:
        with writer:
            for row in tqdm(part.itertuples(), total=len(part), desc=f"shards ({split})", disable=not progress):
                image = read_bytes(key_file(render_dir(cfg, row.eval), row.id, ext))
                locations.append(writer.write(row.id, {ext: image, "txt": row.caption.encode(),
                                                       "json": _sample_meta(row)}))
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(writer.current, "a curation shard") from err
        raise
    for col in ("shard", "key", "offset", "nbytes"):
        rows.loc[part.index, col] = [getattr(loc, col) for loc in locations]
    return writer.paths


# ------------------------------------------------------------------------------------------------ the stage


def run_curation(params: Params | dict, out_dir: Path, progress: bool = True) -> dict:
    """Curate ``data.source`` (or the procedural set) into ``out_dir``; returns a flat dict of metrics.

    ``params``: the validated :class:`~ultraflux.schema.Params` (a dict is validated here). Raises
    :class:`TooFewImages` (after writing the manifest, for inspection) when the minimums are not met, and
    :class:`ultraflux.io.DiskFullError` naming the path when the disk fills up.
    """
    started = time.perf_counter()
    params, out_dir = typed(params), Path(out_dir)
    curate, variant = params.curate, params.data.variant
    cfg = worker_config(params)
    if variant == "multiaspect":  # fail fast, before any work
        scorers.check_weights("quality", curate.quality.weights)
        scorers.check_weights("aesthetic", curate.aesthetic.weights)
    items, root = _list_items(params, out_dir)
    if variant == "multiaspect":
        released.require_released(items, curate.model_dump())
    with CacheEntries(curate.cache_dir or out_dir / ".cache", str(out_dir.resolve())) as entries:
        swept = _open_cache(entries, cfg)
        tasks = [{"path": it.path, "caption_error": it.caption_error, "cfg": cfg} for it in items]
        with naming_disk_full(cfg["scan_dir"], "the curation scan cache"):
            records = run_engine(curate.engine, process.scan_one, tasks, curate.workers, progress, desc="scan")
        rows, patch_hist = build_rows(items, records, cfg, root)
        quality_learned = score_candidates(rows, items, params, cfg, progress)
        assign_split(rows, cfg["seed"], float(curate.holdout_fraction), cfg["max_upscale"])  # before the filters
        used = assign_reasons(rows, curate, variant, quality_learned)
        stage2_from_train(rows, variant)
        assign_texture_rank(rows)
        render_hits = _render_or_stop(rows, cfg, curate, out_dir, progress)
        shards, manifest = write_dataset(rows, out_dir, cfg, progress)
        metrics = _finish_outputs(out_dir, manifest, patch_hist, used, cfg, curate.engine, shards)
        entries.prune()
    # Run-dependent figures go under "_timing" (ultraflux.stage pops it), so the metrics stay a function of params.
    elapsed = time.perf_counter() - started
    metrics["_timing"] = {"curate_seconds": round(elapsed, 3), "cache_hits": int(rows["cache_hit"].sum()),
                          "render_cache_hits": int(render_hits), "temporary_files_swept": swept,
                          "images_per_s": round(len(manifest) / max(elapsed, 1e-9), 3)}
    return metrics


def _list_items(params: Params, out_dir: Path) -> tuple[list, Path]:
    """The source items and the folder their paths are relative to; a bad data.source raises before any output."""
    if params.data.source:
        source = resolve_source(params, out_dir)
        items = list_sources(source)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        source = resolve_source(params, out_dir)
        items = list_sources(source)
    return items, (source if source.is_dir() else source.parent)


def _open_cache(entries: CacheEntries, cfg: dict) -> int:
    """Open this run's scan and render entries (their folders go into ``cfg``); sweep the temporaries a killed run
    left there, never while another live run uses the entry. Returns how many were swept."""
    scan = entries.open(f"scan-{process.scan_fingerprint(cfg)}", "curate-scan")
    render = entries.open(f"render-{process.render_fingerprint(cfg)}", "curate-render")
    eval_name = f"render-{process.render_fingerprint(cfg | {'variant': EVAL_GEOMETRY})}"
    eval_render = render if eval_name == render.name else entries.open(eval_name, "curate-render")
    cfg["scan_dir"], cfg["render_dir"], cfg["eval_render_dir"] = str(scan), str(render), str(eval_render)
    with entries.lock:
        return sum(process.sweep_temporary(entry) for entry in {scan, render, eval_render} if entries.alone(entry))


def score_candidates(rows: pd.DataFrame, items, params: Params, cfg: dict, progress: bool) -> bool:
    """Quality and aesthetic scores of the rows that pass the cheap filters (stand-in scores come from pass 1);
    fills the scorer-name columns. Returns whether the quality scorer is learned (a threshold, not a percentile)."""
    curate, variant = params.curate, params.data.variant
    rows["variant"] = variant
    if variant != "multiaspect":
        rows["quality"] = rows["aesthetic"] = float("nan")
        rows["quality_scorer"] = rows["aesthetic_scorer"] = "none"
        return False
    qcfg, acfg = curate.quality.model_dump(), curate.aesthetic.model_dump()
    texture = texture_reasons(rows["s_flat_fraction"], rows["entropy"], cfg["flat_max_fraction"], cfg["entropy_min"])
    cheap_ok = (rows["error"] == "") & (rows["caption_error"] == "") & (texture == "")
    workers = 1 if curate.engine != "local" else max(1, min(4, int(curate.workers or cores())))
    scan_dir = Path(cfg["scan_dir"])
    rows["quality_scorer"] = scorers.scorer_name("quality", qcfg)
    rows["aesthetic_scorer"] = scorers.scorer_name("aesthetic", acfg)
    with naming_disk_full(scan_dir, "the curation score cache"):
        if qcfg["source"] == "released":  # the release's Q-Align scores, labelled released:<field>
            rows["quality_scorer"] = released.use_released(rows, "quality", items)
        elif qcfg["weights"]:
            rows["quality_scorer"] = score_learned(rows, cheap_ok, "quality", qcfg, scan_dir, workers, progress)
        if acfg["source"] == "released":
            rows["aesthetic_scorer"] = released.use_released(rows, "aesthetic", items)
        elif acfg["weights"]:
            rows["aesthetic_scorer"] = score_learned(rows, cheap_ok, "aesthetic", acfg, scan_dir, workers, progress)
    scorers.skip_grayscale(rows)
    return bool(qcfg["weights"]) or qcfg["source"] == "released"


def _render_or_stop(rows: pd.DataFrame, cfg: dict, curate: Curate, out_dir: Path, progress: bool) -> int:
    """Pass 2 between the two minimum checks; on :class:`TooFewImages` the manifest is written for inspection."""
    try:
        check_minimums(rows, cfg, curate)
        with naming_disk_full(cfg["render_dir"], "the curation render cache"):
            hits = render_kept(rows, cfg, curate.engine, curate.workers, progress)
        check_minimums(rows, cfg, curate)  # a colour decode may still have failed
    except TooFewImages:
        rows["shard"], rows["key"], rows["offset"], rows["nbytes"] = "", "", 0, 0
        _write_manifest(rows, out_dir)
        raise
    return hits


def write_dataset(rows: pd.DataFrame, out_dir: Path, cfg: dict, progress: bool) -> tuple[list[Path], pd.DataFrame]:
    """The shards, then the manifest that indexes them; if either fails, neither is left behind."""
    shards = write_shards(rows, out_dir, cfg, progress)
    try:
        manifest = _write_manifest(rows, out_dir)
    except BaseException:
        shutil.rmtree(out_dir / "shards", ignore_errors=True)
        raise
    if (out_dir / "images").is_dir():  # the loose-file layout of older runs
        shutil.rmtree(out_dir / "images")
    return shards, manifest


def _finish_outputs(out_dir: Path, manifest: pd.DataFrame, patch_hist: np.ndarray, used: dict, cfg: dict,
                    engine: str, shards: list[Path]) -> dict:
    from .plots import write_histograms

    with naming_disk_full(out_dir, "the curation plots and metrics"):
        write_histograms(out_dir / "plots", manifest, (process.PLOT_BINS, patch_hist), cfg["flat_threshold"],
                         cfg["flat_max_fraction"], cfg["entropy_min"])
        metrics = summarize(manifest, used, cfg, engine)
        metrics["num_shards"] = len(shards)
        metrics["shard_bytes"] = int(sum(p.stat().st_size for p in shards))
        write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_manifest(rows: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    manifest = rows[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    path = out_dir / "manifest.parquet"
    with naming_disk_full(path, "the curated manifest"), atomic_path(path) as tmp:
        manifest.to_parquet(tmp, index=False)
    return manifest


def summarize(manifest: pd.DataFrame, used: dict, cfg: dict, engine: str) -> dict:
    """Flat metrics dict: counts per outcome, scorer names, thresholds used."""
    kept = manifest[manifest["kept"]]
    metrics = {
        "variant": cfg["variant"],
        "engine": str(engine),
        "num_sources": int(len(manifest)),
        "num_kept": int(len(kept)),
        "num_stage2": int(manifest["stage2"].sum()),
        "num_holdout": int(manifest["eval"].sum()),
        "eval_set_sha256": eval_set_sha256(manifest),
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


INPUT_ERRORS = ("unreadable", "decompression_bomb", "failed")
"""Reason prefixes that say the input itself could not be read (not a verdict on a readable image)."""


def image_stats(path: str, curate: Curate) -> dict:
    """The curate-stats record of one image file: the multi-aspect checks that need no other image (too_small, then
    :func:`ultraflux.data.rule.texture_reason`), on the statistics as computed, never rounded."""
    cfg = image_config(curate) | {"variant": "multiaspect", "quality_standin": "", "aesthetic_standin": ""}
    data, image_id, error = process.read_source(path)
    rec = {"error": error, "s_flat": []} if data is None else process.analyze(data, image_id, cfg)[0]
    summary = process.summarize_record({"id": image_id, **rec}, cfg)
    reason, bucket = rec["error"], None
    if not reason:
        bucket, upscale = process.upscale_needed(rec["orig_width"], rec["orig_height"], cfg)
        reason = "too_small" if needs_too_much_upscale(upscale, cfg["max_upscale"]) else texture_reason(
            summary["s_flat_fraction"], summary["entropy"], cfg["flat_max_fraction"], cfg["entropy_min"])
    entropy = summary["entropy"]
    return {"path": path, "s_flat_fraction": None if rec["error"] else summary["s_flat_fraction"],
            "entropy": float(entropy) if entropy is not None and math.isfinite(entropy) else None,
            "bucket": bucket, "kept": not reason, "reason": reason}
