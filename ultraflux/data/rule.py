"""The per-image keep/reject rule of seed Sec. 2.1 (and the bucket limit of Sec. 2.2), written once.

An image is ``too_small`` when it would need more than ``curate.max_upscale`` upscaling to fill its aspect bucket
(:func:`needs_too_much_upscale`); otherwise it is ``flat`` when MORE than ``curate.flat.max_fraction`` of its full
patches are texture-poor (S_flat below ``curate.flat.threshold``, see :func:`ultraflux.data.stats.flat_summary`),
else ``low_entropy`` when its gray-level entropy H is below ``curate.entropy_min`` (or is not a number), else it
passes ("").

Every caller applies this function to the statistics exactly as computed (float64), never rounded first: pass 1 in
every engine (:func:`ultraflux.data.process.is_candidate`, local and Ray), the stage's candidate mask and the
selection (:func:`ultraflux.data.select.assign_reasons`), and ``ultraflux curate-stats``
(:func:`ultraflux.data.curate.image_stats`). So an image at H = 6.99999 is ``low_entropy`` everywhere, as in the
public ``tools/filtering_pipeline.py``.
"""
from __future__ import annotations

import numpy as np

FLAT = "flat"
LOW_ENTROPY = "low_entropy"


def texture_reasons(flat_fraction, entropy, max_fraction: float, entropy_min: float) -> np.ndarray:
    """The rule over arrays (or scalars: a 0-d array) of flat fractions and entropies: "flat" | "low_entropy" | ""."""
    fraction = np.asarray(flat_fraction, dtype=np.float64)
    bits = np.asarray(entropy, dtype=np.float64)
    return np.where(fraction > max_fraction, FLAT, np.where(~(bits >= entropy_min), LOW_ENTROPY, ""))


def texture_reason(flat_fraction: float, entropy: float, max_fraction: float, entropy_min: float) -> str:
    """:func:`texture_reasons` of one image."""
    return str(texture_reasons(flat_fraction, entropy, max_fraction, entropy_min))


UPSCALE_TOLERANCE = 1e-9
"""Float slack of the bucket arithmetic: an image that needs exactly ``max_upscale`` is not too small."""


def needs_too_much_upscale(upscale: float, max_upscale: float) -> bool:
    """``too_small``: the image would need more than ``curate.max_upscale`` upscaling to fill its bucket."""
    return upscale > max_upscale + UPSCALE_TOLERANCE
