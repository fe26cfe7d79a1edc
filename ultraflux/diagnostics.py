"""Seed diagnostics: Fig. 1 (1D band-wise Resonance RoPE analysis), Fig. 2 (2D cosine phase patterns), Fig. 3 (wavelet
statistics of VAE latents), written as PNG figures plus CSV/JSON files usable as DVC plots and metrics.

Figs. 1 and 2 are defined in the seed on one spatial Flux axis (d = 56 dims -> 28 bands, b = rope.theta) with the
training window L = 64 tokens (seed Sec. 3: "64 x 64 patches"), so they are drawn with d = 56 and L = 64 whatever the
profile (the tiny profile's axes_dims_rope = [4, 6, 6] and train_len = 8 would leave 3 bands); ``rope.snap_all_bands``
is honoured. Both say which RoPE is in force (``rope.kind``, ``rope.snap_in_window``): by default an axis of <= L
tokens keeps the plain Flux spectrum and only longer axes are snapped + YaRN-scaled (the public release), so Fig. 2's
"Resonance" row shows the seed's definition while its third row shows the frequencies the model actually uses on
each grid; ``rope_snap_in_window`` in the metrics is 1 when the seed's Fig. 2 reading (snapping inside the window too)
is configured.

Fig. 3 uses the latents it is given (the DiT's normalised latents z = (mu - shift) * scale are expected, the space in
which the seed quotes |w| > 0.5 / > 1.0) and puts the paper's 4K numbers (seed Sec. 4) beside ours. Latents are
consumed one at a time (``WaveletStats``: running sums and a fixed-bin histogram), so memory does not grow with their
number; ``latents_from_curated`` streams up to ``diagnostics.max_latents`` curated images (seed Sec. 4: 400) through
the VAE, evenly spaced over the kept rows.

Files (out_dir):
    fig1_cycles.csv      band, r, r_hat                      (Fig. 1a)
    fig1_closure.csv     band, flux, resonance               (Fig. 1b: |wrap(L omega_k)|, |wrap(L omega_hat_k)|)
    fig1_dphi.csv        band, p, dphi                       (Fig. 1c: |wrap(p omega_k - p omega_hat_k)|, p in [0, 2L])
    fig1_resonance.png, fig2_phase_patterns.png
    fig3_wavelet_stats.csv  band, ours vs paper: energy share, mean energy, fraction |w| > 0.5 / > 1.0, max |w|
    fig3_hist.csv        band, bin_lo, bin_hi, count         (|w| in bins of 0.05 up to 16, then one overflow bin)
    fig3_wavelet_stats.png
    diagnostics.json     the flat metrics dict returned by ``run_diagnostics``
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch
from tqdm import tqdm

from ultraflux.io import atomic_path, write_json
from ultraflux.losses.wavelet import SUBBANDS, haar_dwt2
from ultraflux.models.rope import ROPE_THETA, UltraFluxPosEmbed, cycles, flux_frequencies, snapped_cycles

FIG_TRAIN_LEN = 64        # seed Sec. 3 / Fig. 2: 64 x 64 training patches
FIG_AXIS_DIM = 56         # Flux spatial axis dim (axes_dims_rope = [16, 56, 56])
FIG2_GRIDS = ((64, 64), (128, 64), (64, 128), (128, 32))   # (H, W): 1:1, 2:1, 1:2, 4:1 (seed Fig. 2)
FIG2_BAND = 4             # representative band: r_4 = 2.73 -> r_hat = 3 at L = 64, b = 10,000
HIST_EDGES = np.linspace(0.0, 16.0, 321)   # |w| bins of 0.05 (seed Sec. 4: max |w| = 7.2), then an overflow bin
MAX_LATENTS = 400         # seed Sec. 4: statistics of 400 MultiAspect-4K-1M images

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


def _as_iter(latents) -> Iterator[torch.Tensor]:
    if latents is None:
        return iter(())
    if isinstance(latents, torch.Tensor):
        latents = [latents] if latents.dim() == 3 else latents
    return (torch.as_tensor(z).detach().float().cpu() for z in latents)


class WaveletStats:
    """Per-subband statistics of a one-level Haar DWT of latents [C, H, W], accumulated one latent at a time (seed
    Sec. 4, Fig. 3): memory is that of one latent, whatever their number."""

    def __init__(self):
        self.n_latents = 0
        self.sum_sq = {b: 0.0 for b in SUBBANDS}
        self.count = {b: 0 for b in SUBBANDS}
        self.gt_0_5 = {b: 0 for b in SUBBANDS}
        self.gt_1_0 = {b: 0 for b in SUBBANDS}
        self.max_abs = {b: 0.0 for b in SUBBANDS}
        self.hist = {b: np.zeros(len(HIST_EDGES), dtype=np.int64) for b in SUBBANDS}   # last bin: >= HIST_EDGES[-1]

    def update(self, z: torch.Tensor) -> None:
        self.n_latents += 1
        for name, coef in zip(SUBBANDS, haar_dwt2(z.double())):
            a = coef.abs().flatten()
            self.sum_sq[name] += float((a ** 2).sum())
            self.count[name] += a.numel()
            self.gt_0_5[name] += int((a > 0.5).sum())
            self.gt_1_0[name] += int((a > 1.0).sum())
            self.max_abs[name] = max(self.max_abs[name], float(a.max()))
            idx = np.clip(np.searchsorted(HIST_EDGES, a.numpy(), side="right") - 1, 0, len(HIST_EDGES) - 1)
            self.hist[name] += np.bincount(idx, minlength=len(HIST_EDGES))

    def result(self) -> dict:
        total = sum(self.sum_sq.values())
        top = max(max(self.max_abs.values()), HIST_EDGES[-1]) * (1 + 1e-9)
        edges = np.append(HIST_EDGES, top)
        return {b: dict(energy_share=self.sum_sq[b] / total, mean_energy=self.sum_sq[b] / self.count[b],
                        frac_gt_0_5=self.gt_0_5[b] / self.count[b], frac_gt_1_0=self.gt_1_0[b] / self.count[b],
                        max_abs=self.max_abs[b], hist=self.hist[b].copy(), edges=edges) for b in SUBBANDS}


def wavelet_statistics(latents) -> dict:
    """``WaveletStats`` over an iterable of latents [C, H, W] (or a [N, C, H, W] batch)."""
    acc = WaveletStats()
    for z in _as_iter(latents):
        acc.update(z)
    return acc.result()


def evenly_spaced(n: int, k: int) -> list[int]:
    """min(n, k) indices spread evenly over range(n), first and last included (a deterministic systematic sample)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def latents_from_curated(vae, curated_dir: str | Path, rows: list[Mapping], max_latents: int = MAX_LATENTS,
                         progress: bool = True) -> Iterator[torch.Tensor]:
    """Normalised latents of up to ``max_latents`` curated images (evenly spaced over ``rows``), one at a time."""
    from ultraflux.data.shards import load_image_tensor
    from ultraflux.models.vae import encode_latents

    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    picked = [rows[i] for i in evenly_spaced(len(rows), max_latents)]
    for row in tqdm(picked, desc="diagnostics latents", disable=not progress):
        pixels = load_image_tensor(curated_dir, row)[None].to(device=device, dtype=dtype)
        yield encode_latents(vae, pixels)[0].float().cpu()


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(f"{v:.10g}" if isinstance(v, float) else str(v) for v in row) + "\n")


