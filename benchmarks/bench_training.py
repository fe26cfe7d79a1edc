"""Training-loop benchmark (issue 5); every ratio is measured within one run, variants interleaved.

Tiny profile (CPU, default):
  1. DiT training step (forward + backward + AdamW) from CACHED latents/text embeddings (``training/cache.py``: one
     ``torch.load`` per sample) vs ENCODING ON THE FLY (PNG decode + frozen F16 VAE encoder + both text encoders, then
     the same step). Goal: caching makes the step >= 2x faster.
  2. The SNR-aware Huber wavelet objective (``objective: ultraflux``) vs latent L2: the loss alone (forward +
     backward) and its share of the full training step.

Full profile (``--full``, GPU only; skipped on CPU): the full-size FLUX.1-dev transformer config (19 double + 38
single blocks, 24 heads x 128, random weights, bf16), gradient checkpointing, SDPA attention, one 4K bucket
(4096x4096 px -> 256x256 F16 latents -> 16384 image tokens + 512 text tokens), forward + backward + optimizer step.
Prints seconds/step, peak CUDA memory and MFU:

    model FLOPs / sample = 6 * P * S  +  12 * L * S^2 * D
      P = parameters in the transformer's matmuls (~11.9e9), S = image + text tokens, L = 57 blocks,
      D = 3072 (hidden); 6PS = forward + backward of the dense layers (2PS forward, 4PS backward),
      12 L S^2 D = the two attention matmuls (QK^T, AV: 4 S^2 D forward per block, x3 with backward).
    Recomputation under gradient checkpointing is not counted (MFU, not hardware FLOPs utilisation).
    MFU = FLOPs / step time / peak, peak = 989 TFLOP/s (H100 SXM dense bf16) or 790 (H200 per the brief; the H200
    data-sheet dense bf16 figure is also ~989), chosen from the device name or --peak-tflops.

    python benchmarks/bench_training.py [--reps 8]
    python benchmarks/bench_training.py --full [--layers 19 38] [--optimizer adamw|sgd|none]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import timed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------ tiny (CPU)
def tiny(reps: int, aspect: str) -> dict:
    import numpy as np
    from PIL import Image

    from ultraflux.config import load_params
    from ultraflux.data.buckets import bucket_table
    from ultraflux.losses import dit_loss
    from ultraflux.models.text import build_text_encoders
    from ultraflux.models.transformer import build_transformer
    from ultraflux.models.vae import build_vae
    from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, static_shift_scheduler
    from ultraflux.training.cache import build_cache, encode_latents, load_image_tensor
    from ultraflux.training.dit import GUIDANCE_TRAIN
    from ultraflux.training.flow import image_ids, pack, sample_sigmas, unpack

    params = load_params(ROOT / "params.yaml")
    cfg = params["dit_stage1"]
    w, h = bucket_table(params["curate"]["buckets"]["scale"])[aspect]
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a benchmark caption number {i}", "bucket": aspect})

    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=0)
    vae = build_vae(params["model"]).requires_grad_(False).eval()
    text_pipe = UltraFluxPipeline(static_shift_scheduler(cfg["shift"]), vae, te, tok, te2, tok2, None)
    max_len = params["model"]["tiny"]["text_max_length"]
    cache_files = build_cache(rows, tmp, vae, text_pipe, tmp / "cache", max_len, progress=False)
    transformer = build_transformer(params["model"], params["rope"], seed=0).train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    k = {"i": 0}

    def step(x0, prompt_embeds, pooled, objective):
        bsz, _, lh, lw = x0.shape
        noise = torch.randn(x0.shape, generator=gen)
        sig = sample_sigmas(bsz, 0, 999, cfg["shift"], gen)
        s = sig.view(-1, 1, 1, 1)
        pred = transformer(hidden_states=pack((1 - s) * x0 + s * noise), timestep=sig,
                           guidance=torch.full((bsz,), GUIDANCE_TRAIN), pooled_projections=pooled,
                           encoder_hidden_states=prompt_embeds, txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
                           img_ids=image_ids(lh, lw, "cpu"), return_dict=False)[0]
        loss, _ = dit_loss(unpack(pred, lh, lw).float(), noise, x0, sig, objective, params["loss"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached(objective="ultraflux"):
        item = torch.load(cache_files[k["i"] % 4], weights_only=True)
        k["i"] += 1
        step(item["latents"][None], item["prompt_embeds"][None], item["pooled"][None], objective)

    def on_the_fly():
        row = rows[k["i"] % 4]
        k["i"] += 1
        with torch.no_grad():
            x0 = encode_latents(vae, load_image_tensor(tmp / row["image"])[None])
            prompt_embeds, pooled, _ = text_pipe.encode_prompt(row["caption"], prompt_2=None, max_sequence_length=max_len)
        step(x0, prompt_embeds, pooled, "ultraflux")

    # loss alone on a latent of this bucket (forward + backward)
    lat = torch.load(cache_files[0], weights_only=True)["latents"][None].repeat(cfg["batch_size"], 1, 1, 1)
    pred0 = torch.randn_like(lat, requires_grad=True)
    noise0, sig0 = torch.randn_like(lat), torch.full((lat.shape[0],), 0.5)

    def loss_only(objective):
        loss, _ = dit_loss(pred0, noise0, lat, sig0, objective, params["loss"])
        loss.backward()

    for fn in (cached, on_the_fly, lambda: cached("l2")):   # warm-up
        fn()
    t = {"cached": [], "on_the_fly": [], "step_ultraflux": [], "step_l2": [], "loss_ultraflux": [], "loss_l2": []}
    for _ in range(reps):   # interleaved, so load changes on a shared machine hit every variant alike
        t["cached"] += timed(cached, 1)
        t["on_the_fly"] += timed(on_the_fly, 1)
        t["step_ultraflux"] += timed(lambda: cached("ultraflux"), 1)
        t["step_l2"] += timed(lambda: cached("l2"), 1)
        t["loss_ultraflux"] += timed(lambda: loss_only("ultraflux"), 5)
        t["loss_l2"] += timed(lambda: loss_only("l2"), 5)
    # min over reps: on a shared CPU, contention only ever adds time, so the minimum is the least noisy estimate
    m = {key: min(v) for key, v in t.items()}
    tokens = (lat.shape[-2] // 2) * (lat.shape[-1] // 2)
    print(f"tiny profile, CPU ({torch.get_num_threads()} threads), bucket {aspect} = {w}x{h} px -> latent "
          f"{lat.shape[-1]}x{lat.shape[-2]} -> {tokens} image tokens + {max_len} text tokens, batch 1, "
          f"min of {reps} interleaved reps")
    print(f"  DiT step, cached latents      : {m['cached'] * 1e3:8.1f} ms  ({1 / m['cached']:.2f} steps/s)")
    print(f"  DiT step, encoding on the fly : {m['on_the_fly'] * 1e3:8.1f} ms  ({1 / m['on_the_fly']:.2f} steps/s)")
    print(f"  caching speed-up              : {m['on_the_fly'] / m['cached']:.2f}x   (goal >= 2x)")
    print(f"  step, objective ultraflux / l2: {m['step_ultraflux'] * 1e3:.1f} / {m['step_l2'] * 1e3:.1f} ms "
          f"-> overhead {100 * (m['step_ultraflux'] / m['step_l2'] - 1):+.1f}%")
    print(f"  loss alone (fwd+bwd) ultraflux / l2: {m['loss_ultraflux'] * 1e3:.2f} / {m['loss_l2'] * 1e3:.2f} ms "
          f"({m['loss_ultraflux'] / m['loss_l2']:.1f}x; {100 * (m['loss_ultraflux'] - m['loss_l2']) / m['step_l2']:.1f}% "
          f"of a step)")
    return m


# ------------------------------------------------------------------------------------------------ full (GPU)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def model_flops_per_sample(matmul_params: int, seq: int, blocks: int, hidden: int) -> float:
    return 6.0 * matmul_params * seq + 12.0 * blocks * seq * seq * hidden


def full(args) -> None:
    if not torch.cuda.is_available():
        print("--full: no CUDA device, skipped (the full-size profile needs a GPU; ~24 GB of bf16 weights alone)")
        return
    from diffusers import FluxTransformer2DModel

    from ultraflux.losses import dit_loss
    from ultraflux.training.flow import image_ids, pack, unpack

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    cfg = {**FLUX_DEV, "num_layers": args.layers[0], "num_single_layers": args.layers[1]}
    model = FluxTransformer2DModel(**cfg).to(dev, torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total_params = sum(p.numel() for p in model.parameters())
    if args.optimizer == "adamw":   # bf16 states (a single GPU cannot hold fp32 Adam states for 12B params)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    elif args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    else:
        opt = None
    side = args.pixels // 16
    b, txt = args.batch, 512
    x0 = torch.randn(b, 16, side, side, device=dev)
    noise = torch.randn_like(x0)
    sig = torch.rand(b, device=dev)
    prompt = torch.randn(b, txt, 4096, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(b, 768, device=dev, dtype=torch.bfloat16)
    ids = image_ids(side, side, dev)

    def step():
        s = sig.view(-1, 1, 1, 1)
        pred = model(hidden_states=pack((1 - s) * x0 + s * noise).to(torch.bfloat16), timestep=sig.bfloat16(),
                     guidance=torch.ones(b, device=dev, dtype=torch.bfloat16), pooled_projections=pooled,
                     encoder_hidden_states=prompt, txt_ids=torch.zeros(txt, 3, device=dev), img_ids=ids,
                     return_dict=False)[0]
        loss, _ = dit_loss(unpack(pred, side, side).float(), noise, x0, sig, "ultraflux", {})
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    sec = med(times)
    seq = (side // 2) ** 2 + txt
    flops = b * model_flops_per_sample(matmul_params, seq, cfg["num_layers"] + cfg["num_single_layers"], 3072)
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or (790.0 if "H200" in name else 989.0)
    print(f"full profile on {name}: {total_params / 1e9:.2f}B params ({matmul_params / 1e9:.2f}B in matmuls), "
          f"{cfg['num_layers']}+{cfg['num_single_layers']} blocks, {args.pixels}x{args.pixels} px, batch {b}, "
          f"S = {seq} tokens, bf16, gradient checkpointing, SDPA, optimizer {args.optimizer}")
    print(f"  seconds/step (median of {args.reps}): {sec:.3f}")
    print(f"  peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"  model FLOPs/step: {flops / 1e15:.2f} PFLOP -> {flops / sec / 1e12:.0f} TFLOP/s -> "
          f"MFU {100 * flops / sec / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--aspect", default="1:1", help="tiny profile bucket (scale from params.yaml)")
    ap.add_argument("--full", action="store_true", help="full-size Flux transformer on a GPU (skipped on CPU)")
    ap.add_argument("--layers", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--pixels", type=int, default=4096, help="--full: square bucket side in px (multiple of 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", choices=["adamw", "sgd", "none"], default="adamw")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.full:
        full(args)
    else:
        tiny(args.reps, args.aspect)


if __name__ == "__main__":
    main()
