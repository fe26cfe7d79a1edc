"""Listing a source: images and their captions (``data.source``).

Accepted layouts, tried in this order:

1. ``data.source`` is a CSV or Parquet FILE with one row per image: a path column (``file_name``, ``path``, ``image``
   or ``file``; relative paths are relative to the table's folder) and a caption column (``text``, ``caption`` or
   ``prompt``).
2. a folder holding ``metadata.jsonl`` (Hugging Face imagefolder: one JSON object per line with ``file_name`` and
   ``text``), or ``metadata.csv`` / ``metadata.parquet`` with the columns of (1). Images in the folder that the
   metadata does not list are still sources, with no caption.
3. a folder of images with sidecar captions: ``photo.jpg`` + ``photo.txt``.
4. a folder of WebDataset tars (the download stage's output, img2dataset's output): :mod:`ultraflux.data.released`.

Images are the entries (recursively, hidden ones skipped) with an image extension; a file with an image extension
that is not an image (e.g. text named .jpg), a folder named like an image (its contents are listed too), a dangling
symlink or a special file is still listed, and rejected later with an "unreadable" reason: every source entry gets
a manifest row.

Caption problems are recorded, never fatal: no caption / empty caption -> ``caption_error = "no_caption"``,
bytes that are not UTF-8 -> ``"bad_caption: not UTF-8 (...)"``. A UTF-8 BOM is accepted; captions are stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PATH_COLUMNS = ("file_name", "path", "image", "file")
CAPTION_COLUMNS = ("text", "caption", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass
class SourceItem:
    """One source image: its path, its caption (or "") and, when the caption is unusable, why."""

    path: str
    caption: str = ""
    caption_error: str = ""
    meta: dict = field(default_factory=dict)  # released fields + attribution (WebDataset sources: data/released.py)


class SourceError(Exception):
    """``data.source`` is missing, unreadable or empty: raised before any work."""


def decode_caption(raw: bytes | str | None) -> tuple[str, str]:
    """(caption, error) from raw caption bytes/str; error is "" when usable."""
    if raw is None:
        return "", "no_caption"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            return "", f"bad_caption: not UTF-8 ({err.reason})"
    text = str(raw).strip()
    return (text, "") if text else ("", "no_caption")


def _pick(columns, candidates, what: str, where: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise SourceError(f"data.source: {where} has no {what} column (expected one of {', '.join(candidates)})")


def _read_table(path: Path) -> list[tuple[str, object]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path, dtype=str,
                                                                                            keep_default_na=False)
    except Exception as err:
        raise SourceError(f"data.source: cannot read table {path}: {err}") from err
    path_col = _pick(frame.columns, PATH_COLUMNS, "path", str(path))
    cap_col = _pick(frame.columns, CAPTION_COLUMNS, "caption", str(path))
    return [(str(p), c) for p, c in zip(frame[path_col], frame[cap_col])]


def _read_jsonl(path: Path) -> dict[str, tuple[str, str]]:
    captions: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            # The file name is unknown when the line cannot be decoded; salvage it from the raw bytes if possible.
            record = json.loads(line.decode("utf-8", errors="replace"))
            captions[str(record.get("file_name", f"<line {number}>"))] = ("", f"bad_caption: not UTF-8 ({err.reason})")
            continue
        except json.JSONDecodeError as err:
            raise SourceError(f"data.source: {path} line {number} is not JSON: {err}") from err
        name = record.get("file_name")
        if name is None:
            raise SourceError(f"data.source: {path} line {number} has no file_name")
        text = next((record[c] for c in CAPTION_COLUMNS if c in record), None)
        captions[str(name)] = decode_caption(text)
    return captions


def _image_files(root: Path) -> list[Path]:
    """Every entry with an image extension: regular files, but also folders, dangling symlinks and special files,
    which then get a row with an "unreadable" reason instead of vanishing."""
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def list_sources(source: str | Path) -> list[SourceItem]:
    """All source images with captions, sorted by path; raises :class:`SourceError` naming ``data.source``."""
    root = Path(source)
    if not str(source):
        raise SourceError("data.source is empty")
    if not root.exists():
        raise SourceError(f"data.source = {str(source)!r} does not exist")
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".parquet"):
            raise SourceError(f"data.source = {str(source)!r} is a file but not a .csv/.parquet table")
        items = []
        for rel, raw in _read_table(root):
            caption, error = decode_caption(raw if isinstance(raw, (str, bytes)) else None)
            items.append(SourceItem(str(root.parent / rel), caption, error))
        return sorted(items, key=lambda it: it.path)
    from .released import is_webdataset, list_webdataset

    if is_webdataset(root):  # the download stage's shards or img2dataset's output: images stay in their tars
        return [SourceItem(path, *decode_caption(txt), meta) for path, txt, meta in list_webdataset(root)]
    try:
        files = _image_files(root)
    except OSError as err:
        raise SourceError(f"data.source = {str(source)!r} cannot be read: {err}") from err
    metadata = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    captions: dict[str, tuple[str, str]] = {}
    if metadata is not None:
        if metadata.suffix == ".jsonl":
            captions = _read_jsonl(metadata)
        else:
            captions = {rel: decode_caption(raw if isinstance(raw, (str, bytes)) else None)
                        for rel, raw in _read_table(metadata)}
    items = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        if metadata is not None:
            caption, error = captions.get(rel, ("", "no_caption"))
        else:
            sidecar = path.with_suffix(".txt")
            caption, error = decode_caption(sidecar.read_bytes() if sidecar.is_file() else None)
        items[str(path)] = SourceItem(str(path), caption, error)
    for rel, (caption, error) in captions.items():  # listed in the metadata but missing on disk
        full = str(root / rel)
        if full not in items and not rel.startswith("<line"):
            items[full] = SourceItem(full, caption, error)
    if not items:
        raise SourceError(f"data.source = {str(source)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(items.values(), key=lambda it: it.path)
