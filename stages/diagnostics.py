"""DVC stage `diagnostics`: seed Figs. 1-3 (RoPE band analysis, 2D phase patterns, wavelet statistics of latents)."""
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/diagnostics")


def main(params, logger):
    import pandas as pd

    from ultraflux.diagnostics import run_diagnostics
    from ultraflux.models.vae import build_vae
    from ultraflux.data.shards import load_image_tensor
    from ultraflux.training.cache import encode_latents

    manifest = pd.read_parquet("outputs/curated/manifest.parquet")
    vae = build_vae({**params["model"], "vae_pretrained": "outputs/vae/vae"}).eval()
    kept = manifest[manifest["kept"]]
    latents = [encode_latents(vae, load_image_tensor("outputs/curated", row)[None])[0]
               for row in kept.to_dict("records")]
    metrics = run_diagnostics(params, latents, OUT)
    logger.log_artifact(OUT, "diagnostics")
    return metrics


if __name__ == "__main__":
    run_stage("diagnostics", main)
