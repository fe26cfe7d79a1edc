"""VAE reconstruction metrics: the columns of seed Table 2 that need no learned weights (PSNR, SSIM, NMSE).

Used by the VAE post-training loop (held-out metrics every ``vae_train.eval_every`` steps) and by the ``evaluate``
stage (Table 2 on the held-out curated images). Images are [3, H, W] tensors in [-1, 1]; metrics are computed on
[0, 1] with torchmetrics (PSNR, SSIM) and as ||D(E(x)) - x||^2 / ||x||^2 (NMSE), averaged over images.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """D(mode(E(x))) for a batch ``x`` [B, 3, H, W] in [-1, 1]."""
    z = vae.encode(x).latent_dist.mode()
    return vae.decode(z).sample


@torch.no_grad()
def reconstruction_metrics(vae, images: Iterable[torch.Tensor]) -> dict[str, float]:
    """PSNR / SSIM / NMSE averaged over ``images`` (any iterable: a list, or a generator that streams them)."""
    param = next(vae.parameters())
    psnr = ssim = nmse = 0.0
    n = 0
    for x in images:
        x = x[None].to(param.device, param.dtype)
        r = reconstruct(vae, x).clamp(-1, 1)
        a, b = (x + 1) / 2, (r + 1) / 2
        psnr += float(peak_signal_noise_ratio(b, a, data_range=1.0))
        ssim += float(structural_similarity_index_measure(b, a, data_range=1.0))
        nmse += float(((r - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-12))
        n += 1
    n = max(1, n)
    return {"psnr": psnr / n, "ssim": ssim / n, "nmse": nmse / n}
