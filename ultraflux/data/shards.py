"""The curated dataset on disk: WebDataset tar shards, and random access to one image through the manifest.

Layout (``outputs/curated``): ``shards/<split>-<n:06d>.tar``. Every sample is one ``key`` with up to three members,
consecutive in the tar, as WebDataset expects (``<key>.jpg`` | ``<key>.png``, ``<key>.txt`` the caption,
``<key>.json`` its manifest row): any WebDataset / img2dataset reader streams the shards as they are. A shard rolls
over at ``max_bytes`` or ``max_count`` samples, so a million images are a few hundred files for DVC, not a million.

Shards are byte-reproducible: members are written in the order given, with fixed metadata (mtime 0, uid/gid 0, no
user or group names, mode 0644, USTAR format). The writer is single-process; workers encode images in parallel and
hand over bytes, so the local and the Ray engine produce identical shards.

Random access: the manifest row of a kept image holds ``shard`` (path relative to the curated folder), ``key``,
``offset`` and ``nbytes`` (the image member's data inside the tar), so :func:`read_image_bytes` is one seek and one
read: training, evaluation and the report never scan a shard nor hold the dataset in memory. Rows of the older
layout (one file per image, ``image`` column) are still read.
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

SHARD_DIR = "shards"
IMAGE_EXTENSIONS = ("jpg", "png", "webp")


@dataclass(frozen=True)
class Location:
    """Where one sample's image lives: ``shard`` relative to the curated folder, byte range of the image data."""

    shard: str
    key: str
    offset: int
    nbytes: int


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Append samples to ``<directory>/<prefix>-<n:06d>.tar``, opening a new shard at ``max_bytes`` / ``max_count``.

    ``write(key, {"jpg": bytes, "txt": bytes, "json": bytes})`` returns the image's :class:`Location`. Each shard is
    written to a temporary name and renamed when it is complete (``close`` or roll-over), so a killed run never
    leaves a truncated shard under a final name; an exception inside ``with`` (e.g. a full disk) removes the shard
    being written (:meth:`abort`) instead of completing it. ``current`` is the shard being written.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, root: str | os.PathLike,
                 max_bytes: int = 1 << 30, max_count: int = 10_000):
        self.dir, self.prefix, self.root = Path(directory), prefix, Path(root)
        self.max_bytes, self.max_count = int(max_bytes), int(max_count)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index, self.count, self._tar, self._fh, self._path = -1, 0, None, None, None
        self.paths: list[Path] = []

    def _open_next(self) -> None:
        self._finish()
        self.index += 1
        self._path = self.dir / f"{self.prefix}-{self.index:06d}.tar"
        self._fh = open(self._path.with_name(self._path.name + ".tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self.paths.append(self._path)
        self._tar = self._fh = None

    def write(self, key: str, files: Mapping[str, bytes]) -> Location:
        size = sum(len(v) for v in files.values())
        if self._tar is None or self.count >= self.max_count or (
                self.count and self._fh.tell() + size > self.max_bytes):
            self._open_next()
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if image_ext is None:
            raise ValueError(f"sample {key!r} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
        location = None
        for ext, data in files.items():
            header_at = self._tar.offset
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
            if ext == image_ext:   # USTAR: the data follows one 512-byte header block
                location = Location(self._path.relative_to(self.root).as_posix(), key, header_at + tarfile.BLOCKSIZE,
                                    len(data))
        self.count += 1
        return location

    @property
    def current(self) -> Path:
        return self._path or self.dir

    def close(self) -> list[Path]:
        self._finish()
        return self.paths

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); the shards completed before it stay."""
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk may refuse the buffered rest too
                self._fh.close()
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)
        self._tar = self._fh = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_image_bytes(curated_dir: str | os.PathLike, row: Mapping) -> bytes:
    """The encoded image of one manifest row (one seek + one read); older rows name a file in ``image``."""
    if row.get("shard"):
        with open(Path(curated_dir) / row["shard"], "rb") as fh:
            fh.seek(int(row["offset"]))
            data = fh.read(int(row["nbytes"]))
        if len(data) != int(row["nbytes"]):
            raise OSError(f"{row['shard']}: truncated at key {row.get('key')!r}")
        return data
    if row.get("image"):
        return (Path(curated_dir) / row["image"]).read_bytes()
    raise ValueError(f"manifest row {row.get('id')!r} has no image (rejected: {row.get('reason')!r})")


def open_image(curated_dir: str | os.PathLike, row: Mapping):
    """The curated image of ``row`` as an RGB ``PIL.Image`` (bucket size)."""
    from PIL import Image

    im = Image.open(io.BytesIO(read_image_bytes(curated_dir, row)))
    return im.convert("RGB")


def load_image_array(curated_dir: str | os.PathLike, row: Mapping) -> np.ndarray:
    """HxWx3 uint8 RGB array of ``row``'s curated image."""
    return np.asarray(open_image(curated_dir, row))


def load_image_tensor(curated_dir: str | os.PathLike, row: Mapping):
    """Float tensor [3, H, W] in [-1, 1] of ``row``'s curated image (the VAE's input range)."""
    import torch

    arr = np.asarray(open_image(curated_dir, row), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream one shard as ``(key, {ext: bytes})`` in file order (what a WebDataset reader yields)."""
    key, sample = None, {}
    with tarfile.open(path, mode="r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if key is not None and stem != key:
                yield key, sample
                sample = {}
            key = stem
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample
