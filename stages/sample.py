"""DVC stage `sample`: the prompt list x aspect ratios, with the stage-2 and the stage-1 model (for the judge)."""
import json
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/samples")


def main(params, logger):
    from ultraflux.models.transformer import load_transformer
    from ultraflux.pipelines import load_pipeline
    from ultraflux.sampling import sample_set
    from ultraflux.tracking import repo_root

    prompts = list(params["sample"]["prompts"])
    if params["sample"]["refine_prompts"]:
        from ultraflux.evaluation.refiner import refine_prompts

        prompts = refine_prompts(prompts, params["refiner"], repo_root() / ".cache" / "refiner")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompts.json").write_text(json.dumps(prompts, indent=2))
    timing = {}
    pipe = load_pipeline(params, Path("outputs/dit_stage2/transformer"), Path("outputs/vae/vae"))
    for label in ("dit_stage2", "dit_stage1"):
        if label != "dit_stage2":  # same VAE and text encoders: swap only the transformer
            pipe.transformer = load_transformer(Path("outputs") / label / "transformer", params["rope"])
        timing.update({f"{label}.{k}": v for k, v in sample_set(params, pipe, prompts, OUT / label).items()})
    for grid in sorted((OUT / "dit_stage2").glob("grid_*.png")):
        logger.log_artifact(grid, "samples")
    logger.log_metrics(timing)
    return {"num_prompts": len(prompts), "aspects": len(params["sample"]["aspects"]), "_timing": timing}


if __name__ == "__main__":
    run_stage("sample", main)
