"""LPIPS (VGG) from local files only: the perceptual term of VAE post-training (seed Table 3, lambda_perc) and the
LPIPS column of the reconstruction metrics (seed Table 2). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LPIPS_BACKBONE_FILE = "vgg16-397923af.pth"   # torchvision's ImageNet VGG16 (the LPIPS backbone)
LPIPS_HEADS_FILE = "vgg.pth"                 # the LPIPS v0.1 linear heads (shipped in the lpips package)


def load_lpips(weights_dir: str | Path, key: str = "vae_train.lpips_weights") -> nn.Module:
    """Frozen LPIPS(VGG) from local files only: ``<dir>/vgg16-397923af.pth`` (backbone) and ``<dir>/vgg.pth`` (heads,
    optional: the lpips package ships them). Raises a RuntimeError that says what is missing; never downloads."""
    weights_dir = Path(weights_dir)
    backbone = weights_dir / LPIPS_BACKBONE_FILE
    if not backbone.is_file():
        raise RuntimeError(f"{key}={weights_dir}: no {LPIPS_BACKBONE_FILE} there (torchvision's ImageNet VGG16 "
                           f"weights); set {key}: \"\" to go without LPIPS")
    try:
        import lpips
    except ImportError as e:   # lpips imports torchvision; PyPI's torchvision breaks beside the CPU torch wheel
        raise RuntimeError(f"{key} is set but the `lpips` package (and torchvision) cannot be imported ({e}); "
                           "install the `vision` extra (pip install -e .[vision]) with a torchvision matching this "
                           f"torch, or set {key}: \"\" to go without LPIPS") from e
    heads = weights_dir / LPIPS_HEADS_FILE
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, model_path=str(heads) if heads.is_file() else None,
                        verbose=False)
    # LPIPS' VGG is torchvision's ``vgg16().features`` cut into slices that keep the layer indices as names.
    src = torch.load(backbone, map_location="cpu", weights_only=True)
    dst = model.net.state_dict()
    mapped = {}
    for name in dst:                                  # "slice2.5.weight" <- "features.5.weight"
        _, idx, param = name.split(".")
        mapped[name] = src[f"features.{idx}.{param}"]
    model.net.load_state_dict(mapped, strict=True)
    return model.requires_grad_(False).eval()
