"""Robust decoding of odd inputs (issue 4, item 5)."""

import io

import numpy as np
import pytest
from PIL import Image

from data_fixtures import bomb_png, exif_rotated_jpeg, jpeg_bytes, png_bytes, textured
from ultraflux.data.decode import BadImage, decode_rgb


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(BadImage) as info:
        decode_rgb(data, **kw)
    return info.value.reason


def test_empty_truncated_and_text_are_unreadable():
    good_jpeg = jpeg_bytes(textured(300, 200))
    good_png = png_bytes(Image.fromarray(textured(300, 200)))
    assert reason_of(b"") == "unreadable: empty file"
    assert reason_of(good_jpeg[: len(good_jpeg) // 2]).startswith("unreadable: ")
    assert reason_of(good_png[: len(good_png) // 2]).startswith("unreadable: ")
    assert reason_of(b"this is plain text, not a JPEG\n" * 10).startswith("unreadable: ")


def test_decompression_bomb_by_declared_size():
    assert reason_of(bomb_png(30000, 30000)) == "decompression_bomb"
    # the limit is configurable (curate.max_image_pixels): a real 2000x1000 JPEG is a bomb under a 1 MP limit
    big = jpeg_bytes(textured(2000, 1000))
    assert reason_of(big, max_pixels=1_000_000) == "decompression_bomb"
    assert decode_rgb(big, max_pixels=2_000_000).shape == (1000, 2000, 3)


def test_exif_orientation_applied():
    arr = textured(300, 200)
    out = decode_rgb(exif_rotated_jpeg(arr, orientation=6))
    assert out.shape == (300, 200, 3)  # displayed portrait


def test_cmyk_grayscale_and_16bit():
    arr = textured(64, 48)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    out = decode_rgb(buf.getvalue())
    assert out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 12  # colours survive the round trip
    gray = png_bytes(Image.fromarray(arr[..., 0]))
    out = decode_rgb(gray)
    assert out.shape == (48, 64, 3) and np.array_equal(out[..., 0], out[..., 2])
    sixteen = np.array([[0, 257 * 128, 65535]], np.uint16)
    img16 = Image.fromarray(sixteen)
    assert img16.mode.startswith("I;16")
    assert decode_rgb(png_bytes(img16))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_and_palette_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 0  # transparent top half
    rgba[2:, :, 3] = 255
    out = decode_rgb(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[3, 0].tolist() == [200, 0, 0]
    pal = Image.fromarray(textured(32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out = decode_rgb(png_bytes(pal))
    assert out.shape == (32, 32, 3)
    opaque = Image.fromarray(textured(32, 32)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert decode_rgb(png_bytes(opaque)).shape == (32, 32, 3)
