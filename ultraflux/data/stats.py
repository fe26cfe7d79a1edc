"""Texture statistics of seed Sec. 2.1, computed exactly as the public filtering tool computes them.

The UltraFlux release ships ``tools/filtering_pipeline.py``, whose numbers are the metadata of MultiAspect-4K-1M.
Its conventions, reproduced here:

* ``I`` is the 8-bit grayscale image, OpenCV's ``cvtColor(..., RGB2GRAY)`` (BT.601: 0.299 R + 0.587 G + 0.114 B,
  fixed-point rounded) of the image's STORED pixels (Pillow ``convert("RGB")``, no EXIF rotation). For JPEGs the
  decoder's own luma plane (``curate.gray: luma``) differs from it by one level on some pixels: see
  :func:`ultraflux.data.decode.decode_gray` and benchmarks/bench_curate.py for what that changes.
* Patches: the full ``patch x patch`` (240) tiles of a grid anchored at the TOP-LEFT corner; partial tiles at the
  right and bottom edges are skipped. Each patch is Sobel-filtered ON ITS OWN (OpenCV ``Sobel``, ksize 3, the
  default border, reflect-101, inside the patch), so a patch's statistic does not depend on its neighbours.
* ``S_flat`` of a patch is the population variance of the gradient magnitude ``sqrt(Ix^2 + Iy^2)``; a patch is
  texture-poor when ``S_flat < threshold`` (800). The flat fraction is (texture-poor patches) / (full patches), and
  **0.0 when the image has no full patch** (the tool's choice), so such an image is never dropped as flat.
  An image is dropped when MORE than ``max_fraction`` (50%) of its patches are texture-poor
  (:mod:`ultraflux.data.rule`, the one place the thresholds are compared).
* Entropy: ``skimage.measure.shannon_entropy(I)`` (bits), i.e. ``scipy.stats.entropy`` of the counts of the gray
  levels present; dropped when ``H < 7.0`` (:mod:`ultraflux.data.rule`).

Speed and exactness (budget: well under the cost of a decode; figures in benchmarks/bench_curate.py): per patch,
``cv2.spatialGradient`` gives the int16 Sobel pair (exact for uint8 input: |I_x| <= 1020). Then
``Var(m) = E[Ix^2 + Iy^2] - E[m]^2`` where the first term is an exact integer sum (``cv2.norm(NORM_L2SQR)``) and
``E[m]`` sums the float64 magnitude (``cv2.magnitude``: x^2 + y^2 is exact in float64, the square root is
correctly rounded), so no float32 rounding enters: values agree with the tool's float64 per-patch ``var()`` to
~1e-12 relative (tests/test_data_stats.py), and every flat verdict is the same.
"""

from __future__ import annotations

import cv2
import numpy as np

FLAT_PATCH = 240
"""Seed Sec. 2.1: non-overlapping 240x240 patches."""


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit gray (BT.601) of an HxWx3 uint8 RGB array, as the public tool computes it (2-D: unchanged)."""
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def patch_grid(height: int, width: int, patch: int = FLAT_PATCH) -> tuple[int, int]:
    """Number of full patches ``(ny, nx)`` of the top-left-anchored grid (partial edge patches are skipped)."""
    return height // patch, width // patch


def _patch_variance(patch: np.ndarray) -> float:
    """Population variance of the Sobel magnitude of one patch, the patch filtered on its own (see module doc)."""
    dx, dy = cv2.spatialGradient(patch)  # int16, ksize 3, reflect-101 inside this (isolated) array
    mean_sq = (cv2.norm(dx, cv2.NORM_L2SQR) + cv2.norm(dy, cv2.NORM_L2SQR)) / patch.size  # exact integer sum
    magnitude = cv2.magnitude(dx.astype(np.float64), dy.astype(np.float64))
    mean = cv2.sumElems(magnitude)[0] / patch.size
    return max(mean_sq - mean * mean, 0.0)


def patch_flatness(gray: np.ndarray, patch: int = FLAT_PATCH) -> np.ndarray:
    """Per-patch S_flat = Var(|Sobel|) of every full patch; shape ``patch_grid(...)``, float64."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("patch_flatness expects a 2-D uint8 grayscale image")
    ny, nx = patch_grid(*gray.shape, patch)
    out = np.empty((ny, nx), dtype=np.float64)
    for i in range(ny):
        for j in range(nx):
            # A numpy view reaches OpenCV as its own matrix (no parent ROI), so the border is the patch's own.
            out[i, j] = _patch_variance(gray[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch])
    return out


def flat_summary(s_flat, threshold: float) -> tuple[float, float]:
    """(fraction of texture-poor patches, mean patch S_flat); ``(0.0, nan)`` without full patches (the tool's 0.0)."""
    values = np.asarray(s_flat, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0, float("nan")
    return float(np.mean(values < threshold)), float(values.mean())


def gray_counts(gray: np.ndarray) -> np.ndarray:
    """The 256-bin histogram of an 8-bit image as exact int64 counts.

    ``cv2.calcHist`` (one fast pass) returns float32 counts, exact only up to 2^24, so the pixels are counted in
    chunks of at most 2^24 and the chunks summed as integers.
    """
    flat = np.ascontiguousarray(gray).reshape(1, -1)
    chunk = 1 << 24
    counts = np.zeros(256, np.int64)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk]
        counts += cv2.calcHist([part], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return counts


def entropy_bits(gray: np.ndarray) -> float:
    """``skimage.measure.shannon_entropy(gray)`` in bits, from a histogram instead of a sort of every pixel.

    skimage computes ``scipy.stats.entropy(counts, base=2)`` over the counts of the values present (``np.unique``);
    the same call on the same counts in the same order gives the same float.
    """
    from scipy.stats import entropy

    counts = gray_counts(gray)
    return float(entropy(counts[counts > 0], base=2)) + 0.0
