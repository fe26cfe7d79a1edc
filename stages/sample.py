"""DVC stage `sample`: the prompt list x aspect ratios, with the stage-2 and the stage-1 model (for the judge).

Decode (tiled above sample.vae_tiling_min_pixels, partitioned for official weights), offload and dtype: params.yaml's
``sample`` keys, applied by ``load_pipeline``. On several processes (``python -m ultraflux.launch sample``) the
images are split over them (``ultraflux.sampling.sample_set``); rank 0 refines the prompts and writes prompts.json.
"""
import json
import sys
from pathlib import Path

from ultraflux.stage import run_stage

OUT = Path("outputs/samples")


def main(params, logger):
    from ultraflux import distributed
    from ultraflux.models.transformer import load_transformer
    from ultraflux.pipelines import load_pipeline
    from ultraflux.sampling import sample_set, trained_transformer
    from ultraflux.io import write_json
    from ultraflux.tracking import repo_root

    distributed.process_state()   # joins the process group and picks this process' GPU before the pipeline loads
    weights = params["sample"]["weights"]   # raw | ema
    pipe = load_pipeline(params, trained_transformer("outputs/dit_stage2", weights), Path("outputs/vae/vae"))
    prompts = list(params["sample"]["prompts"])
    if distributed.is_main():
        if params["sample"]["refine_prompts"]:
            from ultraflux.evaluation.refiner import refine_prompts

            prompts = refine_prompts(prompts, params["refiner"], repo_root() / ".cache" / "refiner")
        OUT.mkdir(parents=True, exist_ok=True)
        write_json(OUT / "prompts.json", prompts)
    distributed.barrier()
    prompts = json.loads((OUT / "prompts.json").read_text())
    timing, tiled = {}, 0
    for label in ("dit_stage2", "dit_stage1"):
        if label != "dit_stage2":  # same VAE and text encoders: swap only the transformer
            pipe.replace_transformer(load_transformer(trained_transformer(Path("outputs") / label, weights),
                                                      params["rope"], rope_from=params["sample"]["rope_from"]))
        result = sample_set(params, pipe, prompts, OUT / label)
        tiled += result.pop("vae_tiled_images")
        timing.update({f"{label}.{k}": v for k, v in result.items()})
    for grid in sorted((OUT / "dit_stage2").glob("grid_*.png")):
        logger.log_artifact(grid, "samples")
    logger.log_metrics(timing)
    logger.set_tags({"sample.device": pipe.placement["device"], "sample.dtype": pipe.placement["dtype"],
                     "sample.offload": pipe.placement["offload"], "sample.rope": pipe.transformer.pos_embed.describe(),
                     "sample.weights": weights, "sample.memory": pipe.placement["memory"],
                     "sample.vae_decode": pipe.last_decode.get("mode", "")})
    return {"num_prompts": len(prompts), "aspects": len(params["sample"]["aspects"]), "vae_tiled_images": tiled,
            "weights": weights, "memory": pipe.placement["memory"],
            "vae_decode_partitioned": int(pipe.last_decode.get("mode") == "partitioned"), "_timing": timing}


def weights_rope(params):
    """Pretrained weights released, or trained weights saved, with another RoPE than rope.*: refused before any work
    (unless sample.rope_from: params)."""
    from ultraflux.models.transformer import RopeMismatchError, check_model_dir, rope_problems

    problems = rope_problems(params)
    for label in ("dit_stage2", "dit_stage1"):
        try:
            check_model_dir(Path("outputs") / label / "transformer", params["rope"], params["sample"]["rope_from"])
        except RopeMismatchError as e:
            problems.append(str(e))
    return problems


if __name__ == "__main__":
    from ultraflux.sampling import ema_problems

    sys.exit(run_stage("sample", main, checks=[weights_rope, ema_problems]))
