"""Sampling: fixed prompts x aspect ratios, one image each, reproducible by seed; and the work behind ``generate``.

Image sizes come from the aspect-ratio bucket table at ``curate.buckets.scale`` (1.0 = the 4K table), or explicitly
(``--size 4096x2048``). Image i of a prompt list uses ``torch.Generator().manual_seed(seed + i)``: same seed, same image.
How the VAE decodes (tiled above ``sample.vae_tiling_min_pixels``, partitioned for the official weights) and where the
pipeline runs (``sample.offload``, ``sample.dtype``) are params.yaml's ``sample`` keys, applied by
``ultraflux.pipelines.load_pipeline``; ``generate`` and ``sample_set`` report what each image used.

On several processes (``accelerate launch``, ``ultraflux.distributed``) the (aspect, prompt) jobs are split
round-robin; each process writes its images (one filesystem), rank 0 gathers what they measured, draws the grids
from the written files and counts every process' images in its progress bar. The seed of an image depends only on
its prompt, so the files are byte-identical to a one-process run on the same device type.
"""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from ultraflux import distributed
from ultraflux.data.buckets import bucket_table
from ultraflux.io import atomic_path

SAMPLE_OVERRIDES = ("vae_tiling", "vae_decode", "offload", "memory", "rope_from")  # keys a command may override


def trained_transformer(stage_dir: str | Path, weights: str) -> Path:
    """A DiT stage's trained (``raw``) or averaged (``ema``: ``transformer/ema``) weights, per ``sample.weights``."""
    path = Path(stage_dir) / "transformer"
    return path / "ema" if weights == "ema" else path


def ema_problems(params: dict) -> list[str]:
    """For ``run_stage(checks=...)``: ``sample.weights: ema`` needs the EMA weights of both DiT stages on disk."""
    if params["sample"]["weights"] != "ema":
        return []
    return [f"sample.weights is ema but {path} is missing (set {stage}.ema and re-run {stage})"
            for stage in ("dit_stage2", "dit_stage1")
            if not (path := trained_transformer(Path("outputs") / stage, "ema") / "config.json").is_file()]


def image_size(params: dict, aspect: str) -> tuple[int, int]:
    return bucket_table(params["curate"]["buckets"]["scale"])[aspect]


def parse_size(size: str) -> tuple[int, int]:
    """``"4096x2048"`` -> (4096, 2048); sides must be positive multiples of 32 px (F16 VAE x 2x2 patches)."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 4096x2048, got {size!r}") from None
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise ValueError(f"size sides must be positive multiples of 32 px (16 px VAE x 2x2 patches), got {size!r}")
    return w, h


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 4) -> Image.Image:
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * (w + pad), (k // cols) * (h + pad)))
    return grid


def generate(pipe, prompt: str, width: int, height: int, steps: int, guidance: float, seed: int,
             progress: bool = False) -> Image.Image:
    import torch

    pipe.set_progress_bar_config(disable=not progress)
    gen = torch.Generator().manual_seed(seed)
    max_len = pipe.tokenizer_2.model_max_length if pipe.tokenizer_2.model_max_length < 10_000 else 512
    return pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                generator=gen, max_sequence_length=min(512, max_len)).images[0]


def sample_path(out_dir: Path, aspect: str, i: int) -> Path:
    return out_dir / aspect.replace(":", "x") / f"{i:03d}.png"


def sample_set(params: dict, pipe, prompts: list[str], out_dir: Path, progress: bool = True) -> dict:
    """Write ``out_dir/<aspect>/<i>.png`` and ``out_dir/grid_<aspect>.png``; returns seconds per image by aspect and
    ``vae_tiled_images`` (how many images the VAE decoded tiled). Collective on several processes (module doc)."""
    cfg = params["sample"]
    jobs = [(a, i, p) for a in cfg["aspects"] for i, p in enumerate(prompts)]
    done = []
    for aspect, i, prompt in distributed.progress(jobs, f"sample {out_dir.name}", progress):
        w, h = image_size(params, aspect)
        t0 = time.perf_counter()
        img = generate(pipe, prompt, w, h, cfg["num_inference_steps"], cfg["guidance_scale"], params["seed"] + i)
        seconds = time.perf_counter() - t0
        path = sample_path(out_dir, aspect, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".png") as tmp:
            img.save(tmp)
        done.append((aspect, seconds, int(pipe.last_decode.get("tiled", False))))
    done = distributed.gather(done)     # every image is on disk once all processes are here
    seconds_by_aspect: dict[str, list[float]] = {}
    for aspect, sec, _ in done:
        seconds_by_aspect.setdefault(aspect, []).append(sec)
    if distributed.is_main():
        for aspect in cfg["aspects"]:
            with atomic_path(out_dir / f"grid_{aspect.replace(':', 'x')}.png", ".png") as tmp:
                make_grid([Image.open(sample_path(out_dir, aspect, i)) for i in range(len(prompts))]).save(tmp)
    distributed.barrier()
    return {"vae_tiled_images": sum(t for *_, t in done),
            **{f"sec_per_image_{a.replace(':', 'x')}": sum(v) / len(v) for a, v in seconds_by_aspect.items()}}


def sample_with(params: dict, overrides: dict | None, source: str = "params.yaml") -> dict:
    """``params``' sample section with a command's ``overrides`` (``SAMPLE_OVERRIDES``; None keeps the value),
    validated as a whole: the schema's cross-key rules hold for the combination (a ``ParamsError`` names ``source``)."""
    from ultraflux.config import validated_section

    bad = set(overrides or {}) - set(SAMPLE_OVERRIDES)
    if bad:
        raise ValueError(f"cannot override sample.{', sample.'.join(sorted(bad))} here")
    merged = {**params["sample"], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return validated_section({"sample": merged}, "sample", source)


def generate_file(params: dict, transformer_dir: str | Path, vae_dir: str | Path, prompt: str, out: str | Path,
                  width: int, height: int, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                  overrides: dict | None = None, progress: bool = True) -> dict:
    """One image from trained (or official) weights to ``out`` (written atomically); returns what was done.

    ``overrides`` replace ``sample`` keys (``SAMPLE_OVERRIDES``) for this call only.
    """
    from ultraflux.pipelines import load_pipeline

    sample_cfg = sample_with(params, overrides)
    pipe = load_pipeline({**params, "sample": sample_cfg}, transformer_dir, vae_dir)
    img = generate(pipe, prompt, width, height, steps or sample_cfg["num_inference_steps"],
                   sample_cfg["guidance_scale"] if guidance is None else guidance, seed, progress=progress)
    with atomic_path(out, Path(out).suffix) as tmp:
        img.save(tmp)
    return {"out": str(out), "width": width, "height": height, "seed": seed,
            "transformer": str(Path(transformer_dir).resolve()), "vae": str(Path(vae_dir).resolve()),
            "rope": pipe.transformer.pos_embed.describe(),
            "vae_tiled": pipe.last_decode["tiled"], "vae_decode": pipe.last_decode["mode"], **pipe.placement}
