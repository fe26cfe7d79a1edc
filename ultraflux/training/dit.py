"""Two-stage DiT training (seed Sec. 2.2 "DiT Training", Table 3 "Stage-wise Aesthetic Curriculum").

VAE and text encoders are frozen; their outputs come from the cache (``training/cache.py``), so a step runs only the
transformer. Stage 1 trains on all kept images over timestep indices 0-999; stage 2 starts from stage 1's weights
on the ArtiMuse top-5% subset over indices 0-459 (the high-noise end, see ``training/flow.py``). AdamW with a constant
learning rate (paper: 1e-6, effective batch 64 through accumulation across processes and steps).
Launch through accelerate (DeepSpeed ZeRO-2 config in configs/accelerate/); one CPU process works unchanged.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ultraflux.io import sha256_file, sha256_json
from ultraflux.losses import dit_loss
from ultraflux.training.checkpoint import Checkpointer
from ultraflux.training.flow import image_ids, pack, sample_sigmas, unpack
from ultraflux.training.sampler import BucketBatchSampler

GUIDANCE_TRAIN = 1.0  # embedded-guidance value fed during training (FLUX.1-dev fine-tuning convention)


def select_rows(manifest: pd.DataFrame, subset: str) -> list[dict]:
    rows = manifest[manifest["kept"] & (manifest["split"] == "train")]
    if subset == "aesthetic_top":
        rows = rows[rows["stage2"]]
    return rows.to_dict("records")


def make_accelerator(grad_accum: int):
    """Accelerator for this launch (plain / DDP / DeepSpeed, as ``accelerate launch --config_file`` says).

    bf16 mixed precision on GPU, fp32 on CPU. gloo lets DeepSpeed/DDP run with several CPU processes (tests);
    NCCL is used automatically on GPUs.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mixed = "bf16" if torch.cuda.is_available() else "no"
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
    return Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed, kwargs_handlers=kwargs)


def _configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the "auto" entries of the DeepSpeed config that accelerate cannot infer without a DataLoader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    cfg = plugin.deepspeed_config
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = batch_size
    if cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(max_grad_norm or 0.0)


def sample_noise_and_sigmas(indices: list[int], shape, seed: int, draw: int, cfg: dict):
    """Noise [B, C, H, W] and sigmas [B] for the images ``indices`` of global micro-batch number ``draw``.

    Each sample's randomness comes from its own generator keyed by (seed, draw, image index), so it does not depend
    on how a global batch is split over processes: a 2-process run sees exactly the noise and timesteps of a
    1-process run with the same global batches, and a resumed run needs only the sampler position to continue.
    """
    noise, sigmas = [], []
    for i in indices:
        g = torch.Generator().manual_seed(((seed * 1_000_003 + draw) * 1_000_033 + i) % (2**63 - 1))
        noise.append(torch.randn(tuple(shape), generator=g))
        sigmas.append(sample_sigmas(1, cfg["t_min"], cfg["t_max"], cfg["shift"], g))
    return torch.stack(noise), torch.cat(sigmas)


