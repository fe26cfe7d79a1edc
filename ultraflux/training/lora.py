"""LoRA training of the DiT through PEFT as diffusers integrates it (``dit_stage*.lora``; null = full fine-tune, the
paper's setting).

``apply_lora`` freezes the transformer and injects a LoRA adapter (``transformer.add_adapter(LoraConfig(r, alpha,
dropout, target_modules))``): only the adapter's A/B matrices train (B starts at zero, so step 0 is the base model).
Validation runs the model with its adapter. The stage writes

    transformer/        the base weights with the LoRA merged: W + (alpha / r) B A (every consumer loads it unchanged)
    transformer/lora/   the adapter alone, diffusers' LoRA format (``FluxPipeline.load_lora_weights`` loads it; export
                        it for ComfyUI with ``ultraflux export transformer/lora --out x.safetensors``)

Merging works on a state dict (``accelerator.get_state_dict``), so it is the same under DDP and ZeRO-2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ultraflux.models.export import merge_lora

ADAPTER = "default"


def lora_config(cfg: dict):
    from peft import LoraConfig

    return LoraConfig(r=int(cfg["rank"]), lora_alpha=float(cfg["alpha"]), lora_dropout=float(cfg["dropout"]),
                      target_modules=list(cfg["target_modules"]), init_lora_weights=True)


def adapter_metadata(cfg: dict) -> dict:
    """The LoraConfig as diffusers stores it in a LoRA file's header (target modules sorted: same bytes every run)."""
    meta = lora_config(cfg).to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def apply_lora(model: torch.nn.Module, cfg: dict | None, seed: int = 0) -> int:
    """Freeze ``model`` and add the adapter (no-op when ``cfg`` is null), its A matrices drawn from ``seed`` (not
    from the global RNG, whose state depends on what ran before); returns the trainable parameter count."""
    if cfg:
        model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.add_adapter(lora_config(cfg), adapter_name=ADAPTER)
        missing = [m for m in cfg["target_modules"] if not any(n.endswith(m) for n, _ in model.named_modules())]
        if missing:
            raise ValueError(f"lora.target_modules: {', '.join(missing)} match no module of the transformer")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def split_lora_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A PEFT-injected state dict -> (base weights under the plain names, adapter as ``<module>.lora_A/B.weight``)."""
    base, lora = {}, {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            lora[k.replace(f".{ADAPTER}.", ".")] = v
        elif ".lora_" not in k:
            base[k.replace(".base_layer.", ".")] = v
    return base, lora


def save_trained(model, state_dict: dict[str, torch.Tensor], out: Path, cfg: dict | None) -> None:
    """``out``: the diffusers transformer directory (LoRA merged) and, for a LoRA run, ``out/lora`` (module docstring)."""
    if not cfg:
        model.save_pretrained(out, state_dict=state_dict)
        return
    from diffusers import FluxPipeline
    from huggingface_hub import save_torch_state_dict

    base, lora = split_lora_state_dict(state_dict)
    model.save_config(out)   # diffusers' save_pretrained would write the PEFT-wrapped names: the merged dict instead
    save_torch_state_dict(merge_lora(base, lora, float(cfg["alpha"]), prefix=""), out,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
    FluxPipeline.save_lora_weights(Path(out) / "lora", transformer_lora_layers={k: v.contiguous() for k, v in
                                                                                lora.items()},
                                   transformer_lora_adapter_metadata=adapter_metadata(cfg))
