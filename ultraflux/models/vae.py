"""The F16 VAE (seed Sec. 2.2 "VAE Training", Table 2 "UltraFlux-F16-VAE", Table 3 "F16 VAE post-training").

The public F16 VAEs (Diffusion-4K's Flux-VAE-F16 and UltraFlux-F16-VAE) are Flux's F8 ``AutoencoderKL`` with two
changes and no new weights:

    encoder.conv_in : 3x3 conv, stride 1 -> stride 2          (x: [B, 3, H, W] -> [B, C0, H/2, W/2])
    decoder.conv_out: 3x3 conv           -> nearest 2x upsample, then the same 3x3 conv

so the spatial compression is 2 * 2^(len(block_out_channels) - 1) = 2 * 8 = 16, with Flux's 16 latent channels and
Flux's latent normalisation z = (mu - shift) * scale, (scale, shift) = (0.3611, 0.1159). Every parameter keeps its
name and shape, so F8 weights load into the F16 model unchanged ("initialising from F8 weights"); the decoder is then
post-trained (the encoder stays frozen).

F16 marking: the subclass ``AutoencoderKLF16`` (saved as ``"_class_name": "AutoencoderKLF16"`` in config.json) with
one extra config key ``extra_stride`` (= 2). ``load_vae``/``build_vae`` read config.json: an ``AutoencoderKLF16``
directory loads as is; a plain ``AutoencoderKL`` (F8) directory is adapted (F8 weights, F16 geometry). Load F16
directories through this module: diffusers' plain ``AutoencoderKL.from_pretrained`` would ignore ``extra_stride``.

Official weights. The public release saves its F16 VAE with its own ``AutoencoderKL`` class: config.json says
``"_class_name": "AutoencoderKL"`` plus the key ``"stride": 2`` (its F16 switch, unknown to diffusers). ``load_vae``
recognises exactly that pair as the release's format, builds the F16 geometry from ``stride`` (same weights as the F8
body) and marks the model ``release_format = True``; ``decode_mode="auto"`` then decodes partitioned, as the release's
pipeline does by default. A VAE saved by this project (``AutoencoderKLF16``, e.g. after the ``vae`` stage post-trained
the official weights with the plain decode) is not marked and decodes plain under ``auto``.

Decode modes (``set_decode_mode``), both on the upsampled 2x features before ``decoder.conv_out``:

    plain        y = conv3x3(up2(h))                      (zero padding 1 around the image)
    partitioned  the same conv run on the four quadrants of h, each with a one-pixel halo, to bound the largest
                 activation at a quarter of the full-resolution feature map (the release's memory saver). Its output is
                 the plain one moved by one pixel down and right: y_part[i, j] = conv3x3(up2(h))[i - 1, j - 1], row and
                 column -1 computed over zero padding, i.e. conv2d(up2(h), padding=2)[:2H, :2W].

Tiling: ``enable_tiling(tile_sample_size)`` decodes latents in overlapping tiles of tile_sample_size / 16 latents
(diffusers' blend with 25% overlap), so peak activation memory is set by the tile, not the image (a 4096x4096 decode
with 1024 px tiles runs 6x6 decoder calls on 64x64 latents). Tiling and the partitioned decode combine: each tile's
decoder call is partitioned.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config
from torch import nn

from ultraflux.models.release import RELEASE_VAE_STRIDE, is_release_vae, quiet_config_keys

FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
LATENT_CHANNELS = 16

# FLUX.1 VAE ("ae", diffusers format) geometry, the F8 body of the public F16 VAEs.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True, force_upcast=True,
)


DECODE_MODES = ("plain", "partitioned")


def _halves(n: int) -> list[tuple[int, int]]:
    return [(0, n // 2), (n // 2, n)]


class UpsampleConv2d(nn.Conv2d):
    """Nearest ``factor``x upsample followed by this convolution; parameters named like the plain ``nn.Conv2d``.

    ``partitioned = True`` runs it quadrant by quadrant (module docstring: output shifted by one pixel).
    """

    def __init__(self, *args, factor: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor
        self.partitioned = False

    def _up_conv(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=self.factor, mode="nearest"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._partitioned(x) if self.partitioned else self._up_conv(x)

    def _partitioned(self, x: torch.Tensor) -> torch.Tensor:
        """Output rows/cols [2 r0, 2 r1) need input rows r0 - 1 .. r1 - 1 (row -1 = zeros): one halo row above and
        left of each quadrant, none below/right. The conv's own zero padding only touches the cropped border."""
        if self.factor != 2 or self.kernel_size != (3, 3) or self.padding != (1, 1) or self.stride != (1, 1):
            raise ValueError("partitioned decode needs a 2x upsample and a 3x3 conv with padding 1 (F16 conv_out)")
        rows = []
        for r0, r1 in _halves(x.shape[-2]):
            cols = []
            for c0, c1 in _halves(x.shape[-1]):
                part = x[..., max(r0 - 1, 0):r1, max(c0 - 1, 0):c1]
                part = F.pad(part, (1 if c0 == 0 else 0, 0, 1 if r0 == 0 else 0, 0))   # the image's row/col -1
                cols.append(self._up_conv(part)[..., 1:-1, 1:-1])
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)


