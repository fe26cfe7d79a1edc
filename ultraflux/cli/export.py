"""``ultraflux export``: a trained transformer, VAE or LoRA as one safetensors file in the original Flux layout
(ComfyUI / Forge). Argument parsing only; the work is ``ultraflux.models.export``.

  ultraflux export outputs/dit_stage2/transformer --out ultraflux-bf16.safetensors --dtype bf16
  ultraflux export outputs/dit_stage2/transformer --out ultraflux-fp8.safetensors --dtype fp8
  ultraflux export outputs/dit_stage2/transformer --merge-lora outputs/dit_stage2/lora --out merged.safetensors
  ultraflux export outputs/vae/vae --out ae.safetensors
  ultraflux export outputs/dit_stage2/lora --out my-lora.safetensors          (kohya keys: lora_unet_double_blocks_...)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from ultraflux.models.export import EXPORT_DTYPES, EXPORTERS

    ap = argparse.ArgumentParser(prog="ultraflux export", description="Export a diffusers transformer / VAE / LoRA "
                                 "directory as one safetensors file in the original Flux (BFL) layout.")
    ap.add_argument("source", help="a transformer, VAE or LoRA directory (kind detected from its files)")
    ap.add_argument("--out", required=True, help="the .safetensors file to write")
    ap.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default=None,
                    help="default: bf16 (transformer, LoRA), fp32 (VAE); fp8 = float8_e4m3fn, transformer only")
    ap.add_argument("--kind", choices=("auto", *EXPORTERS), default="auto")
    ap.add_argument("--merge-lora", default=None, help="transformer only: merge this LoRA directory first")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from ultraflux.models.export import EXPORTERS, detect_kind

    if not Path(args.source).exists():
        raise SystemExit(f"{args.source}: no such file or directory")
    if not args.out.endswith(".safetensors"):
        raise SystemExit(f"--out {args.out}: must end with .safetensors")
    try:
        kind = detect_kind(args.source) if args.kind == "auto" else args.kind
        if args.merge_lora and kind != "transformer":
            raise ValueError(f"--merge-lora applies to a transformer, {args.source} is a {kind}")
        dtype = args.dtype or ("fp32" if kind == "vae" else "bf16")
        extra = {"lora": args.merge_lora} if args.merge_lora else {}
        info = EXPORTERS[kind](args.source, args.out, dtype, **extra)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"ultraflux export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0
