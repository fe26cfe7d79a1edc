"""UltraFluxPipeline: diffusers' ``FluxPipeline`` with the F16 VAE, our RoPE and a static-shift scheduler.

Only what must differ from ``FluxPipeline`` is overridden: the VAE scale factor comes from the VAE's real spatial
compression (16 for the F16 VAE, where ``FluxPipeline`` would infer 8 from ``block_out_channels``), and the VAE decodes
tiled above ``tile_above`` pixels so a 4096x4096 image decodes in bounded memory. Everything else
(``from_pretrained``, ``__call__(prompt, height, width, num_inference_steps, guidance_scale, generator)``) is
FluxPipeline's.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.image_processor import VaeImageProcessor

from ultraflux.models.vae import spatial_factor

# Public UltraFlux release's sampler: static shift 3.0 (Flux's resolution-dependent shift extrapolates to ~25 at 4096^2).
STATIC_SHIFT = 3.0


def static_shift_scheduler(shift: float = STATIC_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


class UltraFluxPipeline(FluxPipeline):
    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        if vae is not None:
            self.vae_scale_factor = spatial_factor(vae)
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)


def load_pipeline(params: dict, transformer_dir: str | Path, vae_dir: str | Path) -> UltraFluxPipeline:
    """Assemble the pipeline from stage outputs: a trained transformer dir, a post-trained VAE dir, frozen text."""
    from ultraflux.models.text import build_text_encoders
    from ultraflux.models.transformer import load_transformer
    from ultraflux.models.vae import build_vae

    tok, te, tok2, te2 = build_text_encoders(params["model"], seed=params["seed"])
    transformer = load_transformer(transformer_dir, params["rope"])
    vae = build_vae({**params["model"], "vae_pretrained": str(vae_dir)})
    shift = params["dit_stage2"]["shift"]
    return UltraFluxPipeline(static_shift_scheduler(shift), vae, te, tok, te2, tok2, transformer)
