"""UltraFluxPipeline: diffusers' ``FluxPipeline`` with the F16 VAE, our RoPE and a static-shift scheduler.

Only what must differ from ``FluxPipeline`` is overridden or added:

* the VAE scale factor comes from the VAE's real spatial compression (16 for the F16 VAE, where ``FluxPipeline`` would
  infer 8 from ``block_out_channels``);
* the decode (``configure_decode``), chosen per call from the image size:
    - ``vae_tiling``: ``on`` | ``off`` | ``auto`` (tiled when height x width > ``tiling_min_pixels``): diffusers' tiled
      decode, tiles of ``tile_size`` px (tile_size / 16 latents) blended over a 25% overlap, so a 4096x4096 decode
      needs the memory of one tile, not of the image;
    - ``vae_decode``: ``plain`` | ``partitioned`` | ``auto`` (partitioned iff the VAE was loaded from the official
      release's directory, as the release's pipeline decodes it): see ``ultraflux.models.vae``. Both combine.
* ``place(offload, dtype)``: device, dtype and diffusers' CPU offload for small GPUs (``model``: whole components move
  to the GPU in turn, ``enable_model_cpu_offload``; ``sequential``: layer by layer, ``enable_sequential_cpu_offload``,
  slowest and smallest). Offload needs an accelerator (it moves weights between host and device); on a CPU-only
  machine the weights already live in host memory, so the pipeline runs there without offload and says so.

Everything else (``from_pretrained``, ``__call__(prompt, height, width, num_inference_steps, guidance_scale,
generator)``) is FluxPipeline's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.image_processor import VaeImageProcessor

from ultraflux.models.vae import spatial_factor
from ultraflux.pipelines.memory import apply_memory_mode

logger = logging.getLogger(__name__)

# Public UltraFlux release's sampler: static shift 3.0 (Flux's resolution-dependent shift extrapolates to ~25 at 4096^2).
STATIC_SHIFT = 3.0
TILING_MODES = ("auto", "on", "off")
DECODE_MODES = ("auto", "plain", "partitioned")
OFFLOAD_MODES = ("none", "model", "sequential")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def static_shift_scheduler(shift: float = STATIC_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


@dataclass
class DecodeSettings:
    vae_tiling: str = "auto"
    tiling_min_pixels: int = 2048 * 2048     # the paper's 2K training window: larger images decode tiled under auto
    tile_size: int = 1024                    # px; the Flux VAE's own sample_size
    vae_decode: str = "auto"


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (as the release samples), float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    _choice("dtype", dtype or "auto", tuple(DTYPES))
    return DTYPES[dtype or "auto"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def default_device() -> torch.device:
    # the current CUDA device: each process of a multi-GPU launch has set its own (accelerate's PartialState)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class UltraFluxPipeline(FluxPipeline):
    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        if vae is not None:
            self.vae_scale_factor = spatial_factor(vae)
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.decode_settings = DecodeSettings()
        self.offload = "none"
        self.placement: dict = {}
        self.last_decode: dict = {}   # how the latest __call__ decoded: {"tiled": bool, "mode": "plain"|...}

    def configure_decode(self, vae_tiling: str = "auto", tiling_min_pixels: int = 2048 * 2048,
                         tile_size: int = 1024, vae_decode: str = "auto") -> DecodeSettings:
        """Validate and store the decode settings (module docstring); applied at each ``__call__``."""
        _choice("vae_tiling", vae_tiling, TILING_MODES)
        _choice("vae_decode", vae_decode, DECODE_MODES)
        if int(tiling_min_pixels) < 0 or int(tile_size) < 32 or int(tile_size) % 32:
            raise ValueError(f"tiling_min_pixels must be >= 0 and tile_size a multiple of 32 px >= 32; got "
                             f"{tiling_min_pixels}, {tile_size}")
        self.decode_settings = DecodeSettings(vae_tiling, int(tiling_min_pixels), int(tile_size), vae_decode)
        return self.decode_settings

    def tiled_for(self, height: int, width: int) -> bool:
        s = self.decode_settings
        return s.vae_tiling == "on" or (s.vae_tiling == "auto" and height * width > s.tiling_min_pixels)

    def _prepare_decode(self, height: int, width: int) -> None:
        s, vae = self.decode_settings, self.vae
        tiled = self.tiled_for(height, width)
        if tiled:
            if hasattr(vae, "set_tile_size"):
                vae.enable_tiling(s.tile_size)
            else:
                vae.enable_tiling()
        else:
            vae.use_tiling = False
        mode = vae.set_decode_mode(s.vae_decode) if hasattr(vae, "set_decode_mode") else "plain"
        self.last_decode = {"tiled": tiled, "mode": mode}

    def __call__(self, *args, height: int | None = None, width: int | None = None, **kwargs):
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if self.vae is not None:
            self._prepare_decode(height, width)
        return super().__call__(*args, height=height, width=width, **kwargs)

    def place(self, offload: str = "none", dtype: str | torch.dtype | None = "auto",
              device: str | torch.device | None = None, memory: str = "none") -> dict:
        """Move to ``device`` (default: CUDA when present) in ``dtype``, or set up diffusers' CPU offload there.

        Returns what was done: {"device", "dtype", "offload", "memory"} (offload "none" when no accelerator is
        present). ``memory``: the transformer's low-VRAM mode (``ultraflux.pipelines.memory``).
        """
        _choice("offload", offload, OFFLOAD_MODES)
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        if offload != "none" and device.type == "cpu":
            logger.warning("sample.offload=%s needs an accelerator; on the CPU the weights already live in host "
                           "memory, so sampling runs without offload", offload)
            offload = "none"
        self._cast(dtype)
        held = memory != "none" and offload == "none" and self.transformer is not None
        if offload == "none":  # a low-VRAM transformer gets its hooks in host memory first (below): the device
            for name, module in self.components.items():  # never holds all of its weights in sample.dtype
                if isinstance(module, torch.nn.Module) and not (held and name == "transformer"):
                    module.to(device)
        elif offload == "model":
            self.enable_model_cpu_offload(device=device)
        else:
            self.enable_sequential_cpu_offload(device=device)
        self.offload = offload
        memory = apply_memory_mode(self.transformer, memory, device, dtype) if self.transformer is not None else "none"
        if held and not memory.startswith("group"):  # fp8 storage (or group's CPU fallback) lives on the device
            self.transformer.to(device)
        self.placement = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "offload": offload,
                          "memory": memory}
        return self.placement

    def _cast(self, dtype: torch.dtype) -> None:
        """Cast the components that are not in ``dtype`` yet. Plain ``nn.Module.to`` where no submodule must stay in
        float32: diffusers' ``ModelMixin.to`` warns on every dtype cast, even when its float32 list is empty."""
        for module in self.components.values():
            first = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
            if first is None or first.dtype == dtype:
                continue
            if getattr(module, "_keep_in_fp32_modules", None):
                module.to(dtype=dtype)
            else:
                torch.nn.Module.to(module, dtype=dtype)

    def replace_transformer(self, transformer) -> None:
        """Swap the transformer (e.g. stage 1 for stage 2) keeping the placement and offload set by ``place``."""
        placement = getattr(self, "placement", None)
        if placement and placement["offload"] != "none":
            self.remove_all_hooks()
        self.register_modules(transformer=transformer)
        if placement:
            self.place(placement["offload"], getattr(torch, placement["dtype"]), placement["device"],
                       placement["memory"])


