"""Example thumbnails of curation outcomes, for a person to look at: ``<out>/examples/`` + ``index.json``.

For "kept" and for every rejection reason (``flat``, ``low_entropy``, ``low_quality``, ...), up to ``per_group``
images (the smallest ids: the same ones on every run) as small JPEGs with their scores (flat fraction, entropy,
quality, aesthetic). Kept images come from the shards (bucket size, as trained on), rejected ones from the source
file (DCT-scaled decode, displayed orientation). An image that cannot be decoded (unreadable, bomb) is listed
without a picture. Bounded: at most ``per_group`` x (reasons + 1) thumbnails whatever the dataset size.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ultraflux.io import atomic_path, write_json

from .decode import BadImage, apply_orientation, decode_small, read_header
from .shards import open_image

PER_GROUP = 6
THUMB = 256
SCORES = {"s_flat_fraction": "flat fraction", "entropy": "entropy", "quality": "quality", "aesthetic": "aesthetic"}


def _group(row) -> str:
    return "kept" if row["kept"] else str(row["reason"]).split(":")[0].strip()


def _thumbnail(row, out_dir: Path) -> Image.Image | None:
    try:
        if row["kept"]:
            im = open_image(out_dir, row)
        else:
            data = Path(row["source"]).read_bytes()
            header = read_header(data)
            im = Image.fromarray(apply_orientation(decode_small(data, header, THUMB), header.orientation))
    except (OSError, ValueError, BadImage):
        return None
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return im


def write_examples(manifest: pd.DataFrame, out_dir: Path, per_group: int = PER_GROUP) -> dict:
    """Write ``out_dir/examples/<group>-<id>.jpg`` and ``index.json``: {"groups": [{"group", "count", "items"}]},
    "kept" first, then the reasons alphabetically."""
    folder = Path(out_dir) / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jpg"):
        old.unlink()
    frame = manifest.assign(_group=manifest.apply(_group, axis=1)).sort_values(["_group", "id"])
    groups: list[dict] = []
    for group, rows in sorted(frame.groupby("_group", sort=True), key=lambda g: (g[0] != "kept", g[0])):
        items = []
        for row in rows.head(per_group).to_dict("records"):
            scores = {label: round(float(row[col]), 4) for col, label in SCORES.items()
                      if isinstance(row[col], (int, float, np.floating)) and math.isfinite(float(row[col]))}
            item = {"id": row["id"], "source": Path(row["source"]).name, "reason": row["reason"], "scores": scores,
                    "file": ""}
            im = _thumbnail(row, out_dir)
            if im is not None:
                item["file"] = f"{group}-{row['id']}.jpg"
                with atomic_path(folder / item["file"]) as tmp:
                    im.convert("RGB").save(tmp, format="JPEG", quality=85)
            items.append(item)
        groups.append({"group": group, "count": int(len(rows)), "items": items})
    index = {"per_group": per_group, "groups": groups}
    write_json(folder / "index.json", index)
    return index
