"""DVC stage `diagnostics`: seed Figs. 1-3 (RoPE band analysis, 2D phase patterns, wavelet statistics of latents).

Fig. 3 streams at most ``diagnostics.max_latents`` curated images (seed Sec. 4: 400) through the post-trained VAE.
"""
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/diagnostics")
CURATED = Path("outputs/curated")


def main(params, logger):
    import pandas as pd

    from ultraflux.diagnostics import evenly_spaced, latents_from_curated, run_diagnostics
    from ultraflux.models.vae import build_vae

    max_latents = int(params["diagnostics"]["max_latents"])
    kept = pd.read_parquet(CURATED / "manifest.parquet").query("kept")
    rows = kept.iloc[evenly_spaced(len(kept), max_latents)].to_dict("records")
    vae = build_vae({**params["model"], "vae_pretrained": "outputs/vae/vae"}).eval()
    latents = latents_from_curated(vae, CURATED, rows, max_latents)
    metrics = run_diagnostics(params, latents, OUT)
    logger.set_tags({"diagnostics.rope_in_force": (OUT / "rope_in_force.txt").read_text().strip()})
    logger.log_artifact(OUT, "diagnostics")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage("diagnostics", main))
