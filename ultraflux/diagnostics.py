"""Seed diagnostics: Fig. 1 (1D band-wise Resonance RoPE analysis), Fig. 2 (2D cosine phase patterns), Fig. 3 (wavelet
statistics of VAE latents), written as PNG figures plus CSV/JSON files usable as DVC plots and metrics.

Figs. 1 and 2 are defined in the seed on one spatial Flux axis (d = 56 dims -> 28 bands, b = rope.theta) with the
training window L = 64 tokens (seed Sec. 3: "64 x 64 patches"), so they are drawn with d = 56 and L = 64 whatever the
profile (the tiny profile's axes_dims_rope = [4, 6, 6] and train_len = 8 would leave 3 bands); ``rope.snap_all_bands``
is honoured. Fig. 3 uses the latents it is given (the DiT's normalised latents z = (mu - shift) * scale are expected,
the space in which the seed quotes |w| > 0.5 / > 1.0) and puts the paper's 4K numbers (seed Sec. 4) beside ours.

Files (out_dir):
    fig1_cycles.csv      band, r, r_hat                      (Fig. 1a)
    fig1_closure.csv     band, flux, resonance               (Fig. 1b: |wrap(L omega_k)|, |wrap(L omega_hat_k)|)
    fig1_dphi.csv        band, p, dphi                       (Fig. 1c: |wrap(p omega_k - p omega_hat_k)|, p in [0, 2L])
    fig1_resonance.png, fig2_phase_patterns.png
    fig3_wavelet_stats.csv  band, ours vs paper: energy share, mean energy, fraction |w| > 0.5 / > 1.0, max |w|
    fig3_hist.csv        band, bin_lo, bin_hi, count         (log-count histograms of |w|)
    fig3_wavelet_stats.png
    diagnostics.json     the flat metrics dict returned by ``run_diagnostics``
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ultraflux.losses.wavelet import SUBBANDS, haar_dwt2
from ultraflux.models.rope import ROPE_THETA, cycles, flux_frequencies, snapped_cycles

FIG_TRAIN_LEN = 64        # seed Sec. 3 / Fig. 2: 64 x 64 training patches
FIG_AXIS_DIM = 56         # Flux spatial axis dim (axes_dims_rope = [16, 56, 56])
FIG2_GRIDS = ((64, 64), (128, 64), (64, 128), (128, 32))   # (H, W): 1:1, 2:1, 1:2, 4:1 (seed Fig. 2)
FIG2_BAND = 4             # representative band: r_4 = 2.73 -> r_hat = 3 at L = 64, b = 10,000
HIST_BINS = 60

# seed Sec. 4 (400 MultiAspect-4K-1M images, F16 VAE, one-level orthonormal DWT); NaN = not reported
PAPER_FIG3 = {
    "LL": dict(energy_share=0.874, energy_share_max=0.874, mean_energy=3.55, frac_gt_0_5=math.nan,
               frac_gt_1_0=math.nan, max_abs=math.nan),
    "LH": dict(energy_share=0.035, energy_share_max=0.047, mean_energy=math.nan, frac_gt_0_5=0.208,
               frac_gt_1_0=0.032, max_abs=7.2),
    "HL": dict(energy_share=0.035, energy_share_max=0.047, mean_energy=math.nan, frac_gt_0_5=math.nan,
               frac_gt_1_0=math.nan, max_abs=math.nan),
    "HH": dict(energy_share=0.035, energy_share_max=0.047, mean_energy=math.nan, frac_gt_0_5=math.nan,
               frac_gt_1_0=math.nan, max_abs=math.nan),
}


def wrap(phi: torch.Tensor) -> torch.Tensor:
    """wrap(phi) in [-pi, pi)."""
    return torch.remainder(phi + math.pi, 2 * math.pi) - math.pi


def resonance_analysis(theta: float = ROPE_THETA, train_len: int = FIG_TRAIN_LEN, dim: int = FIG_AXIS_DIM,
                       snap_all_bands: bool = False) -> dict[str, torch.Tensor]:
    """Fig. 1 quantities (float64): omega, omega_hat, r, r_hat, closure errors at p = L, dphi(k, p) for p in [0, 2L]."""
    omega = flux_frequencies(dim, theta)
    r = cycles(omega, train_len)
    r_hat = snapped_cycles(r, snap_all_bands)
    omega_hat = 2 * math.pi * r_hat / train_len
    p = torch.arange(0, 2 * train_len + 1, dtype=torch.float64)
    return dict(omega=omega, omega_hat=omega_hat, r=r, r_hat=r_hat,
                closure_flux=wrap(train_len * omega).abs(), closure_res=wrap(train_len * omega_hat).abs(),
                snapped=(r_hat == torch.round(r_hat)), p=p,
                dphi=wrap(torch.outer(omega, p) - torch.outer(omega_hat, p)).abs())


def phase_pattern(omega_h: float, omega_w: float, height: int, width: int) -> np.ndarray:
    """f(h, w) = cos(h omega_H + w omega_W) on an H x W patch grid (seed Fig. 2)."""
    h = np.arange(height, dtype=np.float64)[:, None]
    w = np.arange(width, dtype=np.float64)[None, :]
    return np.cos(h * omega_h + w * omega_w)


def _as_list(latents) -> list[torch.Tensor]:
    if latents is None:
        return []
    if isinstance(latents, torch.Tensor):
        latents = [latents] if latents.dim() == 3 else list(latents)
    return [torch.as_tensor(z).detach().float().cpu() for z in latents]


def wavelet_statistics(latents) -> dict:
    """Per-subband statistics of a one-level Haar DWT of each latent [C, H, W] (seed Sec. 4, Fig. 3)."""
    zs = _as_list(latents)
    bands = {b: [] for b in SUBBANDS}
    for z in zs:
        for name, coef in zip(SUBBANDS, haar_dwt2(z)):
            bands[name].append(coef.abs().flatten())
    absw = {b: torch.cat(v) for b, v in bands.items()}
    total = sum(float((a ** 2).sum()) for a in absw.values())
    hi = max(float(a.max()) for a in absw.values())
    edges = np.linspace(0.0, hi * (1 + 1e-9), HIST_BINS + 1)
    stats = {}
    for b, a in absw.items():
        stats[b] = dict(energy_share=float((a ** 2).sum()) / total, mean_energy=float((a ** 2).mean()),
                        frac_gt_0_5=float((a > 0.5).double().mean()), frac_gt_1_0=float((a > 1.0).double().mean()),
                        max_abs=float(a.max()), hist=np.histogram(a.numpy(), bins=edges)[0], edges=edges)
    return stats


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(f"{v:.10g}" if isinstance(v, float) else str(v) for v in row) + "\n")


def _fig1(an: dict, out_dir: Path, train_len: int, plt) -> None:
    k = np.arange(len(an["r"]))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    ax[0].plot(k, an["r"].numpy(), "o-", label="Flux $r_k$")
    ax[0].plot(k, an["r_hat"].numpy(), "s-", label=r"Resonance $\hat r_k$")
    ax[0].set_yscale("log"); ax[0].set_xlabel("band k"); ax[0].set_ylabel("cycles in window")
    ax[0].set_title(f"(a) cycles in L = {train_len}"); ax[0].legend()
    ax[1].bar(k - 0.2, an["closure_flux"].numpy(), 0.4, label="Flux")
    ax[1].bar(k + 0.2, an["closure_res"].numpy(), 0.4, label="Resonance")
    ax[1].set_xlabel("band k"); ax[1].set_ylabel(r"$|\Delta\phi_k|$ at p = L (rad)")
    ax[1].set_title("(b) phase closure error"); ax[1].legend()
    im = ax[2].imshow(an["dphi"].numpy(), aspect="auto", origin="lower", cmap="magma",
                      extent=(0, 2 * train_len, -0.5, len(k) - 0.5))
    ax[2].axvline(train_len, color="w", ls="--", lw=1)
    ax[2].set_xlabel("position p"); ax[2].set_ylabel("band k"); ax[2].set_title(r"(c) $|\Delta\phi_k(p)|$, p in [0, 2L]")
    fig.colorbar(im, ax=ax[2])
    fig.tight_layout(); fig.savefig(out_dir / "fig1_resonance.png", dpi=110); plt.close(fig)


def _fig2(an: dict, out_dir: Path, band: int, plt) -> None:
    fig, ax = plt.subplots(2, len(FIG2_GRIDS), figsize=(4 * len(FIG2_GRIDS), 7))
    for row, (label, om) in enumerate((("Flux", an["omega"]), ("Resonance", an["omega_hat"]))):
        w = float(om[band])
        for col, (hh, ww) in enumerate(FIG2_GRIDS):
            ax[row, col].imshow(phase_pattern(w, w, hh, ww), cmap="RdBu", vmin=-1, vmax=1, origin="upper")
            ax[row, col].set_title(f"{label} {hh}x{ww} (band {band})", fontsize=9)
            ax[row, col].set_xticks([]); ax[row, col].set_yticks([])
    fig.suptitle(r"$\cos(h\omega_H + w\omega_W)$")
    fig.tight_layout(); fig.savefig(out_dir / "fig2_phase_patterns.png", dpi=90); plt.close(fig)


def _fig3(stats: dict, out_dir: Path, plt) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for a, b in zip(ax, SUBBANDS):
        s = stats[b]
        centers = (s["edges"][:-1] + s["edges"][1:]) / 2
        a.bar(centers, np.log10(s["hist"] + 1), width=np.diff(s["edges"]), color="C0")
        a.set_title(f"{b}: energy {100 * s['energy_share']:.1f}%, max|w| {s['max_abs']:.2f}", fontsize=9)
        a.set_xlabel("|w|")
    ax[0].set_ylabel("log10(count + 1)")
    fig.tight_layout(); fig.savefig(out_dir / "fig3_wavelet_stats.png", dpi=100); plt.close(fig)


def run_diagnostics(params: dict, latents: torch.Tensor | None, out_dir: Path) -> dict:
    """Write seed Figs. 1-3 (PNG + CSV) and diagnostics.json into ``out_dir``; return flat numeric metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rope = params.get("rope", {}) or {}
    theta = float(rope.get("theta", ROPE_THETA))
    an = resonance_analysis(theta, FIG_TRAIN_LEN, FIG_AXIS_DIM, bool(rope.get("snap_all_bands", False)))
    nb = len(an["r"])
    _write_csv(out_dir / "fig1_cycles.csv", ["band", "r", "r_hat"],
               [(k, float(an["r"][k]), float(an["r_hat"][k])) for k in range(nb)])
    _write_csv(out_dir / "fig1_closure.csv", ["band", "flux", "resonance"],
               [(k, float(an["closure_flux"][k]), float(an["closure_res"][k])) for k in range(nb)])
    _write_csv(out_dir / "fig1_dphi.csv", ["band", "p", "dphi"],
               [(k, int(p), float(an["dphi"][k, i])) for k in range(nb) for i, p in enumerate(an["p"])])
    _fig1(an, out_dir, FIG_TRAIN_LEN, plt)
    _fig2(an, out_dir, FIG2_BAND, plt)

    snapped = an["snapped"]
    inside = an["p"] <= FIG_TRAIN_LEN
    metrics: dict[str, float] = {
        "fig_train_len": float(FIG_TRAIN_LEN),
        "fig1_num_bands": float(nb),
        "fig1_num_snapped_bands": float(snapped.sum()),
        "fig1_max_closure_err_flux": float(an["closure_flux"].max()),
        "fig1_max_closure_err_resonance": float(an["closure_res"].max()),
        "fig1_max_closure_err_flux_snapped_bands": float(an["closure_flux"][snapped].max()),
        "fig1_max_closure_err_resonance_snapped_bands": float(an["closure_res"][snapped].max()),
        "fig1c_max_dphi_within_L": float(an["dphi"][:, inside].max()),
        "fig1c_max_dphi_2L": float(an["dphi"].max()),
        "fig1c_mean_dphi_2L": float(an["dphi"].mean()),
    }

    zs = _as_list(latents)
    metrics["fig3_num_latents"] = float(len(zs))
    if zs:
        stats = wavelet_statistics(zs)
        cols = ["energy_share", "mean_energy", "frac_gt_0_5", "frac_gt_1_0", "max_abs"]
        _write_csv(out_dir / "fig3_wavelet_stats.csv",
                   ["band"] + cols + ["paper_" + c for c in cols] + ["paper_energy_share_max"],
                   [[b] + [stats[b][c] for c in cols] + [PAPER_FIG3[b][c] for c in cols]
                    + [PAPER_FIG3[b]["energy_share_max"]] for b in SUBBANDS])
        _write_csv(out_dir / "fig3_hist.csv", ["band", "bin_lo", "bin_hi", "count"],
                   [(b, float(stats[b]["edges"][i]), float(stats[b]["edges"][i + 1]), int(stats[b]["hist"][i]))
                    for b in SUBBANDS for i in range(HIST_BINS)])
        _fig3(stats, out_dir, plt)
        for b in SUBBANDS:
            for c in cols:
                metrics[f"fig3_{c}_{b}"] = float(stats[b][c])
    (out_dir / "diagnostics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
