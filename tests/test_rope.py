"""Resonance 2D RoPE with YaRN (seed Sec. 3, Table 3) and its parity with the public UltraFlux release.

The release-parity tests compute the expected cos/sin tables here, in numpy, from the formulas documented in
ultraflux/models/rope.py (no call into rope.py), at the paper's axes [16, 56, 56] and L = 64.
"""
import json
import logging
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from conftest import params_section
from ultraflux.data.buckets import bucket_table
from ultraflux.models.rope import (KINDS, UltraFluxPosEmbed, axis_frequencies, build_pos_embed, correction_range,
                                   cycles, flux_frequencies, resonance_frequencies, yarn_mscale)
from ultraflux.models.transformer import (RopeMismatchError, build_transformer, check_model_dir, load_transformer,
                                          release_rope)

THETA, L, DIM = 10_000, 64, 56
AXES = [16, 56, 56]


def grid_ids(h, w, n_txt=5, dtype=torch.float32):
    """Flux ids: n_txt zero text ids followed by (0, row, col) image ids."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([torch.zeros(h * w), hh.flatten().float(), ww.flatten().float()], dim=-1)
    return torch.cat([torch.zeros(n_txt, 3), img]).to(dtype)


def wrap(x):
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


# ---- independent reference (numpy), written from the module docstring's formulas -------------------------------

def ref_flux(d, b=THETA):
    return b ** (-np.arange(0, d, 2, dtype=np.float64) / d)                        # omega_k = b^(-2k/d)


def ref_resonance(d, win, b=THETA):
    omega = ref_flux(d, b)
    r = win * omega / (2 * np.pi)                                                   # r_k = L omega_k / 2 pi
    return np.where(r >= 1, 2 * np.pi * np.round(r) / win, omega)                   # omega_hat = 2 pi round(r) / L


def ref_yarn(d, win, span, b=THETA):
    """Resonance base + NTK-by-parts YaRN at s = span / L (alpha, beta) = (1.25, 0.75), (gamma0, gamma1) = (16, 2)."""
    s = span / win
    base = ref_resonance(d, win, b)
    expo = -np.log(base) / np.log(b)
    lin, ntk = base / s, (b * s ** (d / (d - 2))) ** (-expo)
    k = np.arange(d // 2, dtype=np.float64)

    def kc(rot):
        return d * np.log(win / (2 * np.pi * rot)) / (2 * np.log(b))

    def ramp(hi_rot, lo_rot):
        lo, hi = max(math.floor(kc(hi_rot)), 0), min(math.ceil(kc(lo_rot)), d - 1, d // 2)
        hi = hi + 1e-3 if hi == lo else hi
        return np.clip((k - lo) / (hi - lo), 0, 1)

    m1 = 1 - ramp(1.25, 0.75)
    omega = lin * (1 - m1) + ntk * m1
    m2 = 1 - ramp(16, 2)
    return omega * (1 - m2) + base * m2, 0.1 * np.log(s) + 1


def ref_tables(h, w, snap_in_window=False, win=L, axes=AXES):
    """Expected (cos, sin) [N, 128] for a text + h x w grid: release semantics, or the Fig. 2 reading."""
    ids = grid_ids(h, w).double().numpy()
    cos, sin = [], []
    for i, d in enumerate(axes):
        span = int(ids[:, i].max() - ids[:, i].min()) + 1
        if i == 0:
            omega, m = ref_flux(d), 1.0
        elif span > win:
            omega, m = ref_yarn(d, win, span)
        else:
            omega, m = (ref_resonance(d, win) if snap_in_window else ref_flux(d)), 1.0
        phase = np.outer(ids[:, i], omega)
        cos.append(np.repeat(np.cos(phase), 2, axis=1) * m)
        sin.append(np.repeat(np.sin(phase), 2, axis=1) * m)
    return np.concatenate(cos, 1), np.concatenate(sin, 1)


PARITY_GRIDS = [(64, 64), (128, 64), (64, 128), (32, 128), (40, 40), (65, 64), (128, 128), (78, 165)]


@pytest.mark.parametrize("hw", PARITY_GRIDS)
def test_default_matches_release_formulas(hw):
    pe = UltraFluxPosEmbed(THETA, AXES, kind="resonance_yarn", train_len=L)
    cos, sin = pe(grid_ids(*hw))
    exp_cos, exp_sin = ref_tables(*hw)
    assert cos.dtype == torch.float32 and cos.shape == exp_cos.shape == (5 + hw[0] * hw[1], 128)
    assert np.abs(cos.numpy() - exp_cos).max() < 2e-6 and np.abs(sin.numpy() - exp_sin).max() < 2e-6
    # inside the window: the untouched Flux RoPE of diffusers, bit for bit, and no YaRN temperature
    flux_cos, flux_sin = FluxPosEmbed(THETA, AXES)(grid_ids(*hw))
    for axis, cols in ((1, slice(16, 72)), (2, slice(72, 128))):
        inside = hw[axis - 1] <= L
        assert torch.equal(cos[:, cols], flux_cos[:, cols]) == inside
        assert pe.last_scales[axis] == (1.0 if inside else hw[axis - 1] / L)


@pytest.mark.parametrize("hw", PARITY_GRIDS)
def test_snap_in_window_is_the_fig2_reading(hw):
    pe = UltraFluxPosEmbed(THETA, AXES, kind="resonance_yarn", train_len=L, snap_in_window=True)
    cos, sin = pe(grid_ids(*hw))
    exp_cos, exp_sin = ref_tables(*hw, snap_in_window=True)
    assert np.abs(cos.numpy() - exp_cos).max() < 2e-6 and np.abs(sin.numpy() - exp_sin).max() < 2e-6
    release_cos, _ = ref_tables(*hw)
    gap = np.abs(cos.numpy() - release_cos).max()
    assert (gap > 0.5) == (min(hw) <= L)            # differs from the release exactly where an axis is <= L


def test_pinned_numbers_at_128x64():
    """Hand-derived values: r_0 = 64 / 2 pi = 10.19 -> 10 turns; the slowest band (r < 0.75) is linear, omega / 2."""
    pe = UltraFluxPosEmbed(THETA, AXES, kind="resonance_yarn", train_len=L)
    omega_h, m_h = pe.axis_spectrum(1, 128)
    omega_w, m_w = pe.axis_spectrum(2, 64)
    assert float(omega_h[0]) == pytest.approx(2 * math.pi * 10 / 64, rel=1e-14)
    assert float(omega_h[27]) == pytest.approx(THETA ** (-54 / 56) / 2, rel=1e-14)
    assert m_h == pytest.approx(1 + 0.1 * math.log(2)) and m_w == 1.0
    assert torch.equal(omega_w, flux_frequencies(56, THETA))
    cos, sin = pe(grid_ids(128, 64))
    amp = cos[:, 16:72] ** 2 + sin[:, 16:72] ** 2
    assert torch.allclose(amp, torch.full_like(amp, (1 + 0.1 * math.log(2)) ** 2), atol=1e-5)


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
    assert correction_range(0.01, 1e-9, DIM, THETA, L)[1] == DIM // 2      # the release's clamp hi <= d/2
    assert yarn_mscale(2.0) == pytest.approx(0.1 * math.log(2.0) + 1)
    assert yarn_mscale(1.0) == 1.0


@pytest.mark.parametrize("kind", ["yarn", "resonance_yarn"])
def test_yarn_spectrum_is_ntk_by_parts(kind):
    base = (resonance_frequencies(DIM, THETA, L) if kind == "resonance_yarn" else flux_frequencies(DIM, THETA))
    assert torch.equal(axis_frequencies(DIM, THETA, L, L, kind), flux_frequencies(DIM, THETA))   # span <= L
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
    ref_cos, ref_sin = FluxPosEmbed(THETA, AXES)(ids)
    cos, sin = UltraFluxPosEmbed(THETA, AXES, kind="flux", train_len=8)(ids)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert cos.shape == (ids.shape[0], 128) and cos.dtype == torch.float32


def _tables(ids, omegas, mscales):
    cos, sin = [], []
    for i, (om, m) in enumerate(zip(omegas, mscales)):
        ph = torch.outer(ids[:, i].double(), om)
        cos.append((ph.cos().repeat_interleave(2, 1) * m).float())
        sin.append((ph.sin().repeat_interleave(2, 1) * m).float())
    return torch.cat(cos, -1), torch.cat(sin, -1)


@pytest.mark.parametrize("kind", ["yarn", "resonance_yarn"])
def test_yarn_scales_only_the_long_axis(kind):
    ids = grid_ids(8, 16)                                  # tiny profile L = 8: width is 2x the window
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind=kind, train_len=8)
    cos, sin = pe(ids)
    assert pe.last_scales == [1.0, 1.0, 2.0]
    exp = _tables(ids, [flux_frequencies(4, THETA), flux_frequencies(6, THETA),
                        axis_frequencies(6, THETA, 8, 16, kind)], [1.0, 1.0, yarn_mscale(2.0)])
    assert torch.allclose(cos, exp[0], atol=1e-6) and torch.allclose(sin, exp[1], atol=1e-6)
    amp2 = cos ** 2 + sin ** 2
    assert torch.allclose(amp2[:, :10], torch.ones_like(amp2[:, :10]), atol=1e-6)          # text + height axes
    assert torch.allclose(amp2[:, 10:], torch.full_like(amp2[:, 10:], yarn_mscale(2.0) ** 2), atol=1e-5)


def test_design_maximum_bounds_the_resolution_not_the_aspect(caplog):
    # a 1:3 grid: per-axis s = 3 on the long side (unclamped), resolution scale sqrt(8 * 24) / 8 = 1.73: no warning
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind="resonance_yarn", train_len=8, max_scale=2.0)
    with caplog.at_level("WARNING", logger="ultraflux.models.rope"):
        cos, sin = pe(grid_ids(8, 24))
    assert pe.last_scales[2] == 3.0 and "design maximum" not in caplog.text
    assert (cos[:, 10:] ** 2 + sin[:, 10:] ** 2).mean().item() == pytest.approx(yarn_mscale(3.0) ** 2, rel=1e-5)
    with caplog.at_level("WARNING", logger="ultraflux.models.rope"):
        pe(grid_ids(24, 24))                               # 9x the window's pixels: resolution scale 3 > 2
    assert "resolution scale sqrt(h*w)/L = 3.000 exceeds the design maximum" in caplog.text


@pytest.mark.parametrize("scale,train_len", [(0.125, 8), (1.0, 64)])      # embedded profile, paper profile
def test_bucket_tables_stay_within_the_design_maximum(caplog, scale, train_len):
    pe = UltraFluxPosEmbed(THETA, [4, 6, 6], kind="resonance_yarn", train_len=train_len)
    with caplog.at_level("WARNING", logger="ultraflux.models.rope"):
        for w, h in bucket_table(scale).values():
            pe(grid_ids(h // 32, w // 32, n_txt=1))
    assert caplog.text == ""
    assert max(pe.last_scales) > 1.0                       # YaRN was active on the long axes all the same


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


def test_build_pos_embed_takes_every_key_from_the_rope_section():
    rope = params_section("rope", kind="yarn", train_len=8, theta=500.0, ntk_factor=0.5, yarn_alpha=2.0,
                          yarn_beta=0.5, max_scale=3.0, snap_all_bands=True, snap_in_window=True)
    pe = build_pos_embed(rope, [4, 6, 6])
    assert (pe.kind, pe.train_len, pe.theta, pe.ntk_factor, pe.yarn_alpha, pe.yarn_beta, pe.max_scale,
            pe.snap_all_bands, pe.snap_in_window) == ("yarn", 8, 500.0, 0.5, 2.0, 0.5, 3.0, True, True)
    assert "plain Flux (as the public release)" in build_pos_embed(params_section("rope"), AXES).describe()
    with pytest.raises(KeyError, match="ntk_factor"):   # a partial section is a caller's bug, not a default
        build_pos_embed({k: v for k, v in rope.items() if k != "ntk_factor"}, AXES)


TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def tiny_transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY, guidance_embeds=False).eval()


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
    tiny_transformer.pos_embed = UltraFluxPosEmbed(10_000, [4, 6, 6], kind="resonance_yarn", train_len=8,
                                                   snap_in_window=True)
    snapped = _forward(tiny_transformer, *hw)
    assert not torch.allclose(outs["flux"], snapped)       # the Fig. 2 reading changes every grid
    if max(hw) > 8:                                        # YaRN active: both YaRN kinds differ from flux
        assert not torch.allclose(outs["flux"], outs["yarn"])
        assert not torch.allclose(outs["flux"], outs["resonance_yarn"])
    else:                                                  # inside the window: the release's RoPE is Flux's
        assert torch.equal(outs["flux"], outs["yarn"]) and torch.equal(outs["flux"], outs["resonance_yarn"])


# ---- official weights: the release's config keys map to rope params -------------------------------------------

PAPER_ROPE = {"kind": "resonance_yarn", "theta": 10000, "train_len": 64, "ntk_factor": 1.0, "yarn_alpha": 1.25,
              "yarn_beta": 0.75, "max_scale": 2.0, "snap_all_bands": False, "snap_in_window": False}


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny transformer saved as the release saves its own: config.json with method + ntk_factor."""
    root = tmp_path_factory.mktemp("ultraflux-v1")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY, guidance_embeds=True).save_pretrained(root / "transformer")
    cfg_path = root / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(method="yarn", ntk_factor=1.0)
    cfg_path.write_text(json.dumps(cfg))
    return root


