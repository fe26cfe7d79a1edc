"""Single-file exports in the original Flux (BFL) layout, for ComfyUI / Forge: transformer, VAE, LoRA.

* ``export_transformer(dir, out, dtype, lora=None)``: a diffusers transformer directory (ours, FLUX.1, UltraFlux-v1;
  sharded or not) -> one safetensors file with BFL keys (``double_blocks.0.img_attn.qkv.weight``, ...), in fp32,
  bf16 or fp8 (``float8_e4m3fn`` for the weight matrices, bf16 for biases and norm scales, as ComfyUI's fp8 Flux
  checkpoints; values clamped to e4m3fn's +-448). ``lora`` merges a LoRA directory first: W + (alpha / r) B A, in
  fp32.
* ``export_vae(dir, out, dtype)``: a VAE directory -> the LDM layout of Flux's ``ae.safetensors``. The F16 VAE has
  the F8 VAE's parameters (``ultraflux.models.vae``): the file holds them all, but a loader that reads only the keys
  builds the F8 geometry; the F16 stride must come from the loader (the metadata says ``extra_stride``).
* ``export_lora(dir, out, dtype)``: a diffusers LoRA directory (``pytorch_lora_weights.safetensors``, saved by
  ``FluxPipeline.save_lora_weights``) -> kohya ``lora_unet_<bfl>`` keys (``ultraflux.models.bfl_keys``).

diffusers' own loaders are the oracle (tests/test_export.py): ``FluxTransformer2DModel.from_single_file``,
``AutoencoderKL.from_single_file`` and ``FluxPipeline.load_lora_weights`` read these files back. Note: diffusers'
Flux converters assume FLUX.1's width (3072 = 24 heads x 128; ComfyUI reads widths from the tensor shapes): the
export is exact at any width, diffusers reads it back only at 3072.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ultraflux.io import atomic_path
from ultraflux.models.bfl_keys import lora_to_kohya, transformer_to_bfl, vae_to_ldm

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0   # largest finite float8_e4m3fn
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"   # diffusers' key for the LoraConfig in a LoRA file's header


def cast_for_export(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """fp32 / bf16: every floating tensor; fp8: matrices (ndim >= 2) in e4m3fn, the rest in bf16."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    target = EXPORT_DTYPES[dtype]
    out = {}
    for k, t in sd.items():
        if not t.is_floating_point():
            out[k] = t
        elif target == torch.float8_e4m3fn and t.ndim >= 2:
            out[k] = t.float().clamp(-FP8_MAX, FP8_MAX).to(target)
        elif target == torch.float8_e4m3fn:
            out[k] = t.to(torch.bfloat16)
        else:
            out[k] = t.to(target)
    return {k: v.contiguous() for k, v in out.items()}


def read_diffusers_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All ``*.safetensors`` weights of a diffusers model directory (one file or an index of shards)."""
    model_dir = Path(model_dir)
    if (model_dir / "transformer" / "config.json").is_file() and not (model_dir / "config.json").is_file():
        model_dir = model_dir / "transformer"
    files = sorted(p for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (not a diffusers model directory)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def read_lora(lora_dir: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """A diffusers LoRA file (or its directory) -> (state dict, alpha); alpha from the file's LoraConfig metadata,
    else the rank (diffusers' default when a file carries no alpha)."""
    path = Path(lora_dir)
    path = path / LORA_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA weights ({LORA_FILE})")
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get(LORA_METADATA_KEY)
    sd = load_file(path)
    ranks = {t.shape[0] for k, t in sd.items() if ".lora_A." in k}
    config = json.loads(meta) if meta else {}   # diffusers writes the LoraConfig as "transformer.<key>" entries
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank/alpha patterns are not supported by the export")
    if len(ranks) != 1:
        raise ValueError(f"{path}: the export needs one LoRA rank for all modules, found {sorted(ranks)}")
    return sd, float(config.get("lora_alpha", next(iter(ranks))))


def merge_lora(sd: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float,
               prefix: str = "transformer.", keep_dtype: bool = True) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every LoRA module (fp32 arithmetic; the result in W's dtype, or in fp32 when not
    ``keep_dtype``); a module the base lacks is an error naming it."""
    out = dict(sd)
    for key in (k for k in lora if k.endswith(".lora_A.weight")):
        module = key[len(prefix):-len(".lora_A.weight")]
        if f"{module}.weight" not in out:
            raise KeyError(f"LoRA module {module!r} is not in the base transformer")
        a, b = lora[key].float(), lora[key.replace(".lora_A.", ".lora_B.")].float()
        w = out[f"{module}.weight"]
        merged = w.float() + (alpha / a.shape[0]) * (b @ a)
        out[f"{module}.weight"] = merged.to(w.dtype) if keep_dtype else merged
    return out


def _save(sd: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str]) -> dict:
    with atomic_path(out, ".safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", **metadata})
    return {"out": str(out), "tensors": len(sd), "bytes": Path(out).stat().st_size, **metadata}


def export_transformer(model_dir: str | Path, out: str | Path, dtype: str = "bf16",
                       lora: str | Path | None = None) -> dict:
    sd = read_diffusers_weights(model_dir)
    if lora is not None:
        sd = merge_lora(sd, *read_lora(lora), keep_dtype=False)   # cast once, to the export dtype
    bfl = cast_for_export(transformer_to_bfl(sd), dtype)
    return _save(bfl, out, {"ultraflux.kind": "transformer", "ultraflux.layout": "bfl", "ultraflux.dtype": dtype,
                            "ultraflux.merged_lora": str(lora or "")})


def export_vae(model_dir: str | Path, out: str | Path, dtype: str = "fp32") -> dict:
    if dtype == "fp8":
        raise ValueError("the VAE exports in fp32 or bf16 (no loader reads an fp8 VAE)")
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json" if (model_dir / "config.json").is_file() else model_dir / "vae/config.json"
    extra_stride = json.loads(config_path.read_text()).get("extra_stride", 1) if config_path.is_file() else 1
    ldm = cast_for_export(vae_to_ldm(read_diffusers_weights(config_path.parent)), dtype)
    return _save(ldm, out, {"ultraflux.kind": "vae", "ultraflux.layout": "ldm", "ultraflux.dtype": dtype,
                            "ultraflux.extra_stride": str(extra_stride)})


def export_lora(lora_dir: str | Path, out: str | Path, dtype: str = "bf16") -> dict:
    if dtype == "fp8":
        raise ValueError("a LoRA exports in fp32 or bf16")
    sd, alpha = read_lora(lora_dir)
    kohya = cast_for_export(lora_to_kohya(sd, alpha), dtype)
    return _save(kohya, out, {"ultraflux.kind": "lora", "ultraflux.layout": "kohya", "ultraflux.dtype": dtype,
                              "ultraflux.alpha": str(alpha)})


def detect_kind(path: str | Path) -> str:
    """``transformer`` | ``vae`` | ``lora`` from a directory's files (its config.json class, or a LoRA file)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors" or (path / LORA_FILE).is_file():
        return "lora"
    for config in (path / "config.json", path / "transformer" / "config.json"):
        if config.is_file():
            cls = json.loads(config.read_text()).get("_class_name", "")
            if "Transformer" in cls:
                return "transformer"
            if "Autoencoder" in cls:
                return "vae"
    raise ValueError(f"{path}: not a transformer, VAE or LoRA directory (no config.json naming the class, "
                     f"no {LORA_FILE})")


EXPORTERS = {"transformer": export_transformer, "vae": export_vae, "lora": export_lora}
