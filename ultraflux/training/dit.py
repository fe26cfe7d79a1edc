"""Two-stage DiT training (seed Sec. 2.2 "DiT Training", Table 3 "Stage-wise Aesthetic Curriculum").

VAE and text encoders are frozen; their outputs come from the latent cache (``training/cache.py``: built by every
process, streamed through a DataLoader), so a step runs only the transformer. Stage 1 trains on all kept images over
timestep indices 0-999; stage 2 starts from stage 1's weights on the ArtiMuse top-5% subset over indices 0-459 (the
high-noise end, see ``training/flow.py``). AdamW with a constant learning rate (paper: 1e-6, effective batch 64 through
accumulation across processes and steps). Every ``val_every`` steps (and at the start and the end) the held-out
validation loss of ``training/validation.py``; gradient checkpointing per ``gradient_checkpointing`` (auto = on GPU).
Launch through accelerate (DeepSpeed ZeRO-2 config in configs/accelerate/); one CPU process works unchanged.

Checkpoints follow the trajectory (``training/checkpoint.py``: raising ``steps`` resumes), the disk space they and the
final weights need is checked before the latent cache is built, and a non-finite loss or gradient norm stops the run
(``training/loop.py``). The trained transformer is saved with the RoPE it was trained with (``ultraflux.json``).
"""
from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ultraflux.io import atomic_path, naming_disk_full, sha256_file, sha256_json
from ultraflux.losses import dit_loss
from ultraflux.training.cache import build_cache, load_encoders
from ultraflux.training.checkpoint import Checkpointer, Fingerprint, TrainState
from ultraflux.training.ema import ema_update, make_ema, swapped_in
from ultraflux.training.flow import predict_velocity, sample_sigmas
from ultraflux.training.layout import stage_layout
from ultraflux.training.lora import apply_lora, save_trained
from ultraflux.training.loop import (check_disk_space, check_finite, checkpoint_bytes, decided_by_main, disk_needs,
                                     rng_neutral)
from ultraflux.training.memory import gradient_checkpointing, peak_memory
from ultraflux.training.sampler import BucketBatchSampler
from ultraflux.training.validation import VAL_COLUMNS, sample_images, validate


def select_rows(manifest: pd.DataFrame, subset: str) -> pd.DataFrame:
    rows = manifest[manifest["kept"] & (manifest["split"] == "train")]
    if subset == "aesthetic_top":
        rows = rows[rows["stage2"]]
    return rows


def holdout_rows(manifest: pd.DataFrame, count: int) -> pd.DataFrame:
    """The validation images: the first ``count`` rows of the evaluation set (shared by the data variants)."""
    return manifest[manifest["eval"]].head(int(count))


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


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
TRAIN_IMAGES = "train_images_sha256"   # the fingerprint key the latent cache completes (its sample keys)


def dit_fingerprint(params: dict, stage: str, accelerator, init_sha256: str | None,
                    train_keys: list[str] | None = None) -> Fingerprint:
    """What this stage's weights at step n depend on (``training/checkpoint.py``); ``train_keys`` (the latent cache's
    sample keys, content-addressed) are known only after the cache is built."""
    return Fingerprint.of(
        {stage: params[stage], "model": params["model"], "rope": params["rope"], "objective": params["objective"],
         "loss": params["loss"], "seed": params["seed"], "precision": accelerator.mixed_precision,
         "init_weights_sha256": init_sha256,
         TRAIN_IMAGES: sha256_json(train_keys) if train_keys is not None else None},
        world={"num_processes": accelerator.num_processes, "distributed": str(accelerator.distributed_type)})


def check_dit_disk(params: dict, stage: str, accelerator, ckpt: Checkpointer, out_dir: Path,
                   init_transformer: Path | None) -> None:
    """Room for ``keep_checkpoints`` + 1 checkpoints and the final weights, before the cache is built."""
    from ultraflux.models.transformer import parameter_count

    def check() -> None:
        n = parameter_count(params["model"], init_transformer)
        per = checkpoint_bytes(n, n, mixed_precision=accelerator.mixed_precision != "no")
        keep_key = f"{stage}.keep_checkpoints"
        check_disk_space(stage, disk_needs(keep_key, ckpt.dir, Path(out_dir), per, n * 4,
                                           params[stage]["keep_checkpoints"], len(ckpt.checkpoints())), keep_key)
    decided_by_main(accelerator, check)


