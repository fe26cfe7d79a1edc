"""Example images of curation outcomes, for a person to look at (the report's curation section).

For "kept" and for every rejection reason (``flat``, ``low_entropy``, ``low_quality``, ...), up to ``per_group``
images (the smallest ids: the same ones on every run) as small thumbnails with their scores (flat fraction, entropy,
quality, aesthetic). Kept images come from the shards (bucket size, as trained on), rejected ones from the source
file (DCT-scaled decode, displayed orientation). An image that cannot be decoded (unreadable, bomb, source gone) has
no picture, only its reason. Bounded: at most ``per_group`` x (reasons + 1) decodes whatever the dataset size.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .decode import BadImage, apply_orientation, decode_small, read_header
from .released import attribution_line, read_source_bytes
from .shards import read_image_bytes

PER_GROUP = 6
THUMB = 256
SCORES = {"s_flat_fraction": "flat fraction", "entropy": "entropy", "quality": "quality", "aesthetic": "aesthetic"}


def _group(row) -> str:
    return "kept" if row["kept"] else str(row["reason"]).split(":")[0].strip()


def thumbnail(row: dict, curated_dir: Path) -> Image.Image | None:
    """A <= THUMB px picture of a manifest row: the curated image if kept, else the source; None if undecodable."""
    try:
        data = read_image_bytes(curated_dir, row) if row["kept"] else read_source_bytes(row["source"])
        header = read_header(data)
        arr = apply_orientation(decode_small(data, header, THUMB), header.orientation)
    except (OSError, ValueError, BadImage):
        return None
    im = Image.fromarray(arr)
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return im


def curation_examples(manifest: pd.DataFrame, curated_dir: Path, per_group: int = PER_GROUP) -> list[dict]:
    """[{"group", "count", "items": [{"id", "source", "reason", "scores", "image": PIL image or None}]}], "kept"
    first, then the rejection reasons alphabetically."""
    frame = manifest.assign(_group=manifest.apply(_group, axis=1)).sort_values(["_group", "id"])
    groups = []
    for group, rows in sorted(frame.groupby("_group", sort=True), key=lambda g: (g[0] != "kept", g[0])):
        items = []
        for row in rows.head(per_group).to_dict("records"):
            scores = {label: round(float(row[col]), 4) for col, label in SCORES.items()
                      if isinstance(row[col], (int, float, np.floating)) and math.isfinite(float(row[col]))}
            items.append({"id": row["id"], "source": Path(row["source"]).name, "reason": row["reason"],
                          "scores": scores, "image": thumbnail(row, curated_dir),
                          "credit": attribution_line(row)})
        groups.append({"group": group, "count": int(len(rows)), "items": items})
    return groups
