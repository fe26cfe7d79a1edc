"""The Flux DiT (diffusers' ``FluxTransformer2DModel``) with its RoPE swapped for ``rope.kind``.

The transformer is never forked: ``transformer.pos_embed`` is replaced by ``UltraFluxPosEmbed``, which has
``FluxPosEmbed``'s call signature. ``pos_embed`` holds no weights, so checkpoints stay plain diffusers checkpoints and
the RoPE variant is re-applied from params at load time.

Official UltraFlux weights. The public release saves its transformer with its own ``FluxTransformer2DModel``, whose
config.json carries RoPE keys that stock diffusers does not know (and would drop with a generic warning). They are
read here and mapped explicitly onto params.yaml's ``rope`` section (what the release's code computes for them):

    method: yarn       -> rope.kind = resonance_yarn, rope.snap_in_window = false (plain Flux inside the window),
                          rope.train_len = 64 (its 2048 px base resolution / 32 px per token), rope.theta = 10000,
                          (rope.yarn_alpha, rope.yarn_beta) = (1.25, 0.75), rope.ntk_factor = 1.0 (hard-wired)
    method: base | ntk -> rope.kind = flux (its FluxPosEmbed computes the plain Flux RoPE for any method but yarn;
                          it never passes an NTK factor)
    ntk_factor: x      -> not read by the release's model class (no such argument), so its output is that of
                          eta = 1: rope.ntk_factor must be 1.0; a value != 1 is reported, not applied

Loading such a directory with params that disagree is an error naming the ``rope.*`` key (e.g. the embedded profile's
``rope.train_len: 8`` against the release's 64), raised before any work. Directories without these keys (FLUX.1-dev,
our own checkpoints) load with whatever RoPE params.yaml asks for.
"""
from __future__ import annotations

import ast
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ultraflux.models.rope import ROPE_THETA, TRAIN_LEN, YARN_ALPHA, YARN_BETA, build_pos_embed, rope_settings

LATENT_CHANNELS = 16  # Flux VAE latents; 2x2 packing gives in_channels = 64
RELEASE_ROPE_KEYS = ("method", "ntk_factor")
RELEASE_METHODS = ("yarn", "base", "ntk")

logger = logging.getLogger(__name__)


class RopeMismatchError(ValueError):
    """params.yaml's ``rope`` section contradicts the RoPE the loaded weights were released with."""


def release_rope(config: dict, source: str = "config.json") -> dict | None:
    """The ``rope`` params the official release's config keys imply (module docstring), or None without such keys."""
    if not any(k in config for k in RELEASE_ROPE_KEYS):
        return None
    method = config.get("method", "yarn")   # the release's FluxTransformer2DModel default
    if method not in RELEASE_METHODS:
        raise RopeMismatchError(f"{source}: 'method' must be one of {', '.join(RELEASE_METHODS)} "
                                f"(UltraFlux release RoPE), got {method!r}")
    if "ntk_factor" in config and float(config["ntk_factor"]) != 1.0:
        logger.warning("%s: ntk_factor=%s is not read by the release's transformer (its YaRN uses eta = 1); "
                       "reproducing the release needs rope.ntk_factor = 1.0", source, config["ntk_factor"])
    if method != "yarn":
        return {"kind": "flux"}
    return {"kind": "resonance_yarn", "snap_in_window": False, "train_len": TRAIN_LEN, "theta": ROPE_THETA,
            "yarn_alpha": YARN_ALPHA, "yarn_beta": YARN_BETA, "ntk_factor": 1.0}


def check_rope(config: dict, rope_cfg: dict, source: str = "config.json") -> None:
    """Raise ``RopeMismatchError`` naming each ``rope.*`` key that contradicts the released model's RoPE."""
    expected = release_rope(config, source)
    if expected is None:
        return
    ours = rope_settings(rope_cfg)
    bad = [f"rope.{k} must be {v!r} (got {ours[k]!r})" for k, v in expected.items()
           if not (ours[k] == v if isinstance(v, str) else float(ours[k]) == float(v))]
    if bad:
        keys = ", ".join(f"{k}={config[k]!r}" for k in RELEASE_ROPE_KEYS if k in config)
        raise RopeMismatchError(f"{source} was released with the UltraFlux RoPE ({keys}); params.yaml disagrees: "
                                + "; ".join(bad) + " (configs/paper-4k.yaml has the release's values)")


@contextmanager
def _quiet_release_keys(keys):
    """Drop diffusers' generic 'config attributes ... are not expected' notice for keys this module has mapped."""
    cfg_logger = logging.getLogger("diffusers.configuration_utils")

    def keep(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "are not expected and will be ignored" not in msg:
            return True
        try:   # "The config attributes {...} were passed to ..., but are not expected ..."
            unexpected = ast.literal_eval(msg.split("attributes ", 1)[1].split(" were passed", 1)[0])
        except (IndexError, ValueError, SyntaxError):
            return True
        return not (isinstance(unexpected, dict) and set(unexpected) <= set(keys))

    cfg_logger.addFilter(keep)
    try:
        yield
    finally:
        cfg_logger.removeFilter(keep)


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
    with _quiet_release_keys([k for k in RELEASE_ROPE_KEYS if k in config]):
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
