"""The Flux DiT (diffusers' ``FluxTransformer2DModel``) with its RoPE swapped for ``rope.kind``.

The transformer is never forked: ``transformer.pos_embed`` is replaced by ``UltraFluxPosEmbed``, which has
``FluxPosEmbed``'s call signature. ``pos_embed`` holds no weights, so checkpoints stay plain diffusers checkpoints and
the RoPE variant is re-applied from params at load time.

Official UltraFlux weights (a transformer config.json with the release's ``method`` / ``ntk_factor`` keys) are checked
against params.yaml's ``rope`` section before they load: ``ultraflux.models.release``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ultraflux.models.release import RELEASE_ROPE_KEYS, RopeMismatchError, check_rope, quiet_config_keys, release_rope
from ultraflux.models.rope import build_pos_embed

LATENT_CHANNELS = 16  # Flux VAE latents; 2x2 packing gives in_channels = 64

__all__ = ["LATENT_CHANNELS", "RopeMismatchError", "build_transformer", "check_model_dir", "load_transformer",
           "release_rope", "swap_rope"]


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"   # a full diffusers pipeline directory (e.g. UltraFlux-v1/)
    return path


def check_model_dir(path: str | Path, rope_cfg: dict) -> None:
    """``check_rope`` on a transformer (or pipeline) directory's config.json alone: cheap, for use before any work."""
    path = _model_dir(path)
    if (path / "config.json").is_file():
        check_rope(json.loads((path / "config.json").read_text()), rope_cfg, str(path / "config.json"))


def rope_problems(params: dict) -> list[str]:
    """For ``run_stage(checks=...)``: ``model.pretrained`` weights released with a RoPE that ``rope.*`` contradicts
    (one problem naming the keys), checked from config.json alone, before any work."""
    pretrained = params["model"]["pretrained"]
    if not pretrained:
        return []
    try:
        check_model_dir(pretrained, params["rope"])
    except RopeMismatchError as e:
        return [str(e)]
    return []


def swap_rope(transformer: FluxTransformer2DModel, rope_cfg: dict) -> FluxTransformer2DModel:
    transformer.pos_embed = build_pos_embed(rope_cfg, transformer.config.axes_dims_rope)
    return transformer


def load_transformer(path: str | Path, rope_cfg: dict, **kwargs) -> FluxTransformer2DModel:
    """A diffusers transformer directory (or a pipeline directory with ``transformer/``), RoPE from ``rope_cfg``.

    Official release directories are checked against ``rope_cfg`` first (``check_rope``). ``kwargs`` go to
    ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    path = _model_dir(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers transformer directory)")
    config = json.loads((path / "config.json").read_text())
    check_rope(config, rope_cfg, str(path / "config.json"))
    with quiet_config_keys([k for k in RELEASE_ROPE_KEYS if k in config]):
        transformer = FluxTransformer2DModel.from_pretrained(path, **kwargs)
    return swap_rope(transformer, rope_cfg)


def build_transformer(model_cfg: dict, rope_cfg: dict, seed: int = 0) -> FluxTransformer2DModel:
    """From ``model.pretrained``/transformer when set, else a tiny random-init Flux transformer (seeded)."""
    if model_cfg.get("pretrained"):
        return load_transformer(Path(model_cfg["pretrained"]) / "transformer", rope_cfg)
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
