"""Texture statistics of seed Sec. 2.1: the flat-region detector (S_flat) and the information-entropy filter.

Conventions (the seed leaves them open; these are the choices made here):

* ``I`` is the 8-bit (0-255) grayscale image, ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (OpenCV
  ``COLOR_RGB2GRAY``, the same weights as Pillow's ``convert("L")``), computed ONCE per image and shared by both
  statistics.
* ``dI/dx``, ``dI/dy`` are the standard unnormalised 3x3 Sobel responses (OpenCV ``Sobel(ksize=3)`` /
  ``spatialGradient``, kernel ``[-1 0 1; -2 0 2; -1 0 1]``, range +-1020) computed on the whole image with OpenCV's
  default border (reflect-101), then tiled: the threshold 800 is in these units.
* Patches are non-overlapping ``patch x patch`` (240) tiles on a grid centred in the image; the remainder border
  (< 240 px per side in total) is not scored. An axis shorter than one patch is covered by one patch as long as the
  axis (so a 200x1000 image has 4 patches of 200x240).
* ``S_flat`` of a patch is the population variance (ddof 0) of the gradient magnitude ``sqrt(Ix^2 + Iy^2)``.
  A patch is texture-poor when ``S_flat < threshold`` (800); an image is flat when MORE than ``max_fraction`` (50%)
  of its patches are texture-poor (seed Sec. 2.1 "Flat-region detection").
* Entropy is the Shannon entropy in bits of the 256-bin histogram of the same grayscale image (seed Sec. 2.1
  "Information Entropy Filtering"); an image is dropped when ``H < 7.0``.

Speed: everything runs on uint8/int16/float32 arrays with OpenCV (one ``spatialGradient`` pass, then the magnitude
one strip of patches at a time so temporaries stay in cache, and ``meanStdDev`` per patch, accumulated in double);
no scipy, no float64 image copies. See benchmarks/bench_curate.py.
"""

from __future__ import annotations

import cv2
import numpy as np


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """8-bit BT.601 luma of an HxWx3 uint8 RGB array (a 2-D array is returned unchanged)."""
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def patch_grid(height: int, width: int, patch: int) -> tuple[int, int, int, int, int, int]:
    """Centred tiling: ``(y0, x0, ph, pw, ny, nx)`` for an image of this size (see module docstring)."""
    ph, pw = min(patch, height), min(patch, width)
    ny, nx = height // ph, width // pw
    return (height - ny * ph) // 2, (width - nx * pw) // 2, ph, pw, ny, nx


def patch_flatness(gray: np.ndarray, patch: int = 240) -> np.ndarray:
    """Per-patch S_flat = Var(sqrt(Ix^2 + Iy^2)) with unnormalised 3x3 Sobel gradients; shape (ny, nx), float64."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("patch_flatness expects a 2-D uint8 grayscale image")
    h, w = gray.shape
    y0, x0, ph, pw, ny, nx = patch_grid(h, w, patch)
    gx, gy = cv2.spatialGradient(gray)  # int16 Sobel dx, dy (ksize 3, reflect-101 border), whole image
    out = np.empty((ny, nx), dtype=np.float64)
    for i in range(ny):  # one strip of patches at a time: the float32 temporaries stay in cache
        rows = slice(y0 + i * ph, y0 + (i + 1) * ph)
        cols = slice(x0, x0 + nx * pw)
        fx, fy = gx[rows, cols].astype(np.float32), gy[rows, cols].astype(np.float32)
        mag = np.sqrt(fx * fx + fy * fy)  # correctly rounded; cv2.magnitude's SIMD path varies with buffer alignment
        for j in range(nx):
            _, std = cv2.meanStdDev(mag[:, j * pw : (j + 1) * pw])  # accumulated in double by OpenCV
            out[i, j] = float(std[0, 0]) ** 2
    return out


def flat_summary(s_flat: np.ndarray, threshold: float = 800.0) -> tuple[float, float]:
    """(fraction of texture-poor patches, mean patch S_flat)."""
    values = np.asarray(s_flat, dtype=np.float64).ravel()
    if values.size == 0:
        return 1.0, 0.0
    return float(np.mean(values < threshold)), float(values.mean())


def is_flat(flat_fraction: float, max_fraction: float = 0.5) -> bool:
    """Seed Sec. 2.1: drop an image when MORE than 50% of its patches are texture-poor."""
    return flat_fraction > max_fraction


def entropy_bits(gray: np.ndarray) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of an 8-bit grayscale image (seed Sec. 2.1, drop if < 7.0)."""
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0