def _set_config(root, **keys):
    path = root / "transformer" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(keys)
    path.write_text(json.dumps(cfg))


def test_release_config_maps_to_rope_params():
    assert release_rope({"method": "yarn", "ntk_factor": 1.0}) == {
        k: PAPER_ROPE[k] for k in ("kind", "snap_in_window", "train_len", "theta", "yarn_alpha", "yarn_beta",
                                   "ntk_factor")}
    assert release_rope({"method": "base"}) == {"kind": "flux"} == release_rope({"method": "ntk"})
    assert release_rope({"ntk_factor": 1.0})["kind"] == "resonance_yarn"   # the release class defaults to yarn
    assert release_rope({"axes_dims_rope": [16, 56, 56]}) is None           # FLUX.1-dev / our checkpoints
    with pytest.raises(RopeMismatchError, match="'method' must be one of"):
        release_rope({"method": "dype"}, "x/config.json")


@contextmanager
def diffusers_log():
    """Records logged by diffusers (its root logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


def test_release_weights_load_with_paper_rope(release_dir):
    with diffusers_log() as records:
        tr = build_transformer({"pretrained": str(release_dir)}, PAPER_ROPE)
        tr2 = load_transformer(release_dir / "transformer", PAPER_ROPE)
    assert not [r for r in records if "not expected" in r.getMessage()]    # the keys were mapped, not dropped
    pe = tr.pos_embed
    assert (pe.kind, pe.train_len, pe.snap_in_window) == ("resonance_yarn", 64, False)
    assert torch.equal(tr.x_embedder.weight, tr2.x_embedder.weight)
    cos, _ = pe(grid_ids(64, 64))
    assert torch.equal(cos, FluxPosEmbed(10_000, [4, 6, 6])(grid_ids(64, 64))[0])  # 2048 px: the release's Flux RoPE


@pytest.mark.parametrize("key,value", [("train_len", 8), ("kind", "flux"), ("kind", "yarn"),
                                       ("snap_in_window", True), ("theta", 20000), ("ntk_factor", 0.5)])
def test_release_weights_reject_inconsistent_rope(release_dir, key, value):
    rope = {**PAPER_ROPE, key: value}
    for call in (lambda: load_transformer(release_dir / "transformer", rope),
                 lambda: build_transformer({"pretrained": str(release_dir)}, rope),
                 lambda: check_model_dir(release_dir, rope)):
        with pytest.raises(RopeMismatchError, match=rf"rope\.{key} must be") as err:
            call()
        assert "method='yarn'" in str(err.value) and "config.json" in str(err.value)


def test_embedded_profile_rope_rejected_with_official_weights(release_dir):
    from conftest import ROOT
    from ultraflux.config import load_params

    with pytest.raises(RopeMismatchError, match=r"rope\.train_len must be 64 \(got 8\)"):
        check_model_dir(release_dir, load_params(ROOT / "params.yaml")["rope"])


def test_unmapped_config_keys_still_reported(tmp_path):
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY).save_pretrained(tmp_path / "transformer")
    _set_config(tmp_path, method="yarn", bogus_key=1)
    with diffusers_log() as records:
        load_transformer(tmp_path, PAPER_ROPE)
    assert any("bogus_key" in r.getMessage() for r in records)


def test_release_method_base_needs_flux(tmp_path):
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY).save_pretrained(tmp_path / "transformer")
    _set_config(tmp_path, method="base")
    with pytest.raises(RopeMismatchError, match=r"rope\.kind must be 'flux'"):
        load_transformer(tmp_path, PAPER_ROPE)
    assert load_transformer(tmp_path, {**PAPER_ROPE, "kind": "flux", "train_len": 8}).pos_embed.kind == "flux"
