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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from ultraflux.io import atomic_path, naming_disk_full, sha256_file, sha256_json
from ultraflux.losses import dit_loss
from ultraflux.training.cache import build_cache, load_encoders
from ultraflux.training.checkpoint import Checkpointer, Fingerprint
from ultraflux.training.ema import ema_update, make_ema, swapped_in
from ultraflux.training.flow import predict_velocity, sample_sigmas
from ultraflux.training.layout import stage_layout
from ultraflux.training.lora import apply_lora, save_trained
from ultraflux.training.loop import (TrainLoop, TrainState, check_training_disk, checkpoint_bytes, decided_by_main,
                                     rng_neutral, write_csv)
from ultraflux.training.memory import gradient_checkpointing, peak_memory
from ultraflux.training.sampler import BucketBatchSampler
from ultraflux.training.validation import VAL_COLUMNS, sample_images, validation_losses


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
    cfg = plugin.deepspeed_config   # the user's DeepSpeed JSON (not params.yaml): a missing entry counts as "auto"
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
        check_training_disk(stage, f"{stage}.keep_checkpoints", params[stage]["keep_checkpoints"], ckpt, Path(out_dir),
                            per, n * 4)
    decided_by_main(accelerator, check)


def write_curves(out_dir: Path, state: TrainState) -> None:
    """``loss.csv`` and ``val_loss.csv`` from the run's history (atomically; a full disk is named)."""
    with naming_disk_full(out_dir, "the loss curves"):
        write_csv(out_dir / "loss.csv", state.history)
        write_csv(out_dir / "val_loss.csv", state.val_history, ["step", *VAL_COLUMNS])


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


