"""DVC stage `vae`: F16 VAE decoder post-training (seed Sec. 2.2, Table 3) -> outputs/vae/vae."""
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/vae")


def main(params, logger):
    from ultraflux.training.vae import train_vae

    return train_vae(params, Path("outputs/curated"), OUT, logger=logger, ckpt_dir=Path("checkpoints/vae"))


if __name__ == "__main__":
    sys.exit(run_stage("vae", main))