def _fig1(an: dict, out_dir: Path, train_len: int, label: str, plt) -> None:
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
    fig.suptitle(f"RoPE in force: {label}", fontsize=9)
    fig.tight_layout(); fig.savefig(out_dir / "fig1_resonance.png", dpi=110); plt.close(fig)


def in_force_frequencies(rope: dict, band: int = FIG2_BAND) -> list[tuple[float, float]]:
    """(omega_H, omega_W) of ``band`` that the configured RoPE uses on each Fig. 2 grid (d = 56, L = 64)."""
    cfg = {**rope, "train_len": FIG_TRAIN_LEN}
    pe = UltraFluxPosEmbed(cfg["theta"], [16, FIG_AXIS_DIM, FIG_AXIS_DIM], kind=cfg["kind"], train_len=FIG_TRAIN_LEN,
                           ntk_factor=cfg["ntk_factor"], yarn_alpha=cfg["yarn_alpha"], yarn_beta=cfg["yarn_beta"],
                           snap_all_bands=cfg["snap_all_bands"], snap_in_window=cfg["snap_in_window"])
    return [(float(pe.axis_spectrum(1, hh)[0][band]), float(pe.axis_spectrum(2, ww)[0][band]))
            for hh, ww in FIG2_GRIDS]


def _fig2(an: dict, in_force: list[tuple[float, float]], label: str, out_dir: Path, band: int, plt) -> None:
    fig, ax = plt.subplots(3, len(FIG2_GRIDS), figsize=(4 * len(FIG2_GRIDS), 10.5))
    rows = [("Flux", [(float(an["omega"][band]),) * 2] * len(FIG2_GRIDS)),
            ("Resonance (seed)", [(float(an["omega_hat"][band]),) * 2] * len(FIG2_GRIDS)),
            ("In force", in_force)]
    for row, (name, freqs) in enumerate(rows):
        for col, ((hh, ww), (om_h, om_w)) in enumerate(zip(FIG2_GRIDS, freqs)):
            ax[row, col].imshow(phase_pattern(om_h, om_w, hh, ww), cmap="RdBu", vmin=-1, vmax=1, origin="upper")
            ax[row, col].set_title(f"{name} {hh}x{ww} (band {band})", fontsize=9)
            ax[row, col].set_xticks([]); ax[row, col].set_yticks([])
    fig.suptitle(r"$\cos(h\omega_H + w\omega_W)$" + f"; in force: {label}", fontsize=9)
    fig.tight_layout(); fig.savefig(out_dir / "fig2_phase_patterns.png", dpi=90); plt.close(fig)


