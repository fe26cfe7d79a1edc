"""The two per-image functions every engine runs, and their cache.

Pass 1, :func:`scan_one`, EVERY source (seed Sec. 2.1 cheap filters): read the bytes, hash them (``id`` = first 16
hex digits of the SHA-256), check the header, decode GRAY at native resolution (:func:`decode.decode_gray`), compute
the per-patch flatness and the entropy (:mod:`ultraflux.data.stats`). Only an image that passes the cheap filters
(and the upscale limit) is then looked at in colour, and only as a ~512-px copy (:func:`decode.decode_small`, a
DCT-scaled decode for JPEGs) for the classical stand-in scores. Rejected images are never decoded in colour (in
``curate.gray: luma`` mode).

Pass 2, :func:`render_one`, KEPT rows only, after the main process has made every percentile selection: decode RGB
(DCT-reduced by 2/4/8 when the bucket needs at least that much downscaling), EXIF orientation applied, crop the
box the main process chose (centred crop of the bucket's aspect, or the Diffusion-4K random square), resize to the
bucket (:func:`resize_to`), encode (JPEG at ``curate.image_quality`` or lossless PNG) and cache the bytes; the main
process copies them into the shards in manifest order.

Cache (``curate.cache_dir``), so an interrupted run recomputes nothing it finished: pass-1 records are
``scan-<fingerprint>/<id[:2]>/<id>.json`` (per-patch S_flat, entropy, sizes, stand-in scores by scorer name),
pass-2 images ``render-<fingerprint>/<id[:2]>/<id>.<ext>``, each folder a marked, owned cache entry
(:mod:`ultraflux.data.cache_entries`). A fingerprint hashes only the settings that change
what is cached (:func:`scan_fingerprint`, :func:`render_fingerprint`); thresholds and percentiles are applied in
:mod:`ultraflux.data.select`, so changing them recomputes nothing, except the stand-in scores of an image that
newly passes the cheap filters. Files are written through :func:`ultraflux.io.atomic_path`; temporary entries that
a killed worker left behind are swept at the start of the next run (:func:`sweep_temporary`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np

from ultraflux.io import atomic_write_bytes, key_file, read_bytes, sha256_bytes, sha256_json, sha256_text

from . import scorers
from .buckets import bucket_table
from .cache_entries import RESERVED
from .decode import BadImage, Header, dct_reduction, decode_gray, decode_rgb, decode_small, read_header
from .released import is_member_path, read_source_bytes
from .rule import needs_too_much_upscale, texture_reason
from .stats import entropy_bits, flat_summary, patch_flatness

SCAN_VERSION = 2
RENDER_VERSION = 1
PLOT_BINS = np.linspace(-1.0, 6.0, 71)
"""log10 S_flat bins of the per-patch histogram each record contributes to plots/s_flat_patches.png."""
CUBIC_MIN_SCALE = 0.875
"""Resize rule, from ``python benchmarks/bench_curate.py --resize`` (4K photo-like image and a zone plate, PSNR to
Pillow's Lanczos; time as a ratio to a Pillow RGB decode): at 4096 -> 3840 (scale 0.9375) OpenCV's INTER_CUBIC
(0.06-0.18x) is as good as an antialiased filter (45.8 dB photo / 27.7 dB zone plate, vs 45.2 / 27.0 for
antialiased bicubic at 0.39x; INTER_AREA 39.4 / 20.8 at 0.37x; Pillow Lanczos itself 1.3x). Below ~0.875 it
aliases (zone plate 17.6 dB at 0.75, 14.1 at 0.6), so smaller scales, after the decoder's DCT reduction by 2/4/8,
use torch's antialiased bicubic on uint8 (Pillow's filter to +-1 level; 28.9 / 30.8 dB at 0.15 / 0.09x)."""


def _hash(material: dict) -> str:
    return sha256_json(material)[:12]


def scan_fingerprint(cfg: dict) -> str:
    """Settings that change a pass-1 record: patch size, gray conversion, pixel limit."""
    return _hash({k: cfg[k] for k in ("patch", "gray", "max_pixels")} | {"version": SCAN_VERSION})


def render_fingerprint(cfg: dict) -> str:
    """Settings that change a pass-2 image: the bucket table, the crop rule, the encoding."""
    keys = ("variant", "scale", "aspects", "image_format", "image_quality")
    material = {k: cfg[k] for k in keys} | {"version": RENDER_VERSION, "cubic_min_scale": CUBIC_MIN_SCALE}
    if cfg["variant"] == "baseline":
        material["seed"] = cfg["seed"]  # the random square crop
    return _hash(material)


def sweep_temporary(directory: str | Path) -> int:
    """Remove the temporary entries (names starting with '.', other than the cache entry's own bookkeeping,
    :data:`ultraflux.data.cache_entries.RESERVED`) that killed workers left; returns how many."""
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for sub in [directory, *(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for entry in sub.iterdir():
            if entry.name.startswith(".") and entry.name not in RESERVED:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed += 1
    return removed


def read_source(path: str) -> tuple[bytes | None, str, str]:
    """(bytes or None, id, error) for one source path; errors are stable strings (no address, no path). Plain
    ``os`` calls on the string (see :func:`ultraflux.io.read_bytes`)."""
    if is_member_path(path):  # an image inside a WebDataset tar (data/released.py)
        try:
            data = read_source_bytes(path)
        except OSError as err:
            return None, sha256_text(f"missing:{path}")[:16], f"unreadable: {err.strerror or err}"
        return data, sha256_bytes(data)[:16], ""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block the worker; folders, sockets, devices: no image
            detail = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
            return None, sha256_text(f"missing:{path}")[:16], f"unreadable: {detail}"
        data = read_bytes(path)
    except OSError as err:
        if os.path.islink(path) and not os.path.exists(path):
            detail = "dangling symlink"
        elif isinstance(err, FileNotFoundError):
            detail = "file not found"
        elif isinstance(err, PermissionError):
            detail = "permission denied"
        elif isinstance(err, IsADirectoryError):
            detail = "is a directory"
        else:
            detail = f"{type(err).__name__}: {err.strerror or 'read failed'}"
        return None, sha256_text(f"missing:{path}")[:16], f"unreadable: {detail}"
    return data, sha256_bytes(data)[:16], ""


# ---------------------------------------------------------------------------------------------------- pass 1


def analyze(data: bytes, image_id: str, cfg: dict) -> tuple[dict, np.ndarray | None]:
    """The pass-1 record of one image (statistics of the stored pixels), and the RGB if it was decoded anyway."""
    rec = {"id": image_id, "error": "", "format": "", "orig_width": 0, "orig_height": 0, "orientation": 1,
           "s_flat": [], "patch_grid": [0, 0], "entropy": float("nan"), "scores": {}}
    try:
        header = read_header(data, cfg["max_pixels"])
        gray, rgb = decode_gray(data, header, cfg["gray"], cfg["max_pixels"])
    except BadImage as bad:
        rec["error"] = bad.reason
        return rec, None
    rec["format"] = header.format
    rec["orientation"] = header.orientation
    rec["orig_width"], rec["orig_height"] = header.display_size
    s_flat = patch_flatness(gray, cfg["patch"])
    rec["s_flat"] = s_flat.ravel().tolist()
    rec["patch_grid"] = list(s_flat.shape)
    rec["entropy"] = entropy_bits(gray)
    return rec, rgb


def upscale_needed(width: int, height: int, cfg: dict) -> tuple[str, float]:
    """(bucket, upscale factor needed to fill it) for an image of this displayed size (see select_box)."""
    table = bucket_table(cfg["scale"], cfg["aspects"])
    bucket, box = select_box(width, height, table, cfg, "0" * 16)
    bw, bh = table[bucket]
    return bucket, max(bw / (box[2] - box[0]), bh / (box[3] - box[1]))


def is_candidate(rec: dict, cfg: dict, caption_error: str) -> bool:
    """Whether a row is still in the running after the cheap, per-image filters (so it needs stand-in scores)."""
    if rec["error"] or caption_error or cfg["variant"] == "baseline":
        return False
    fraction, _ = flat_summary(rec["s_flat"], cfg["flat_threshold"])
    if texture_reason(fraction, rec["entropy"], cfg["flat_max_fraction"], cfg["entropy_min"]):
        return False
    return not needs_too_much_upscale(upscale_needed(rec["orig_width"], rec["orig_height"], cfg)[1],
                                      cfg["max_upscale"])


def standin_scores(data: bytes, rec: dict, cfg: dict, rgb: np.ndarray | None) -> dict:
    """The configured classical stand-in scores on a ~512-px RGB copy (from ``rgb`` when already decoded)."""
    names = [n for n in (cfg["quality_standin"], cfg["aesthetic_standin"]) if n]
    if not names:
        return {}
    if rgb is not None:
        small = scorers.small_copy(rgb)
    else:
        header = read_header(data, cfg["max_pixels"])
        small = decode_small(data, header, scorers.STANDIN_SIDE, cfg["max_pixels"])
    return {name: scorers.STANDINS[name](small) for name in names}


def summarize_record(rec: dict, cfg: dict) -> dict:
    """What the main process needs from a record (no per-patch lists: memory does not grow with patches)."""
    values = np.asarray(rec.get("s_flat", []), dtype=np.float64)
    fraction, mean = flat_summary(values, cfg["flat_threshold"])
    has = not rec["error"]
    scores = rec.get("scores", {})
    hist = np.histogram(np.log10(np.maximum(values, 10 ** PLOT_BINS[0])), PLOT_BINS)[0] if values.size else None
    return {
        "id": rec["id"], "error": rec["error"], "orig_width": rec.get("orig_width", 0),
        "orig_height": rec.get("orig_height", 0), "orientation": rec.get("orientation", 1),
        "s_flat_fraction": fraction if has else float("nan"), "s_flat_mean": mean if has else float("nan"),
        "num_patches": int(values.size), "entropy": rec.get("entropy", float("nan")),
        "quality": scores.get(cfg["quality_standin"], float("nan")) if cfg["quality_standin"] else float("nan"),
        "aesthetic": scores.get(cfg["aesthetic_standin"], float("nan")) if cfg["aesthetic_standin"] else float("nan"),
        "patch_hist": hist.tolist() if hist is not None else [],
    }


def scan_one(task: dict) -> dict:
    """Pass 1 for one source (cached): ``task`` = path, caption_error, cfg (see curate.worker_config)."""
    cfg = task["cfg"]
    data, image_id, error = read_source(task["path"])
    if data is None:
        out = summarize_record({"id": image_id, "error": error}, cfg)
        return out | {"cache_hit": False}
    path = key_file(cfg["scan_dir"], image_id, "json")
    rec, rgb, hit = None, None, False
    if os.path.isfile(path):
        try:
            rec, hit = json.loads(read_bytes(path)), True
        except (OSError, ValueError):  # a damaged record is recomputed
            rec = None
    try:
        if rec is None:
            rec, rgb = analyze(data, image_id, cfg)
        if is_candidate(rec, cfg, task["caption_error"]):
            missing = [n for n in (cfg["quality_standin"], cfg["aesthetic_standin"]) if n and n not in rec["scores"]]
            if missing:
                rec["scores"].update(standin_scores(data, rec, cfg, rgb))
                hit = False
    except BadImage as bad:  # the colour decode failed although the gray one worked
        rec["error"] = bad.reason
    except Exception as err:  # one image never kills the run: record why, do not cache (a fixed version retries)
        out = summarize_record({"id": image_id, "error": f"failed: {type(err).__name__}: {err}"}, cfg)
        return out | {"cache_hit": False}
    if not hit:
        atomic_write_bytes(path, json.dumps(rec).encode())
    return summarize_record(rec, cfg) | {"cache_hit": hit}


# ---------------------------------------------------------------------------------------------------- pass 2


def crop_box(width: int, height: int, bw: int, bh: int) -> tuple[float, float, float, float]:
    """Largest centred box of aspect bw/bh inside a width x height image (float coordinates)."""
    target = bw / bh
    if width / height > target:
        cw, ch = height * target, float(height)
    else:
        cw, ch = float(width), width / target
    x0, y0 = (width - cw) / 2, (height - ch) / 2
    return x0, y0, x0 + cw, y0 + ch


def random_square_box(width: int, height: int, side: int,
                      rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Diffusion-4K: scale the short side to ``side``, random ``side`` x ``side`` crop; as a box in source pixels."""
    s = side / min(width, height)
    long_resized = round(max(width, height) * s)
    c = min(width, height)
    # The offset is drawn in resized pixels; clamp it in source pixels, where rounding could push the box past the edge.
    offset = min(int(rng.integers(0, max(0, long_resized - side) + 1)) / s, float(max(width, height) - c))
    return (offset, 0.0, offset + c, float(c)) if width >= height else (0.0, offset, float(c), offset + c)


