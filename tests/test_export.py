"""Single-file exports (ultraflux.models.export) read back by diffusers' own converters, the independent oracle:
``FluxTransformer2DModel.from_single_file``, ``AutoencoderKL.from_single_file``, ``FluxPipeline.load_lora_weights``.

diffusers' Flux converters hard-code FLUX.1's width (3072), so the transformer tests use a Flux of the real width
with one double and one single block (530M parameters, built in bf16 and filled from a seeded random period that
divides no tensor size, so a swapped or misplaced slice cannot go unnoticed).
"""
from __future__ import annotations

import json

import pytest
import torch

WIDTH_KW = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
PERIOD = 1_000_003   # prime: no parameter's chunk size is a multiple of it


def fill_seeded(model: torch.nn.Module, seed: int = 0) -> None:
    base = torch.randn(PERIOD, generator=torch.Generator().manual_seed(seed)) * 0.05
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            idx = (torch.arange(p.numel()) + offset) % PERIOD
            p.copy_(base[idx].view(p.shape))
            offset += p.numel()


def flux_width_3072(dtype=torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**WIDTH_KW)
    model = model.to_empty(device="cpu").to(dtype)
    fill_seeded(model)
    return model.eval()


def forward(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    img, txt = 16, 8
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(img, 1), ids.float()], 1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, img, 64, generator=g).to(dtype),
                     encoder_hidden_states=torch.randn(1, txt, 64, generator=g).to(dtype),
                     pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
                     timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype),
                     img_ids=img_ids, txt_ids=torch.zeros(txt, 3)).sample.float()


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux3072") / "transformer"
    model = flux_width_3072()
    model.save_pretrained(path)
    return path, model, forward(model)


def test_transformer_bf16_export_loads_in_diffusers_with_identical_weights(flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    from ultraflux.models.export import export_transformer

    src, model, ref = flux_dir
    out = tmp_path / "flux-bf16.safetensors"
    export_transformer(src, out, "bf16")
    loaded = FluxTransformer2DModel.from_single_file(str(out), config=str(src), torch_dtype=torch.bfloat16)
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours), [k for k in ours if not torch.equal(theirs[k], ours[k])]
    assert torch.equal(forward(loaded), ref)


def test_transformer_fp8_export_is_e4m3fn_and_within_its_rounding(flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from ultraflux.models.export import export_transformer

    src, model, ref = flux_dir
    out = tmp_path / "flux-fp8.safetensors"
    export_transformer(src, out, "fp8")
    with safe_open(out, "pt") as f:
        assert f.get_tensor("double_blocks.0.img_attn.qkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("double_blocks.0.img_attn.qkv.bias").dtype == torch.bfloat16
    loaded = FluxTransformer2DModel.from_single_file(str(out), config=str(src), torch_dtype=torch.bfloat16)
    ours = model.state_dict()
    for k, t in loaded.state_dict().items():   # e4m3fn: 3 mantissa bits (rel. step 2^-3), subnormal step 2^-9
        bound = ours[k].float().abs() * 2 ** -4 + 2 ** -10
        assert ((t.float() - ours[k].float()).abs() <= bound).all(), k
    out = forward(loaded)   # stated tolerance (random weights): relative RMS error and max |delta| <= 15% of the output
    rel_rms, rel_max = ((out - ref).norm() / ref.norm()).item(), ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel_rms <= 0.15 and rel_max <= 0.15, (rel_rms, rel_max)


def test_vae_export_loads_in_diffusers_single_file_and_decodes_identically(tmp_path):
    from diffusers import AutoencoderKL

    from ultraflux.models.export import export_vae
    from ultraflux.models.vae import AutoencoderKLF16, from_f8, tiny_config

    torch.manual_seed(0)
    vae = AutoencoderKLF16(**tiny_config((32, 64)), extra_stride=2).eval()
    vae.save_pretrained(tmp_path / "vae")
    f8_config = tmp_path / "f8"
    AutoencoderKL(**tiny_config((32, 64))).save_config(f8_config)
    out = tmp_path / "ae.safetensors"
    info = export_vae(tmp_path / "vae", out, "fp32")
    assert info["ultraflux.extra_stride"] == "2"
    loaded = AutoencoderKL.from_single_file(str(out), config=str(f8_config), torch_dtype=torch.float32)
    theirs, ours = loaded.state_dict(), vae.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_f8(loaded).decode(z).sample, vae.decode(z).sample)


def _lora_transformer(model, rank=4, alpha=8.0):
    from peft import LoraConfig

    # fused members targeted in part (add_k_proj alone, no proj_mlp): exercises the zero blocks. Not the final layer
    # or embedders: diffusers' kohya converter writes them without the "transformer." prefix and drops them.
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2"])
    model.add_adapter(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return config


def test_lora_export_loads_with_load_lora_weights_and_merges(flux_dir, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from ultraflux.models.export import export_lora, export_transformer

    src, model, ref = flux_dir
    model = model.float()
    config = _lora_transformer(model)
    with_lora = forward(model)
    assert (with_lora - ref).abs().max() > 1e-2          # the LoRA changes the output
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    out = tmp_path / "lora-kohya.safetensors"
    export_lora(tmp_path / "lora", out, "fp32")
    model.delete_adapters("default")
    model.to(torch.bfloat16)
    assert torch.equal(forward(model), ref)
    model.float()
    pipe = FluxPipeline(None, None, None, None, None, None, model)
    pipe.load_lora_weights(str(out))                     # diffusers' kohya converter: the oracle
    loaded = forward(model)
    pipe.unload_lora_weights()
    assert (loaded - with_lora).abs().max().item() <= 1e-4 * with_lora.abs().max().item()
    merged = tmp_path / "merged.safetensors"
    export_transformer(src, merged, "fp32", lora=tmp_path / "lora")
    fused = FluxTransformer2DModel.from_single_file(str(merged), config=str(src), torch_dtype=torch.float32)
    assert (forward(fused) - with_lora).abs().max().item() <= 1e-4 * with_lora.abs().max().item()
    model.to(torch.bfloat16)


def test_export_cli_detects_kind_and_names_a_bad_source(tmp_path, capsys):
    from ultraflux.cli import main

    with pytest.raises(SystemExit, match="missing: no such file"):
        main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert main(["export", str(tmp_path / "d"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a transformer, VAE or LoRA directory" in capsys.readouterr().err
