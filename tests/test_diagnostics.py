"""Seed Figs. 1-3 diagnostics."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from ultraflux.config import load_params
from ultraflux.diagnostics import PAPER_FIG3, resonance_analysis, run_diagnostics, wavelet_statistics

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
