"""Diffusers -> original Flux (BFL) key layout: the inverse of diffusers' single-file and LoRA converters.

The BFL layout (``flux1-dev.safetensors``, ``ae.safetensors``) is what ComfyUI and Forge load. Three maps:

* ``transformer_to_bfl``: ``FluxTransformer2DModel`` state dict -> BFL keys; the inverse of
  ``diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers``. Fused tensors are
  concatenated along the output dimension (double blocks: ``to_q|to_k|to_v -> img_attn.qkv``,
  ``add_q_proj|add_k_proj|add_v_proj -> txt_attn.qkv``; single blocks: ``to_q|to_k|to_v|proj_mlp -> linear1``) and
  the final AdaLN's (scale, shift) halves are swapped back to BFL's (shift, scale).
* ``vae_to_ldm``: ``AutoencoderKL`` state dict -> LDM/BFL VAE keys (``encoder.down.0.block.0...``); the inverse of
  ``convert_ldm_vae_checkpoint``; the mid-block attention's linear q/k/v/proj weights become the original 1x1 convs.
* ``lora_to_kohya``: a PEFT LoRA on the diffusers transformer -> kohya ``lora_unet_<bfl_key>`` modules with
  ``lora_down``/``lora_up``/``alpha`` (the form ComfyUI, Forge, kohya and diffusers' ``load_lora_weights`` load). A
  LoRA on the members of a fused BFL layer becomes one LoRA of rank n*r on the fused layer: ``lora_down`` stacks the
  members' A matrices, ``lora_up`` is block diagonal in the members' B matrices (absent members: zero blocks), so the
  product is exactly the members' LoRAs. PEFT's scale alpha / r is folded into ``lora_down`` and ``alpha`` is written
  as the rank (scale 1): diffusers' kohya converter ignores the alpha of the final layer, ComfyUI reads every one.
  (diffusers 0.42 loads kohya LoRAs of the blocks only: it drops those of the final layer and the embedders.)

Every key of the input must be consumed: a leftover (a module the BFL layout does not have) is an error naming it.
"""
from __future__ import annotations

import re

import torch

# (diffusers module, BFL module) for the modules that map one to one.
_GLOBAL = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",   # (scale, shift) -> (shift, scale): swap_halves
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
# fused BFL layer -> its diffusers members, in concatenation order
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_SWAPPED = "final_layer.adaLN_modulation.1"


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' ``swap_scale_shift``, which is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _block_indices(keys, prefix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})


def module_map(keys) -> tuple[dict[str, str], dict[str, tuple[str, tuple[str, ...]]]]:
    """For the diffusers modules present in ``keys``: {diffusers module: BFL module} for one-to-one modules and
    {diffusers module: (fused BFL module, its diffusers members in order)} for members of a fused layer."""
    one, fused = dict(_GLOBAL), {}
    for i in _block_indices(keys, "transformer_blocks."):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        one.update({src + a: dst + b for a, b in _DOUBLE.items()})
        for bfl, members in _DOUBLE_FUSED.items():
            fused.update({src + m: (dst + bfl, tuple(src + x for x in members)) for m in members})
    for i in _block_indices(keys, "single_transformer_blocks."):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        one.update({src + a: dst + b for a, b in _SINGLE.items()})
        for bfl, members in _SINGLE_FUSED.items():
            fused.update({src + m: (dst + bfl, tuple(src + x for x in members)) for m in members})
    return one, fused


def _norm_map(keys) -> dict[str, str]:
    out = {}
    for i in _block_indices(keys, "transformer_blocks."):
        out.update({f"transformer_blocks.{i}.{a}": f"double_blocks.{i}.{b}" for a, b in _DOUBLE_NORMS.items()})
    for i in _block_indices(keys, "single_transformer_blocks."):
        out.update({f"single_transformer_blocks.{i}.{a}": f"single_blocks.{i}.{b}" for a, b in _SINGLE_NORMS.items()})
    return out


def _leftover(sd: dict, used: set, what: str) -> None:
    rest = sorted(set(sd) - used)
    if rest:
        raise KeyError(f"{what}: {len(rest)} keys have no place in the BFL layout: {', '.join(rest[:5])}"
                       + (" ..." if len(rest) > 5 else ""))


