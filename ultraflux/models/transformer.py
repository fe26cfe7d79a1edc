"""The Flux DiT (diffusers' ``FluxTransformer2DModel``) with its RoPE swapped for ``rope.kind``.

The transformer is never forked: ``transformer.pos_embed`` is replaced by ``UltraFluxPosEmbed``, which has
``FluxPosEmbed``'s call signature. ``pos_embed`` holds no weights, so checkpoints stay plain diffusers checkpoints and
the RoPE variant is re-applied at load time.

Trained weights carry their RoPE: :func:`write_weights_config` writes ``ultraflux.json`` (the ``rope`` settings they were
trained with) beside diffusers' ``config.json``. Loading with ``rope_from="weights"`` (sampling's default,
``sample.rope_from``) uses those settings and refuses a params.yaml ``rope`` section that disagrees, naming the keys;
``rope_from="params"`` applies params.yaml's RoPE on purpose (training does: it defines the RoPE it records; an
inference-time RoPE ablation does too).

Official UltraFlux weights (a transformer config.json with the release's ``method`` / ``ntk_factor`` keys) are checked
against params.yaml's ``rope`` section before they load: ``ultraflux.models.release``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ultraflux.io import write_json
from ultraflux.models.release import RELEASE_ROPE_KEYS, RopeMismatchError, check_rope, quiet_config_keys, release_rope
from ultraflux.models.rope import build_pos_embed
from ultraflux.schema import Rope

LATENT_CHANNELS = 16  # Flux VAE latents; 2x2 packing gives in_channels = 64

WEIGHTS_CONFIG = "ultraflux.json"   # beside config.json: the settings the weights were trained with
ROPE_FROM = ("weights", "params")
# rope keys that change the model's output (max_scale only sets when a warning is printed)
MODEL_ROPE_KEYS = tuple(k for k in Rope.model_fields if k != "max_scale")
ROPE_KEYS = tuple(Rope.model_fields)

__all__ = ["LATENT_CHANNELS", "RopeMismatchError", "build_transformer", "check_model_dir", "load_transformer",
           "parameter_count", "release_rope", "write_weights_config", "swap_rope"]


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"   # a full diffusers pipeline directory (e.g. UltraFlux-v1/)
    return path


def check_model_dir(path: str | Path, rope_cfg: dict, rope_from: str = "params") -> None:
    """The RoPE checks of :func:`load_transformer` from the directory's json files alone: cheap, before any work."""
    path = _model_dir(path)
    if (path / "config.json").is_file():
        check_rope(json.loads((path / "config.json").read_text()), rope_cfg, str(path / "config.json"))
    resolve_rope(path, rope_cfg, rope_from)


def trained_rope(path: str | Path) -> dict | None:
    """The ``rope`` settings saved beside trained weights (``ultraflux.json``), or None (other weights)."""
    file = _model_dir(path) / WEIGHTS_CONFIG
    return json.loads(file.read_text()).get("rope") if file.is_file() else None


def resolve_rope(path: str | Path, rope_cfg: dict, rope_from: str = "weights") -> dict:
    """The RoPE to load ``path`` with: its saved settings (``rope_from="weights"``; params.yaml's ``rope`` must agree
    on every model-defining key, else ``RopeMismatchError`` naming them) or params.yaml's (``"params"``)."""
    if rope_from not in ROPE_FROM:
        raise ValueError(f"rope_from must be one of {', '.join(ROPE_FROM)}, got {rope_from!r}")
    saved = trained_rope(path)
    if saved is None or rope_from == "params":
        return rope_cfg
    ours = {k: rope_cfg[k] for k in ROPE_KEYS}
    bad = [f"rope.{k}: weights {saved[k]!r}, params.yaml {ours[k]!r}" for k in MODEL_ROPE_KEYS
           if k in saved and saved[k] != ours[k]]
    if bad:
        raise RopeMismatchError(f"{_model_dir(path) / WEIGHTS_CONFIG}: these weights were trained with another RoPE "
                                f"than params.yaml's ({'; '.join(bad)}); set those keys back, or sample with "
                                "params.yaml's RoPE on purpose: sample.rope_from: params "
                                "(generate: --rope-from params)")
    return {**ours, **saved}


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


def load_transformer(path: str | Path, rope_cfg: dict, rope_from: str = "weights", **kwargs) -> FluxTransformer2DModel:
    """A diffusers transformer directory (or a pipeline directory with ``transformer/``), RoPE per ``rope_from``
    (:func:`resolve_rope`; directories without ``ultraflux.json`` use ``rope_cfg``).

    Official release directories are checked against ``rope_cfg`` first (``check_rope``). ``kwargs`` go to
    ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    path = _model_dir(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a diffusers transformer directory)")
    config = json.loads((path / "config.json").read_text())
    check_rope(config, rope_cfg, str(path / "config.json"))
    rope = resolve_rope(path, rope_cfg, rope_from)
    with quiet_config_keys([k for k in RELEASE_ROPE_KEYS if k in config]):
        transformer = FluxTransformer2DModel.from_pretrained(path, **kwargs)
    return swap_rope(transformer, rope)


def write_weights_config(path: str | Path, rope_cfg: dict) -> None:
    """``<path>/ultraflux.json``: the RoPE settings the weights in ``path`` were trained with."""
    write_json(Path(path) / WEIGHTS_CONFIG, {"rope": {k: rope_cfg[k] for k in ROPE_KEYS}})


def parameter_count(model_cfg: dict, init_dir: str | Path | None = None) -> int:
    """Parameters of the transformer ``build_transformer`` / ``load_transformer(init_dir)`` would give, counted on
    the meta device (no memory, no weights read): for estimates made before any work."""
    from accelerate import init_empty_weights

    source = init_dir or (Path(model_cfg["pretrained"]) / "transformer" if model_cfg.get("pretrained") else None)
    with init_empty_weights():
        if source is not None:
            model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(_model_dir(source)))
        else:
            model = _tiny_transformer(model_cfg["tiny"])
    return sum(p.numel() for p in model.parameters())


def build_transformer(model_cfg: dict, rope_cfg: dict, seed: int = 0) -> FluxTransformer2DModel:
    """From ``model.pretrained``/transformer when set, else a tiny random-init Flux transformer (seeded)."""
    if model_cfg.get("pretrained"):
        return load_transformer(Path(model_cfg["pretrained"]) / "transformer", rope_cfg, rope_from="params")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _tiny_transformer(model_cfg["tiny"])
    return swap_rope(transformer, rope_cfg)


def _tiny_transformer(t: dict) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=t["num_layers"],
        num_single_layers=t["num_single_layers"], attention_head_dim=t["attention_head_dim"],
        num_attention_heads=t["num_attention_heads"], joint_attention_dim=t["joint_attention_dim"],
        pooled_projection_dim=t["pooled_projection_dim"], guidance_embeds=t["guidance_embeds"],
        axes_dims_rope=tuple(t["axes_dims_rope"]))
