"""The public UltraFlux release's config keys (W2GenAI-Lab/UltraFlux, its ``ultraflux/`` model classes): what they
mean here, so official weights load explicitly rather than through diffusers' silent drop of unknown keys.

Transformer config.json. The release saves its transformer with its own ``FluxTransformer2DModel``, whose config
carries RoPE keys stock diffusers does not know. They map onto params.yaml's ``rope`` section as the release's code
computes them:

    method: yarn       -> rope.kind = resonance_yarn, rope.snap_in_window = false (plain Flux inside the window),
                          rope.train_len = 64 (its 2048 px base resolution / 32 px per token), rope.theta = 10000,
                          (rope.yarn_alpha, rope.yarn_beta) = (1.25, 0.75), rope.ntk_factor = 1.0 (hard-wired)
    method: base | ntk -> rope.kind = flux (its FluxPosEmbed computes the plain Flux RoPE for any method but yarn;
                          it never passes an NTK factor)
    ntk_factor: x      -> not read by the release's model class (no such argument), so its output is that of
                          eta = 1: rope.ntk_factor must be 1.0; a value != 1 is reported, not applied

Loading such a directory with params that disagree raises ``RopeMismatchError`` naming the ``rope.*`` key (e.g. the
embedded profile's ``rope.train_len: 8`` against the release's 64). Directories without these keys (FLUX.1-dev, this
project's checkpoints) load with whatever RoPE params.yaml asks for.

VAE config.json. ``"_class_name": "AutoencoderKL"`` with ``"stride": 2`` is the release's F16 VAE (``is_release_vae``);
``ultraflux.models.vae.load_vae`` builds the F16 geometry from it and marks it for the release's partitioned decode.
"""
from __future__ import annotations

import ast
import logging
from contextlib import contextmanager

from ultraflux.models.rope import ROPE_THETA, TRAIN_LEN, YARN_ALPHA, YARN_BETA

RELEASE_ROPE_KEYS = ("method", "ntk_factor")
RELEASE_METHODS = ("yarn", "base", "ntk")
RELEASE_VAE_STRIDE = 2   # the release's F16 switch in its VAE config.json

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
    ours = rope_cfg
    bad = [f"rope.{k} must be {v!r} (got {ours[k]!r})" for k, v in expected.items()
           if not (ours[k] == v if isinstance(v, str) else float(ours[k]) == float(v))]
    if bad:
        keys = ", ".join(f"{k}={config[k]!r}" for k in RELEASE_ROPE_KEYS if k in config)
        raise RopeMismatchError(f"{source} was released with the UltraFlux RoPE ({keys}); params.yaml disagrees: "
                                + "; ".join(bad) + " (configs/paper-4k.yaml has the release's values)")


@contextmanager
def quiet_config_keys(keys):
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


def is_release_vae(config: dict) -> bool:
    """The release's F16 VAE config: its ``AutoencoderKL`` class with a ``stride`` other than 1."""
    return config.get("_class_name") == "AutoencoderKL" and config.get("stride", 1) != 1
