"""Training-loop benchmark (issue 5); every ratio is measured within one run, variants interleaved.

Tiny profile (CPU, default):
  1. DiT training step (forward + backward + AdamW) from CACHED latents/text embeddings (``training/cache.py``: one
     lazy safetensors read per sample, bf16) vs ENCODING ON THE FLY (image decode from the curated shard + frozen F16
     VAE encoder + both text encoders, then the same step). Goal: caching makes the step >= 2x faster.
  2. The SNR-aware Huber wavelet objective (``objective: ultraflux``) vs latent L2: the loss alone (forward +
     backward) and its share of the full training step.

Full profile (``--full``, GPU only; skipped on CPU): the full-size FLUX.1-dev transformer config (19 double + 38
single blocks, 24 heads x 128, random weights, bf16), gradient checkpointing (``--no-checkpointing`` to turn it off),
SDPA attention, one 4K bucket (4096x4096 px -> 256x256 F16 latents -> 16384 image tokens + 512 text tokens), forward +
backward + optimizer step. The optimizer is the paper's layout (seed Sec. 2.2: DeepSpeed ZeRO-2 over 8 GPUs): one rank
of an N-GPU ZeRO-2 run, emulated on this one GPU (:class:`Zero2Rank`): bf16 parameters replicated, the gradients of
the other ranks' partitions dropped as soon as they are accumulated (what reduce-scatter does), fp32 master weights and
AdamW moments only for this rank's 1/N. It prints the per-GPU accounting of ``training/memory.py`` for N = 8 beside
the measured static and peak memory (communication is not emulated: its time and its buckets are not measured).
``--optimizer adamw`` is a plain single-GPU AdamW over all parameters (~16 bytes/param: cannot fit 12B on 80 GB).
Prints seconds/step, memory and MFU:

    model FLOPs / sample = 6 * P * S  +  12 * L * S^2 * D
      P = parameters in the transformer's matmuls (~11.9e9), S = image + text tokens, L = 57 blocks,
      D = 3072 (hidden); 6PS = forward + backward of the dense layers (2PS forward, 4PS backward),
      12 L S^2 D = the two attention matmuls (QK^T, AV: 4 S^2 D forward per block, x3 with backward).
    Recomputation under gradient checkpointing is not counted (MFU, not hardware FLOPs utilisation).
    MFU = FLOPs / step time / peak, peak = 989 TFLOP/s (H100 SXM dense bf16) or 790 (H200 per the brief; the H200
    data-sheet dense bf16 figure is also ~989), chosen from the device name or --peak-tflops.

    python benchmarks/bench_training.py [--reps 8]
    python benchmarks/bench_training.py --full [--layers 19 38] [--zero-world 8] [--optimizer zero2|adamw|sgd|none]
"""
from __future__ import annotations