class AutoencoderKLF16(AutoencoderKL):
    """Flux-style ``AutoencoderKL`` with ``extra_stride`` (2) more spatial compression: F8 body -> F16."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = LATENT_CHANNELS,
        norm_num_groups: int = 32,
        sample_size: int = 1024,
        scaling_factor: float = FLUX_SCALING_FACTOR,
        shift_factor: float | None = FLUX_SHIFT_FACTOR,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        mid_block_add_attention: bool = True,
        extra_stride: int = 2,
    ):
        super().__init__(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std, force_upcast=force_upcast,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        if extra_stride != 1:
            ci = self.encoder.conv_in   # encoder: stride-2 first convolution (same weight shape)
            self.encoder.conv_in = nn.Conv2d(ci.in_channels, ci.out_channels, ci.kernel_size, stride=extra_stride,
                                             padding=ci.padding)
            co = self.decoder.conv_out  # decoder: nearest 2x upsample before the last convolution
            self.decoder.conv_out = UpsampleConv2d(co.in_channels, co.out_channels, co.kernel_size, padding=co.padding,
                                                   factor=extra_stride)
        self.set_tile_size(sample_size if isinstance(sample_size, int) else sample_size[0])

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1) * self.config.extra_stride

    def set_tile_size(self, tile_sample_size: int) -> None:
        """Tile = ``tile_sample_size`` px = tile_sample_size / 16 latents (overlap 25%, diffusers' blend)."""
        self.tile_sample_min_size = int(tile_sample_size)
        self.tile_latent_min_size = int(tile_sample_size) // self.spatial_factor

    def enable_tiling(self, tile_sample_size: int | None = None) -> None:
        if tile_sample_size is not None:
            self.set_tile_size(tile_sample_size)
        self.use_tiling = True

    @property
    def release_format(self) -> bool:
        """Loaded from the public release's VAE directory (``load_vae``)."""
        return getattr(self, "_release_format", False)

    @property
    def decode_mode(self) -> str:
        return "partitioned" if getattr(self.decoder.conv_out, "partitioned", False) else "plain"

    def set_decode_mode(self, mode: str) -> str:
        """``plain`` | ``partitioned`` | ``auto`` (partitioned iff ``release_format``); returns the mode set."""
        if mode == "auto":
            mode = "partitioned" if self.release_format else "plain"
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of auto, {', '.join(DECODE_MODES)}; got {mode!r}")
        if not isinstance(self.decoder.conv_out, UpsampleConv2d):
            if mode == "partitioned":
                raise ValueError("partitioned decode needs the F16 decoder (extra_stride = 2)")
            return mode
        self.decoder.conv_out.partitioned = mode == "partitioned"
        return mode


def spatial_factor(vae) -> int:
    """Pixels per latent along one axis: 2^(len(block_out_channels) - 1) * extra_stride (16 for the F16 VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * int(vae.config.get("extra_stride", 1))


def _groups(channels) -> int:
    """Largest GroupNorm group count <= 32 dividing every channel count (Flux: 32)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


def tiny_config(block_out_channels, layers_per_block: int = 1, sample_size: int = 256) -> dict:
    """A Flux-style VAE config with a small F8 body (tiny profile); F16 comes from ``extra_stride``."""
    ch = tuple(int(c) for c in block_out_channels)
    return {**FLUX_VAE_CONFIG, "down_block_types": ("DownEncoderBlock2D",) * len(ch),
            "up_block_types": ("UpDecoderBlock2D",) * len(ch), "block_out_channels": ch,
            "layers_per_block": layers_per_block, "norm_num_groups": _groups(ch), "sample_size": sample_size}


def from_f8(vae_f8: AutoencoderKL) -> AutoencoderKLF16:
    """F16 VAE with the F8 VAE's weights (strict: every parameter has the same name and shape)."""
    init_keys = set(inspect.signature(AutoencoderKLF16.__init__).parameters) - {"self", "extra_stride"}
    vae = AutoencoderKLF16(**{k: v for k, v in vae_f8.config.items() if k in init_keys}, extra_stride=2)
    vae.load_state_dict(vae_f8.state_dict(), strict=True)
    return vae.to(dtype=next(vae_f8.parameters()).dtype)


def _config_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        return path / "vae"   # a full diffusers pipeline directory (e.g. FLUX.1-dev/)
    return path


def load_vae(path: str | Path) -> AutoencoderKLF16:
    """Load a local diffusers-format VAE dir: F16 as is, F8 (``AutoencoderKL``) adapted to F16 with its weights,
    the release's ``stride: 2`` directory as F16 marked ``release_format``."""
    path = _config_dir(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") == AutoencoderKLF16.__name__:
        return AutoencoderKLF16.from_pretrained(path)
    if not is_release_vae(config):
        return from_f8(AutoencoderKL.from_pretrained(path))
    if config["stride"] != RELEASE_VAE_STRIDE:
        raise ValueError(f"{path / 'config.json'}: 'stride' must be {RELEASE_VAE_STRIDE} (the release's F16 VAE), "
                         f"got {config['stride']!r}")
    with quiet_config_keys(["stride"]):
        vae = from_f8(AutoencoderKL.from_pretrained(path))
    vae._release_format = True
    return vae


def build_vae(model_cfg: dict, seed: int = 0) -> AutoencoderKLF16:
    """The F16 VAE from params.yaml's ``model`` section.

    ``vae_pretrained`` = local dir -> ``load_vae`` (F16, or F8 adapted); "" -> tiny random init (seeded, independent
    of the global RNG) from ``tiny.vae_block_out_channels`` (the F8 body; F16 via the extra stride).
    """
    if model_cfg["vae_pretrained"]:
        return load_vae(model_cfg["vae_pretrained"])
    tiny = model_cfg["tiny"]
    cfg = tiny_config(tiny["vae_block_out_channels"], layers_per_block=int(tiny["vae_layers_per_block"]),
                      sample_size=int(tiny["vae_tile_size"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLF16(**cfg)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Normalized latents (Flux convention, what the DiT sees): (mode(E(x)) - shift) * scale."""
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor
