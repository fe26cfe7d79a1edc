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

from ultraflux.pipelines.memory import MEMORY_MODES
from ultraflux.pipelines.pipeline_ultraflux import DECODE_MODES, OFFLOAD_MODES, TILING_MODES


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
    ap.add_argument("--vae-tiling", choices=TILING_MODES, default=None, help="default: sample.vae_tiling")
    ap.add_argument("--vae-decode", choices=DECODE_MODES, default=None, help="default: sample.vae_decode")
    ap.add_argument("--offload", choices=OFFLOAD_MODES, default=None, help="default: sample.offload")
    ap.add_argument("--memory", choices=MEMORY_MODES, default=None,
                    help="default: sample.memory (fp8 weights / group offload; README: what runs at 4096^2)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", required=True)
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from ultraflux.config import load_params
    from ultraflux.data.buckets import bucket_table
    from ultraflux.models.release import RopeMismatchError
    from ultraflux.sampling import generate_file, parse_size

    params = load_params(args.params)
    if args.size:
        try:
            w, h = parse_size(args.size)
        except ValueError as e:
            raise SystemExit(f"--size: {e}")
    else:
        table = bucket_table(params["curate"]["buckets"]["scale"])
        if args.aspect not in table:
            raise SystemExit(f"--aspect {args.aspect!r} is not in the bucket table: {', '.join(table)}")
        w, h = table[args.aspect]
    for flag, p in (("--transformer", args.transformer), ("--vae", args.vae)):
        if not Path(p).is_dir():
            raise SystemExit(f"{flag} {p}: not a model directory (run `dvc repro` first or pass {flag})")
    overrides = {"vae_tiling": args.vae_tiling, "vae_decode": args.vae_decode, "offload": args.offload, "memory": args.memory}
    try:
        info = generate_file(params, args.transformer, args.vae, args.prompt, args.out, w, h, seed=args.seed,
                             steps=args.steps, guidance=args.guidance, overrides=overrides)
    except RopeMismatchError as e:
        raise SystemExit(f"{args.params}: {e}")
    print(json.dumps(info))
    return 0
