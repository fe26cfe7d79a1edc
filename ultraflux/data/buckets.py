"""Aspect-ratio buckets for native-4K multi-AR training (seed Sec. 2.2 "DiT Training").

The seed names the bucket sizes twice, and the two lists disagree:

* Sec. 2.2 (the text): landscape 5120x2880 (16:9) and 4704x3136 (3:2), portrait 2880x5120 (9:16) and 3136x4704 (2:3),
  and "a single square bucket at 3840x3840". All of these have the same area, 3840^2 = 14.75 MP, and exact aspects.
* Table 3 (left "to be filled"): sizes of ~16.7 MP (4096^2 area, e.g. 5440x3072, 4096x4096) whose labels are swapped:
  its "square" list holds portraits (3072x5440, ...), its "portrait" list holds landscapes (5568x3008, ...), and most
  of its sizes are not at a named aspect ratio (5440x3072 = 1.771, 5184x3264 = 1.588, ...).

ONE consistent table is used here, the Sec. 2.2 recipe generalised: every bucket has (about) the area of the
3840x3840 square, i.e. ``(3840 * scale)^2`` pixels (0.88 x 4096^2 at scale 1.0, "about 4K"), its aspect as close as
possible to the named ratio, and every side a multiple of 32 (F16 VAE x 2x2 patchify = 32 px per DiT token) at
every scale. For each aspect r the side pair (w, h) minimises ``|ln(w/h) - ln r| + 0.25 |ln(w h / A)|`` over heights
within +-3 tokens of the ideal ``sqrt(A / r)``, ties to the larger area; portraits are the
transposed landscapes. At scale 1.0 this reproduces the seed's
named sizes exactly (3840x3840, 5120x2880, 2880x5120, 4704x3136, 3136x4704). At the tiny profile's scale 0.125 the
square is 480x480 (~512^2).

For comparison, Sana's 4K table has 41 sizes from 2048x8192 to 8192x2048 in 256-px steps at ~16 MP; the Diffusion-4K
baseline (``data.variant: baseline``) uses only the square.
"""

from __future__ import annotations

import math

PX_PER_TOKEN = 32
"""F16 VAE (16 px per latent) x 2x2 patchify: every bucket side is a multiple of 32 px."""

BASE_SIDE = 3840
"""Side of the seed's single square bucket (Sec. 2.2); every bucket has about this side squared in area."""

DEFAULT_ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "2:1", "1:2", "2.39:1", "1:2.39"]


def parse_aspect(name: str) -> float:
    """Return width / height for an aspect name like ``"16:9"`` or ``"2.39:1"``."""
    try:
        w, h = (float(part) for part in name.split(":"))
    except ValueError as err:
        raise ValueError(f"aspect name {name!r} is not of the form 'W:H'") from err
    if w <= 0 or h <= 0:
        raise ValueError(f"aspect name {name!r} must have positive sides")
    return w / h


def bucket_size(aspect: float, area: float, step: int = PX_PER_TOKEN) -> tuple[int, int]:
    """Sides (w, h), multiples of ``step``, with w/h close to ``aspect`` and w*h close to ``area``.

    Portrait sizes are the transposed landscape sizes, so "2:3" is always "3:2" turned on its side.
    """
    if aspect < 1:
        w, h = bucket_size(1 / aspect, area, step)
        return h, w
    ideal_h = math.sqrt(area / aspect) / step
    best = None
    for k in range(max(1, round(ideal_h) - 3), round(ideal_h) + 4):
        h = k * step
        w = max(1, round(h * aspect / step)) * step
        cost = abs(math.log(w / h / aspect)) + 0.25 * abs(math.log(w * h / area))
        key = (round(cost, 12), -w * h)
        if best is None or key < best[0]:
            best = (key, (w, h))
    return best[1]


def bucket_table(scale: float = 1.0, aspects: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Map aspect names to (width, height) in pixels; about ``(3840 * scale)^2`` px each, sides multiples of 32.

    ``scale`` 1.0 gives the seed's 4K sizes (module docstring); the tiny profile uses 0.125.
    """
    if scale <= 0:
        raise ValueError(f"bucket scale must be positive, got {scale}")
    area = (BASE_SIDE * scale) ** 2
    return {name: bucket_size(parse_aspect(name), area) for name in (aspects or DEFAULT_ASPECTS)}


def nearest_bucket(width: int, height: int, table: dict[str, tuple[int, int]]) -> str:
    """Name of the bucket whose aspect is nearest to width/height by |log aspect ratio| (ties: first in table)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_ar = math.log(width / height)
    return min(table, key=lambda name: abs(math.log(table[name][0] / table[name][1]) - log_ar))
