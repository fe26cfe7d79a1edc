"""Robust, least-work image decoding: every input becomes the pixels a step needs, or a recorded reason.

Three decodes, each doing only what its caller needs (seed Sec. 2.1 filters first, colour only for survivors):

* :func:`decode_gray` (statistics, every image): the 8-bit gray image of the STORED pixels (no EXIF rotation, as the
  public filtering tool, which calls Pillow ``convert("RGB")`` and OpenCV ``RGB2GRAY``). For a baseline/progressive
  YCbCr or grayscale JPEG with ``gray="luma"`` this is the decoder's own luma plane (``cv2.imdecode`` with
  ``IMREAD_GRAYSCALE``: libjpeg-turbo skips the chroma IDCT, upsampling and colour conversion; the same bytes as
  Pillow's ``draft("L", size)``). JPEG luma is the JFIF BT.601 Y of the decoded colour, and differs from OpenCV's
  fixed-point ``RGB2GRAY`` of the decoded RGB by one level on some pixels; ``gray="opencv"`` decodes colour and
  converts, exactly as the tool does (figures in benchmarks/bench_curate.py). Every other format: Pillow decode,
  ``convert("RGB")``, OpenCV gray.
* :func:`decode_small` (stand-in scores of the images that passed the cheap filters): an RGB copy of about
  ``min_side`` px on the long side. JPEGs use the decoder's DCT-domain scaling (``IMREAD_REDUCED_COLOR_2/4/8``), so
  it costs a fraction of a full decode; the rest are area-downscaled from a full decode.
* :func:`decode_rgb` (bucket images of KEPT rows, learned scorers): 8-bit RGB with the EXIF orientation applied,
  optionally DCT-reduced by 2/4/8 for JPEGs.

JPEG pixels come from OpenCV's libjpeg-turbo (a numpy array straight from the decoder; Pillow's decode is the same
libjpeg-turbo, bit for bit, but its conversion to numpy costs about as much as the decode itself). Anything OpenCV
refuses goes through Pillow, which then names the problem.

Odd inputs:

* unreadable (zero bytes, truncated, text named .jpg, unknown format) -> :class:`BadImage` with reason
  ``"unreadable: <detail>"``; details never carry memory addresses or paths, so reasons are identical whichever
  process or engine decoded the file. Pillow's ``LOAD_TRUNCATED_IMAGES`` stays False (a truncated file is an error).
* decompression bombs: the DECLARED size is checked against ``max_pixels`` (``curate.max_image_pixels``) before any
  pixel is decoded -> ``"decompression_bomb"``; Pillow's own guard is set to the same value.
* EXIF orientation: read from the header; applied by :func:`decode_rgb` (bucket choice, crop, resize use the image
  as displayed), not by the statistics (the tool's stored orientation).
* CMYK through its embedded ICC profile when it has one; 16-bit (``I;16*``, ``I``) scaled by ``round(v / 257)``,
  float 0-1 or 0-255; transparency composited onto WHITE for training pixels (the statistics use Pillow's
  ``convert("RGB")`` as the tool does, which drops alpha); gray replicated to three channels.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageFile

DEFAULT_MAX_PIXELS = 200_000_000
JPEG_FAST_MODES = ("RGB", "L")
"""JPEGs that libjpeg-turbo decodes as YCbCr->RGB or gray (the OpenCV fast path); CMYK etc. go through Pillow."""
REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
KEEP_STORED = cv2.IMREAD_IGNORE_ORIENTATION
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class BadImage(Exception):
    """An input that cannot become a training image; ``reason`` is the manifest's reason string."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What the header says, before any pixel is decoded."""

    format: str           # "JPEG", "PNG", ...
    mode: str             # Pillow mode of the stored pixels
    width: int            # stored size
    height: int
    orientation: int      # EXIF orientation 1-8 (1 = as stored)

    @property
    def fast_jpeg(self) -> bool:
        return self.format == "JPEG" and self.mode in JPEG_FAST_MODES

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as displayed (orientations 5-8 swap the axes)."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def _reason(err: Exception) -> str:
    """A stable "unreadable: ..." reason: no memory address, no path, no incidental count (Pillow's "image file is
    truncated (55 bytes not processed)" becomes "... truncated")."""
    if isinstance(err, Image.UnidentifiedImageError):
        return "unreadable: not a recognised image format"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(err))
    text = re.sub(r"<_io\.\w+ object>|'[^']*/[^']*'", "<file>", text)
    text = re.sub(r"\s*\([^()]*\d[^()]*\)", "", text)
    return f"unreadable: {type(err).__name__}: {text}".strip().rstrip(":")


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
        raise BadImage(_reason(err)) from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage("decompression_bomb")
    if width <= 0 or height <= 0:
        raise BadImage(f"unreadable: invalid size {width}x{height}")
    return img


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    img = open_checked(data, max_pixels)
    try:
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    return Header(img.format or "", img.mode, img.width, img.height, orientation if 1 <= orientation <= 8 else 1)