def write_curves(out_dir: Path, state: TrainState) -> None:
    """``loss.csv`` and ``val_loss.csv`` from the run's history (atomically; a full disk is named)."""
    with naming_disk_full(out_dir, "the loss curves"):
        with atomic_path(out_dir / "loss.csv") as tmp:
            pd.DataFrame(state.history).to_csv(tmp, index=False)
        with atomic_path(out_dir / "val_loss.csv") as tmp:
            pd.DataFrame(state.val_history, columns=["step", *VAL_COLUMNS]).to_csv(tmp, index=False)


def _grad_norm(model, clipped) -> float | None:
    """The step's global gradient norm: what clipping returned, or (DeepSpeed: the engine clips) the engine's."""
    if clipped is None and hasattr(model, "get_global_grad_norm"):
        clipped = model.get_global_grad_norm()
    return None if clipped is None else float(clipped)


def sample_noise_and_sigmas(indices: list[int], shape, seed: int, first: int, cfg: dict):
    """Noise [B, C, H, W] and sigmas [B] for the images ``indices`` at sample positions ``first``, ``first + 1``, ...

    A position counts samples over the run (step x global batch + place in the step's global batch). Each sample's
    randomness comes from its own generator keyed by (seed, position, image index), so it does not depend on how a
    global batch is laid out over processes and accumulation steps: a 2-process run sees exactly the noise and
    timesteps of a 1-process run, and a resumed run needs only the sampler position to continue.
    """
    noise, sigmas = [], []
    for k, i in enumerate(indices):   # hashed: torch's CPU generator keeps 32 bits of a seed, mixing would collide
        g = torch.Generator().manual_seed(int(sha256_json(["train-noise", seed, first + k, i])[:8], 16))
        noise.append(torch.randn(tuple(shape), generator=g))
        sigmas.append(sample_sigmas(1, cfg["t_min"], cfg["t_max"], cfg["shift"], g))
    return torch.stack(noise), torch.cat(sigmas)


