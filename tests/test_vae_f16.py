"""The F16 VAE: Flux F8 body + stride-2 conv_in + nearest-2x conv_out (seed Sec. 2.2, Table 2/3)."""
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from conftest import params_section
from ultraflux.models.vae import (FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, AutoencoderKLF16, build_vae, from_f8,
                                  load_vae, spatial_factor, tiny_config)

TINY = params_section("model", pretrained="", vae_pretrained="")   # the tiny profile's VAE: [16, 32, 32, 32]


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


# ---- partitioned decode (the public release's default) ----------------------------------------------------------

def _conv_out_input(vae, z):
    """The features entering decoder.conv_out (after norm + SiLU) for latents z."""
    seen = []
    handle = vae.decoder.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        vae.decode(z)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (2, 7)])
def test_partitioned_decode_is_the_plain_one_shifted_by_one_pixel(vae, hw):
    torch.manual_seed(1)
    z = torch.randn(1, 16, *hw)
    vae.set_decode_mode("plain")
    with torch.no_grad():
        plain = vae.decode(z).sample
    h = _conv_out_input(vae, z)
    assert vae.set_decode_mode("partitioned") == "partitioned" and vae.decode_mode == "partitioned"
    calls = []
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        part = vae.decode(z).sample
    handle.remove()
    vae.set_decode_mode("plain")
    # independent computation: the 3x3 conv of the 2x nearest upsample, over zero padding 2, first 2H x 2W outputs
    conv = vae.decoder.conv_out
    expected = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), conv.weight, conv.bias,
                        padding=2)[..., :plain.shape[-2], :plain.shape[-1]]
    assert part.shape == plain.shape == (1, 3, 16 * hw[0], 16 * hw[1])
    assert torch.allclose(part, expected, atol=1e-5)
    assert torch.allclose(part[..., 1:, 1:], plain[..., :-1, :-1], atol=1e-5)      # the one-pixel shift
    assert not torch.allclose(part, plain, atol=1e-3)
    assert len(calls) == 1


def test_partitioned_conv_works_quadrant_by_quadrant():
    """Largest upsampled activation: a quarter of the image plus the halo, not the full map."""
    conv = from_f8(AutoencoderKL(**tiny_config([16, 32]))).decoder.conv_out
    x = torch.randn(1, 16, 9, 12)                          # odd height: uneven halves are fine too
    sizes = []
    orig = F.interpolate

    def spy(t, *a, **k):
        sizes.append(tuple(t.shape[-2:]))
        return orig(t, *a, **k)

    conv.partitioned = True
    F.interpolate = spy
    try:
        with torch.no_grad():
            y = conv(x)
    finally:
        F.interpolate = orig
    assert sizes == [(5, 7), (5, 7), (6, 7), (6, 7)]        # (4 or 5 rows + halo) x (6 cols + halo)
    ref = F.conv2d(F.interpolate(x, scale_factor=2), conv.weight, conv.bias, padding=2)[..., :18, :24]
    assert torch.allclose(y, ref, atol=1e-5)


def test_release_format_vae_loads_as_f16_and_decodes_partitioned(tmp_path):
    torch.manual_seed(3)
    f8 = AutoencoderKL(**tiny_config([16, 32, 32, 32]))
    f8.save_pretrained(tmp_path / "UltraFlux-v1" / "vae")
    cfg_path = tmp_path / "UltraFlux-v1" / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "stride": 2}))   # what the release's AutoencoderKL writes
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        official = load_vae(tmp_path / "UltraFlux-v1")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "not expected" in r.getMessage()]
    assert official.release_format and spatial_factor(official) == 16
    assert official.decode_mode == "plain"                  # the module default; auto picks per weights
    assert official.set_decode_mode("auto") == "partitioned"
    ours = from_f8(f8).eval()
    assert not ours.release_format and ours.set_decode_mode("auto") == "plain"
    z = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        assert torch.allclose(official.decode(z).sample[..., 1:, 1:], ours.decode(z).sample[..., :-1, :-1],
                              atol=1e-5)
    # a saved copy is this project's format: no longer the release's, plain under auto
    official.save_pretrained(tmp_path / "saved")
    assert load_vae(tmp_path / "saved").set_decode_mode("auto") == "plain"
    cfg_path.write_text(json.dumps({**cfg, "stride": 3}))
    with pytest.raises(ValueError, match="'stride' must be 2"):
        load_vae(tmp_path / "UltraFlux-v1")
    with pytest.raises(ValueError, match="decode mode"):
        ours.set_decode_mode("quadrants")


