"""The per-image function every engine runs: bytes -> statistics, bucket, resized candidate image, cached record.

``process_one(task)`` reads the file, hashes it (the ``id`` is the first 16 hex digits of the SHA-256 of the file's
bytes), and either returns the cached record ``<cache_dir>/<id>.json`` or calls :func:`analyze` and caches its
record (temp file + ``os.replace``, image first, record last, so an interrupted run never leaves a record without
its image). The cache directory is specific to the settings that change a record (:func:`fingerprint`); thresholds
that only change the final selection (flat threshold, entropy_min, quality/aesthetic cut-offs) are applied later, in
:mod:`ultraflux.data.select`, so changing them recomputes nothing, except that an image that newly passes the cheap
filters gets its resized image made then.

Resizing (seed Sec. 2.2): ``multiaspect`` snaps the image to the nearest bucket by |log aspect ratio|, takes the
largest centred crop of the bucket's aspect and resizes it with Pillow's Lanczos (antialiased) in one call
(``resize(box=crop)``); ``baseline`` (Diffusion-4K) scales the short side to the "1:1" bucket side and takes a
random square crop (deterministic from ``seed`` and ``id``). Either way a source that would need more than
``max_upscale`` upscaling is rejected "too_small". Candidate images are PNG (compress level 1: fast, lossless).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from . import scorers
from .buckets import bucket_table, nearest_bucket
from .decode import BadImage, decode_rgb
from .stats import entropy_bits, flat_summary, is_flat, patch_flatness, to_gray

CACHE_VERSION = 1
COUNTERS = {"analyze": 0}
"""How many times :func:`analyze` ran in this process (tests check that a resumed run computes nothing)."""


def fingerprint(cfg: dict) -> str:
    """Hash of the settings that change a per-image record (the cache directory name)."""
    keys = ("variant", "patch", "scale", "aspects", "max_upscale", "max_pixels", "quality_standin",
            "aesthetic_standin")
    material = {k: cfg.get(k) for k in keys}
    if cfg.get("variant") == "baseline":
        material["seed"] = cfg.get("seed")
    material["version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def needs_image(rec: dict, cfg: dict, caption_error: str) -> bool:
    """Whether the row can still be kept after the cheap filters (so it needs a resized candidate image)."""
    if rec["error"] or caption_error:
        return False
    if cfg["variant"] == "baseline":
        return True
    fraction, _ = flat_summary(rec["s_flat"], cfg["flat_threshold"])
    return not is_flat(fraction, cfg["flat_max_fraction"]) and rec["entropy"] >= cfg["entropy_min"]


def analyze(data: bytes, image_id: str, cfg: dict, caption_error: str, image_path: Path | None) -> dict:
    """Statistics + bucket of one image; writes the resized candidate to ``image_path`` (if given) when it may be
    kept."""
    COUNTERS["analyze"] += 1
    rec = {"id": image_id, "error": "", "orig_width": 0, "orig_height": 0, "s_flat": [], "patch_grid": [0, 0],
           "entropy": float("nan"), "bucket": "", "width": 0, "height": 0, "upscale": float("nan"),
           "quality": float("nan"), "aesthetic": float("nan"), "image": False}
    try:
        rgb = decode_rgb(data, cfg["max_pixels"])
    except BadImage as bad:
        rec["error"] = bad.reason
        return rec
    h, w = rgb.shape[:2]
    rec["orig_width"], rec["orig_height"] = w, h
    gray = to_gray(rgb)
    s_flat = patch_flatness(gray, cfg["patch"])
    rec["s_flat"] = [round(float(v), 6) for v in s_flat.ravel()]
    rec["patch_grid"] = list(s_flat.shape)
    rec["entropy"] = entropy_bits(gray)
    del gray
    if cfg.get("quality_standin"):
        rec["quality"] = scorers.STANDINS[cfg["quality_standin"]](rgb)
    if cfg.get("aesthetic_standin"):
        rec["aesthetic"] = scorers.STANDINS[cfg["aesthetic_standin"]](rgb)

    table = bucket_table(cfg["scale"], cfg["aspects"])
    if cfg["variant"] == "baseline":
        rec["bucket"] = "1:1" if "1:1" in table else nearest_bucket(1, 1, table)
        bw, bh = table[rec["bucket"]]
        rng = np.random.default_rng([int(cfg["seed"]), int(image_id[:8], 16)])
        box = random_square_box(w, h, bw, rng)
    else:
        rec["bucket"] = nearest_bucket(w, h, table)
        bw, bh = table[rec["bucket"]]
        box = crop_box(w, h, bw, bh)
    rec["width"], rec["height"] = bw, bh
    rec["upscale"] = max(bw / (box[2] - box[0]), bh / (box[3] - box[1]))
    if rec["upscale"] > cfg["max_upscale"] + 1e-9:
        rec["error"] = "too_small"
        return rec
    if image_path is not None and needs_image(rec, cfg, caption_error):
        resized = Image.fromarray(rgb).resize((bw, bh), Image.Resampling.LANCZOS, box=box)
        tmp = image_path.with_name(f".{image_path.name}.{os.getpid()}.tmp")
        resized.save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, image_path)
        rec["image"] = True
    return rec


def read_source(path: str) -> tuple[bytes | None, str, str]:
    """(bytes or None, id, error) for one source path."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        detail = "file not found" if isinstance(err, FileNotFoundError) else f"{type(err).__name__}: {err}"
        return None, hashlib.sha256(f"missing:{path}".encode()).hexdigest()[:16], f"unreadable: {detail}"
    return data, hashlib.sha256(data).hexdigest()[:16], ""


def process_one(task: dict) -> dict:
    """Record for one source (cached). ``task``: path, caption_error, cfg (see curate.worker_config)."""
    cfg = task["cfg"]
    cache_dir = Path(cfg["cache_dir"])
    data, image_id, error = read_source(task["path"])
    if data is None:
        return {"id": image_id, "error": error, "cache_hit": False}
    record_path = cache_dir / f"{image_id}.json"
    image_path = cache_dir / "images" / f"{image_id}.png"
    if record_path.is_file():
        rec = json.loads(record_path.read_text())
        if not needs_image(rec, cfg, task["caption_error"]) or image_path.is_file():
            rec["cache_hit"] = True
            return rec
    image_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        rec = analyze(data, image_id, cfg, task["caption_error"], image_path)
    except Exception as err:  # one image never kills the run: record why, do not cache (a fixed version retries)
        return {"id": image_id, "error": f"failed: {type(err).__name__}: {err}", "cache_hit": False}
    atomic_write_bytes(record_path, json.dumps(rec).encode())
    rec["cache_hit"] = False
    return rec


def init_worker() -> None:
    """Process-pool initialiser: one OpenCV thread per worker process (the pool is the parallelism)."""
    cv2.setNumThreads(1)

