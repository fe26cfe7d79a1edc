"""Flow matching for Flux: noising, the per-stage timestep range, latent packing.

Rectified flow (Flux): x_t = (1 - sigma) * x0 + sigma * noise, target velocity v = noise - x0.
Timesteps are *indices into the scheduler's descending table*: ``FlowMatchEulerDiscreteScheduler`` with 1000 train
steps lists t = 1000, 999, ..., 1 (index 0 is sigma = 1, pure noise), then applies the static shift
sigma' = s * sigma / (1 + (s - 1) * sigma). So stage 2's range 0-459 (seed Table 3) is the high-noise end, unshifted
sigma in [0.541, 1.0].
"""
from __future__ import annotations

import torch
from diffusers import FluxPipeline

NUM_TRAIN_TIMESTEPS = 1000


def sigma_table(shift: float) -> torch.Tensor:
    """sigma for each timestep index 0..999 of the scheduler's descending table (float64)."""
    t = torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    sigma = (NUM_TRAIN_TIMESTEPS - t) / NUM_TRAIN_TIMESTEPS
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(batch: int, t_min: int, t_max: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timestep indices in [t_min, t_max] mapped through the shifted table."""
    idx = torch.randint(t_min, t_max + 1, (batch,), generator=generator)
    return sigma_table(shift)[idx].float()


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack`` for latents of spatial size h x w."""
    b, n, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """Flux position ids for a packed h x w latent: (0, row, col) per token."""
    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


GUIDANCE_TRAIN = 1.0  # embedded-guidance value fed during training (FLUX.1-dev fine-tuning convention)


def guidance_embedded(transformer) -> bool:
    """Whether the (possibly DDP/DeepSpeed-wrapped) transformer embeds a guidance value (FLUX.1-dev) or takes none
    (FLUX.1-schnell, ``model.tiny.guidance_embeds: false``); FluxPipeline feeds guidance only to the former."""
    from accelerate.utils import extract_model_from_parallel

    return bool(extract_model_from_parallel(transformer).config.guidance_embeds)


def predict_velocity(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                     pooled: torch.Tensor, dtype: torch.dtype, guidance: float = GUIDANCE_TRAIN) -> torch.Tensor:
    """Velocity prediction [B, C, H, W] (fp32) for unpacked noisy latents ``x_t`` at ``sigmas`` [B], as trained."""
    bsz, _, h, w = x_t.shape
    device = x_t.device
    pred = transformer(
        hidden_states=pack(x_t).to(dtype), timestep=sigmas.to(dtype),
        guidance=torch.full((bsz,), guidance, device=device, dtype=dtype) if guidance_embedded(transformer) else None,
        pooled_projections=pooled.to(device, dtype), encoder_hidden_states=prompt_embeds.to(device, dtype),
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device), img_ids=image_ids(h, w, device),
        return_dict=False)[0]
    return unpack(pred, h, w).float()
