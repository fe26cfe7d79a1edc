"""Curation of downloaded WebDataset shards, on the released scores, with attribution.

Sources (hooks in :func:`ultraflux.data.ingest.list_sources` and :func:`ultraflux.data.process.read_source`):

* the download stage's output (``outputs/download``, sibling of ``outputs/curated``), used by curation whenever
  ``data.source`` is the released metadata (:func:`ultraflux.data.metadata.is_metadata_source`);
* any folder of WebDataset tars, e.g. img2dataset's output (``00000.tar`` with ``<key>.jpg`` / ``.txt`` /
  ``.json``, plus its ``.parquet`` / ``_stats.json`` files, which are not needed): point ``data.source`` at it.

Each image stays inside its tar: its source path is ``<tar>::<member>@<offset>+<nbytes>`` (:func:`member_path`),
read with one seek (:func:`read_source_bytes`). The caption is the ``.txt`` member; the ``.json`` member gives the
released fields (:data:`ultraflux.data.metadata.FIELDS`: canonical names as the download stage writes them, else
the record's own names as img2dataset keeps them, auto-detected like the metadata) and the attribution. Tar
members with absolute names, ``..`` or links are skipped (a tar is never extracted).

Released scores (``curate.quality.source`` / ``curate.aesthetic.source: released``): the quality and aesthetic
columns take the released values, and their scorer is named ``released:<record field>``, never a computed name;
the seed's rules then apply unchanged (Q-Align > 4.0; aesthetic top 30%, stage 2 top 5%).

Agreement (:func:`agreement`): flatness and entropy recomputed on the downloaded bytes vs the released values:
max |delta| and the number of images whose keep/reject verdict of that filter differs.
"""
from __future__ import annotations

import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from . import metadata

MEMBER = re.compile(r"^(?P<tar>.+\.tar)::(?P<member>[^/]+)@(?P<offset>\d+)\+(?P<nbytes>\d+)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif")
RELEASED_PREFIX = "released:"
RELEASED_COLUMNS = {"url": str, "released_quality": float, "released_aesthetic": float, "released_flatness": float,
                    "released_entropy": float, "photographer": str, "work_url": str, "photographer_url": str}
"""Manifest columns this module fills (empty / NaN for other sources)."""


def download_output(curated_dir: str | Path) -> Path:
    """Where curation reads a download: ``outputs/download`` beside ``outputs/curated``."""
    return Path(curated_dir).parent / "download"


def member_path(tar: Path, member: str, offset: int, nbytes: int) -> str:
    return f"{tar}::{member}@{offset}+{nbytes}"


def is_member_path(path: str) -> bool:
    return MEMBER.match(str(path)) is not None


def read_source_bytes(path: str) -> bytes:
    """The bytes of a source: a tar member path (one seek) or a plain file."""
    match = MEMBER.match(str(path))
    if match is None:
        return Path(path).read_bytes()
    with open(match["tar"], "rb") as fh:
        fh.seek(int(match["offset"]))
        data = fh.read(int(match["nbytes"]))
    if len(data) != int(match["nbytes"]):
        raise OSError(f"{match['tar']}: truncated at {match['member']}")
    return data


def is_webdataset(root: Path) -> bool:
    """A folder whose images are inside ``.tar`` files (no loose images)."""
    if not root.is_dir():
        return False
    has_tar = False
    for entry in root.rglob("*"):
        if entry.suffix.lower().lstrip(".") in IMAGE_EXTS:
            return False
        has_tar |= entry.suffix == ".tar" and entry.is_file()
    return has_tar


def released_fields(sample: dict) -> dict:
    """Canonical fields of one sample's ``.json``: as the download stage writes them, else auto-detected."""
    mapping = {f: f if f in sample else next((s for s in metadata.SPELLINGS[f] if s in sample), None)
               for f in metadata.FIELDS}
    out = {f: (sample.get(k) if k else None) for f, k in mapping.items()}
    record_fields = sample.get("fields") or {}  # the download stage: which record field each value came from
    out["_names"] = {f: record_fields.get(f) or mapping[f] or f for f in metadata.FIELDS}
    return out


def _samples(tar_path: Path):
    """(key, image member name, offset, nbytes, txt bytes, json dict) of each sample of one tar, in file order."""
    current: dict = {}
    with tarfile.open(tar_path, mode="r|") as tar:
        for info in tar:
            if metadata.member_problem(info) or not info.isfile():
                continue
            key, _, ext = info.name.rpartition("/")[2].partition(".")
            if current and current["key"] != key:
                yield current
                current = {}
            current.setdefault("key", key)
            if ext.lower() in IMAGE_EXTS:
                current["image"] = (info.name, info.offset_data, info.size)
            elif ext in ("txt", "json"):
                current[ext] = tar.extractfile(info).read()
    if current:
        yield current


