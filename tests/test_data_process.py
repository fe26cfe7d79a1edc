"""Pass 2 (bucket images of kept rows): DCT-reduced decode for >= 2x downscales, resize rule, crop, encoding."""
import io

import numpy as np
import pytest
from PIL import Image

from data_fixtures import exif_rotated_jpeg, jpeg_bytes, textured
from ultraflux.data import process
from ultraflux.data.decode import read_header


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def lanczos_reference(rgb: np.ndarray, box, size) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, box=box))


@pytest.mark.parametrize("width,height,size,expect_reduce,min_psnr", [
    (2000, 1500, (544, 416), 2, 33),    # 3.7x downscale: DCT 1/2, then antialiased bicubic for the remaining 0.54
    (1200, 900, (544, 416), 2, 33),     # 2.2x: DCT 1/2, then bicubic at 0.99
    (600, 450, (544, 416), 1, 33),      # 1.1x: no reduction
    (500, 380, (544, 416), 1, 30),      # upscale (<= max_upscale): bicubic; the crop starts on a whole pixel
])
def test_render_matches_a_lanczos_reference(monkeypatch, width, height, size, expect_reduce, min_psnr):
    rgb = textured(width, height, seed=width)
    data = jpeg_bytes(rgb)
    header = read_header(data)
    box = process.crop_box(width, height, *size)
    seen = {}
    real = process.decode_rgb

    def spy(*args, **kwargs):
        seen["reduce"] = kwargs.get("reduce")
        return real(*args, **kwargs)

    monkeypatch.setattr(process, "decode_rgb", spy)
    out = np.asarray(Image.open(io.BytesIO(process.render(data, header, box, size, "png", 95, 10**9))))
    assert seen["reduce"] == expect_reduce and out.shape == (size[1], size[0], 3)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert psnr(out, lanczos_reference(decoded, box, size)) > min_psnr


def test_render_applies_exif_orientation_before_the_crop():
    rgb = textured(800, 600, seed=3)  # stored landscape, displayed portrait (orientation 6)
    data = exif_rotated_jpeg(rgb, orientation=6)
    header = read_header(data)
    assert header.display_size == (600, 800)
    size = (416, 544)
    box = process.crop_box(600, 800, *size)
    out = np.asarray(Image.open(io.BytesIO(process.render(data, header, box, size, "png", 95, 10**9))))
    from PIL import ImageOps

    displayed = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert out.shape == (544, 416, 3) and psnr(out, lanczos_reference(displayed, box, size)) > 33


def test_jpeg_encoding_quality_and_determinism():
    bgr = np.ascontiguousarray(textured(320, 256, seed=5)[..., ::-1])
    q95, q50 = process.encode(bgr, "jpeg", 95), process.encode(bgr, "jpeg", 50)
    assert q95 == process.encode(bgr, "jpeg", 95) and len(q50) < len(q95)
    assert Image.open(io.BytesIO(q95)).format == "JPEG"
    png = process.encode(bgr, "png", 95)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)))[..., ::-1], bgr)  # lossless


def test_resize_rule():
    img = textured(1000, 1000, seed=6)
    assert process.resize_to(img, (1000, 1000)) is img
    mild = process.resize_to(img, (940, 940))  # >= CUBIC_MIN_SCALE: OpenCV bicubic
    import cv2

    assert np.array_equal(mild, cv2.resize(img, (940, 940), interpolation=cv2.INTER_CUBIC))
    strong = process.resize_to(img, (600, 600))  # antialiased (Pillow's bicubic filter, via torch)
    pil = np.asarray(Image.fromarray(img).resize((600, 600), Image.Resampling.BICUBIC))
    assert np.abs(strong.astype(int) - pil.astype(int)).max() <= 1
