"""DVC stages `dit_stage1` / `dit_stage2`: two-stage DiT training (seed Sec. 2.2, Table 3).

usage: python stages/dit.py dit_stage1|dit_stage2      (multi-process: accelerate launch stages/dit.py ...)
"""
import sys
from pathlib import Path

from ultraflux.stage import run_stage


def main(stage):
    def fn(params, logger):
        from ultraflux.distributed import init_cpu_group
        from ultraflux.tracking import repo_root
        from ultraflux.training.dit import train_dit

        init_cpu_group()   # DDP on several CPU processes (tests, laptops): gloo, before train_dit's Accelerator

        init = Path("outputs/dit_stage1/transformer") if stage == "dit_stage2" else None
        out = Path("outputs") / stage
        out.mkdir(parents=True, exist_ok=True)
        metrics = train_dit(params, stage, Path("outputs/curated"), Path("outputs/vae/vae"), out,
                            Path("checkpoints") / stage, repo_root() / params["latent_cache"]["dir"],
                            init_transformer=init, logger=logger)
        logger.log_artifact(out / "loss.csv")
        logger.log_artifact(out / "val_loss.csv")
        return metrics
    return fn


def weights_rope(params):
    """Pretrained weights released with another RoPE than rope.*: refused before any work."""
    from ultraflux.models.transformer import rope_problems

    return rope_problems(params)


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else ""
    if stage not in ("dit_stage1", "dit_stage2"):
        raise SystemExit("usage: python stages/dit.py dit_stage1|dit_stage2")
    sys.exit(run_stage(stage, main(stage), checks=[weights_rope]))
