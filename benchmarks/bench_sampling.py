"""Sampling speed and memory: UltraFluxPipeline vs diffusers' stock FluxPipeline, same transformer weights and steps.

Prints seconds per image and peak RSS growth at the seed's evaluation sizes (Table 5 / Sec. 6), scaled by
--scale (tiny CPU profile: 0.125) and rounded to 32 px, and the ratio ours / stock (goal <= 1.05).
"Stock" is FluxPipeline with diffusers' FluxPosEmbed; the only patch is its VAE scale factor (16 instead of the 8 it
infers from block_out_channels), so both produce the same image size from the same F16 VAE.

  python benchmarks/bench_sampling.py [--steps 8] [--repeats 3] [--scale 0.125] [--full]   (--full: GPU, paper shape)
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import psutil
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ultraflux.config import load_params
from ultraflux.models.text import build_text_encoders
from ultraflux.models.transformer import build_transformer
from ultraflux.models.vae import build_vae
from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, decode_settings_from, static_shift_scheduler

EVAL_SIZES = [(4096, 4096), (4096, 2048), (2048, 4096), (5120, 2880), (2496, 5952)]  # seed Table 5 / Sec. 8


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (CPU); CUDA peak allocation on GPU."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def timed(pipe, w, h, steps, repeats):
    times, peak = [], 0
    for r in range(repeats):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            pipe(prompt="a mountain lake at dawn", height=h, width=w, num_inference_steps=steps, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(r), max_sequence_length=pipe.tokenizer_max_length)
            times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.125)
    ap.add_argument("--full", action="store_true", help="GPU: full-size Flux transformer (random weights), bf16")
    args = ap.parse_args()
    params = load_params(os.path.join(os.path.dirname(__file__), "..", "params.yaml"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    if args.full:
        if device != "cuda":
            raise SystemExit("--full needs a GPU")
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(guidance_embeds=True).to(dtype)  # FLUX.1-dev shape, random weights
        from ultraflux.models.transformer import swap_rope

        transformer = swap_rope(transformer, {**params["rope"], "train_len": 64})
        args.scale = 1.0
    else:
        transformer = build_transformer(params["model"], params["rope"], seed=0)
    vae = build_vae(params["model"]).to(dtype)
    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=0)
    ours = UltraFluxPipeline(static_shift_scheduler(3.0), vae, te, tok, te2, tok2, transformer).to(device)
    stock_transformer = build_transformer(params["model"], params["rope"], seed=0) if not args.full else transformer
    stock = FluxPipeline(static_shift_scheduler(3.0), vae, te, tok, te2, tok2, stock_transformer).to(device)
    stock.vae_scale_factor = 16
    stock.image_processor = VaeImageProcessor(vae_scale_factor=32)
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)
    ours.configure_decode(**decode_settings_from(params["sample"]))   # 4K: tiled above 2048^2 px (sample.vae_tiling)

    print(f"device={device} dtype={dtype} steps={args.steps} repeats={args.repeats} scale={args.scale} "
          f"threads={torch.get_num_threads()}")
    print(f"{'size':>11} {'ours s/img':>10} {'stock s/img':>11} {'ratio':>6} {'ours peak MB':>12} {'stock peak MB':>13}")
    if not args.full:
        stock.transformer.pos_embed = FluxPosEmbed(params["rope"]["theta"], list(transformer.config.axes_dims_rope))
    for W, H in EVAL_SIZES:
        w, h = (max(32, round(v * args.scale / 32) * 32) for v in (W, H))
        pipes = [ours] if args.full else [ours, stock]  # stock at 4K: untiled decode; report ours only
        for _ in range(2):
            for p in pipes:
                timed(p, w, h, args.steps, 1)  # warm-up at the measured shapes (RoPE tables, kernels, allocator)
        runs = {id(p): [] for p in pipes}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            for p in pipes:
                runs[id(p)].append(timed(p, w, h, args.steps, 1))
        (ours_s, ours_m), (stock_s, stock_m) = [
            (statistics.median(r[0] for r in runs[id(p)]), max(r[1] for r in runs[id(p)])) if id(p) in runs
            else (float("nan"), float("nan")) for p in (ours, stock)]
        print(f"{w:>5}x{h:<5} {ours_s:>10.3f} {stock_s:>11.3f} {ours_s / stock_s:>6.3f} {ours_m / 2**20:>12.1f} "
              f"{stock_m / 2**20:>13.1f}")
    if args.full:
        print("paper (seed Table 4): 49.50 s per 4096x4096 sample; seed Sec. 10: 'a high-end 50GB GPU'")


if __name__ == "__main__":
    main()
