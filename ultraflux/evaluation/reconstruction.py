"""VAE reconstruction metrics (seed Table 2 columns that need no learned weights): PSNR, SSIM, NMSE."""
from __future__ import annotations

from typing import Iterable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Decode(mode(Encode(x))) for images [B, 3, H, W] in [-1, 1]."""
    z = vae.encode(x).latent_dist.mode()
    return vae.decode(z).sample


@torch.no_grad()
def reconstruction_metrics(vae, images: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR / SSIM / NMSE over ``images`` ([3, H, W] in [-1, 1], any iterable: consumed one at a time)."""
    psnr = ssim = nmse = 0.0
    n = 0
    for x in images:
        x = x[None]
        r = reconstruct(vae, x).clamp(-1, 1)
        a, b = (x + 1) / 2, (r + 1) / 2
        psnr += float(peak_signal_noise_ratio(b, a, data_range=1.0))
        ssim += float(structural_similarity_index_measure(b, a, data_range=1.0))
        nmse += float(((r - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-12))
        n += 1
    n = max(1, n)
    return {"psnr": psnr / n, "ssim": ssim / n, "nmse": nmse / n}
