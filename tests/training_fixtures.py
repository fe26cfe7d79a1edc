"""Tiny curated sets and worker scripts for tests/test_training_*.py (no curation run: a hand-built manifest).

Images are random PNGs at small multiples of 32 px (F16 VAE x 2x2 packing), grouped in a few aspect buckets.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# Small bucket sizes (w, h): multiples of 32 px so latents pack 2x2.
TINY_BUCKETS = {"1:1": (64, 64), "2:1": (128, 64), "1:2": (64, 128)}


def make_curated(root: Path, counts: dict[str, int] | None = None, holdout: int = 2, seed: int = 0,
                 sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write ``root/images/*.png`` and ``root/manifest.parquet`` with the columns the trainers read."""
    counts = counts or {"1:1": 6, "2:1": 4, "1:2": 4}
    sizes = sizes or TINY_BUCKETS
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for bucket, count in counts.items():
        w, h = sizes[bucket]
        for k in range(count + (holdout if bucket == "1:1" else 0)):
            # smooth-ish random image: low-res noise upsampled, so reconstructions are learnable
            small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            name = f"images/{n:04d}.png"
            img.save(root / name)
            split = "holdout" if k >= count else "train"
            rows.append({"id": f"img{n:04d}", "image": name, "caption": f"a test picture number {n}",
                         "bucket": bucket, "kept": True, "split": split, "stage2": n % 2 == 0,
                         "texture_rank": float(rng.random())})
            n += 1
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