def test_partitioned_combines_with_tiling(vae):
    torch.manual_seed(0)
    z = torch.randn(1, 16, 32, 32)                          # 512 x 512 px, 16-latent tiles at a 12-latent stride
    modes = []
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, a, o: modes.append(m.partitioned))
    with torch.no_grad():
        vae.enable_tiling(256)
        vae.set_decode_mode("plain")
        tiled_plain = vae.decode(z).sample
        vae.set_decode_mode("partitioned")
        tiled_part = vae.decode(z).sample
        vae.use_tiling = False
        full_part = vae.decode(z).sample
    handle.remove()
    vae.set_decode_mode("plain")
    vae.set_tile_size(vae.config.sample_size)
    assert modes == [False] * 9 + [True] * 9 + [True]      # 3 x 3 tiles, each tile's decoder call partitioned
    assert tiled_part.shape == full_part.shape == (1, 3, 512, 512)
    assert not torch.allclose(tiled_part, tiled_plain, atol=1e-3)
    # the shift survives tiling: the partitioned tiled image is the plain tiled one moved by one pixel, away from
    # the tile joins (where each tile's own shifted border enters the blend)
    inner = (slice(None), slice(None), slice(8, 180), slice(8, 180))
    assert torch.allclose(tiled_part[..., 1:, 1:][inner], tiled_plain[..., :-1, :-1][inner], atol=1e-4)


def _column_jumps(y):
    return y.diff(dim=-1).abs().mean(dim=(0, 1, 2))        # mean |x+1 - x| per column


def test_tiled_decode_has_no_seam_and_small_difference(vae):
    """diffusers' tiled decode with the F16 tile geometry: 25% overlap blended linearly (seams invisible)."""
    torch.manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 16, 8, 8), size=(64, 64), mode="bicubic")   # structure > tile
    with torch.no_grad():
        vae.use_tiling = False
        untiled = vae.decode(smooth).sample
        ratios = {}
        for overlap in (0.25, 0.0):                          # 0.0: abutting tiles, the control that must show seams
            vae.enable_tiling(512)
            vae.tile_overlap_factor = overlap
            tiled = vae.decode(smooth).sample
            step = 512 - int(512 * overlap)                  # output columns per tile
            joins = [k * step - 1 for k in range(1, 1024 // step + 1) if k * step < 1024]
            jumps = _column_jumps(tiled)
            ratios[overlap] = float(jumps[joins].max() / jumps.median())
        untiled_jumps = _column_jumps(untiled)
        # stationary latents (iid, as sampled latents are locally): tile and image statistics agree, so what is left
        # is the tiling/blending error of a random-init decoder (per-tile GroupNorm and attention statistics)
        iid = torch.randn(1, 16, 96, 96)
        vae.enable_tiling(768)
        vae.tile_overlap_factor = 0.25
        tiled_iid = vae.decode(iid).sample
        vae.use_tiling = False
        untiled_iid = vae.decode(iid).sample
    vae.set_tile_size(vae.config.sample_size)
    assert ratios[0.25] < 1.2 and ratios[0.0] > 2.0
    assert float(untiled_jumps[[383, 767]].max() / untiled_jumps.median()) < 1.2     # same columns, no tiling
    assert float((tiled_iid - untiled_iid).abs().mean() / untiled_iid.std()) < 0.1