def _fig3(stats: dict, out_dir: Path, plt) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    last = max(int(np.flatnonzero(stats[b]["hist"]).max()) for b in SUBBANDS) + 1   # trailing empty bins not drawn
    for a, b in zip(ax, SUBBANDS):
        s = stats[b]
        edges = s["edges"][:last + 1]
        centers = (edges[:-1] + edges[1:]) / 2
        a.bar(centers, np.log10(s["hist"][:last] + 1), width=np.diff(edges), color="C0")
        a.set_title(f"{b}: energy {100 * s['energy_share']:.1f}%, max|w| {s['max_abs']:.2f}", fontsize=9)
        a.set_xlabel("|w|")
    ax[0].set_ylabel("log10(count + 1)")
    fig.tight_layout(); fig.savefig(out_dir / "fig3_wavelet_stats.png", dpi=100); plt.close(fig)


def run_diagnostics(params: dict, latents: Iterable[torch.Tensor] | torch.Tensor | None, out_dir: Path) -> dict:
    """Write seed Figs. 1-3 (PNG + CSV) and diagnostics.json into ``out_dir``; return flat numeric metrics.

    ``latents`` may be a generator: it is consumed once, one latent at a time.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rope = params["rope"]
    label = UltraFluxPosEmbed(rope["theta"], [2, 2, 2], kind=rope["kind"], snap_all_bands=rope["snap_all_bands"],
                              snap_in_window=rope["snap_in_window"]).describe()
    an = resonance_analysis(float(rope["theta"]), FIG_TRAIN_LEN, FIG_AXIS_DIM, bool(rope["snap_all_bands"]))
    nb = len(an["r"])
    _write_csv(out_dir / "fig1_cycles.csv", ["band", "r", "r_hat"],
               [(k, float(an["r"][k]), float(an["r_hat"][k])) for k in range(nb)])
    _write_csv(out_dir / "fig1_closure.csv", ["band", "flux", "resonance"],
               [(k, float(an["closure_flux"][k]), float(an["closure_res"][k])) for k in range(nb)])
    _write_csv(out_dir / "fig1_dphi.csv", ["band", "p", "dphi"],
               [(k, int(p), float(an["dphi"][k, i])) for k in range(nb) for i, p in enumerate(an["p"])])
    in_force = in_force_frequencies(rope)
    _fig1(an, out_dir, FIG_TRAIN_LEN, label, plt)
    _fig2(an, in_force, label, out_dir, FIG2_BAND, plt)
    with atomic_path(out_dir / "rope_in_force.txt", ".txt") as tmp:
        tmp.write_text(label + "\n")

    snapped = an["snapped"]
    inside = an["p"] <= FIG_TRAIN_LEN
    metrics: dict[str, float] = {
        "fig_train_len": float(FIG_TRAIN_LEN),
        "rope_snap_in_window": float(rope["kind"] == "resonance_yarn" and bool(rope["snap_in_window"])),
        "fig1_num_bands": float(nb),
        "fig1_num_snapped_bands": float(snapped.sum()),
        "fig1_max_closure_err_flux": float(an["closure_flux"].max()),
        "fig1_max_closure_err_resonance": float(an["closure_res"].max()),
        "fig1_max_closure_err_flux_snapped_bands": float(an["closure_flux"][snapped].max()),
        "fig1_max_closure_err_resonance_snapped_bands": float(an["closure_res"][snapped].max()),
        "fig1c_max_dphi_within_L": float(an["dphi"][:, inside].max()),
        "fig1c_max_dphi_2L": float(an["dphi"].max()),
        "fig1c_mean_dphi_2L": float(an["dphi"].mean()),
        # the 64x64 training grid: in force = Flux (release) or resonance (Fig. 2 reading)
        "fig2_in_force_omega_train_grid": in_force[0][0],
    }

    acc = WaveletStats()
    for z in _as_iter(latents):
        acc.update(z)
    metrics["fig3_num_latents"] = float(acc.n_latents)
    if acc.n_latents:
        stats = acc.result()
        cols = ["energy_share", "mean_energy", "frac_gt_0_5", "frac_gt_1_0", "max_abs"]
        _write_csv(out_dir / "fig3_wavelet_stats.csv",
                   ["band"] + cols + ["paper_" + c for c in cols] + ["paper_energy_share_max"],
                   [[b] + [stats[b][c] for c in cols] + [PAPER_FIG3[b][c] for c in cols]
                    + [PAPER_FIG3[b]["energy_share_max"]] for b in SUBBANDS])
        _write_csv(out_dir / "fig3_hist.csv", ["band", "bin_lo", "bin_hi", "count"],
                   [(b, float(stats[b]["edges"][i]), float(stats[b]["edges"][i + 1]), int(stats[b]["hist"][i]))
                    for b in SUBBANDS for i in range(len(stats[b]["hist"]))])
        _fig3(stats, out_dir, plt)
        for b in SUBBANDS:
            for c in cols:
                metrics[f"fig3_{c}_{b}"] = float(stats[b][c])
    write_json(out_dir / "diagnostics.json", metrics)
    return metrics