def transformer_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL keys (module docstring)."""
    one, fused = module_map(sd)
    out, used = {}, set()
    for key, bfl in _norm_map(sd).items():
        if key in sd:
            out[bfl], _ = sd[key], used.add(key)
    for module, bfl in one.items():
        for p in ("weight", "bias"):
            if f"{module}.{p}" in sd:
                t = sd[f"{module}.{p}"]
                out[f"{bfl}.{p}"] = swap_halves(t) if bfl == _SWAPPED else t
                used.add(f"{module}.{p}")
    for bfl, members in set(fused.values()):
        for p in ("weight", "bias"):
            names = [f"{m}.{p}" for m in members]
            if all(n in sd for n in names):
                out[f"{bfl}.{p}"] = torch.cat([sd[n] for n in names], dim=0)
                used.update(names)
    _leftover(sd, used, "transformer")
    return out


# diffusers AutoencoderKL -> LDM VAE: ordered (pattern, replacement) rules on the whole key.
_VAE_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def _vae_key(key: str, num_up: int) -> str:
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)
    if m:   # diffusers counts decoder blocks from the bottleneck, LDM from the image
        block, kind, j, rest = num_up - 1 - int(m[1]), m[2], m[3], m[4]
        key = f"decoder.up.{block}.block.{j}.{rest}" if kind == "resnets" else f"decoder.up.{block}.upsample.{rest}"
    for pattern, repl in _VAE_RULES:
        key = re.sub(pattern, repl, key)
    return key


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM/BFL VAE keys (``ae.safetensors``)."""
    num_up = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")), default=-1)
    out = {}
    for key, t in sd.items():
        new = _vae_key(key, num_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]   # the original attention q/k/v/proj_out are 1x1 convolutions
        out[new] = t
    return out


def _out_features(member: str, hidden: int) -> int:
    """Output size of a fused layer's member: every member reads the hidden state; Flux's single-block MLP is 4x."""
    return 4 * hidden if member.endswith("proj_mlp") else hidden


def lora_to_kohya(sd: dict[str, torch.Tensor], alpha: float, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """A PEFT LoRA state dict (``<prefix><module>.lora_A.weight`` / ``lora_B.weight``, one ``alpha`` for all modules)
    in kohya keys on BFL modules (module docstring)."""
    mods = {}
    for key, t in sd.items():
        m = re.match(rf"^{re.escape(prefix)}(.+)\.lora_(A|B)\.weight$", key)
        if not m:
            raise KeyError(f"LoRA: {key!r} is not a '{prefix}<module>.lora_A/lora_B.weight' key")
        mods.setdefault(m[1], {})[m[2]] = t
    one, fused = module_map([f"{k}.weight" for k in mods])
    out: dict[str, torch.Tensor] = {}

    def put(bfl: str, down: torch.Tensor, up: torch.Tensor, n: int) -> None:
        name = "lora_unet_" + bfl.replace(".", "_")
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = (down * (float(alpha) * n / rank)).contiguous()   # n * r = rank
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))

    for module, ab in mods.items():
        if module in one:
            up = swap_halves(ab["B"]) if one[module] == _SWAPPED else ab["B"]
            put(one[module], ab["A"], up, 1)
        elif module not in fused:
            raise KeyError(f"LoRA: module {module!r} has no place in the BFL layout")
    for bfl, members in sorted(set(fused[m] for m in mods if m in fused)):
        present = [mods[m] for m in members if m in mods]
        r, in_features = present[0]["A"].shape
        like = present[0]["A"]
        downs, ups, rows = [], [], []
        for m in members:
            if m in mods:
                downs.append(mods[m]["A"])
                rows.append(mods[m]["B"])
            else:   # a member the LoRA does not target: zero blocks
                downs.append(torch.zeros(r, in_features, dtype=like.dtype))
                rows.append(torch.zeros(_out_features(m, in_features), r, dtype=like.dtype))
        up = torch.block_diag(*rows)
        put(bfl, torch.cat(downs, dim=0), up, len(members))
    return out