def decode_settings_from(sample_cfg: dict) -> dict:
    """``configure_decode`` keyword arguments from params.yaml's complete, validated ``sample`` section."""
    return {"vae_tiling": str(sample_cfg["vae_tiling"]), "tiling_min_pixels": int(sample_cfg["vae_tiling_min_pixels"]),
            "tile_size": int(sample_cfg["vae_tile_size"]), "vae_decode": str(sample_cfg["vae_decode"])}


def load_pipeline(params: dict, transformer_dir: str | Path, vae_dir: str | Path,
                  place: bool = True) -> UltraFluxPipeline:
    """Assemble the pipeline from stage outputs (a trained transformer dir, a post-trained VAE dir, frozen text
    encoders) with ``params["sample"]``'s decode, offload and dtype settings; ``place=False`` leaves it on the CPU in
    float32."""
    from ultraflux.models.text import build_text_encoders
    from ultraflux.models.transformer import load_transformer
    from ultraflux.models.vae import build_vae

    sample_cfg = params["sample"]
    decode = decode_settings_from(sample_cfg)            # validated before anything loads
    _choice("offload", str(sample_cfg["offload"]), OFFLOAD_MODES)
    dtype = resolve_dtype(sample_cfg["dtype"], default_device()) if place else torch.float32
    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=params["seed"])
    transformer = load_transformer(transformer_dir, params["rope"], rope_from=sample_cfg["rope_from"],
                                   torch_dtype=dtype)
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)})
    shift = params["dit_stage2"]["shift"]
    pipe = UltraFluxPipeline(static_shift_scheduler(shift), vae, te, tok, te2, tok2, transformer)
    pipe.configure_decode(**decode)
    if place:
        pipe.place(offload=str(sample_cfg["offload"]), dtype=dtype, memory=str(sample_cfg["memory"]))
    return pipe