def training_rows(params: dict, stage: str, curated_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the stage's training rows, the validation rows) of the curated manifest; an empty subset is an error."""
    manifest = pd.read_parquet(curated_dir / "manifest.parquet")
    subset = params[stage]["subset"]
    train_rows, val_rows = select_rows(manifest, subset), holdout_rows(manifest, params["validation"]["images"])
    if train_rows.empty:
        raise ValueError(f"{stage}: subset '{subset}' of {curated_dir}/manifest.parquet is empty")
    return train_rows, val_rows


@dataclass
class CachedData:
    """What the latent cache gives a stage: its training samples (cache key, bucket) and sets, the validation samples'
    inputs (main process, with ``validation.prompts``: prompt embeddings and the VAE that decodes them)."""

    cache: Any
    kept: list[tuple[str, str]]
    train_set: Any
    val_set: Any
    sample_prompts: tuple | None
    vae: Any
    build_s: float


def cached_data(params: dict, stage: str, rows: tuple[pd.DataFrame, pd.DataFrame], curated_dir: Path, vae_dir: Path,
                cache_dir: Path, accelerator, progress: bool) -> CachedData:
    """Frozen encoders -> latent cache: every process encodes its share of the missing samples on its device."""
    (train_rows, val_rows), cache_cfg, main = rows, params["latent_cache"], accelerator.is_main_process
    t0 = time.perf_counter()
    enc = load_encoders(params, vae_dir, accelerator.device, cache_cfg["dtype"])
    cache = build_cache(pd.concat([train_rows, val_rows]), curated_dir, enc, Path(cache_dir),
                        batch_size=cache_cfg["encode_batch_size"], shard_size=cache_cfg["shard_size"],
                        num_workers=cache_cfg["num_workers"], progress=progress and main)
    build_s = time.perf_counter() - t0
    n_train = len(train_rows)
    kept = [(k, b) for k, b in zip(cache.keys[:n_train], train_rows["bucket"]) if cache.has(k)]
    val_keys = [k for k in cache.keys[n_train:] if cache.has(k)]
    if cache.failures:
        accelerator.print(f"{stage}: {len(cache.failures)} images could not be encoded, skipped "
                          f"(reasons in {cache.root / 'failed'})")
    prompts = params["validation"]["prompts"]
    sample_prompts = enc.encode_prompts(prompts) if main and prompts else None
    vae = enc.vae if sample_prompts is not None else None   # the main process decodes the validation samples
    del enc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return CachedData(cache, kept, cache.dataset([k for k, _ in kept]), cache.dataset(val_keys), sample_prompts, vae,
                      build_s)


def build_model(params: dict, stage: str, accelerator, init_transformer: Path | None, batch_size: int):
    """(transformer, AdamW, constant LR schedule) through ``accelerator.prepare``: stage 1 builds the transformer,
    stage 2 loads stage 1's; LoRA per ``lora`` (training/lora.py: only the adapter trains; null = full)."""
    from ultraflux.models.transformer import build_transformer, load_transformer

    cfg, seed = params[stage], params["seed"]
    transformer = (load_transformer(init_transformer, params["rope"], rope_from="params") if init_transformer
                   else build_transformer(params["model"], params["rope"], seed=seed))
    if gradient_checkpointing(cfg["gradient_checkpointing"], f"{stage}.gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    apply_lora(transformer, cfg["lora"], seed)
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]   # the adapter only, under LoRA
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _configure_deepspeed(accelerator, batch_size, cfg["max_grad_norm"])
    return accelerator.prepare(transformer, optimizer, scheduler)


@dataclass
class DitSteps:
    """The DiT's parts of the :class:`~ultraflux.training.loop.TrainLoop`: one optimizer step, validation, saving."""

    params: dict
    stage: str
    loop: TrainLoop
    transformer: Any
    optimizer: Any
    scheduler: Any
    sampler: BucketBatchSampler
    grad_accum: int
    data: CachedData
    ema: Any = None
    on_batch: Callable | None = None

    def __post_init__(self):
        self.cfg, self.accelerator = self.params[self.stage], self.loop.accelerator
        self.model = self.accelerator.unwrap_model(self.transformer)
        self.dtype = next(p.dtype for p in self.transformer.parameters())   # bf16 under DeepSpeed bf16, else fp32

    def step(self, step: int, batches) -> dict:
        """Optimizer step ``step`` over ``grad_accum`` micro-batches: its loss and loss terms (the mean over the
        micro-batches and processes, i.e. the global batch), lr, gradient norm, throughput, peak memory."""
        acc, t0 = self.accelerator, time.perf_counter()
        logs_acc: dict[str, float] = {}
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for micro in range(self.grad_accum):
            loss, logs, clipped = self._micro_step(step, micro, next(batches))
            grad_norm = clipped if clipped is not None else grad_norm
            loss_sum += loss
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / self.grad_accum
        names = sorted(logs_acc)
        reduced = acc.reduce(torch.tensor([float(loss_sum) / self.grad_accum] + [logs_acc[k] for k in names],
                                          device=acc.device, dtype=torch.float64), "mean").tolist()
        ema_update(self.ema, self.cfg["ema"], step, self.model)
        dt = time.perf_counter() - t0
        return {"step": step, "loss": reduced[0], "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": _grad_norm(self.transformer, grad_norm),
                "samples_per_s": self.cfg["global_batch"] / dt, "step_time_s": dt,
                **{k: v for k, v in zip(names, reduced[1:]) if k != "loss"}, **peak_memory()}

    def _micro_step(self, step: int, micro: int, batch: dict):
        """Forward and backward of one micro-batch (accelerate steps the optimizer at the last one of the step):
        (detached loss, loss terms, the clipped gradient norm at the optimizer step or None)."""
        acc, device, cfg, seed = self.accelerator, self.accelerator.device, self.cfg, self.params["seed"]
        indices = batch["index"].tolist()
        if self.on_batch is not None:
            self.on_batch(step - 1, micro, acc.process_index, indices)
        x0 = batch["latents"].to(device, non_blocking=True).float()
        first = (step - 1) * int(cfg["global_batch"]) + self.sampler.position(micro)
        noise, sigmas = sample_noise_and_sigmas(indices, x0.shape[1:], seed, first, cfg)
        noise, sigmas = noise.to(device), sigmas.to(device)
        s = sigmas.view(-1, 1, 1, 1)
        clipped = None
        with acc.accumulate(self.transformer):
            pred = predict_velocity(self.transformer, (1 - s) * x0 + s * noise, sigmas,
                                    batch["prompt_embeds"].to(device, non_blocking=True),
                                    batch["pooled"].to(device, non_blocking=True), self.dtype)
            loss, logs = dit_loss(pred, noise, x0, sigmas, self.params["objective"], self.params["loss"])
            acc.backward(loss)
            if acc.sync_gradients:   # no max_grad_norm: the norm only (a factor of 1.0)
                clipped = acc.clip_grad_norm_(self.transformer.parameters(), cfg["max_grad_norm"] or float("inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), logs, clipped

    def validate(self, step: int) -> None:
        """The held-out loss (``val_loss.csv``, MLflow) and the validation samples (MLflow images), with the EMA
        weights under ``ema.use_for_validation``; RNG-neutral: how often it runs cannot change the trajectory."""
        ema_cfg = self.cfg["ema"]
        with rng_neutral(), swapped_in(self.ema, self.model, bool(ema_cfg and ema_cfg["use_for_validation"])):
            if len(self.data.val_set):
                record = validation_losses(self.accelerator, self.model, self.data.val_set, self.params, step,
                                           self.dtype)
                self.loop.state.val_history.append(record)
                self.loop.log(record, step)
            if self.data.sample_prompts is not None and self.loop.logger is not None:
                val_cfg = self.params["validation"]
                images = sample_images(self.model, self.data.vae, *self.data.sample_prompts, val_cfg["sample_size"],
                                       val_cfg["sample_steps"], val_cfg["guidance_scale"], self.cfg["shift"],
                                       self.params["seed"])
                for i, image in enumerate(images):
                    self.loop.logger.log_image(image, f"val_sample_{i}", step)

    def save(self, out_dir: Path) -> None:
        """``out_dir/transformer`` (+ ``ema/`` beside it), ``loss.csv``, ``val_loss.csv``: atomically, main process."""
        from ultraflux.models.transformer import write_weights_config

        acc, lora, rope = self.accelerator, self.cfg["lora"], self.params["rope"]
        state_dict = acc.get_state_dict(self.transformer)   # collective under ZeRO-3; plain gather otherwise
        if acc.is_main_process:
            with naming_disk_full(out_dir / "transformer", f"{self.stage} final weights"):
                with atomic_path(out_dir / "transformer") as tmp:
                    save_trained(self.model, state_dict, tmp, lora)
                    write_weights_config(tmp, rope)
                    if self.ema is not None:   # the averaged weights beside the trained ones
                        with swapped_in(self.ema, self.model) as averaged:
                            save_trained(averaged, averaged.state_dict(), tmp / "ema", lora)
                        write_weights_config(tmp / "ema", rope)
            write_curves(out_dir, self.loop.state)
        acc.wait_for_everyone()

    def summary(self) -> dict:
        """The stage's result (``outputs/results/<stage>.json``; headline numbers go to the DVC metrics)."""
        state, data = self.loop.state, self.data
        losses = [r["loss"] for r in state.history]
        tail = losses[-max(1, len(losses) // 4):]
        final_val = state.val_history[-1] if state.val_history else {}
        return {"final_loss": losses[-1] if losses else float("nan"), "steps": self.cfg["steps"],
                "num_train_images": len(data.train_set), "num_val_images": len(data.val_set),
                "num_cache_failed": len(data.cache.failures), "num_processes": self.accelerator.num_processes,
                "mean_loss_last_quarter": float(sum(tail) / len(tail)) if tail else float("nan"),
                "final_val_loss": final_val.get("val_loss", float("nan")),
                "final_val_objective": final_val.get("val_objective", float("nan")),
                # run-to-run figures (this process): MLflow and timings/, not DVC metrics (ultraflux.stage.TIMING_KEY)
                "_timing": {"cache_build_s": round(data.build_s, 3), **data.cache.stats}}


def train_dit(params: dict, stage: str, curated_dir: Path, vae_dir: Path, out_dir: Path, ckpt_dir: Path,
              cache_dir: Path, init_transformer: Path | None = None, logger=None, progress: bool = True,
              on_batch=None, on_end=None) -> dict:
    """Train one stage; writes ``out_dir/transformer`` (diffusers format), ``out_dir/loss.csv``, ``val_loss.csv``.

    Resumes from the newest checkpoint in ``ckpt_dir`` at or below ``steps`` whose trajectory matches (see
    ``training/checkpoint.py``); the resumed run ends with the same weights as an uninterrupted one.
    ``on_batch(step, micro, rank, indices)`` is called for every micro-batch and ``on_end(rank, model)`` on every
    rank with the trained (unwrapped) model; tests record each rank's shard and weights with them.
    """
    cfg, seed, cache_cfg = params[stage], params["seed"], params["latent_cache"]
    batch_size, grad_accum = stage_layout(cfg, stage)   # global_batch over the launched processes
    accelerator = make_accelerator(grad_accum)
    torch.manual_seed(seed)
    curated_dir, out_dir = Path(curated_dir), Path(out_dir)
    rows = training_rows(params, stage, curated_dir)
    # 0. Before any work: the checkpoints' trajectory and world size (all but the data keys), then disk space.
    init_sha = sha256_file(Path(init_transformer) / WEIGHTS_FILE) if init_transformer else None
    ckpt = Checkpointer(ckpt_dir, stage, cfg["keep_checkpoints"], accelerator)
    ckpt.reconcile(dit_fingerprint(params, stage, accelerator, init_sha), cfg["steps"], pending=(TRAIN_IMAGES,))
    check_dit_disk(params, stage, accelerator, ckpt, out_dir, init_transformer)
    # 1. Frozen encoders -> latent cache. 2. Model, optimizer, accelerate.
    data = cached_data(params, stage, rows, curated_dir, vae_dir, cache_dir, accelerator, progress)
    transformer, optimizer, scheduler = build_model(params, stage, accelerator, init_transformer, batch_size)
    # 3. Resume: accelerate restores models, optimizer, RNGs, the loop's TrainState and the EMA; the sampler follows.
    sampler = BucketBatchSampler([b for _, b in data.kept], batch_size, seed, accelerator.process_index,
                                 accelerator.num_processes, grad_accum)
    ckpt.reconcile(dit_fingerprint(params, stage, accelerator, init_sha, [k for k, _ in data.kept]), cfg["steps"])
    loop = TrainLoop(stage, accelerator, ckpt, cfg["steps"], cfg["val_every"], cfg["checkpoint_every"], logger,
                     progress)
    ema = make_ema(cfg["ema"], accelerator.unwrap_model(transformer))   # EMA (training/ema.py); null = off
    if ema is not None:
        accelerator.register_for_checkpointing(ema)   # after the TrainState, before the resume that restores both
    loop.resume()
    run = DitSteps(params, stage, loop, transformer, optimizer, scheduler, sampler, grad_accum, data, ema, on_batch)
    # 4. The loop (training/loop.py), then the final weights.
    loop.run(loop.stream(data.train_set, sampler, grad_accum, int(cache_cfg["num_workers"]),
                         cache_cfg["prefetch_factor"]), run.step, run.validate)
    accelerator.wait_for_everyone()
    if on_end is not None:
        on_end(accelerator.process_index, run.model)
    run.save(out_dir)
    return run.summary()
