"""The Flux DiT (diffusers' ``FluxTransformer2DModel``) with its RoPE swapped for ``rope.kind``.

The transformer is never forked: ``transformer.pos_embed`` is replaced by ``UltraFluxPosEmbed``, which has
``FluxPosEmbed``'s call signature. ``pos_embed`` holds no weights, so checkpoints stay plain diffusers checkpoints and
the RoPE variant is re-applied from params at load time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ultraflux.models.rope import UltraFluxPosEmbed

LATENT_CHANNELS = 16  # Flux VAE latents; 2x2 packing gives in_channels = 64


def swap_rope(transformer: FluxTransformer2DModel, rope_cfg: dict) -> FluxTransformer2DModel:
    transformer.pos_embed = UltraFluxPosEmbed(
        theta=rope_cfg["theta"], axes_dim=list(transformer.config.axes_dims_rope), kind=rope_cfg["kind"],
        train_len=rope_cfg["train_len"], ntk_factor=rope_cfg.get("ntk_factor", 1.0),
        yarn_alpha=rope_cfg.get("yarn_alpha", 1.25), yarn_beta=rope_cfg.get("yarn_beta", 0.75),
        max_scale=rope_cfg.get("max_scale", 2.0), snap_all_bands=rope_cfg.get("snap_all_bands", False))
    return transformer


def build_transformer(model_cfg: dict, rope_cfg: dict, seed: int = 0) -> FluxTransformer2DModel:
    """From ``model.pretrained``/transformer when set, else a tiny random-init Flux transformer (seeded)."""
    if model_cfg.get("pretrained"):
        transformer = FluxTransformer2DModel.from_pretrained(Path(model_cfg["pretrained"]) / "transformer")
    else:
        t = model_cfg["tiny"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=t["num_layers"],
                num_single_layers=t["num_single_layers"], attention_head_dim=t["attention_head_dim"],
                num_attention_heads=t["num_attention_heads"], joint_attention_dim=t["joint_attention_dim"],
                pooled_projection_dim=t["pooled_projection_dim"], guidance_embeds=t["guidance_embeds"],
                axes_dims_rope=tuple(t["axes_dims_rope"]))
    return swap_rope(transformer, rope_cfg)


def load_transformer(path: str | Path, rope_cfg: dict) -> FluxTransformer2DModel:
    return swap_rope(FluxTransformer2DModel.from_pretrained(path), rope_cfg)
