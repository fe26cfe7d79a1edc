"""Robust decoding of odd inputs (issue 4, item 5)."""

import io

import cv2
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


def test_exif_orientations_match_pillow():
    from PIL import ImageOps

    from ultraflux.data.decode import apply_orientation, read_header

    arr = textured(60, 40)
    for orientation in range(1, 9):
        data = exif_rotated_jpeg(arr, orientation=orientation)
        header = read_header(data)
        assert header.orientation == orientation
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert np.array_equal(decode_rgb(data), expected), orientation
        assert header.display_size == expected.shape[1::-1]
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(apply_orientation(stored, orientation), expected)


def test_gray_decodes_use_stored_pixels_and_match_the_tool():
    from ultraflux.data.decode import decode_gray, read_header

    data = exif_rotated_jpeg(textured(300, 200, seed=3), orientation=6)
    header = read_header(data)
    tool_rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the tool: no exif_transpose
    tool_gray = cv2.cvtColor(cv2.cvtColor(tool_rgb, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2GRAY)
    exact, rgb = decode_gray(data, header, "opencv")
    assert np.array_equal(exact, tool_gray) and np.array_equal(rgb, tool_rgb)
    luma, none = decode_gray(data, header, "luma")
    pil = Image.open(io.BytesIO(data))
    pil.draft("L", pil.size)  # Pillow's luma-only JPEG decode
    assert none is None and np.array_equal(luma, np.asarray(pil))
    diff = np.abs(luma.astype(int) - tool_gray)
    # JPEG Y vs OpenCV's gray of the decoded (clipped, rounded) RGB: mostly 0 or 1 level; more where RGB clips.
    assert luma.shape == (200, 300) and diff.mean() < 0.5 and (diff <= 1).mean() > 0.95
    png = png_bytes(Image.fromarray(tool_rgb))
    gray, _ = decode_gray(png, read_header(png), "luma")  # not a JPEG: always OpenCV's gray of the RGB
    assert np.array_equal(gray, tool_gray)


def test_small_and_reduced_decodes():
    from ultraflux.data.decode import area_resize, decode_small, read_header

    arr = textured(2048, 1536, seed=4)
    data = jpeg_bytes(arr)
    header = read_header(data)
    small = decode_small(data, header, 512)  # DCT 1/4 decode: already 512 px
    assert small.shape == (384, 512, 3)
    full = area_resize(decode_rgb(data), 512)
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 1.5
    half = decode_rgb(data, header, reduce=2)
    assert half.shape == (768, 1024, 3)


def test_reasons_are_stable_strings():
    reason = reason_of(b"GIF89a not really" * 3)
    assert "0x" not in reason and reason.startswith("unreadable: ")
    assert reason_of(b"\x00" * 100) == "unreadable: not a recognised image format"