def select_box(width: int, height: int, table: dict, cfg: dict, image_id: str) -> tuple[str, tuple]:
    """(bucket, crop box in displayed pixels): ``multiaspect`` snaps to the nearest bucket by |log aspect| and takes
    the largest centred crop; ``baseline`` (Diffusion-4K) takes a random square (deterministic in seed and id)."""
    from .buckets import nearest_bucket

    if cfg["variant"] == "baseline":
        bucket = "1:1" if "1:1" in table else nearest_bucket(1, 1, table)
        rng = np.random.default_rng([int(cfg["seed"]), int(image_id[:8], 16)])
        return bucket, random_square_box(width, height, table[bucket][0], rng)
    bucket = nearest_bucket(width, height, table)
    return bucket, crop_box(width, height, *table[bucket])


def resize_to(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx3 uint8 array to ``size`` = (w, h) by the rule of :data:`CUBIC_MIN_SCALE`."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    scale = min(size[0] / w, size[1] / h)
    if scale >= CUBIC_MIN_SCALE:
        return cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
    import torch

    if _WORKER["single_thread"]:
        torch.set_num_threads(1)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    t = t.contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(t, (size[1], size[0]), mode="bicubic", antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def encode(bgr: np.ndarray, image_format: str, quality: int) -> bytes:
    """JPEG (libjpeg-turbo, 4:2:0, baseline) at ``quality``, or lossless PNG (zlib level 1)."""
    if image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {bgr.shape} image as {image_format}")
    return buf.tobytes()


def render(data: bytes, header: Header, box: tuple, size: tuple[int, int], image_format: str, quality: int,
           max_pixels: int) -> bytes:
    """Bucket image bytes: decode (DCT-reduced when the box allows), crop ``box`` (displayed px), resize, encode."""
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    reduce = dct_reduction(box_w, box_h, 1) if header.fast_jpeg else 1
    while reduce > 1 and (box_w / reduce < size[0] or box_h / reduce < size[1]):
        reduce //= 2  # only as far as the crop stays at least as large as the bucket
    bgr = decode_rgb(data, header, reduce=reduce, max_pixels=max_pixels, bgr=True)
    sy, sx = bgr.shape[0] / header.display_size[1], bgr.shape[1] / header.display_size[0]
    x0, y0 = round(box[0] * sx), round(box[1] * sy)
    x1, y1 = max(x0 + 1, round(box[2] * sx)), max(y0 + 1, round(box[3] * sy))
    return encode(resize_to(bgr[y0:y1, x0:x1], size), image_format, quality)


def render_one(task: dict) -> dict:
    """Pass 2 for one kept row (cached): ``task`` = path, id, box, size, cfg."""
    cfg = task["cfg"]
    path = key_file(cfg["render_dir"], task["id"], "jpg" if cfg["image_format"] == "jpeg" else "png")
    if os.path.isfile(path):
        return {"id": task["id"], "error": "", "cache_hit": True}
    data, image_id, error = read_source(task["path"])
    if data is None or image_id != task["id"]:
        return {"id": task["id"], "error": error or "failed: the source changed during curation", "cache_hit": False}
    try:
        header = read_header(data, cfg["max_pixels"])
        out = render(data, header, tuple(task["box"]), tuple(task["size"]), cfg["image_format"],
                     cfg["image_quality"], cfg["max_pixels"])
    except BadImage as bad:
        return {"id": task["id"], "error": bad.reason, "cache_hit": False}
    except Exception as err:  # one image never kills the run
        return {"id": task["id"], "error": f"failed: {type(err).__name__}: {err}", "cache_hit": False}
    atomic_write_bytes(path, out)
    return {"id": task["id"], "error": "", "cache_hit": False}


_WORKER = {"single_thread": False}


def init_worker() -> None:
    """Pool-worker initialiser: one OpenCV (and torch, when used) thread per worker (the pool is the parallelism)."""
    cv2.setNumThreads(1)
    _WORKER["single_thread"] = True
