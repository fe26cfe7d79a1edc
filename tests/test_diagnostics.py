"""Seed Figs. 1-3 diagnostics."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from ultraflux.config import load_params
from ultraflux.diagnostics import (MAX_LATENTS, PAPER_FIG3, WaveletStats, evenly_spaced, latents_from_curated,
                                   resonance_analysis, run_diagnostics, wavelet_statistics)
from ultraflux.losses.wavelet import haar_dwt2

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fig1_fig2_and_metrics(tmp_path):
    m = run_diagnostics(PARAMS, None, tmp_path)
    for name in ("fig1_cycles.csv", "fig1_closure.csv", "fig1_dphi.csv", "fig1_resonance.png",
                 "fig2_phase_patterns.png", "diagnostics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "fig3_wavelet_stats.csv").exists() and m["fig3_num_latents"] == 0
    rows = read_csv(tmp_path / "fig1_cycles.csv")
    assert len(rows) == 28 and list(rows[0]) == ["band", "r", "r_hat"]      # d = 56, L = 64 regardless of profile
    assert float(rows[0]["r"]) == pytest.approx(64 / (2 * math.pi)) and float(rows[0]["r_hat"]) == 10
    for r in rows:
        if float(r["r"]) >= 1:
            assert float(r["r_hat"]) == round(float(r["r"]))
    assert m["fig1_num_snapped_bands"] == 8
    assert m["fig1_max_closure_err_resonance_snapped_bands"] < 1e-9
    assert m["fig1_max_closure_err_flux_snapped_bands"] > 1.0               # "up to several radians"
    assert m["fig1c_max_dphi_2L"] > m["fig1c_max_dphi_within_L"] > 0          # grows with position
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == pytest.approx(m)
    assert all(isinstance(v, float) for v in m.values())
    assert len(read_csv(tmp_path / "fig1_dphi.csv")) == 28 * 129
    # the RoPE in force is stated: by default the release's (plain Flux on the 64x64 training grid)
    assert m["rope_snap_in_window"] == 0.0
    assert m["fig2_in_force_omega_train_grid"] == pytest.approx(10_000 ** (-8 / 56))          # band 4, Flux
    assert "plain Flux (as the public release)" in (tmp_path / "rope_in_force.txt").read_text()


def test_fig2_reading_is_reported_when_configured(tmp_path):
    params = {**PARAMS, "rope": {**PARAMS["rope"], "snap_in_window": True}}
    m = run_diagnostics(params, None, tmp_path)
    assert m["rope_snap_in_window"] == 1.0
    assert m["fig2_in_force_omega_train_grid"] == pytest.approx(2 * math.pi * 3 / 64)         # r_4 = 2.73 -> 3
    assert "snap_in_window: seed Fig. 2 reading" in (tmp_path / "rope_in_force.txt").read_text()


def test_snap_all_bands_closes_every_band():
    an = resonance_analysis(snap_all_bands=True)
    assert an["closure_res"].max() < 1e-9 and an["closure_flux"].max() > 1.0


def test_fig3_wavelet_statistics(tmp_path):
    torch.manual_seed(0)
    # piecewise-constant 2x2 blocks: every coefficient lands in LL
    blocky = torch.randn(16, 6, 5).repeat_interleave(2, -2).repeat_interleave(2, -1)
    s = wavelet_statistics([blocky])
    assert s["LL"]["energy_share"] == pytest.approx(1.0) and s["HH"]["max_abs"] == pytest.approx(0, abs=1e-6)
    # iid noise spreads energy evenly; multi-aspect list input
    m = run_diagnostics(PARAMS, [torch.randn(16, 32, 24), torch.randn(16, 20, 40)], tmp_path)
    shares = [m[f"fig3_energy_share_{b}"] for b in ("LL", "LH", "HL", "HH")]
    assert sum(shares) == pytest.approx(1.0) and all(0.2 < x < 0.3 for x in shares)
    # |w| ~ N(0, 1): P(|w| > 1) = 0.317, P(|w| > 0.5) = 0.617
    assert m["fig3_frac_gt_1_0_LH"] == pytest.approx(0.317, abs=0.03)
    assert m["fig3_frac_gt_0_5_HH"] == pytest.approx(0.617, abs=0.03)
    rows = read_csv(tmp_path / "fig3_wavelet_stats.csv")
    assert [r["band"] for r in rows] == ["LL", "LH", "HL", "HH"]
    lh = rows[1]
    assert float(lh["paper_frac_gt_0_5"]) == PAPER_FIG3["LH"]["frac_gt_0_5"] == 0.208
    assert float(rows[0]["paper_energy_share"]) == 0.874
    hist = read_csv(tmp_path / "fig3_hist.csv")
    n = sum(int(h["count"]) for h in hist if h["band"] == "LL")
    assert n == 16 * (16 * 12 + 10 * 20)                                      # every LL coefficient counted
    assert (tmp_path / "fig3_wavelet_stats.png").stat().st_size > 0
    m2 = run_diagnostics(PARAMS, torch.stack([torch.randn(16, 8, 8)] * 2), tmp_path / "batch")
    assert m2["fig3_num_latents"] == 2


def _reference_stats(latents):
    """Independent batch computation: every coefficient of every latent in one tensor per subband."""
    bands = [torch.cat([c.abs().flatten() for c in cs]) for cs in zip(*(haar_dwt2(z.double()) for z in latents))]
    total = sum(float((a ** 2).sum()) for a in bands)
    return {b: dict(energy_share=float((a ** 2).sum()) / total, mean_energy=float((a ** 2).mean()),
                    frac_gt_0_5=float((a > 0.5).double().mean()), frac_gt_1_0=float((a > 1.0).double().mean()),
                    max_abs=float(a.max()), n=a.numel())
            for b, a in zip(("LL", "LH", "HL", "HH"), bands)}


def test_streaming_statistics_equal_the_batch_computation():
    torch.manual_seed(1)
    latents = [torch.randn(16, 10, 14) * 3, torch.randn(16, 7, 9), torch.randn(16, 24, 24) * 8]   # some |w| > 16
    got, ref = wavelet_statistics(iter(latents)), _reference_stats(latents)
    for b in ref:
        for key in ("energy_share", "mean_energy", "frac_gt_0_5", "frac_gt_1_0", "max_abs"):
            assert got[b][key] == pytest.approx(ref[b][key], rel=1e-12), (b, key)
        assert int(got[b]["hist"].sum()) == ref[b]["n"]
        assert got[b]["edges"][-1] >= ref[b]["max_abs"]                   # overflow bin reaches the maximum
    assert got["LL"]["hist"][-1] > 0                                     # values beyond 16 landed in the overflow bin


def test_streaming_state_does_not_grow_with_the_number_of_latents():
    import pickle

    sizes = {}
    for n in (2, 12):
        acc = WaveletStats()
        for z in (torch.randn(16, 32, 32) for _ in range(n)):
            acc.update(z)
        assert acc.n_latents == n
        sizes[n] = len(pickle.dumps(acc))
    assert abs(sizes[12] - sizes[2]) < 64 and sizes[12] < 16 * 32 * 32 * 4   # constant, smaller than one latent


def test_evenly_spaced():
    assert evenly_spaced(5, 400) == [0, 1, 2, 3, 4]
    assert evenly_spaced(1000, 5) == [0, 250, 500, 749, 999]
    assert len(evenly_spaced(10**6, MAX_LATENTS)) == MAX_LATENTS == 400
    assert evenly_spaced(7, 1) == [0]


def test_latents_from_curated_reads_shards_and_caps(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from ultraflux.data.shards import ShardWriter
    from ultraflux.models.vae import build_vae
    from ultraflux.models.vae import encode_latents

    rows = []
    with ShardWriter(tmp_path / "shards", "train", tmp_path, max_count=3) as writer:
        for i in range(7):
            arr = np.random.default_rng(i).integers(0, 256, (32, 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            loc = writer.write(f"{i:04d}", {"png": buf.getvalue(), "txt": b"caption"})
            rows.append({"id": f"{i:04d}", "shard": loc.shard, "key": loc.key, "offset": loc.offset,
                         "nbytes": loc.nbytes, "pixels": arr})
    vae = build_vae(PARAMS["model"]).eval()
    zs = list(latents_from_curated(vae, tmp_path, rows, max_latents=3, progress=False))
    assert len(zs) == 3 and zs[0].shape == (16, 2, 3)
    for z, i in zip(zs, evenly_spaced(7, 3)):                            # rows 0, 3, 6: three different shards
        pixels = torch.from_numpy(rows[i]["pixels"]).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        assert torch.allclose(z, encode_latents(vae, pixels)[0], atol=1e-6)
    m = run_diagnostics(PARAMS, latents_from_curated(vae, tmp_path, rows, max_latents=5, progress=False),
                        tmp_path / "out")
    assert m["fig3_num_latents"] == 5
