"""Flat-region detector and entropy (seed Sec. 2.1) against hand-computed values and against an independent
per-patch computation written here the way the public filtering tool (tools/filtering_pipeline.py) writes it."""

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from data_fixtures import textured
from ultraflux.data.rule import texture_reason
from ultraflux.data.stats import entropy_bits, flat_summary, gray_counts, patch_flatness, patch_grid, to_gray


def tool_flatness(gray: np.ndarray, patch: int = 240) -> list[float]:
    """The public tool's loop: top-left grid, partial patches skipped, each patch Sobel-filtered on its own in
    float64, population variance of the magnitude."""
    out = []
    h, w = gray.shape
    for y in range(0, h, patch):
        for x in range(0, w, patch):
            p = gray[y : y + patch, x : x + patch]
            if p.shape != (patch, patch):
                continue
            sx = cv2.Sobel(p, cv2.CV_64F, 1, 0, ksize=3)
            sy = cv2.Sobel(p, cv2.CV_64F, 0, 1, ksize=3)
            out.append(float(np.sqrt(sx**2 + sy**2).var()))
    return out


def tool_flat_fraction(values: list[float], threshold: float = 800.0) -> float:
    return 0.0 if not values else sum(v < threshold for v in values) / len(values)


def jpeg_roundtrip(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def realistic_images():
    """Photos shipped with scikit-image and procedural scenes, at sizes that are and are not multiples of 240."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
              "rocket": data.rocket(), "retina": data.retina()}
    photos["retina_crop_1000x777"] = photos["retina"][:777, :1000]
    photos["landscape_730x500"] = textured(730, 500, seed=3)
    photos["landscape_1200x480"] = textured(1200, 480, seed=4)
    photos["smooth_960x720"] = cv2.resize(textured(240, 180, seed=5), (960, 720), interpolation=cv2.INTER_CUBIC)
    return {name: jpeg_roundtrip(np.ascontiguousarray(img[..., :3])) for name, img in photos.items()}


@pytest.fixture(scope="module")
def photos():
    return realistic_images()


def test_equals_the_public_tool_on_realistic_images(photos):
    sizes = set()
    for name, rgb in photos.items():
        gray = to_gray(rgb)
        ours = patch_flatness(gray)
        ref = tool_flatness(gray)
        assert ours.shape == patch_grid(*gray.shape) == (gray.shape[0] // 240, gray.shape[1] // 240), name
        np.testing.assert_allclose(ours.ravel(), ref, rtol=1e-9, atol=1e-7, err_msg=name)
        fraction, _ = flat_summary(ours, 800.0)
        assert abs(fraction - tool_flat_fraction(ref)) <= 1e-9, name
        sizes.add(gray.shape)
    assert any(h % 240 or w % 240 for h, w in sizes) and any(0 < tool_flat_fraction(tool_flatness(to_gray(p))) < 1
                                                             for p in photos.values())


def test_entropy_equals_skimage(photos):
    from skimage.measure import shannon_entropy

    for name, rgb in photos.items():
        gray = to_gray(rgb)
        assert entropy_bits(gray) == pytest.approx(float(shannon_entropy(gray)), rel=1e-12, abs=1e-12), name


def test_gray_is_opencv_of_rgb_as_the_tool():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [13, 200, 77]]], np.uint8)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    assert to_gray(rgb).tolist() == cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).tolist()  # the tool goes through BGR
    assert to_gray(rgb)[0, :3].tolist() == [76, 150, 29]


def test_each_patch_is_filtered_on_its_own():
    # Two patches side by side: flat left, a step right at the shared boundary. Filtered on its own, the left patch
    # never sees the right one (reflect-101 inside the patch): S_flat 0; a whole-image Sobel would see the step.
    img = np.zeros((240, 480), np.uint8)
    img[:, 240:] = 200
    s = patch_flatness(img)
    assert s.shape == (1, 2) and s[0, 0] == 0.0 and s[0, 1] == 0.0
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (480, 720), dtype=np.uint8)
    for (i, j), value in np.ndenumerate(patch_flatness(noisy)):
        alone = np.ascontiguousarray(noisy[i * 240 : (i + 1) * 240, j * 240 : (j + 1) * 240])
        assert value == pytest.approx(patch_flatness(alone)[0, 0], rel=1e-12)


def test_constant_image_has_zero_sflat():
    s = patch_flatness(np.full((480, 720), 128, np.uint8))
    assert s.shape == (2, 3) and np.all(s == 0)


def test_vertical_step_edge_hand_computed():
    # One 240x240 patch, left half 0, right half 100. Unnormalised 3x3 Sobel: |Ix| = 4 * 100 = 400 on the two
    # columns next to the step, 0 elsewhere, Iy = 0. m is 400 on 2 * 240 of 240 * 240 pixels -> p = 2/240;
    # Var(m) = 400^2 p (1 - p).
    img = np.zeros((240, 240), np.uint8)
    img[:, 120:] = 100
    p = 2 / 240
    assert patch_flatness(img)[0, 0] == pytest.approx(400.0**2 * p * (1 - p), rel=1e-12)


def test_stripes_hand_computed():
    # Period-2 stripes 0/255: both horizontal neighbours of every pixel are equal -> Ix = 0 (also at the reflect-101
    # border): S_flat = 0, a Sobel blind spot.
    img = np.tile(np.array([0, 255], np.uint8), (240, 120))
    assert patch_flatness(img)[0, 0] == pytest.approx(0.0, abs=1e-9)
    # Period-4 stripes 0,0,255,255: every pixel's two horizontal neighbours differ by 255 -> |Ix| = 4 * 255 = 1020,
    # except the first and last columns, whose reflect-101 neighbours are equal: p = 2/240 zeros.
    img4 = np.tile(np.array([0, 0, 255, 255], np.uint8), (240, 60))
    p = 2 / 240
    assert patch_flatness(img4)[0, 0] == pytest.approx(1020.0**2 * p * (1 - p), rel=1e-12)


def test_noise_patch_matches_rayleigh_theory():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 20, (960, 960)), 0, 255).astype(np.uint8)
    s = patch_flatness(img)
    theory = (4 - math.pi) / 2 * 12 * 20**2  # Rayleigh-like magnitude of two correlated Sobel components
    assert s.shape == (4, 4) and np.median(s) == pytest.approx(theory, rel=0.15)


def test_grid_is_top_left_and_partial_patches_are_skipped():
    assert patch_grid(500, 730) == (2, 3)
    img = np.zeros((500, 730), np.uint8)
    img[480:, :] = np.random.default_rng(1).integers(0, 256, (20, 730))  # texture only in the skipped bottom band
    img[:, 720:] = 255  # and in the skipped right band
    assert np.all(patch_flatness(img) == 0.0)


def test_no_full_patch_is_not_flat_as_in_the_tool():
    s = patch_flatness(np.zeros((100, 500), np.uint8))
    assert s.shape == (0, 2)
    fraction, mean = flat_summary(s, 800.0)
    assert fraction == 0.0 == tool_flat_fraction([]) and math.isnan(mean)
    assert texture_reason(fraction, 8.0, 0.5, 7.0) == ""


def test_flat_decision_is_strictly_more_than_half():
    values = np.array([100.0, 900.0, 50.0, 1000.0])
    fraction, mean = flat_summary(values, 800)
    assert fraction == 0.5 and mean == pytest.approx(512.5)
    assert texture_reason(fraction, 8.0, 0.5, 7.0) == ""
    assert texture_reason(flat_summary(np.array([1.0, 2.0, 900.0]), 800)[0], 8.0, 0.5, 7.0) == "flat"


def test_entropy_hand_values():
    assert entropy_bits(np.zeros((10, 10), np.uint8)) == 0.0
    two = np.zeros((10, 10), np.uint8)
    two[:, :5] = 200
    assert entropy_bits(two) == pytest.approx(1.0)
    assert entropy_bits(np.arange(256, dtype=np.uint8).reshape(16, 16)) == pytest.approx(8.0)


def test_histogram_counts_are_exact_beyond_float32():
    # 4097^2 - 4 = 16785405 pixels of one value: odd and above 2^24, so cv2.calcHist's float32 count would round it.
    gray = np.zeros((4097, 4097), np.uint8)
    gray[0, :4] = 7
    counts = gray_counts(gray)
    assert counts[0] == 4097**2 - 4 and counts[7] == 4
    assert counts.tolist() == np.bincount(gray.ravel(), minlength=256).tolist()
