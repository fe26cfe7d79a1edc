"""Sampling: fixed prompts x aspect ratios, one image each, reproducible by seed; and the ``generate`` CLI.

Image sizes come from the aspect-ratio bucket table at ``curate.buckets.scale`` (1.0 = the 4K table), or explicitly
(``--size 4096x2048``). Image i of a prompt list uses ``torch.Generator().manual_seed(seed + i)``: same seed, same image.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ultraflux.data.buckets import bucket_table
from ultraflux.io import atomic_path


def image_size(params: dict, aspect: str) -> tuple[int, int]:
    return bucket_table(params["curate"]["buckets"]["scale"])[aspect]


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
    pipe.set_progress_bar_config(disable=not progress)
    gen = torch.Generator().manual_seed(seed)
    max_len = pipe.tokenizer_2.model_max_length if pipe.tokenizer_2.model_max_length < 10_000 else 512
    return pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                generator=gen, max_sequence_length=min(512, max_len)).images[0]


def sample_set(params: dict, pipe, prompts: list[str], out_dir: Path, progress: bool = True) -> dict:
    """Write ``out_dir/<aspect>/<i>.png`` and ``out_dir/grid_<aspect>.png``; returns seconds per image by aspect."""
    cfg, seconds = params["sample"], {}
    jobs = [(a, i, p) for a in cfg["aspects"] for i, p in enumerate(prompts)]
    bar = tqdm(jobs, desc=f"sample {out_dir.name}", disable=not progress)
    by_aspect: dict[str, list[Image.Image]] = {}
    for aspect, i, prompt in bar:
        w, h = image_size(params, aspect)
        t0 = time.perf_counter()
        img = generate(pipe, prompt, w, h, cfg["num_inference_steps"], cfg["guidance_scale"], params["seed"] + i)
        seconds.setdefault(aspect, []).append(time.perf_counter() - t0)
        path = out_dir / aspect.replace(":", "x") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".png") as tmp:
            img.save(tmp)
        by_aspect.setdefault(aspect, []).append(img)
    for aspect, imgs in by_aspect.items():
        make_grid(imgs).save(out_dir / f"grid_{aspect.replace(':', 'x')}.png")
    return {f"sec_per_image_{a.replace(':', 'x')}": sum(v) / len(v) for a, v in seconds.items()}


def cli_generate(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="ultraflux generate", description="Generate one image with a trained model.")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--aspect", default="1:1", help="an aspect ratio of the bucket table, e.g. 16:9")
    ap.add_argument("--size", default=None, help="explicit WxH, e.g. 4096x2048 (overrides --aspect)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: sample.num_inference_steps")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--transformer", default="outputs/dit_stage2/transformer")
    ap.add_argument("--vae", default="outputs/vae/vae")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from ultraflux.config import load_params
    from ultraflux.pipelines import load_pipeline

    params = load_params(args.params)
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--size must look like 4096x2048, got {args.size!r}")
    else:
        table = bucket_table(params["curate"]["buckets"]["scale"])
        if args.aspect not in table:
            raise SystemExit(f"--aspect {args.aspect!r} is not in the bucket table: {', '.join(table)}")
        w, h = table[args.aspect]
    for p in (args.transformer, args.vae):
        if not Path(p).is_dir():
            raise SystemExit(f"{p}: not a model directory (run `dvc repro` first or pass --transformer/--vae)")
    pipe = load_pipeline(params, args.transformer, args.vae)
    img = generate(pipe, args.prompt, w, h, args.steps or params["sample"]["num_inference_steps"],
                   args.guidance or params["sample"]["guidance_scale"], args.seed, progress=True)
    with atomic_path(args.out, Path(args.out).suffix) as tmp:
        img.save(tmp)
    print(json.dumps({"out": args.out, "width": w, "height": h, "seed": args.seed}))
    return 0
