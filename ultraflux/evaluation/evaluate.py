"""The `evaluate` stage: seed Table 2 (VAE reconstruction) and Table 5 (generation, per aspect ratio).

Both measurements use the curated evaluation set (manifest ``eval``: held out before the data variant's filters,
:func:`ultraflux.data.select.assign_split`), the same images in every co-design cell. Memory is bounded by
``evaluate.max_images``, not by the dataset: at most that many evaluation images are reconstructed (Table 2) and form
the real reference set of FID and the FD stand-in, read one at a time from the curated shards; the subset is fixed by
the image ids, so runs and cells are comparable.
A few held-out images are also saved as input | reconstruction crops for the report (``outputs/evaluate/recon``).

On several processes (``python -m ultraflux.launch evaluate``) the held-out images and the aspect ratios are split
round-robin (``ultraflux.distributed``); the per-image and per-aspect numbers are gathered in their original order,
so the metrics equal a one-process run's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ultraflux import distributed
from ultraflux.data.shards import load_image_tensor, open_image
from ultraflux.evaluation.metrics import ReconstructionLearned, build_reference, generation_metrics
from ultraflux.io import sha256_text

RECON_EXAMPLES = 4       # held-out images shown as input | reconstruction in the report
RECON_CROP = 256         # px, the centre crop shown


def bounded(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """At most ``n`` rows, the same ones whatever the order of the manifest (smallest sha256 of the id)."""
    if len(rows) <= n:
        return rows.sort_values("id")
    key = rows["id"].map(sha256_text)
    return rows.assign(_k=key).sort_values("_k").head(n).drop(columns="_k").sort_values("id")


def _crop_pair(x, r) -> Image.Image:
    """Input and reconstruction (tensors [3, H, W] in [-1, 1]) as one side-by-side centre crop."""
    h, w = x.shape[-2:]
    c = min(RECON_CROP, h, w)
    y0, x0 = (h - c) // 2, (w - c) // 2
    pair = [((t[:, y0:y0 + c, x0:x0 + c].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            for t in (x, r)]
    return Image.fromarray(np.concatenate([pair[0], np.full((c, 4, 3), 255, np.uint8), pair[1]], axis=1))


def vae_table(params: dict, manifest: pd.DataFrame, curated_dir: Path, vae_dir: Path, recon_dir: Path) -> dict:
    """Reconstruction of the held-out curated images at their bucket size (Table 2 columns)."""
    from ultraflux.evaluation.reconstruction import mean_metrics, per_image_metrics
    from ultraflux.models.vae import build_vae

    rows = manifest[manifest["eval"]]
    split = "holdout"
    if rows.empty:  # the curate guard normally prevents this; say so rather than silently evaluate on train images
        rows, split = manifest[manifest["kept"]], "train (no holdout images)"
    rows = bounded(rows, params["evaluate"]["max_images"])
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)}).eval()
    records = rows.to_dict("records")
    recon_dir.mkdir(parents=True, exist_ok=True)

    learned = ReconstructionLearned(params["evaluate"])

    def on_image(i, x, r):   # the first few kept as examples, and the learned metrics, from the measured pass
        learned.update(x, r)
        if i < RECON_EXAMPLES:
            _crop_pair(x.float().cpu(), r.float().cpu()).save(recon_dir / f"{records[i]['id']}.png")

    values = []
    for i in distributed.progress(range(len(records)), "evaluate: reconstruction"):
        values += per_image_metrics(vae, [load_image_tensor(curated_dir, records[i])],
                                    lambda _, x, r, i=i: on_image(i, x, r))
    table = mean_metrics(distributed.gather(values))
    return {**table, **learned.result(), "split": split, "num_images": int(len(rows))}


def _mean_over_aspects(generation: dict) -> dict:
    """Mean of each metric over the aspect ratios when it is a number in every one; else the first reason."""
    keys = sorted({k for m in generation.values() for k in m} - {"num_images"})
    out = {}
    for k in keys:
        values = [m.get(k) for m in generation.values()]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[k] = float(np.mean(numbers)) if len(numbers) == len(values) else next(
            (v for v in values if isinstance(v, str)), "not reported")
    return out


def evaluate_run(params: dict, curated_dir: Path, vae_dir: Path, samples_dir: Path,
                 out_dir: Path = Path("outputs/evaluate")) -> dict:
    """Generation metrics per aspect ratio of the stage-2 samples against a bounded real reference set."""
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    cfg = params["evaluate"]
    out: dict = {"vae": vae_table(params, manifest, curated_dir, vae_dir, out_dir / "recon"), "generation": {}}
    kept = bounded(manifest[manifest["eval"]], cfg["max_images"])
    aspects = list(params["sample"]["aspects"])
    reference = None   # built by each process that scores an aspect ratio
    prompts = json.loads((samples_dir / "prompts.json").read_text())
    scored = []
    for aspect in distributed.progress(aspects, "evaluate: generation"):
        reference = reference or build_reference((open_image(curated_dir, r) for r in kept.to_dict("records")),
                                                 cfg["fid_inception_weights"])
        paths = sorted((samples_dir / "dit_stage2" / aspect.replace(":", "x")).glob("*.png"))
        images = [Image.open(p).convert("RGB") for p in paths]
        # file i.png was generated from prompt i (ultraflux.sampling.sample_set); one entry per aspect (gather order)
        scored.append((aspect.replace(":", "x"), generation_metrics(
            images, params, reference, [str(p) for p in paths], [prompts[int(p.stem)] for p in paths])
            if images else None))
    out["generation"] = {k: m for k, m in distributed.gather(scored) if m is not None}
    out["generation_mean"] = _mean_over_aspects(out["generation"])
    out["num_reference_images"] = int(len(kept))
    return out
