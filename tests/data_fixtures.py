"""Helpers (no tests) that build odd and broken inputs for the other tests/test_data_*.py files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ultraflux.data import synthetic


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A textured RGB scene that passes the flat and entropy filters."""
    spec = {"kind": "landscape", "scene": "landscape", "aspect": width / height, "palette": "alpine", "sky": "noon",
            "seed": [seed, 1]}
    img = synthetic.render(spec, max(width, height))
    return np.ascontiguousarray(img[:height, :width])


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header declares width x height (1-bit gray) with a tiny, zero-filled first row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def write(path: Path, data: bytes, caption: bytes | None = b"A test caption.") -> Path:
    path.write_bytes(data)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption)
    return path