def train_dit(params: dict, stage: str, curated_dir: Path, vae_dir: Path, out_dir: Path, ckpt_dir: Path,
              cache_dir: Path, init_transformer: Path | None = None, logger=None, progress: bool = True,
              on_batch=None, on_end=None) -> dict:
    """Train one stage; writes ``out_dir/transformer`` (diffusers format), ``out_dir/loss.csv``, ``val_loss.csv``.

    Resumes from the newest checkpoint in ``ckpt_dir`` at or below ``steps`` whose trajectory matches (see
    ``training/checkpoint.py``); the resumed run ends with the same weights as an uninterrupted one.
    ``on_batch(step, micro, rank, indices)`` is called for every micro-batch and ``on_end(rank, model)`` on every
    rank with the trained (unwrapped) model; tests record each rank's shard and weights with them.
    """
    from ultraflux.models.transformer import build_transformer, load_transformer

    cfg, seed, cache_cfg, val_cfg = params[stage], params["seed"], params["latent_cache"], params["validation"]
    batch_size, grad_accum = stage_layout(cfg, stage)   # global_batch over the launched processes
    max_grad_norm = cfg.get("max_grad_norm", 1.0)
    accelerator = make_accelerator(grad_accum)
    main = accelerator.is_main_process
    torch.manual_seed(seed)
    curated_dir = Path(curated_dir)
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    train_rows, val_rows = select_rows(manifest, cfg["subset"]), holdout_rows(manifest, val_cfg["images"])
    if train_rows.empty:
        raise ValueError(f"{stage}: subset '{cfg['subset']}' of {curated_dir}/manifest.parquet is empty")
    # 0. Before any work: the checkpoints' trajectory and world size (all but the data keys), then disk space.
    init_sha = sha256_file(Path(init_transformer) / WEIGHTS_FILE) if init_transformer else None
    ckpt = Checkpointer(ckpt_dir, stage, cfg["keep_checkpoints"], accelerator)
    ckpt.reconcile(dit_fingerprint(params, stage, accelerator, init_sha), cfg["steps"], pending=(TRAIN_IMAGES,))
    check_dit_disk(params, stage, accelerator, ckpt, out_dir, init_transformer)

    # 1. Frozen encoders -> latent cache: every process encodes its share of the missing samples on its device.
    t0 = time.perf_counter()
    enc = load_encoders(params, vae_dir, accelerator.device, cache_cfg["dtype"])
    cache = build_cache(pd.concat([train_rows, val_rows]), curated_dir, enc, Path(cache_dir),
                        batch_size=cache_cfg["encode_batch_size"], shard_size=cache_cfg["shard_size"],
                        num_workers=cache_cfg["num_workers"], progress=progress and main)
    cache_s = time.perf_counter() - t0
    n_train = len(train_rows)
    kept = [(k, b) for k, b in zip(cache.keys[:n_train], train_rows["bucket"]) if cache.has(k)]
    val_keys = [k for k in cache.keys[n_train:] if cache.has(k)]
    if cache.failures:
        accelerator.print(f"{stage}: {len(cache.failures)} images could not be encoded, skipped "
                          f"(reasons in {cache.root / 'failed'})")
    sample_prompts = enc.encode_prompts(val_cfg["prompts"]) if main and val_cfg["prompts"] else None
    vae = enc.vae if sample_prompts is not None else None   # the main process decodes the validation samples
    del enc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    train_set, val_set = cache.dataset([k for k, _ in kept]), cache.dataset(val_keys)

    # 2. Model, optimizer, accelerate.
    transformer = (load_transformer(init_transformer, params["rope"], rope_from="params") if init_transformer
                   else build_transformer(params["model"], params["rope"], seed=seed))
    if gradient_checkpointing(cfg["gradient_checkpointing"], f"{stage}.gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    apply_lora(transformer, cfg.get("lora"), seed)   # LoRA (training/lora.py): only the adapter trains; null = full
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]   # the adapter only, under LoRA
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _configure_deepspeed(accelerator, batch_size, max_grad_norm)
    transformer, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    model_dtype = next(p.dtype for p in transformer.parameters())   # bf16 under DeepSpeed bf16, else fp32

    # 3. Resume: accelerate restores models, optimizer, RNGs and the registered TrainState; the sampler follows.
    sampler = BucketBatchSampler([b for _, b in kept], batch_size, seed, accelerator.process_index,
                                 accelerator.num_processes, grad_accum)
    ckpt.reconcile(dit_fingerprint(params, stage, accelerator, init_sha, [k for k, _ in kept]), cfg["steps"])
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema_cfg = cfg.get("ema")   # EMA (training/ema.py): checkpointed with the rest; null = off
    ema = make_ema(ema_cfg, accelerator.unwrap_model(transformer))
    if ema is not None:
        accelerator.register_for_checkpointing(ema)   # before the resume, which restores it
    ckpt.resume(accelerator, state, cfg["steps"])
    sampler.seek(state.step * grad_accum)
    workers = int(cache_cfg["num_workers"])
    batches = iter(DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                              prefetch_factor=cache_cfg["prefetch_factor"] if workers else None,
                              pin_memory=torch.cuda.is_available()))

    def run_validation(step: int) -> None:
        use_ema = bool(ema_cfg and ema_cfg["use_for_validation"])
        with rng_neutral(), swapped_in(ema, accelerator.unwrap_model(transformer), use_ema):
            validate_and_sample(step)   # how often validation runs must not change the trajectory

    def validate_and_sample(step: int) -> None:
        if len(val_set):
            record = validate(accelerator, accelerator.unwrap_model(transformer), val_set, params, step, model_dtype)
            state.val_history.append(record)
            if logger is not None and main:
                logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=step)
        if sample_prompts is not None and logger is not None:
            images = sample_images(accelerator.unwrap_model(transformer), vae, *sample_prompts,
                                   val_cfg["sample_size"], val_cfg["sample_steps"], val_cfg["guidance_scale"],
                                   cfg["shift"], seed)
            for i, image in enumerate(images):
                logger.log_image(image, f"val_sample_{i}", step)

    device = accelerator.device
    if state.step == 0:
        run_validation(0)
    bar = tqdm(total=cfg["steps"], initial=state.step, desc=stage, disable=not (progress and main))
    while state.step < cfg["steps"]:
        t0 = time.perf_counter()
        logs_acc: dict[str, float] = {}
        loss_sum = torch.zeros((), device=device)
        grad_norm = None
        for micro in range(grad_accum):
            batch = next(batches)
            indices = batch["index"].tolist()
            if on_batch is not None:
                on_batch(state.step, micro, accelerator.process_index, indices)
            x0 = batch["latents"].to(device, non_blocking=True).float()
            first = state.step * int(cfg["global_batch"]) + sampler.position(micro)
            noise, sigmas = sample_noise_and_sigmas(indices, x0.shape[1:], seed, first, cfg)
            noise, sigmas = noise.to(device), sigmas.to(device)
            s = sigmas.view(-1, 1, 1, 1)
            with accelerator.accumulate(transformer):
                pred = predict_velocity(transformer, (1 - s) * x0 + s * noise, sigmas,
                                        batch["prompt_embeds"].to(device, non_blocking=True),
                                        batch["pooled"].to(device, non_blocking=True), model_dtype)
                loss, logs = dit_loss(pred, noise, x0, sigmas, params["objective"], params["loss"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:   # no max_grad_norm: the norm only (a factor of 1.0)
                    grad_norm = accelerator.clip_grad_norm_(transformer.parameters(), max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / grad_accum
        # the step's loss and loss terms: mean over its grad_accum micro-batches and over processes (= the global batch)
        names = sorted(logs_acc)
        reduced = accelerator.reduce(torch.tensor([float(loss_sum) / grad_accum] + [logs_acc[k] for k in names],
                                                  device=device, dtype=torch.float64), "mean").tolist()
        loss_value, logs_acc = reduced[0], dict(zip(names, reduced[1:]))
        grad_norm = _grad_norm(transformer, grad_norm)
        check_finite(stage, state.step + 1, loss_value, grad_norm, scheduler.get_last_lr()[0], ckpt.latest())
        state.step += 1
        ema_update(ema, ema_cfg, state.step, accelerator.unwrap_model(transformer))
        dt = time.perf_counter() - t0
        record = {"step": state.step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "samples_per_s": batch_size * grad_accum * accelerator.num_processes / dt, "step_time_s": dt,
                  **{k: v for k, v in logs_acc.items() if k != "loss"}, **peak_memory()}
        state.history.append(record)
        if logger is not None and main:
            logger.log_metrics({k: v for k, v in record.items() if k != "step"}, step=state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if state.step % cfg["val_every"] == 0 or state.step == cfg["steps"]:
            run_validation(state.step)
        if state.step % cfg["checkpoint_every"] == 0 or state.step == cfg["steps"]:
            ckpt.save(accelerator, state.step)
    bar.close()
    del batches   # stops the DataLoader workers

    accelerator.wait_for_everyone()
    if on_end is not None:
        on_end(accelerator.process_index, accelerator.unwrap_model(transformer))
    state_dict = accelerator.get_state_dict(transformer)   # collective under ZeRO-3; plain gather otherwise
    out_dir = Path(out_dir)
    if main:
        from ultraflux.models.transformer import write_weights_config

        with naming_disk_full(out_dir / "transformer", f"{stage} final weights"):
            with atomic_path(out_dir / "transformer") as tmp:
                save_trained(accelerator.unwrap_model(transformer), state_dict, tmp, cfg.get("lora"))
                write_weights_config(tmp, params["rope"])
                if ema is not None:   # the averaged weights beside the trained ones
                    with swapped_in(ema, accelerator.unwrap_model(transformer)) as averaged:
                        save_trained(averaged, averaged.state_dict(), tmp / "ema", cfg.get("lora"))
                    write_weights_config(tmp / "ema", params["rope"])
        write_curves(out_dir, state)
    accelerator.wait_for_everyone()
    losses = [r["loss"] for r in state.history]
    tail = losses[-max(1, len(losses) // 4):]
    final_val = state.val_history[-1] if state.val_history else {}
    return {"final_loss": losses[-1] if losses else float("nan"), "steps": cfg["steps"],
            "num_train_images": len(train_set), "num_val_images": len(val_set),
            "num_cache_failed": len(cache.failures), "num_processes": accelerator.num_processes,
            "mean_loss_last_quarter": float(sum(tail) / len(tail)) if tail else float("nan"),
            "final_val_loss": final_val.get("val_loss", float("nan")),
            "final_val_objective": final_val.get("val_objective", float("nan")),
            # run-to-run figures (this process): MLflow and timings/, not DVC metrics (ultraflux.stage.TIMING_KEY)
            "_timing": {"cache_build_s": round(cache_s, 3), **cache.stats}}
