"""Tiny curated sets and worker scripts for tests/test_training_*.py (no curation run: a hand-built manifest).

Images are random PNGs at small multiples of 32 px (F16 VAE x 2x2 packing), grouped in a few aspect buckets, written
as WebDataset tar shards with ``ultraflux.data.shards.ShardWriter`` (the curated layout): manifest rows carry
``shard``, ``key``, ``offset``, ``nbytes``, ``width`` and ``height``.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ultraflux.data.shards import SHARD_DIR, ShardWriter

# Small bucket sizes (w, h): multiples of 32 px so latents pack 2x2.
TINY_BUCKETS = {"1:1": (64, 64), "2:1": (128, 64), "1:2": (64, 128)}


def make_curated(root: Path, counts: dict[str, int] | None = None, holdout: int = 2, seed: int = 0,
                 sizes: dict[str, tuple[int, int]] | None = None, corrupt: tuple[int, ...] = ()) -> Path:
    """Write ``root/shards/*.tar`` and ``root/manifest.parquet`` with the columns the trainers read.

    ``corrupt``: row numbers whose stored image bytes are garbage (a decoder must reject them).
    """
    counts = counts or {"1:1": 6, "2:1": 4, "1:2": 4}
    sizes = sizes or TINY_BUCKETS
    rng = np.random.default_rng(seed)
    samples, n = [], 0
    for bucket, count in counts.items():
        w, h = sizes[bucket]
        for k in range(count + (holdout if bucket == "1:1" else 0)):
            # smooth-ish random image: low-res noise upsampled, so reconstructions are learnable
            small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
            data = b"not an image" * 10 if n in corrupt else png(Image.fromarray(small).resize((w, h), Image.BILINEAR))
            samples.append({"data": data, "caption": f"a test picture number {n}", "bucket": bucket, "width": w,
                            "height": h, "split": "holdout" if k >= count else "train",
                            "texture_rank": float(rng.random())})
            n += 1
    return write_curated(root, samples)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_curated(root: Path, samples: list[dict]) -> Path:
    """The curated layout of ``samples`` (dicts: ``data`` image bytes, ``caption``, ``bucket``, ``width``, ``height``,
    ``split``, ``texture_rank``): shards of at most 5 images per split and the manifest (every row kept; ``stage2``
    on every other row)."""
    rows = []
    writers = {split: ShardWriter(root / SHARD_DIR, split, root, max_count=5) for split in ("train", "holdout")}
    for n, s in enumerate(samples):
        key = f"img{n:04d}"
        loc = writers[s["split"]].write(key, {"png": s["data"], "txt": s["caption"].encode(),
                                               "json": json.dumps({"id": key}).encode()})
        rows.append({"id": key, **{c: s[c] for c in ("caption", "bucket", "width", "height")}, "kept": True,
                     "split": s["split"], "eval": s["split"] == "holdout", "stage2": n % 2 == 0,
                     "texture_rank": s["texture_rank"],
                     "shard": loc.shard, "key": loc.key, "offset": loc.offset, "nbytes": loc.nbytes})
    for writer in writers.values():
        writer.close()
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root


def tiny_params(base: dict, stage: str = "dit_stage1", **overrides) -> dict:
    """A copy of params.yaml's dict with ``stage`` overridden for fast tests (keys of ``overrides`` go into stage)."""
    p = copy.deepcopy(base)
    p[stage].update(overrides)
    return p


def save_vae(params: dict, path: Path) -> Path:
    from ultraflux.models.vae import build_vae

    build_vae(params["model"], seed=params["seed"]).save_pretrained(path)
    return path


def write_job(path: Path, **job) -> Path:
    path.write_text(json.dumps(job, default=str))
    return path
