"""``ultraflux generate``: one image from a trained (or the official) model. Argument parsing only; the work is
``ultraflux.sampling.generate_file``.

  ultraflux generate --prompt "a lighthouse at dusk" --aspect 16:9 --seed 0 --out img.png
  ultraflux generate --prompt ... --size 4096x4096 --vae-tiling on --offload model --out big.png
  ultraflux generate --prompt ... --transformer /models/UltraFlux-v1 --vae /models/UltraFlux-v1/vae --out x.png
      (official weights: partitioned decode under --vae-decode auto; params.yaml needs the paper's rope keys)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from typing import get_args

from ultraflux.schema import Sample


def _choices(key: str) -> tuple[str, ...]:
    """The values params.yaml's ``sample.<key>`` accepts (the schema's), without importing torch for ``--help``."""
    return get_args(Sample.model_fields[key].annotation)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ultraflux generate", description="Generate one image with a trained model.")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--aspect", default="1:1", help="an aspect ratio of the bucket table, e.g. 16:9")
    ap.add_argument("--size", default=None, help="explicit WxH, e.g. 4096x2048 (overrides --aspect)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: sample.num_inference_steps")
    ap.add_argument("--guidance", type=float, default=None, help="default: sample.guidance_scale")
    ap.add_argument("--transformer", default="outputs/dit_stage2/transformer",
                    help="transformer directory (or a pipeline directory with transformer/)")
    ap.add_argument("--vae", default="outputs/vae/vae", help="VAE directory (or a pipeline directory with vae/)")
    ap.add_argument("--vae-tiling", choices=_choices("vae_tiling"), default=None, help="default: sample.vae_tiling")
    ap.add_argument("--vae-decode", choices=_choices("vae_decode"), default=None, help="default: sample.vae_decode")
    ap.add_argument("--offload", choices=_choices("offload"), default=None, help="default: sample.offload")
    ap.add_argument("--rope-from", choices=_choices("rope_from"), default=None,
                    help="default: sample.rope_from (weights = the RoPE saved beside trained weights)")
    ap.add_argument("--memory", choices=_choices("memory"), default=None,
                    help="default: sample.memory (fp8 weights / group offload; README: what runs at 4096^2)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True, help="image file; its extension picks the format (.png, .jpg, .webp ...)")
    return ap


def writable_formats() -> dict[str, str]:
    """{".png": "PNG", ...}: the extensions Pillow can write here."""
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def input_problems(args, params: dict) -> tuple[list[str], tuple[int, int] | None]:
    """Every problem with the command line, found before any model loads; and the image size (w, h). Light imports
    only (no torch) until the RoPE check, which reads the weights' json files."""
    from ultraflux.data.buckets import bucket_table
    from ultraflux.sampling import parse_size
    from ultraflux.stage import unwritable

    problems, size = [], None
    if not args.prompt.strip():
        problems.append("--prompt is empty: say what the image should show")
    if args.size:
        try:
            size = parse_size(args.size)
        except ValueError as e:
            problems.append(f"--size: {e}")
    else:
        table = bucket_table(params["curate"]["buckets"]["scale"])
        if args.aspect not in table:
            problems.append(f"--aspect {args.aspect!r} is not in the bucket table: {', '.join(table)}")
        else:
            size = table[args.aspect]
    limit = params["sample"]["max_pixels"]
    if size and size[0] * size[1] > limit:
        problems.append(f"--size {size[0]}x{size[1]} is {size[0] * size[1]:,} px, above sample.max_pixels = {limit:,} "
                        f"({args.params}); raise that key to generate larger images on purpose")
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps must be at least 1 (got {args.steps})")
    if args.guidance is not None and args.guidance < 0:
        problems.append(f"--guidance must not be negative (got {args.guidance})")
    out = Path(args.out)
    formats = writable_formats()
    if out.is_dir():
        problems.append(f"--out {out}: is a folder; name the image file, e.g. {out / 'image.png'}")
    elif out.suffix.lower() not in formats:
        known = ", ".join(e for e in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".bmp") if e in formats)
        problems.append(f"--out {out}: unknown image extension {out.suffix or '(none)'!r}; use one of {known}")
    problems += [f"--out {p}" for p in unwritable([str(out)])]
    for flag, p in (("--transformer", args.transformer), ("--vae", args.vae)):
        if not Path(p).is_dir():
            problems.append(f"{flag} {p}: not a model directory (run `dvc repro` first or pass {flag})")
    if Path(args.transformer).is_dir() and not problems:
        from ultraflux.models.transformer import RopeMismatchError, check_model_dir

        try:
            check_model_dir(args.transformer, params["rope"], args.rope_from or params["sample"]["rope_from"])
        except RopeMismatchError as e:
            problems.append(f"{args.params}: {e}")
    return problems, size


def main(argv: list[str]) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    from ultraflux.config import ParamsError, load_validated
    from ultraflux.sampling import generate_file, sample_with

    try:
        params = load_validated(args.params, check_paths=False)
    except ParamsError as e:
        ap.error(str(e))
    overrides = {"vae_tiling": args.vae_tiling, "vae_decode": args.vae_decode, "offload": args.offload,
                 "memory": args.memory, "rope_from": args.rope_from}
    try:  # the flags replace sample.* keys: the schema's cross-key rules hold for the combination too
        sample_with(params, overrides, f"{args.params} with the command's flags")
    except ParamsError as e:
        ap.error(str(e))
    problems, size = input_problems(args, params)
    if problems:
        ap.error("\n  ".join(problems))
    w, h = size
    info = generate_file(params, args.transformer, args.vae, args.prompt, args.out, w, h, seed=args.seed,
                         steps=args.steps, guidance=args.guidance, overrides=overrides)
    print(json.dumps(info))
    return 0
