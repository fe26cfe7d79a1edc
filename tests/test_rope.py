"""Resonance 2D RoPE with YaRN (seed Sec. 3, Table 3)."""
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ultraflux.models.rope import (KINDS, UltraFluxPosEmbed, axis_frequencies, build_pos_embed, correction_range,
                                   cycles, flux_frequencies, resonance_frequencies, yarn_mscale)

THETA, L, DIM = 10_000, 64, 56


def grid_ids(h, w, n_txt=5, dtype=torch.float32):
    """Flux ids: n_txt zero text ids followed by (0, row, col) image ids."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([torch.zeros(h * w), hh.flatten().float(), ww.flatten().float()], dim=-1)
    return torch.cat([torch.zeros(n_txt, 3), img]).to(dtype)


def wrap(x):
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


@pytest.mark.parametrize("train_len", [64, 8, 100])
def test_phase_closure_exact_for_snapped_bands(train_len):
    omega = flux_frequencies(DIM, THETA)
    r = cycles(omega, train_len)
    snapped = r >= 1
    res = resonance_frequencies(DIM, THETA, train_len)
    assert snapped.sum() >= 1
    assert wrap(train_len * res[snapped]).abs().max() < 1e-12            # exact standing waves on [0, L]
    assert wrap(train_len * omega[snapped]).abs().max() > 0.1             # Flux does not close
    # bands turning less than once keep the Flux frequency exactly
    assert torch.equal(res[~snapped], omega[~snapped])


def test_snap_all_bands_is_seed_literal():
    omega = flux_frequencies(DIM, THETA)
    r = cycles(omega, L)
    res = resonance_frequencies(DIM, THETA, L, snap_all_bands=True)
    r_hat = res * L / (2 * math.pi)
    assert torch.allclose(r_hat, torch.clamp(torch.round(r), min=1.0), atol=1e-12, rtol=0)
    assert wrap(L * res).abs().max() < 1e-12                               # every band closes


def test_paper_profile_numbers():
    # L = 64, b = 1e4, d = 56: r_0 = 64 / (2 pi) = 10.19 -> 10; 8 bands turn at least once.
    r = cycles(flux_frequencies(DIM, THETA), L)
    assert r[0] == pytest.approx(64 / (2 * math.pi))
    assert int((r >= 1).sum()) == 8
    assert correction_range(1.25, 0.75, DIM, THETA, L) == (6, 8)
    assert correction_range(16, 2, DIM, THETA, L) == (0, 5)
    assert yarn_mscale(2.0) == pytest.approx(0.1 * math.log(2.0) + 1)
    assert yarn_mscale(1.0) == 1.0


@pytest.mark.parametrize("kind", ["yarn", "resonance_yarn"])
def test_yarn_spectrum_is_ntk_by_parts(kind):
    base = axis_frequencies(DIM, THETA, L, L, kind)       # span <= L: no YaRN
    for s in (2.0, 3.0):
        om = axis_frequencies(DIM, THETA, L, int(s * L), kind)
        assert torch.equal(om[:1], base[:1])               # > 16 turns per window: base spectrum kept
        assert torch.allclose(om[9:], base[9:] / s, rtol=1e-12)   # < 0.75 turns: linear interpolation omega / s
        assert torch.all(om <= base * (1 + 1e-12)) and torch.all(om >= base / s * (1 - 1e-12))
        assert not torch.allclose(om, base)
    assert torch.equal(axis_frequencies(DIM, THETA, L, 4 * L, "flux"), flux_frequencies(DIM, THETA))
    with pytest.raises(ValueError):
        axis_frequencies(DIM, THETA, L, L, "nope")


def test_flux_kind_equals_diffusers():
    ids = grid_ids(12, 20)
    ids[5:, 1] += 3                                        # offset rows: spans, not maxima, matter
    ref_cos, ref_sin = FluxPosEmbed(THETA, [16, 56, 56])(ids)
    cos, sin = UltraFluxPosEmbed(THETA, [16, 56, 56], kind="flux", train_len=8)(ids)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert cos.shape == (ids.shape[0], 128) and cos.dtype == torch.float32


def _tables(ids, omegas, mscales):
    cos, sin = [], []
    for i, (om, m) in enumerate(zip(omegas, mscales)):
        ph = torch.outer(ids[:, i].double(), om)
        cos.append((ph.cos().repeat_interleave(2, 1) * m).float())
        sin.append((ph.sin().repeat_interleave(2, 1) * m).float())
    return torch.cat(cos, -1), torch.cat(sin, -1)


@pytest.mark.parametrize("hw", [(64, 64), (40, 64), (64, 17)])
def test_within_window_is_plain_resonance(hw):
    ids = grid_ids(*hw)
    pe = UltraFluxPosEmbed(THETA, [16, 56, 56], kind="resonance_yarn", train_len=L)
    cos, sin = pe(ids)
    exp = _tables(ids, [flux_frequencies(16, THETA), resonance_frequencies(56, THETA, L),
                        resonance_frequencies(56, THETA, L)], [1, 1, 1])
    assert torch.allclose(cos, exp[0], atol=1e-6) and torch.allclose(sin, exp[1], atol=1e-6)
    assert pe.last_scales == [1.0, 1.0, 1.0]
    # and it differs from Flux on the spatial axes only
    fcos, _ = FluxPosEmbed(THETA, [16, 56, 56])(ids)
    assert torch.equal(cos[:, :16], fcos[:, :16])
    assert not torch.allclose(cos[:, 16:], fcos[:, 16:], atol=1e-3)


@pytest.mark.parametrize("kind", ["yarn", "resonance_yarn"])
def test_yarn_scales_only_the_long_axis(kind):
    ids = grid_ids(8, 16)                                  # tiny profile L = 8: width is 2x the window
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind=kind, train_len=8)
    cos, sin = pe(ids)
    assert pe.last_scales == [1.0, 1.0, 2.0]
    base_kind_h = axis_frequencies(6, THETA, 8, 8, kind)
    exp = _tables(ids, [flux_frequencies(4, THETA), base_kind_h, axis_frequencies(6, THETA, 8, 16, kind)],
                  [1.0, 1.0, yarn_mscale(2.0)])
    assert torch.allclose(cos, exp[0], atol=1e-6) and torch.allclose(sin, exp[1], atol=1e-6)
    amp2 = cos ** 2 + sin ** 2
    assert torch.allclose(amp2[:, :10], torch.ones_like(amp2[:, :10]), atol=1e-6)          # text + height axes
    assert torch.allclose(amp2[:, 10:], torch.full_like(amp2[:, 10:], yarn_mscale(2.0) ** 2), atol=1e-5)


def test_scale_not_clamped_above_max_scale(caplog):
    ids = grid_ids(8, 24)                                  # s = 3 > s_a = 2
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind="resonance_yarn", train_len=8, max_scale=2.0)
    with caplog.at_level("WARNING"):
        cos, sin = pe(ids)
    assert pe.last_scales[2] == 3.0
    assert "exceeds the design maximum" in caplog.text
    assert (cos[:, 10:] ** 2 + sin[:, 10:] ** 2).mean().item() == pytest.approx(yarn_mscale(3.0) ** 2, rel=1e-5)


def test_cache_reuses_tables_and_detects_new_ids():
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind="resonance_yarn", train_len=8)
    ids = grid_ids(8, 16)
    a = pe(ids)
    b = pe(ids.clone())
    assert a[0] is b[0] and a[1] is b[1]                   # seen resolution: no recomputation
    ids2 = grid_ids(16, 8)                                 # same shape, different content
    c = pe(ids2)
    assert c[0] is not a[0] and pe.last_scales == [1.0, 2.0, 1.0]
    assert not torch.equal(c[0], a[0])


def test_build_pos_embed_defaults():
    pe = build_pos_embed({"kind": "yarn", "train_len": 8}, [4, 6, 6])
    assert (pe.kind, pe.train_len, pe.theta, pe.ntk_factor, pe.yarn_alpha, pe.yarn_beta, pe.max_scale,
            pe.snap_all_bands) == ("yarn", 8, 10_000, 1.0, 1.25, 0.75, 2.0, False)
    assert build_pos_embed({}, [16, 56, 56]).kind == "resonance_yarn"
    assert build_pos_embed({}, [16, 56, 56]).train_len == 64


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def _forward(model, h, w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, h * w, 64, generator=g)
    txt = torch.randn(1, 4, 32, generator=g)
    img_ids = grid_ids(h, w, n_txt=0)
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=torch.randn(1, 32, generator=g),
                     timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(4, 3)).sample


@pytest.mark.parametrize("hw", [(8, 8), (16, 8), (8, 16), (16, 4)])   # 1:1, 2:1, 1:2, 4:1 with L = 8
def test_tiny_transformer_forward_each_kind(tiny_transformer, hw):
    outs = {}
    for kind in KINDS:
        tiny_transformer.pos_embed = UltraFluxPosEmbed(10_000, [4, 6, 6], kind=kind, train_len=8)
        out = _forward(tiny_transformer, *hw)
        assert out.shape == (1, hw[0] * hw[1], 64) and torch.isfinite(out).all()
        outs[kind] = out
    assert not torch.allclose(outs["flux"], outs["resonance_yarn"])
    if max(hw) > 8:                                        # YaRN active: yarn differs from flux
        assert not torch.allclose(outs["flux"], outs["yarn"])
    else:                                                  # inside the window yarn == flux
        assert torch.allclose(outs["flux"], outs["yarn"])
