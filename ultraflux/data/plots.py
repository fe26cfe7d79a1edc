"""Histograms of the curation statistics with their thresholds drawn (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ultraflux.io import atomic_path


def _hist(path: Path, values, threshold: float, title: str, xlabel: str, log: bool = False) -> None:
    """``values``: the values, or ``(bin_edges, counts)`` of a histogram built elsewhere (log10 units if ``log``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if isinstance(values, tuple):
        edges, counts = (np.asarray(v, dtype=float) for v in values)
        n = int(counts.sum())
        if n:
            ax.stairs(counts, edges, fill=True, color="#4a7ab5")
    else:
        values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
        n = values.size
        if n:
            data = np.log10(np.maximum(values, 1e-3)) if log else values
            ax.hist(data, bins=40, color="#4a7ab5", edgecolor="white")
    ax.axvline(np.log10(threshold) if log else threshold, color="#d62728", linestyle="--",
               label=f"threshold {threshold:g}")
    ax.set_title(f"{title} (n={n})")
    ax.set_xlabel(f"log10 {xlabel}" if log else xlabel)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def write_histograms(plots_dir: Path, rows, patch_values, flat_threshold: float, max_fraction: float,
                     entropy_min: float) -> list[Path]:
    """plots/s_flat_patches.png, plots/flat_fraction.png and plots/entropy.png; returns the paths.

    ``patch_values``: per-patch S_flat values, or ``(log10 bin edges, counts)`` accumulated per image by the
    workers (so the main process never holds every patch of the dataset).
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    out = [plots_dir / "s_flat_patches.png", plots_dir / "flat_fraction.png", plots_dir / "entropy.png"]
    _hist(out[0], patch_values, flat_threshold, "Per-patch S_flat = Var(|Sobel|)", "S_flat", log=True)
    _hist(out[1], rows["s_flat_fraction"], max_fraction, "Fraction of texture-poor patches per image",
          "fraction of patches with S_flat < threshold")
    _hist(out[2], rows["entropy"], entropy_min, "Gray-level Shannon entropy per image", "H (bits)")
    return out
