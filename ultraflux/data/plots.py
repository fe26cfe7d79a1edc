"""Histograms of the curation statistics with their thresholds drawn (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _hist(path: Path, values, threshold: float, title: str, xlabel: str, log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if values.size:
        data = np.log10(np.maximum(values, 1e-3)) if log else values
        ax.hist(data, bins=40, color="#4a7ab5", edgecolor="white")
    ax.axvline(np.log10(threshold) if log else threshold, color="#d62728", linestyle="--",
               label=f"threshold {threshold:g}")
    ax.set_title(f"{title} (n={values.size})")
    ax.set_xlabel(f"log10 {xlabel}" if log else xlabel)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def write_histograms(plots_dir: Path, rows, patch_values, flat_threshold: float, max_fraction: float,
                     entropy_min: float) -> list[Path]:
    """plots/s_flat_patches.png, plots/flat_fraction.png and plots/entropy.png; returns the paths."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    out = [plots_dir / "s_flat_patches.png", plots_dir / "flat_fraction.png", plots_dir / "entropy.png"]
    _hist(out[0], patch_values, flat_threshold, "Per-patch S_flat = Var(|Sobel|)", "S_flat", log=True)
    _hist(out[1], rows["s_flat_fraction"], max_fraction, "Fraction of texture-poor patches per image",
          "fraction of patches with S_flat < threshold")
    _hist(out[2], rows["entropy"], entropy_min, "Gray-level Shannon entropy per image", "H (bits)")
    return out
