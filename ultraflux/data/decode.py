"""Robust image decoding: every odd input becomes either an 8-bit RGB array or a recorded reason.

What is handled and how:

* unreadable input (zero bytes, truncated JPEG/PNG, a text file named .jpg, unknown format) raises
  :class:`BadImage` with reason ``"unreadable: <detail>"``; Pillow's ``LOAD_TRUNCATED_IMAGES`` stays False so a
  truncated file is an error, never silently grey-filled.
* decompression bombs: the DECLARED size is checked against ``max_pixels`` (``curate.max_image_pixels``, default
  200 MP = e.g. 16384x12208) before any pixel is decoded -> reason ``"decompression_bomb"``. Pillow's own guard
  (``Image.MAX_IMAGE_PIXELS``) is set to the same value, and its warning is turned into the same reason.
* EXIF orientation is applied first (``ImageOps.exif_transpose``), so sizes, crops and statistics are those of the
  image as displayed.
* CMYK is converted to sRGB through its embedded ICC profile when it has one (else Pillow's naive conversion;
  Adobe inverted CMYK is handled by Pillow's JPEG reader).
* 16-bit images (``I;16*``, ``I``) are scaled to 8 bits by ``round(v / 257)``; 48/64-bit RGB(A) PNGs are reduced to
  8 bits by Pillow itself; float images are taken as 0-1 when their maximum is <= 1, else 0-255.
* Transparency (RGBA, LA, PA, palette with a transparent index) is composited onto WHITE.
* grayscale and 1-bit images are replicated to three channels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps

DEFAULT_MAX_PIXELS = 200_000_000


class BadImage(Exception):
    """An input that cannot become a training image; ``reason`` is the manifest's reason string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
        arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255)
    else:  # I;16, I;16B, I;16L, I (a 16-bit PNG opens as one of these)
        arr8 = np.clip(arr.astype(np.float64) / 257.0, 0, 255)
    return Image.fromarray(np.round(arr8).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB (conventions in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_to_8bit(img).convert("RGB")
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if mode == "L" and "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (without decoding pixels) and check the declared size; raises :class:`BadImage`."""
    if not data:
        raise BadImage("unreadable: empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression_bomb") from None
    except Exception as err:  # UnidentifiedImageError, SyntaxError from broken headers, ...
        raise BadImage(f"unreadable: {type(err).__name__}: {err}".strip()) from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage("decompression_bomb")
    if width <= 0 or height <= 0:
        raise BadImage(f"unreadable: invalid size {width}x{height}")
    return img


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, EXIF orientation applied; raises :class:`BadImage`."""
    img = open_checked(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
            rgb = to_rgb(img)
            arr = np.asarray(rgb)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression_bomb") from None
    except Exception as err:  # OSError("image file is truncated"), zlib errors, ...
        raise BadImage(f"unreadable: {type(err).__name__}: {err}".strip()) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadImage(f"unreadable: unexpected decoded array {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)
