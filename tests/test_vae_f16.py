"""The F16 VAE: Flux F8 body + stride-2 conv_in + nearest-2x conv_out (seed Sec. 2.2, Table 2/3)."""
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from ultraflux.models.vae import (FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, AutoencoderKLF16, build_vae, from_f8,
                                  load_vae, spatial_factor, tiny_config)

TINY = {"vae_pretrained": "", "tiny": {"vae_block_out_channels": [16, 32, 32, 32]}}


@pytest.fixture(scope="module")
def vae():
    return build_vae(TINY).eval()


def test_tiny_f16_geometry(vae):
    assert isinstance(vae, AutoencoderKLF16)
    assert spatial_factor(vae) == 16 and vae.spatial_factor == 16
    assert vae.config.latent_channels == 16 and vae.config.extra_stride == 2
    assert vae.config.scaling_factor == FLUX_SCALING_FACTOR == 0.3611
    assert vae.config.shift_factor == FLUX_SHIFT_FACTOR == 0.1159
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mean
        y = vae.decode(z).sample
    assert z.shape == (2, 16, 4, 6)
    assert y.shape == x.shape
    assert isinstance(vae.encoder, nn.Module) and isinstance(vae.decoder, nn.Module)


def test_build_is_deterministic_and_seeded():
    a, b = build_vae(TINY), build_vae(TINY)
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
    c = build_vae(TINY, seed=1)
    assert not torch.equal(a.decoder.conv_out.weight, c.decoder.conv_out.weight)


def test_f16_is_f8_plus_stride_and_upsample():
    torch.manual_seed(0)
    f8 = AutoencoderKL(**tiny_config([16, 32, 32, 32])).eval()
    assert spatial_factor(f8) == 8
    f16 = from_f8(f8).eval()
    assert spatial_factor(f16) == 16
    sd8, sd16 = f8.state_dict(), f16.state_dict()
    assert sd8.keys() == sd16.keys()
    assert all(torch.equal(sd8[k], sd16[k]) for k in sd8)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # encoder: stride-2 first conv == the F8 conv sampled at even positions
        assert torch.allclose(f16.encoder.conv_in(x), f8.encoder.conv_in(x)[..., ::2, ::2], atol=1e-5)
        # decoder: last conv applied to the nearest-2x upsampled features
        h = torch.randn(1, 16, 8, 8)
        assert torch.allclose(f16.decoder.conv_out(h), f8.decoder.conv_out(F.interpolate(h, scale_factor=2)),
                              atol=1e-5)
        assert f16.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean.shape[-1] == 4
        assert f8.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean.shape[-1] == 8


def test_save_load_roundtrip(vae, tmp_path):
    vae.save_pretrained(tmp_path / "f16")
    cfg = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKLF16" and cfg["extra_stride"] == 2
    z = torch.randn(1, 16, 3, 5)
    x = torch.randn(1, 3, 48, 80)
    for loaded in (AutoencoderKLF16.from_pretrained(tmp_path / "f16"), load_vae(tmp_path / "f16"),
                   build_vae({**TINY, "vae_pretrained": str(tmp_path / "f16")})):
        loaded.eval()
        assert isinstance(loaded, AutoencoderKLF16) and spatial_factor(loaded) == 16
        with torch.no_grad():
            assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)
            assert torch.equal(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)


def test_f8_directory_is_adapted(tmp_path):
    torch.manual_seed(3)
    f8 = AutoencoderKL(**tiny_config([16, 32, 32, 32]))
    f8.save_pretrained(tmp_path / "pipe" / "vae")           # also accepts a pipeline dir with vae/
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        f16 = build_vae({**TINY, "vae_pretrained": str(path)})
        assert isinstance(f16, AutoencoderKLF16) and spatial_factor(f16) == 16
        assert torch.equal(f16.decoder.conv_out.weight, f8.decoder.conv_out.weight)
        assert torch.equal(f16.encoder.conv_in.weight, f8.encoder.conv_in.weight)


def test_tiled_decode_geometry_exact_with_local_decoder():
    """4096x4096 plan with 1024 px tiles: 6x6 bounded tiles, and blending is exact for a pointwise decoder."""
    vae = build_vae(TINY)

    class Nearest16(nn.Module):   # a cheap, purely local stand-in decoder with the F16 geometry
        def forward(self, z):
            return F.interpolate(z[:, :3], scale_factor=16, mode="nearest")

    vae.decoder = Nearest16()
    shapes = []
    vae.decoder.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[-2:])))
    z = torch.randn(1, 16, 256, 256)                        # a 4096 x 4096 image
    vae.enable_tiling(1024)
    assert vae.tile_latent_min_size == 64
    with torch.no_grad():
        y = vae.decode(z).sample
    assert y.shape == (1, 3, 4096, 4096)
    assert len(shapes) == 36 and max(h * w for h, w in shapes) <= 64 * 64
    assert torch.allclose(y, F.interpolate(z[:, :3], scale_factor=16), atol=1e-5)


def test_tiled_decode_bounded_and_close(vae):
    torch.manual_seed(0)
    z = torch.randn(1, 16, 32, 32)                          # 512 x 512 px
    peak = {}

    def track(name):
        def hook(m, i, o):
            if isinstance(o, torch.Tensor):
                peak[name] = max(peak.get(name, 0), o.numel())
        return hook

    handles = [m.register_forward_hook(track("x")) for m in vae.decoder.modules() if m is not vae.decoder]
    with torch.no_grad():
        vae.use_tiling = False
        y = vae.decode(z).sample
        full_peak = peak.pop("x")
        vae.enable_tiling(256)                              # 16 x 16 latent tiles
        yt = vae.decode(z).sample
        tiled_peak = peak.pop("x")
    for h in handles:
        h.remove()
    vae.use_tiling = False
    vae.set_tile_size(vae.config.sample_size)
    assert yt.shape == y.shape
    assert tiled_peak <= full_peak / 4 + 1                  # largest activation set by the tile, not the image
    # random-init decoders have per-tile GroupNorm/attention statistics, so agreement is approximate
    corr = torch.corrcoef(torch.stack([y.flatten(), yt.flatten()]))[0, 1]
    assert corr > 0.8