def peak_memory() -> dict[str, float]:
    """Peak memory figures, clearly named: CUDA allocator peak on GPU, this process's peak RSS (host) always."""
    import resource

    out = {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}   # ru_maxrss: KiB on Linux
    if torch.cuda.is_available():
        out["peak_cuda_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def train_dit(params: dict, stage: str, curated_dir: Path, vae_dir: Path, out_dir: Path, ckpt_dir: Path,
              cache_dir: Path, init_transformer: Path | None = None, logger=None, progress: bool = True,
              on_batch=None, on_end=None) -> dict:
    """Train one stage; writes ``out_dir/transformer`` (diffusers format) and ``out_dir/loss.csv``.

    Resumes from the newest checkpoint in ``ckpt_dir`` whose fingerprint matches (see ``training/checkpoint.py``);
    the resumed run ends with the same weights as an uninterrupted one. ``on_batch(step, micro, rank, indices)``
    is called for every micro-batch and ``on_end(rank, model)`` on every rank with the trained (unwrapped) model;
    tests record each rank's shard and weights with them.
    """
    from ultraflux.models.text import build_text_encoders
    from ultraflux.models.transformer import build_transformer, load_transformer
    from ultraflux.models.vae import build_vae
    from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, static_shift_scheduler
    from ultraflux.training.cache import build_cache

    cfg, seed = params[stage], params["seed"]
    grad_accum, batch_size = int(cfg["grad_accum"]), int(cfg["batch_size"])
    max_grad_norm = cfg.get("max_grad_norm", 1.0)
    accelerator = make_accelerator(grad_accum)
    torch.manual_seed(seed)
    manifest = pd.read_parquet(Path(curated_dir) / "manifest.parquet")
    rows = select_rows(manifest, cfg["subset"])
    if not rows:
        raise ValueError(f"{stage}: subset '{cfg['subset']}' of {curated_dir}/manifest.parquet is empty")

    # Frozen encoders -> cache (main process first, others reuse it).
    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=seed)
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)}).requires_grad_(False).eval()
    text_pipe = UltraFluxPipeline(static_shift_scheduler(cfg["shift"]), vae, te, tok, te2, tok2, None)
    max_len = params["model"]["tiny"]["text_max_length"] if not params["model"].get("pretrained") else 512
    with accelerator.main_process_first():
        cache_files = build_cache(rows, Path(curated_dir), vae, text_pipe, Path(cache_dir), max_len,
                                  progress=progress and accelerator.is_main_process)
    del vae, te, te2, text_pipe
    items = [torch.load(p, weights_only=True) for p in cache_files]

    transformer = (load_transformer(init_transformer, params["rope"]) if init_transformer
                   else build_transformer(params["model"], params["rope"], seed=seed))
    if torch.cuda.is_available():
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _configure_deepspeed(accelerator, batch_size, max_grad_norm)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    model_dtype = next(p.dtype for p in transformer.parameters())   # bf16 under DeepSpeed bf16, else fp32

    sampler = BucketBatchSampler([it["bucket"] for it in items], batch_size, seed,
                                 accelerator.process_index, accelerator.num_processes)
    fingerprint = sha256_json({"stage": params[stage], "model": params["model"], "rope": params["rope"],
                               "objective": params["objective"], "loss": params["loss"], "seed": seed,
                               "data": sorted(p.name for p in cache_files),
                               "init": sha256_file(Path(init_transformer) / "diffusion_pytorch_model.safetensors")
                               if init_transformer else None, "world": accelerator.num_processes,
                               "distributed": str(accelerator.distributed_type)})
    ckpt = Checkpointer(ckpt_dir, fingerprint, cfg["keep_checkpoints"], accelerator)
    step, history = 0, []
    if (latest := ckpt.latest()) is not None:
        extra = ckpt.load(accelerator, latest)
        step, history = extra["step"], extra.get("history", [])
        sampler.load_state_dict(extra["sampler"])
        accelerator.print(f"{stage}: resumed from {latest} at step {step}")

    device = accelerator.device
    bar = tqdm(total=cfg["steps"], initial=step, desc=stage, disable=not (progress and accelerator.is_main_process))
    while step < cfg["steps"]:
        t0 = time.perf_counter()
        logs_acc: dict[str, float] = {}
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            indices = sampler.next_batch()
            if on_batch is not None:
                on_batch(step, micro, accelerator.process_index, indices)
            batch = [items[i] for i in indices]
            x0 = torch.stack([b["latents"] for b in batch]).float()
            prompt_embeds = torch.stack([b["prompt_embeds"] for b in batch]).to(device, model_dtype)
            pooled = torch.stack([b["pooled"] for b in batch]).to(device, model_dtype)
            bsz, _, h, w = x0.shape
            noise, sigmas = sample_noise_and_sigmas(indices, x0.shape[1:], seed, step * grad_accum + micro, cfg)
            x0, noise, sigmas = x0.to(device), noise.to(device), sigmas.to(device)
            s = sigmas.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            with accelerator.accumulate(transformer):
                pred = transformer(
                    hidden_states=pack(x_t).to(model_dtype), timestep=sigmas.to(model_dtype),
                    guidance=torch.full((bsz,), GUIDANCE_TRAIN, device=device, dtype=model_dtype),
                    pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                    txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device), img_ids=image_ids(h, w, device),
                    return_dict=False)[0]
                loss, logs = dit_loss(unpack(pred, h, w).float(), noise, x0, sigmas, params["objective"], params["loss"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(transformer.parameters(), max_grad_norm)  # DeepSpeed: engine clips
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / grad_accum
        step += 1
        # the step's loss and loss terms: mean over its grad_accum micro-batches and over processes (= the global batch)
        names = sorted(logs_acc)
        reduced = accelerator.reduce(torch.tensor([float(loss_sum) / grad_accum] + [logs_acc[k] for k in names],
                                                  device=device, dtype=torch.float64), "mean").tolist()
        loss_value, logs_acc = reduced[0], dict(zip(names, reduced[1:]))
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "samples_per_s": batch_size * grad_accum * accelerator.num_processes / dt, "step_time_s": dt,
                  **{k: v for k, v in logs_acc.items() if k != "loss"}, **peak_memory()}
        history.append(record)
        if logger is not None and accelerator.is_main_process:
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % cfg["checkpoint_every"] == 0 or step == cfg["steps"]:
            ckpt.save(accelerator, step, {"step": step, "sampler": sampler.state_dict(), "history": history})
    bar.close()

    accelerator.wait_for_everyone()
    if on_end is not None:
        on_end(accelerator.process_index, accelerator.unwrap_model(transformer))
    state_dict = accelerator.get_state_dict(transformer)   # collective under ZeRO-3; plain gather otherwise
    if accelerator.is_main_process:
        from ultraflux.io import atomic_path

        with atomic_path(Path(out_dir) / "transformer") as tmp:
            accelerator.unwrap_model(transformer).save_pretrained(tmp, state_dict=state_dict)
        pd.DataFrame(history).to_csv(Path(out_dir) / "loss.csv", index=False)
    accelerator.wait_for_everyone()
    losses = [r["loss"] for r in history]
    return {"final_loss": losses[-1] if losses else float("nan"), "steps": cfg["steps"],
            "num_train_images": len(items), "num_processes": accelerator.num_processes,
            "mean_loss_last_quarter": float(sum(losses[-max(1, len(losses) // 4):]) / max(1, len(losses[-max(1, len(losses) // 4):])))
            if losses else float("nan")}
