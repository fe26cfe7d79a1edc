"""A native-4K sample with the tiny models on the CPU: untiled vs tiled VAE decode (issue 10.4).

Each variant runs in a fresh subprocess (so one's allocations cannot lower the other's peak): the same transformer,
VAE, prompt, seed and steps through ``load_pipeline`` with ``sample.vae_tiling`` off / on. Printed per variant: peak
RSS of the whole process (ru_maxrss), RSS growth during the VAE decode alone (polled every 5 ms), seconds. Then the
tiled-vs-untiled difference of the decoded images (float, [0, 1]): mean / max |diff|, PSNR, and the largest jump across
a tile join relative to the median column jump (1.0 = no seam).

    python benchmarks/bench_4k_tiling.py [--size 4096x4096] [--steps 2] [--tile 1024] [--decode plain]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import peak_rss_growth

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import torch

    from ultraflux.config import load_params
    from ultraflux.pipelines import load_pipeline
    from ultraflux.sampling import parse_size

    params = load_params(ROOT / "params.yaml")
    sample = {**params["sample"], "vae_tiling": args.child, "vae_tile_size": args.tile, "vae_decode": args.decode}
    pipe = load_pipeline({**params, "sample": sample}, args.models / "transformer", args.models / "vae")
    pipe.set_progress_bar_config(disable=True)
    decode, decode_peak = pipe.vae.decode, {}

    def measured_decode(*a, **k):
        out, _, decode_peak["bytes"] = peak_rss_growth(lambda: decode(*a, **k))
        return out

    pipe.vae.decode = measured_decode
    w, h = parse_size(args.size)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    image = pipe(prompt="a mountain lake at dawn", height=h, width=w, num_inference_steps=args.steps,
                 guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=pipe.tokenizer_max_length).images[0]
    seconds = time.perf_counter() - t0
    np.save(args.out, image.astype(np.float32))
    print(json.dumps({"mode": args.child, "tiled": pipe.last_decode["tiled"], "decode": pipe.last_decode["mode"],
                      "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_after_load": rss_loaded, "decode_rss_growth": decode_peak["bytes"],
                      "shape": list(image.shape)}))


def seam_ratio(img: np.ndarray, tile: int) -> float:
    """Largest mean |column jump| at a tile join over the median jump of the columns of the same parity (tiles of
    ``tile`` px, 25% overlap). Same parity: the F16 decoder's last conv runs on a nearest-2x upsampled map, so jumps
    alternate between even and odd columns (and the partitioned decode's one-pixel shift swaps them)."""
    jumps = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))
    step = tile - tile // 4
    joins = [k * step - 1 for k in range(1, img.shape[1] // step + 1) if k * step < img.shape[1]]
    return float(max(jumps[j] / np.median(jumps[j % 2::2]) for j in joins))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="4096x4096")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tile", type=int, default=1024, help="tile side in px (sample.vae_tile_size)")
    ap.add_argument("--decode", default="plain", choices=["plain", "partitioned"])
    ap.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from ultraflux.config import load_params
    from ultraflux.models.transformer import build_transformer
    from ultraflux.models.vae import build_vae

    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_transformer(params["model"], params["rope"], seed=0).save_pretrained(tmp / "transformer")
        build_vae(params["model"]).save_pretrained(tmp / "vae")
        runs = {}
        for mode in ("off", "on"):
            cmd = [sys.executable, __file__, "--child", mode, "--models", str(tmp), "--out", str(tmp / f"{mode}.npy"),
                   "--size", args.size, "--steps", str(args.steps), "--tile", str(args.tile), "--decode", args.decode]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        untiled, tiled = np.load(tmp / "off.npy"), np.load(tmp / "on.npy")

    print(f"{args.size} sample, tiny models, {args.steps} steps, decode {args.decode}, CPU threads "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'vae decode':>11} {'tiled':>6} {'peak RSS MiB':>13} {'decode RSS +MiB':>16} {'seconds':>8}")
    for mode, label in (("off", "untiled"), ("on", f"tiled {args.tile}")):
        r = runs[mode]
        print(f"{label:>11} {str(r['tiled']):>6} {r['peak_rss'] / 2**20:>13.0f} "
              f"{r['decode_rss_growth'] / 2**20:>16.0f} {r['seconds']:>8.1f}")
    diff = np.abs(tiled - untiled)
    mse = float((diff ** 2).mean())
    print(f"tiled vs untiled: mean |diff| {diff.mean():.4f}, max |diff| {diff.max():.4f} (image range [0, 1], "
          f"untiled std {untiled.std():.4f}), PSNR {10 * np.log10(1.0 / max(mse, 1e-20)):.1f} dB")
    print(f"seam ratio at tile joins (1.0 = none): tiled {seam_ratio(tiled, args.tile):.3f}, "
          f"untiled at the same columns {seam_ratio(untiled, args.tile):.3f}")
    on, off = runs["on"], runs["off"]
    print(f"peak RSS ratio tiled / untiled: {on['peak_rss'] / off['peak_rss']:.3f}; decode-phase growth ratio: "
          f"{on['decode_rss_growth'] / max(1, off['decode_rss_growth']):.3f}")


if __name__ == "__main__":
    main()
