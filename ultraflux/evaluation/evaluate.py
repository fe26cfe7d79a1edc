"""The `evaluate` stage: seed Table 2 (VAE reconstruction) and Table 5 (generation, per aspect ratio)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image

from ultraflux.evaluation.metrics import generation_metrics, not_computed


def vae_table(params: dict, curated_dir: Path, vae_dir: Path) -> dict:
    """Reconstruction of the held-out curated images at their bucket size (Table 2 columns)."""
    from ultraflux.models.vae import build_vae
    from ultraflux.data.shards import load_image_tensor
    from ultraflux.evaluation.reconstruction import reconstruction_metrics

    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    rows = manifest[manifest["kept"] & (manifest["split"] == "holdout")]
    if rows.empty:  # tiny sets may have no holdout row; fall back to training images and say so
        rows, split = manifest[manifest["kept"]].head(4), "train (no holdout images)"
    else:
        split = "holdout"
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)}).eval()
    table = reconstruction_metrics(vae, (load_image_tensor(curated_dir, row) for row in rows.to_dict("records")))
    return {**table, "rfid": not_computed("rfid"), "lpips": not_computed("lpips"), "split": split,
            "num_images": int(len(rows))}


def evaluate_run(params: dict, curated_dir: Path, vae_dir: Path, samples_dir: Path) -> dict:
    """Generation metrics per aspect ratio of the stage-2 samples; the real reference set is the kept curated images."""
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    real = [Image.open(curated_dir / p).convert("RGB") for p in manifest.loc[manifest["kept"], "image"]]
    prompts = json.loads((samples_dir / "prompts.json").read_text())
    out: dict = {"vae": vae_table(params, curated_dir, vae_dir), "generation": {}}
    for aspect in params["sample"]["aspects"]:
        paths = sorted((samples_dir / "dit_stage2" / aspect.replace(":", "x")).glob("*.png"))
        images = [Image.open(p).convert("RGB") for p in paths]
        if images:  # file i.png was generated from prompt i (ultraflux.sampling.sample_set)
            out["generation"][aspect.replace(":", "x")] = generation_metrics(
                images, params, real, [str(p) for p in paths], [prompts[int(p.stem)] for p in paths])
    return out
