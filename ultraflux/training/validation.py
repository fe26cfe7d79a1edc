"""Validation during DiT training: a held-out loss at fixed timesteps with fixed noise, and a few fixed samples.

Protocol (MLPerf Training's text-to-image benchmark on Flux.1, after Esser et al. 2024, "Scaling Rectified Flow
Transformers": the validation loss averaged over 8 equidistant timesteps 0, 1/8, ..., 7/8). Every held-out image (the
first ``validation.images`` rows of the curated evaluation set (manifest ``eval``: held out before the data
variant's filters, so every co-design cell validates on the same images), cached like the training ones) is noised
at each sigma in ``VAL_SIGMAS`` with noise fixed per (image, sigma), a generator keyed by the seed, the image's cache
key and the sigma's index; the transformer (the training RoPE, the training forward, ``flow.predict_velocity``)
predicts the velocity, and

    val_loss_t<k>       mean over images of the velocity MSE  mean((v_hat - (n - x0))^2)  at sigma = k / 8
                        (MLPerf's metric and its naming: timestep index k in 0..7, divided by 8)
    val_loss            mean over the 8 sigmas
    val_objective       the same average of the training objective's own value (``dit_loss`` with ``objective``)

``val_loss`` is the same quantity whatever the objective (it equals objective ``l2``), on the same images (the
evaluation set) in latents of the same frozen VAE encoder, so the four co-design cells report a comparable number;
``val_objective`` is each cell's own loss (not comparable across the objectives). Only the model changes between
evaluations, so the curve is comparable across steps and runs. Images are dealt round-robin to the processes and the
sums are all-reduced, so the value does not depend on the number of processes (up to float summation order).

Validation samples: each of ``validation.prompts`` with seed ``seed + i``, ``validation.sample_steps`` Euler steps of
``UltraFluxPipeline`` at ``validation.sample_size`` px (square), decoded by the stage's VAE; the main process logs them
as MLflow images at their step. Cheap by design (a few steps): they show progress, the metrics live above.
"""
from __future__ import annotations

import torch

from ultraflux.io import sha256_json
from ultraflux.losses import dit_loss, velocity_target
from ultraflux.training.flow import predict_velocity

VAL_SIGMAS = tuple(k / 8 for k in range(8))   # MLPerf text-to-image (Flux.1): 8 equidistant timesteps in [0, 7/8]


def sigma_column(k: int) -> str:
    """Column / metric name of the velocity MSE at sigma ``VAL_SIGMAS[k]`` = k / 8."""
    return f"val_loss_t{k}"


VAL_COLUMNS = ["val_loss", *(sigma_column(k) for k in range(len(VAL_SIGMAS))), "val_objective"]


def fixed_noise(seed: int, key: str, k: int, shape) -> torch.Tensor:
    """Noise for image ``key`` at sigma index ``k``: the same at every evaluation, on every process and machine.

    The generator seed is hashed from (seed, key, k): torch's CPU generator keeps only 32 bits of its seed, so
    arithmetic mixing of a long key would collide.
    """
    g = torch.Generator().manual_seed(int(sha256_json(["validation-noise", seed, key, k])[:8], 16))
    return torch.randn(tuple(shape), generator=g)


@torch.no_grad()
def validation_sums(model, dataset, seed: int, objective: str, loss_cfg: dict, dtype: torch.dtype,
                    device: torch.device, rank: int = 0, world: int = 1) -> torch.Tensor:
    """[2, 8] float64: sums over this process's share of images of (velocity MSE, objective) per sigma."""
    sums = torch.zeros(2, len(VAL_SIGMAS), dtype=torch.float64)
    for i in range(rank, len(dataset), world):
        item = dataset[i]
        x0 = item["latents"].float()[None].to(device)
        for k, s in enumerate(VAL_SIGMAS):
            noise = fixed_noise(seed, dataset.key(i), k, x0.shape[1:])[None].to(device)
            sigma = torch.full((1,), s, device=device)
            v = predict_velocity(model, (1 - s) * x0 + s * noise, sigma, item["prompt_embeds"][None],
                                 item["pooled"][None], dtype)
            sums[0, k] += float((v - velocity_target(noise, x0)).square().mean())
            sums[1, k] += float(dit_loss(v, noise, x0, sigma, objective, loss_cfg)[0])
    return sums


def validation_losses(accelerator, model, dataset, params: dict, step: int, dtype: torch.dtype) -> dict:
    """One evaluation (collective): {"step", "val_loss", "val_loss_t0" .. "val_loss_t7", "val_objective"}."""
    was_training = model.training
    model.eval()
    sums = validation_sums(model, dataset, params["seed"], params["objective"], params["loss"], dtype,
                           accelerator.device, accelerator.process_index, accelerator.num_processes)
    model.train(was_training)
    sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu() / max(1, len(dataset))
    mse, objective = sums[0], sums[1]
    return {"step": step, "val_loss": float(mse.mean()),
            **{sigma_column(k): float(mse[k]) for k in range(len(VAL_SIGMAS))},
            "val_objective": float(objective.mean())}


@torch.no_grad()
def sample_images(model, vae, prompt_embeds: torch.Tensor, pooled: torch.Tensor, size: int, steps: int,
                  guidance: float, shift: float, seed: int) -> list:
    """One PIL image per prompt embedding (seed + i), ``steps`` Euler steps at ``size`` x ``size`` px."""
    from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, static_shift_scheduler

    was_training = model.training
    model.eval()
    pipe = UltraFluxPipeline(static_shift_scheduler(shift), vae, None, None, None, None, model)
    pipe.set_progress_bar_config(disable=True)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    vae_param = next(vae.parameters())
    images = []
    for i in range(len(prompt_embeds)):
        packed = pipe(prompt_embeds=prompt_embeds[i:i + 1].to(device, dtype),
                      pooled_prompt_embeds=pooled[i:i + 1].to(device, dtype), height=size, width=size,
                      num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed + i), output_type="latent").images
        latents = pipe._unpack_latents(packed, size, size, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(vae_param.device, vae_param.dtype)).sample
        images.append(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
    model.train(was_training)
    return images
