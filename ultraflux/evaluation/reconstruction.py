"""VAE reconstruction metrics: the columns of seed Table 2 that need no learned weights (PSNR, SSIM, NMSE).

Used by the VAE post-training loop (held-out metrics every ``vae_train.eval_every`` steps) and by the ``evaluate``
stage (Table 2 on the held-out curated images). Images are [3, H, W] tensors in [-1, 1]; metrics are computed on
[0, 1] with torchmetrics (PSNR, SSIM) and as ||D(E(x)) - x||^2 / ||x||^2 (NMSE), averaged over images.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """D(mode(E(x))) for a batch ``x`` [B, 3, H, W] in [-1, 1]."""
    z = vae.encode(x).latent_dist.mode()
    return vae.decode(z).sample


def image_metrics(x: torch.Tensor, r: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM / NMSE of one reconstruction ``r`` of ``x`` (both [1, 3, H, W] in [-1, 1])."""
    r = r.clamp(-1, 1)
    a, b = (x + 1) / 2, (r + 1) / 2
    return {"psnr": float(peak_signal_noise_ratio(b, a, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
            "nmse": float(((r - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-12))}


@torch.no_grad()
def per_image_metrics(vae, images: Iterable[torch.Tensor], on_image=None) -> Iterator[dict[str, float]]:
    """PSNR / SSIM / NMSE of each of ``images`` (any iterable: a list, or a generator that streams them).

    ``on_image(i, x, r)`` sees each input and its reconstruction ([3, H, W] in [-1, 1]), e.g. to keep examples."""
    param = next(vae.parameters())
    for i, x in enumerate(images):
        x = x[None].to(param.device, param.dtype)
        r = reconstruct(vae, x)
        yield image_metrics(x, r)
        if on_image is not None:
            on_image(i, x[0], r[0])


def mean_metrics(values: Iterable[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric, summed in the order given (the same numbers in the same order: the same floats)."""
    sums = {"psnr": 0.0, "ssim": 0.0, "nmse": 0.0}
    n = 0
    for n, metrics in enumerate(values, 1):
        for k, v in metrics.items():
            sums[k] += v
    return {k: v / max(1, n) for k, v in sums.items()}


def reconstruction_metrics(vae, images: Iterable[torch.Tensor], on_image=None) -> dict[str, float]:
    """PSNR / SSIM / NMSE averaged over ``images`` (``per_image_metrics``, then ``mean_metrics``)."""
    return mean_metrics(per_image_metrics(vae, images, on_image))
