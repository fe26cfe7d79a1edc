"""What to relax when curation keeps too few images: for each rejection reason, the exact key, the direction and the
value that would have let ``k`` more images past that filter, computed from this run's own statistics.

Filters run in the order of :mod:`ultraflux.data.select`; an image let past one filter still meets the later ones,
so each line says "up to"; the relative filters (the quality stand-in's and the aesthetic top fraction) keep only a
share of what reaches them, which a last note line says. The values are read off the rejected rows' scores: relaxing
a key to the value given keeps exactly the ``k`` best-scoring images that this filter removed.
"""
from __future__ import annotations

import math

import pandas as pd

from ultraflux.schema import Curate


def _floor(x: float, digits: int = 4) -> float:
    return math.floor(x * 10**digits) / 10**digits


def _ceil(x: float, digits: int = 4) -> float:
    return math.ceil(x * 10**digits) / 10**digits


def _line(reason: str, removed: int, k: int, change: str, all_change: str) -> str:
    more = f"up to {k} more" if k < removed else f"up to all {removed}"
    tail = f" (all {removed}: {all_change})" if k < removed else ""
    return f"{reason} ({removed} removed): {change} to let {more} past this filter{tail}"


def relax_advice(rows: pd.DataFrame, curate: Curate, wanted: int) -> list[str]:
    """One line per rejection reason that removed images (``curate``: the validated section); ``wanted`` is how
    many more images the run needed."""
    reason = rows["reason"].fillna("").astype(str).str.split(":").str[0].str.strip()
    lines = []

    def rejected(name: str) -> pd.DataFrame:
        return rows[reason == name]

    too_small = rejected("too_small")
    if len(too_small):
        need = sorted(too_small["upscale"].dropna())
        k = min(wanted, len(need))
        scale, up = float(curate.buckets.scale), float(curate.max_upscale)
        if need:
            lines.append(_line("too_small", len(too_small), k,
                               f"raise curate.max_upscale from {up:g} to {_ceil(need[k - 1], 3):g}, or lower "
                               f"curate.buckets.scale from {scale:g} to {_floor(scale * up / need[k - 1], 4):g}",
                               f"max_upscale {_ceil(need[-1], 3):g}"))
    flat = rejected("flat")
    if len(flat):
        frac = sorted(flat["s_flat_fraction"])
        k = min(wanted, len(frac))
        lines.append(_line("flat", len(flat), k, f"raise curate.flat.max_fraction from "
                           f"{float(curate.flat.max_fraction):g} to {_ceil(frac[k - 1]):g}",
                           f"{_ceil(frac[-1]):g}"))
    low_entropy = rejected("low_entropy")
    if len(low_entropy):
        ent = sorted(low_entropy["entropy"], reverse=True)
        k = min(wanted, len(ent))
        lines.append(_line("low_entropy", len(low_entropy), k, f"lower curate.entropy_min from "
                           f"{float(curate.entropy_min):g} to {_floor(ent[k - 1]):g}", f"{_floor(ent[-1]):g}"))
    low_quality = rejected("low_quality")
    if len(low_quality):
        k = min(wanted, len(low_quality))
        scorer = str(rows["quality_scorer"].dropna().iloc[0]) if "quality_scorer" in rows and \
            rows["quality_scorer"].notna().any() else ""
        if scorer.startswith("standin"):
            reached = int(reason.isin(["low_quality", "low_aesthetic", ""]).sum())
            passed = reached - len(low_quality)
            frac = float(curate.quality.standin_keep_fraction)
            lines.append(_line("low_quality", len(low_quality), k, f"raise curate.quality.standin_keep_fraction from "
                               f"{frac:g} to {_ceil((passed + k) / reached, 3):g}", "1.0"))
        else:
            q = sorted(low_quality["quality"].dropna(), reverse=True)
            if q:
                lines.append(_line("low_quality", len(low_quality), k, f"lower curate.quality.threshold from "
                                   f"{float(curate.quality.threshold):g} to below {q[k - 1]:.4g}",
                                   f"below {q[-1]:.4g}"))
    low_aesthetic = rejected("low_aesthetic")
    if len(low_aesthetic):
        k = min(wanted, len(low_aesthetic))
        reached = int(reason.isin(["low_aesthetic", ""]).sum())
        passed = reached - len(low_aesthetic)
        lines.append(_line("low_aesthetic", len(low_aesthetic), k, f"raise curate.aesthetic.keep_top from "
                           f"{float(curate.aesthetic.keep_top):g} to {_ceil((passed + k) / reached, 3):g}",
                           "1.0"))
    relative = [f"{key} {value:g}" for key, value, used in (
        ("curate.quality.standin_keep_fraction", float(curate.quality.standin_keep_fraction), len(low_quality)),
        ("curate.aesthetic.keep_top", float(curate.aesthetic.keep_top), len(low_aesthetic))) if used and value < 1]
    if relative and any(not line.startswith(("low_quality", "low_aesthetic")) for line in lines):
        lines.append(f"note: {' and '.join(relative)} keep a fraction of the images that reach them, so an image let "
                     "past an earlier filter is kept only with about that chance; relaxing those keys keeps more of "
                     "every filter's survivors")
    return lines