import argparse
import io
import json
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
    import pandas as pd
    from PIL import Image

    from ultraflux.config import load_params
    from ultraflux.data.buckets import bucket_table
    from ultraflux.data.shards import SHARD_DIR, ShardWriter, load_image_array
    from ultraflux.losses import dit_loss
    from ultraflux.models.transformer import build_transformer
    from ultraflux.models.vae import build_vae
    from ultraflux.training.cache import build_cache, load_encoders
    from ultraflux.training.flow import predict_velocity, sample_sigmas

    params = load_params(ROOT / "params.yaml")
    cfg = params["dit_stage1"]
    w, h = bucket_table(params["curate"]["buckets"]["scale"])[aspect]
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    rows = []
    with ShardWriter(tmp / SHARD_DIR, "train", tmp) as writer:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            loc = writer.write(f"{i:04d}", {"png": buf.getvalue()})
            rows.append({"id": str(i), "caption": f"a benchmark caption number {i}", "bucket": aspect,
                         "shard": loc.shard, "offset": loc.offset, "nbytes": loc.nbytes})
    rows = pd.DataFrame(rows)
    build_vae(params["model"], seed=params["seed"]).save_pretrained(tmp / "vae")
    enc = load_encoders(params, tmp / "vae", torch.device("cpu"), params["latent_cache"]["dtype"])
    max_len = enc.max_len
    cache = build_cache(rows, tmp, enc, tmp / "cache", progress=False)
    items = cache.dataset(cache.keys)
    transformer = build_transformer(params["model"], params["rope"], seed=0).train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    k = {"i": 0}

    def step(x0, prompt_embeds, pooled, objective):
        bsz = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen)
        sig = sample_sigmas(bsz, 0, 999, cfg["shift"], gen)
        s = sig.view(-1, 1, 1, 1)
        pred = predict_velocity(transformer, (1 - s) * x0 + s * noise, sig, prompt_embeds, pooled, torch.float32)
        loss, _ = dit_loss(pred, noise, x0, sig, objective, params["loss"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached(objective="ultraflux"):
        item = items[k["i"] % 4]
        k["i"] += 1
        step(item["latents"][None].float(), item["prompt_embeds"][None], item["pooled"][None], objective)

    def on_the_fly():
        row = rows.iloc[k["i"] % 4].to_dict()
        k["i"] += 1
        x0 = enc.encode_images(torch.from_numpy(load_image_array(tmp, row).copy()).permute(2, 0, 1)[None]).float()
        prompt_embeds, pooled = enc.encode_prompts([row["caption"]])
        step(x0, prompt_embeds, pooled, "ultraflux")

    # loss alone on a latent of this bucket (forward + backward)
    lat = items[0]["latents"][None].float().repeat(cfg["batch_size"], 1, 1, 1)
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
    print(f"  DiT step, cached latents bf16 : {m['cached'] * 1e3:8.1f} ms  ({1 / m['cached']:.2f} steps/s)")
    print(f"  DiT step, encoding on the fly : {m['on_the_fly'] * 1e3:8.1f} ms  ({1 / m['on_the_fly']:.2f} steps/s)")
    print(f"  caching speed-up              : {m['on_the_fly'] / m['cached']:.2f}x   (goal >= 2x)")
    print(f"  step, objective ultraflux / l2: {m['step_ultraflux'] * 1e3:.1f} / {m['step_l2'] * 1e3:.1f} ms "
          f"-> overhead {100 * (m['step_ultraflux'] / m['step_l2'] - 1):+.1f}%")
    print(f"  loss alone (fwd+bwd) ultraflux / l2: {m['loss_ultraflux'] * 1e3:.2f} / {m['loss_l2'] * 1e3:.2f} ms "
          f"({m['loss_ultraflux'] / m['loss_l2']:.1f}x; {100 * (m['loss_ultraflux'] - m['loss_l2']) / m['step_l2']:.1f}% "
          f"of a step)")
    return m


# ------------------------------------------------------------------------------------------------ full (GPU)
from ultraflux.plan import FLUX_DEV  # noqa: E402  (FLUX.1-dev transformer config)


def model_flops_per_sample(matmul_params: int, seq: int, blocks: int, hidden: int) -> float:
    return 6.0 * matmul_params * seq + 12.0 * blocks * seq * seq * hidden


class Zero2Rank:
    """The optimizer-side memory of ONE rank of an N-GPU DeepSpeed ZeRO-2 run, emulated on one device.

    Rank 0 owns the first 1/N of the parameters (whole tensors, in order, as DeepSpeed's flat partition does up to
    tensor boundaries). The gradient of every other parameter is dropped right after it is accumulated (reduce-scatter
    hands it to its owner), fp32 master weights and AdamW moments exist for the owned 1/N only, and ``step`` casts the
    owned bf16 gradients to fp32, updates the masters and copies them back into the bf16 parameters (all ranks would
    then all-gather their partitions). Memory only: no communication, so the other 1 - 1/N of the model is not
    trained here.
    """

    def __init__(self, model: torch.nn.Module, world: int, lr: float = 1e-6):
        params = [p for p in model.parameters() if p.requires_grad]
        budget, count = sum(p.numel() for p in params) / world, 0
        self.owned = []
        for p in params:
            if count < budget:
                self.owned.append(p)
                count += p.numel()
            else:
                p.register_post_accumulate_grad_hook(self._drop)
        self.master = [p.detach().float().clone() for p in self.owned]
        self.opt = torch.optim.AdamW(self.master, lr=lr)

    @staticmethod
    def _drop(p: torch.Tensor) -> None:
        p.grad = None

    def step(self) -> None:
        for m, p in zip(self.master, self.owned):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        self.opt.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.owned):
                p.copy_(m)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.owned:
            p.grad = None


def zero2_settings() -> tuple[float, bool]:
    """reduce_bucket_size and overlap_comm of configs/accelerate/deepspeed_zero2.json (what the accounting uses)."""
    cfg = json.loads((ROOT / "configs" / "accelerate" / "deepspeed_zero2.json").read_text())["zero_optimization"]
    return float(cfg.get("reduce_bucket_size", 5e8)), bool(cfg.get("overlap_comm", False))


def print_zero2_accounting(num_params: int, world: int, measured: dict | None = None) -> dict:
    from ultraflux.training.memory import GIB, zero2_memory

    bucket, overlap = zero2_settings()
    acc = zero2_memory(num_params, world, bucket, overlap)
    rows = [("bf16 parameters, replicated (2P)", "params_bf16_replicated"),
            (f"bf16 gradient partition (2P/{world})", "grads_bf16_partition"),
            (f"fp32 master weights (4P/{world})", "master_fp32_partition"),
            (f"fp32 AdamW m, v (8P/{world})", "adam_moments_fp32_partition"),
            (f"reduce buckets ({bucket:.0e} bf16 x {2 if overlap else 1})", "reduce_buckets"),
            ("= static", "static_total"),
            (f"+ fp32 grad copy during step (4P/{world})", "step_grad_fp32_partition"),
            ("= peak before activations", "peak_total")]
    print(f"  ZeRO-2 per-GPU accounting (training/memory.py), P = {num_params / 1e9:.2f}B, N = {world} GPUs:")
    for label, key in rows:
        print(f"    {label:<44}{acc[key] / GIB:7.1f} GiB")
    print(f"    (ZeRO paper: 2P + 14P/N = {acc['zero_paper_model'] / GIB:.1f} GiB; one GPU, no sharding: "
          f"{zero2_memory(num_params, 1, bucket, overlap)['zero_paper_model'] / GIB:.1f} GiB)")
    if measured:
        static = acc["params_bf16_replicated"] + acc["master_fp32_partition"] + acc["adam_moments_fp32_partition"]
        print(f"  measured on this GPU, one emulated rank of N = {world} (no buckets: communication not emulated):")
        print(f"    allocated between steps (params + master + m, v): {measured['static'] / GIB:7.1f} GiB   "
              f"(accounting: {static / GIB:.1f} GiB)")
        print(f"    peak over a step: {measured['peak'] / GIB:7.1f} GiB = static + grad partition + fp32 copy + "
              f"activations ({(measured['peak'] - measured['static']) / GIB:.1f} GiB over static); "
              f"with the buckets: {(measured['peak'] + acc['reduce_buckets']) / GIB:.1f} GiB per GPU")
    return acc


def full(args) -> None:
    from ultraflux.training.memory import GIB

    flux_params = 11.9e9   # FLUX.1-dev transformer (the accounting without a GPU)
    if not torch.cuda.is_available() and args.device == "cuda":
        print("--full: no CUDA device, skipped (the full-size profile needs a GPU; ~24 GB of bf16 weights alone)")
        print_zero2_accounting(int(flux_params), args.zero_world)
        return
    from diffusers import FluxTransformer2DModel

    from ultraflux.losses import dit_loss
    from ultraflux.training.flow import predict_velocity

    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device(args.device)
    from ultraflux.config import load_validated

    loss_cfg = load_validated(ROOT / "params.yaml", check_paths=False)["loss"]   # the objective as configured
    cfg = {**FLUX_DEV, "num_layers": args.layers[0], "num_single_layers": args.layers[1],
           "num_attention_heads": args.heads}
    hidden = args.heads * FLUX_DEV["attention_head_dim"]
    model = FluxTransformer2DModel(**cfg).to(dev, torch.bfloat16)
    if not args.no_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total_params = sum(p.numel() for p in model.parameters())
    if args.optimizer == "zero2":
        opt = Zero2Rank(model, args.zero_world, lr=1e-6)
    elif args.optimizer == "adamw":   # one GPU holding every state: ~16 bytes/param, cannot fit the 12B model on 80 GB
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

    def step():
        s = sig.view(-1, 1, 1, 1)
        pred = predict_velocity(model, (1 - s) * x0 + s * noise, sig, prompt, pooled, torch.bfloat16)
        loss, _ = dit_loss(pred, noise, x0, sig, "ultraflux", loss_cfg)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step()   # warm-up: allocates the optimizer states
    sync()
    measured = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        measured = {"static": torch.cuda.memory_allocated()}
    times = []
    for _ in range(args.reps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    sec = med(times)
    seq = (side // 2) ** 2 + txt
    flops = b * model_flops_per_sample(matmul_params, seq, cfg["num_layers"] + cfg["num_single_layers"], hidden)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or (790.0 if "H200" in name else 989.0)
    print(f"full profile on {name}: {total_params / 1e9:.2f}B params ({matmul_params / 1e9:.2f}B in matmuls), "
          f"{cfg['num_layers']}+{cfg['num_single_layers']} blocks, {args.pixels}x{args.pixels} px, batch {b}, "
          f"S = {seq} tokens, bf16, gradient checkpointing {'off' if args.no_checkpointing else 'on'}, SDPA, "
          f"optimizer {args.optimizer}" + (f" (one rank of N = {args.zero_world})" if args.optimizer == "zero2"
                                           else ""))
    print(f"  seconds/step (median of {args.reps}): {sec:.3f}")
    if cuda:
        measured["peak"] = torch.cuda.max_memory_allocated()
        print(f"  peak CUDA memory: {measured['peak'] / GIB:.1f} GiB")
        print(f"  model FLOPs/step: {flops / 1e15:.2f} PFLOP -> {flops / sec / 1e12:.0f} TFLOP/s -> "
              f"MFU {100 * flops / sec / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s")
    if args.optimizer == "zero2":
        print_zero2_accounting(total_params, args.zero_world, measured)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--aspect", default="1:1", help="tiny profile bucket (scale from params.yaml)")
    ap.add_argument("--full", action="store_true", help="full-size Flux transformer on a GPU (skipped on CPU)")
    ap.add_argument("--layers", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--pixels", type=int, default=4096, help="--full: square bucket side in px (multiple of 32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", choices=["zero2", "adamw", "sgd", "none"], default="zero2")
    ap.add_argument("--zero-world", type=int, default=8, help="--full: N of the emulated ZeRO-2 layout (seed: 8 GPUs)")
    ap.add_argument("--heads", type=int, default=24, help="--full: attention heads x 128 = hidden (Flux: 24)")
    ap.add_argument("--no-checkpointing", action="store_true", help="--full: gradient checkpointing off")
    ap.add_argument("--device", default="cuda", help="--full: cuda, or cpu for a smoke run with small --layers/--heads")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.full:
        full(args)
    else:
        tiny(args.reps, args.aspect)


if __name__ == "__main__":
    main()