def list_webdataset(root: Path) -> list[tuple[str, bytes | None, dict]]:
    """(source path, caption bytes or None, released fields) per image sample of every tar under ``root`` (sorted
    tar paths, file order inside)."""
    items = []
    for tar_path in sorted(p for p in root.rglob("*.tar") if p.is_file()):
        for sample in _samples(tar_path):
            if "image" not in sample:
                continue
            name, offset, nbytes = sample["image"]
            try:
                meta = json.loads(sample.get("json") or b"{}")
            except ValueError:
                meta = {}
            items.append((member_path(tar_path, name, offset, nbytes), sample.get("txt"),
                          released_fields(meta if isinstance(meta, dict) else {})))
    return items


# --------------------------------------------------------------------------------------------------- curation
def released_columns(items) -> pd.DataFrame:
    """The :data:`RELEASED_COLUMNS` of each item (NaN / "" where a source has none)."""
    rows = []
    for item in items:
        meta = getattr(item, "meta", None) or {}
        row = {c: meta.get(c.removeprefix("released_")) for c in RELEASED_COLUMNS}
        rows.append({c: (_float(v) if RELEASED_COLUMNS[c] is float else ("" if v is None else str(v)))
                     for c, v in row.items()})
    return pd.DataFrame(rows, columns=list(RELEASED_COLUMNS))


def _float(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if math.isfinite(number) else float("nan")


def released_name(kind: str, items) -> str:
    """``released:<record field>`` of ``kind`` (quality / aesthetic) as the items' metadata names it."""
    names = next((it.meta["_names"] for it in items if getattr(it, "meta", None)), {})
    return f"{RELEASED_PREFIX}{names.get(kind, kind)}"


def require_released(items, curate: dict) -> None:
    """Before any work: ``curate.<kind>.source = released`` needs sources that carry the released score."""
    for kind in ("quality", "aesthetic"):
        if curate[kind]["source"] == "released" and not any(
                _float((getattr(it, "meta", None) or {}).get(kind)) == _float(
                    (getattr(it, "meta", None) or {}).get(kind)) for it in items):
            raise ValueError(f"curate.{kind}.source = 'released' but no source has a released {kind} score "
                             "(data.source must be the released metadata, its download, or shards whose .json "
                             "holds the score)")


def use_released(rows: pd.DataFrame, kind: str, items) -> str:
    """Put the released ``kind`` score into ``rows[kind]``; returns the scorer name (see :func:`require_released`)."""
    rows[kind] = rows[f"released_{kind}"]
    return released_name(kind, items)


def agreement(rows: pd.DataFrame, flat_max_fraction: float, entropy_min: float) -> dict:
    """Released vs recomputed flatness and entropy over the rows that have both (module docstring)."""
    out = {}
    checks = (("flatness", "s_flat_fraction", lambda v: v > flat_max_fraction),
              ("entropy", "entropy", lambda v: v < entropy_min))
    for name, computed, rejects in checks:
        both = rows[[f"released_{name}", computed]].dropna()
        released, ours = both[f"released_{name}"].to_numpy(), both[computed].to_numpy()
        out[f"released_{name}_compared"] = int(len(both))
        out[f"released_{name}_max_abs_delta"] = float(np.max(np.abs(released - ours))) if len(both) else None
        out[f"released_{name}_verdict_flips"] = int(np.sum(rejects(released) != rejects(ours))) if len(both) else 0
    return out


def write_credits(manifest: pd.DataFrame, path: Path, kept_only: bool = True) -> int:
    """A Markdown credits file (photographer, profile, work) from a manifest; returns the number of images."""
    from ultraflux.io import atomic_write_text

    rows = manifest[manifest["kept"]] if kept_only else manifest
    lines = ["# Image credits", "", "Training images from MultiAspect-4K-1M (Pexels / Unsplash); photographers:", "",
             "| photographer | profile | work |", "|---|---|---|"]
    credited = 0
    for row in rows.sort_values(["photographer", "work_url"]).itertuples():
        if not (row.photographer or row.work_url):
            continue
        credited += 1
        lines.append(f"| {_md(row.photographer) or 'unknown'} | {_md(row.photographer_url)} | {_md(row.work_url)} |")
    missing = len(rows) - credited
    lines += ["", f"{credited} image(s) credited; {missing} without attribution in the metadata."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return credited


def _md(text: str) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def attribution_line(row) -> str:
    """"Photo: <photographer> (<work_url>)" for a manifest row, "" when it has none (the report's captions)."""
    get = row.get if hasattr(row, "get") else (lambda k, d="": getattr(row, k, d))
    who, work = get("photographer", "") or "", get("work_url", "") or ""
    if not (who or work):
        return ""
    return f"Photo: {who or 'unknown'}" + (f" ({work})" if work else "")
