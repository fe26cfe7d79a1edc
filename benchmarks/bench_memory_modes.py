"""Memory modes (``sample.memory`` / ``sample.offload``) for 4096x4096 at 50 steps: accounted peak accelerator memory
from the real FLUX.1-dev / UltraFlux-v1 sizes, cross-checked on the CPU, and the quality/time cost of fp8 storage.

1. ACCOUNTING (no GPU needed; say so when quoting it): the transformer (FLUX.1-dev config: 19 double + 38 single
   blocks, 24 heads x 128), T5-XXL and CLIP-L text encoders instantiated on the meta device (parameter counts by
   tensor), the F16 VAE's parameters; activations of one transformer forward at 4096^2 = 16384 image tokens
   (F16 VAE x 2x2 packing = 32 px per token; FLUX.1's F8 VAE would give 65536) + 512 text tokens, S = 16896,
   D = 3072, bf16, with a memory-efficient SDPA kernel (flash / mem-efficient: no S^2 scores):
   the single-block peak of ~17 S x D live elements (residual, norm, q/k/v, their rotated copies, attention output,
   4D MLP, the 5D concat); tiled VAE decode (1024 px tiles): ~3 live 128-channel tensors at tile resolution.
   Per mode: none = every component resident; model = the largest component + its activations (diffusers' model
   offload); fp8 + model = the same with the transformer's matrices stored in float8_e4m3fn plus one upcast layer;
   group = non-block weights + two blocks in flight (stream prefetch) + activations, text encoders resident;
   sequential = the largest leaf module + activations.
2. CROSS-CHECK on the CPU: a mid-size Flux (D = 1024, 2 double + 4 single blocks, S = 4224 tokens, fp32): measured
   RSS growth of building the weights, of fp8 layerwise casting and of one forward, against the same formulas.
3. COST on the tiny model (params.yaml's tiny profile, CPU): fp8 storage vs full precision, same seed: median time
   per image, PSNR and max |delta| of the 8-bit image.

    python benchmarks/bench_memory_modes.py
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import peak_rss_growth  # noqa: E402

GB = 1e9
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
LIVE_ACT = 17          # S x D elements live at the single-block peak (module docstring)
VAE_LIVE, VAE_C0, TILE = 3, 128, 1024


def flux(cfg: dict, device="meta"):
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(**cfg)


def param_bytes(module, matrix_bytes: float, other_bytes: float) -> float:
    return sum(p.numel() * (matrix_bytes if p.ndim >= 2 else other_bytes) for p in module.parameters())


def text_encoder_params() -> tuple[int, int]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     vocab_size=32128, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig())
    return sum(p.numel() for p in t5.parameters()), sum(p.numel() for p in clip.parameters())


def accounting(width: int = 4096, height: int = 4096, text_tokens: int = 512, px_per_token: int = 32) -> dict:
    """``px_per_token``: 32 = UltraFlux's F16 VAE x 2x2 packing (16384 image tokens at 4096^2); 16 = FLUX.1's F8 VAE
    (65536 tokens)."""
    from ultraflux.models.vae import AutoencoderKLF16

    model = flux(FLUX_DEV)
    d = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    s = (width // px_per_token) * (height // px_per_token) + text_tokens
    n_t5, n_clip = text_encoder_params()
    with torch.device("meta"):
        vae = AutoencoderKLF16()
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    w_bf16 = param_bytes(model, 2, 2)
    w_fp8 = param_bytes(model, 1, 2)
    block_bf16 = max(param_bytes(b, 2, 2) for b in blocks)
    block_fp8 = max(param_bytes(b, 1, 2) for b in blocks)
    non_block = w_bf16 - sum(param_bytes(b, 2, 2) for b in blocks)
    largest_linear = max(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    act = LIVE_ACT * s * d * 2
    text = (n_t5 + n_clip) * 2
    vae_w = sum(p.numel() for p in vae.parameters()) * 2
    decode = VAE_LIVE * VAE_C0 * TILE * TILE * 2
    t5_embed = 32128 * 4096 * 2
    modes = {
        "none (bf16, all resident)": w_bf16 + text + vae_w + max(act, decode),
        "offload=model": max(w_bf16 + act, text, vae_w + decode),
        "memory=fp8 + offload=model": max(w_fp8 + largest_linear + act, text, vae_w + decode),
        "memory=fp8 (text encoders resident)": w_fp8 + largest_linear + text + vae_w + max(act, decode),
        "memory=group": non_block + 2 * block_bf16 + text + vae_w + max(act, decode),
        "memory=group_fp8": non_block + 2 * block_fp8 + text + vae_w + max(act, decode),
        "offload=sequential": max(t5_embed, largest_linear) + max(act, decode),
    }
    return {"params": sum(p.numel() for p in model.parameters()), "tokens": s, "act_gb": act / GB,
            "t5_params": n_t5, "weights_bf16_gb": w_bf16 / GB, "weights_fp8_gb": w_fp8 / GB,
            "modes_gb": {k: v / GB for k, v in modes.items()}}


def cross_check() -> list[tuple[str, float, float]]:
    """(what, accounted GB, measured RSS growth GB) on the CPU for a mid-size Flux in fp32."""
    cfg = dict(FLUX_DEV, num_layers=2, num_single_layers=4, num_attention_heads=8, joint_attention_dim=256,
               pooled_projection_dim=64)
    d, img, txt = 1024, 64 * 64, 128
    gc.collect()
    model, _, grown = peak_rss_growth(lambda: flux(cfg, "cpu").eval())
    rows = [("weights fp32", param_bytes(model, 4, 4) / GB, grown / GB)]
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(-1, 2)
    kw = dict(hidden_states=torch.randn(1, img, 64, generator=g), encoder_hidden_states=torch.randn(1, txt, 256,
              generator=g), pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([0.5]),
              guidance=torch.tensor([3.5]), img_ids=torch.cat([torch.zeros(img, 1), ids.float()], 1),
              txt_ids=torch.zeros(txt, 3))
    with torch.no_grad():
        _, _, grown = peak_rss_growth(lambda: model(**kw))
    rows.append((f"forward activations S={img + txt}", LIVE_ACT * (img + txt) * d * 4 / GB, grown / GB))
    import psutil

    before = psutil.Process().memory_info().rss
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    gc.collect()
    rows.append(("weights after fp8 casting (change)", (param_bytes(model, 1, 4) - param_bytes(model, 4, 4)) / GB,
                 (psutil.Process().memory_info().rss - before) / GB))
    return rows


def tiny_cost(reps: int = 3, size: int = 256, steps: int = 4) -> dict:
    from ultraflux.config import load_params
    from ultraflux.models.transformer import build_transformer
    from ultraflux.models.vae import build_vae
    from ultraflux.pipelines import load_pipeline
    from ultraflux.sampling import generate

    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_transformer(params["model"], params["rope"], seed=0).save_pretrained(root / "transformer")
        build_vae(params["model"]).save_pretrained(root / "vae")
        pipes = {m: load_pipeline({**params, "sample": {**params["sample"], "memory": m}}, root / "transformer",
                                  root / "vae") for m in ("none", "fp8")}
        times, images = {m: [] for m in pipes}, {}
        for _ in range(reps):   # interleaved
            for m, pipe in pipes.items():
                t = time.perf_counter()
                images[m] = np.asarray(generate(pipe, "a red boat", size, size, steps, 4.0, 3)).astype(np.float64)
                times[m].append(time.perf_counter() - t)
    mse = ((images["fp8"] - images["none"]) ** 2).mean()
    return {"time_ratio": statistics.median(times["fp8"]) / statistics.median(times["none"]),
            "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse),
            "max_abs_delta": float(np.abs(images["fp8"] - images["none"]).max()), "size": size, "steps": steps}


def main() -> None:
    for px, vae in ((32, "UltraFlux F16 VAE"), (16, "FLUX.1 F8 VAE")):
        print_accounting(accounting(px_per_token=px), vae)
    print("\nCROSS-CHECK on the CPU (mid-size Flux, fp32): accounted vs measured RSS growth")
    for what, a, m in cross_check():
        print(f"{what:<40} accounted {a:7.3f} GB   measured {m:7.3f} GB   ratio {m / a if a else float('nan'):.2f}")
    cost = tiny_cost()
    print(f"\nCOST of memory=fp8 on the tiny model (CPU, {cost['size']}^2, {cost['steps']} steps, same seed): time x"
          f"{cost['time_ratio']:.2f}, PSNR {cost['psnr_db']:.1f} dB, max |delta| {cost['max_abs_delta']:.0f}/255")
    print("load:", os.popen("uptime").read().strip())


def print_accounting(acc: dict, vae: str) -> None:
    print(f"\nACCOUNTED (not measured on a GPU): 4096x4096, 50 steps, {vae} (the peak is per step: the step count "
          "changes time, not memory)")
    print(f"transformer {acc['params'] / 1e9:.2f}B params: {acc['weights_bf16_gb']:.1f} GB bf16, "
          f"{acc['weights_fp8_gb']:.1f} GB fp8 storage; T5-XXL {acc['t5_params'] / 1e9:.2f}B params; "
          f"activations {acc['act_gb']:.1f} GB at S = {acc['tokens']} tokens")
    print(f"{'mode':<40} {'peak GB':>8}   fits 80 / 48 / 24 / 16 GB")
    for mode, gb in acc["modes_gb"].items():
        fits = " / ".join("yes" if gb <= cap * 0.95 else "no" for cap in (80, 48, 24, 16))   # 5% for the allocator
        print(f"{mode:<40} {gb:>8.1f}   {fits}")


if __name__ == "__main__":
    main()