def _pillow_load(data: bytes, max_pixels: int) -> Image.Image:
    img = open_checked(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression_bomb") from None
    except Exception as err:  # OSError("image file is truncated"), zlib errors, ...
        raise BadImage(_reason(err)) from None
    return img


def _cv_decode(data: bytes, flags: int, max_pixels: int) -> np.ndarray:
    """OpenCV decode of a JPEG; on refusal, let Pillow name the problem (or decode it)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags | KEEP_STORED)
    if arr is not None:
        return arr
    _pillow_load(data, max_pixels)  # raises BadImage with Pillow's reason
    raise BadImage("unreadable: the JPEG decoder refused the data")


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
    """Any decoded Pillow image as 8-bit RGB for TRAINING (conventions in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in HIGH_BIT_MODES:
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
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info):
        return _composite_on_white(img)
    return img.convert("RGB")


def _stats_rgb(img: Image.Image) -> Image.Image:
    """The tool's ``convert("RGB")`` for 8-bit modes; high-bit modes scaled to 8 bits first (the tool clips them)."""
    if img.mode in HIGH_BIT_MODES:
        img = _high_bit_to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_array(img: Image.Image) -> np.ndarray:
    try:
        arr = np.asarray(img)
    except Exception as err:
        raise BadImage(_reason(err)) from None
    if arr.dtype != np.uint8:
        raise BadImage(f"unreadable: unexpected decoded array {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr)


def _rgb_array(img: Image.Image, convert) -> np.ndarray:
    """``convert(img)`` as an [H, W, 3] uint8 array; any failure is a :class:`BadImage` with a stable reason."""
    try:
        out = _as_array(convert(img))
    except BadImage:
        raise
    except Exception as err:
        raise BadImage(_reason(err)) from None
    if out.ndim != 3 or out.shape[2] != 3:
        raise BadImage(f"unreadable: unexpected decoded array {out.shape}")
    return out


def decode_gray(data: bytes, header: Header, gray: str = "luma",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """``(gray, rgb_or_None)`` of the stored pixels; ``rgb`` is returned when a colour decode was needed anyway."""
    if header.fast_jpeg:
        if gray == "luma" or header.mode == "L":
            return _cv_decode(data, cv2.IMREAD_GRAYSCALE, max_pixels), None
        rgb = _cv_decode(data, cv2.IMREAD_COLOR_RGB, max_pixels)
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), rgb
    rgb = _rgb_array(_pillow_load(data, max_pixels), _stats_rgb)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), rgb


def dct_reduction(width: int, height: int, min_side: int) -> int:
    """Largest JPEG DCT scale-down factor (1, 2, 4 or 8) that keeps the long side >= ``min_side``."""
    factor = 1
    while factor < 8 and max(width, height) / (factor * 2) >= min_side:
        factor *= 2
    return factor


def area_resize(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """Area-average downscale to ``long_side`` px on the long side (unchanged when already that small)."""
    h, w = rgb.shape[:2]
    s = long_side / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def decode_small(data: bytes, header: Header, long_side: int = 512,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Stored-orientation RGB with ``long_side`` px on the long side (DCT-scaled decode for JPEGs)."""
    if header.fast_jpeg:
        factor = dct_reduction(header.width, header.height, long_side)
        flags = REDUCED_COLOR[factor] if factor > 1 else cv2.IMREAD_COLOR
        bgr = _cv_decode(data, flags, max_pixels)
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        return area_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), long_side)
    return area_resize(decode_rgb(data, header, max_pixels=max_pixels, orient=False), long_side)


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation applied to an HxW(xC) array, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        out = arr[:, ::-1]
    elif orientation == 3:
        out = arr[::-1, ::-1]
    elif orientation == 4:
        out = arr[::-1]
    elif orientation == 5:
        out = arr.swapaxes(0, 1)
    elif orientation == 6:
        out = arr.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        out = arr.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        out = arr.swapaxes(0, 1)[::-1]
    else:
        return arr
    return np.ascontiguousarray(out)


def decode_rgb(data: bytes, header: Header | None = None, reduce: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
               orient: bool = True, bgr: bool = False) -> np.ndarray:
    """HxWx3 uint8 training pixels (RGB, or BGR for OpenCV encoders), EXIF orientation applied unless ``orient`` is
    False; JPEGs DCT-reduced by ``reduce`` (1, 2, 4 or 8). Raises :class:`BadImage`."""
    header = header or read_header(data, max_pixels)
    if header.fast_jpeg:
        flags = REDUCED_COLOR[reduce] if reduce > 1 else cv2.IMREAD_COLOR
        out = _cv_decode(data, flags, max_pixels)  # BGR
        if out.ndim == 2:
            out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
        if not bgr:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    else:
        out = _rgb_array(_pillow_load(data, max_pixels), to_rgb)
        if reduce > 1:
            out = cv2.resize(out, (-(-out.shape[1] // reduce), -(-out.shape[0] // reduce)),
                             interpolation=cv2.INTER_AREA)
        if bgr:
            out = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
    return apply_orientation(out, header.orientation) if orient else out
