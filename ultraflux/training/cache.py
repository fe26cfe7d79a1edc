"""Cache of frozen-encoder outputs for DiT training.

The VAE encoder and the text encoders are frozen during DiT training (seed Sec. 2.2), so each image's latent and each
caption's embeddings are computed once and stored under ``<cache_dir>/<key>.pt``, where the key hashes the image file,
the caption, and fingerprints of the encoder weights. A training step then touches only the transformer.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from ultraflux.io import atomic_path, sha256_file


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: the 'model version' part of a cache key."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """RGB image -> float tensor [3, H, W] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Normalized latents (Flux convention): (mode(E(x)) - shift) * scale."""
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def build_cache(rows: list[dict], root: Path, vae, text_pipe, cache_dir: Path, max_sequence_length: int,
                progress: bool = True) -> list[Path]:
    """Return one cache file per row (``image``, ``caption``), computing only the missing ones."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    version = module_fingerprint(vae.encoder) + module_fingerprint(text_pipe.text_encoder) + \
        module_fingerprint(text_pipe.text_encoder_2) + f"-L{max_sequence_length}"
    paths = []
    for row in tqdm(rows, desc="cache latents", disable=not progress):
        img = root / row["image"]
        key = hashlib.sha256(f"{sha256_file(img)}|{row['caption']}|{version}".encode()).hexdigest()
        path = cache_dir / f"{key}.pt"
        if not path.exists():
            latents = encode_latents(vae, load_image_tensor(img)[None])[0]
            prompt_embeds, pooled, _ = text_pipe.encode_prompt(row["caption"], prompt_2=None,
                                                               max_sequence_length=max_sequence_length)
            with atomic_path(path) as tmp:
                torch.save({"latents": latents.clone(), "prompt_embeds": prompt_embeds[0].clone(),
                            "pooled": pooled[0].clone(), "bucket": row["bucket"]}, tmp)
        paths.append(path)
    return paths
