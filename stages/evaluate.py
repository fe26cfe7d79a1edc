"""DVC stage `evaluate`: VAE reconstruction (seed Table 2) and generation metrics per aspect ratio (Table 5)."""
import sys
from pathlib import Path

from ultraflux.stage import run_stage


def main(params, logger):
    from ultraflux.evaluation.evaluate import evaluate_run

    return evaluate_run(params, Path("outputs/curated"), Path("outputs/vae/vae"), Path("outputs/samples"))


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", main))
