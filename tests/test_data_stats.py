"""Flat-region detector and entropy (seed Sec. 2.1) against hand-computed values."""

import math

import numpy as np
import pytest

from ultraflux.data.stats import entropy_bits, flat_summary, is_flat, patch_flatness, patch_grid, to_gray


def test_constant_image_has_zero_sflat():
    s = patch_flatness(np.full((480, 720), 128, np.uint8))
    assert s.shape == (2, 3)
    assert np.all(s == 0)


def test_vertical_step_edge_hand_computed():
    # One 240x240 patch, left half 0, right half 100. Unnormalised 3x3 Sobel: |Ix| = 4 * 100 = 400 on the two
    # columns next to the step (120 of 240 columns -> 2 columns), 0 elsewhere, Iy = 0.
    # Magnitude m is 400 on 2 * 240 pixels of 240 * 240 -> p = 2/240; Var(m) = 400^2 p (1 - p).
    img = np.zeros((240, 240), np.uint8)
    img[:, 120:] = 100
    p = 2 / 240
    expected = 400.0**2 * p * (1 - p)
    assert patch_flatness(img)[0, 0] == pytest.approx(expected, rel=1e-6)


def test_stripes_hand_computed():
    # Period-2 stripes 0/255: both horizontal neighbours of every pixel are equal -> Ix = 0 (also at the reflect-101
    # border), Iy = 0: S_flat = 0, a Sobel blind spot.
    img = np.tile(np.array([0, 255], np.uint8), (240, 120))
    assert patch_flatness(img)[0, 0] == pytest.approx(0.0, abs=1e-9)
    # Period-4 stripes 0,0,255,255: every pixel's two horizontal neighbours differ by 255 -> |Ix| = 4 * 255 = 1020,
    # except the first and last columns, whose reflect-101 neighbours are equal (|Ix| = 0): p = 2/240 zeros,
    # Var = 1020^2 p (1 - p).
    img4 = np.tile(np.array([0, 0, 255, 255], np.uint8), (240, 60))
    p = 2 / 240
    assert patch_flatness(img4)[0, 0] == pytest.approx(1020.0**2 * p * (1 - p), rel=1e-6)


def test_noise_patch_matches_rayleigh_theory():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 20, (960, 960)), 0, 255).astype(np.uint8)
    s = patch_flatness(img)
    # gx of iid noise: sigma * sqrt(12) per component (kernel squared sum 12), magnitude Rayleigh-like with
    # Var = (4 - pi)/2 * 12 sigma^2 (components are correlated a bit, so allow 15%).
    theory = (4 - math.pi) / 2 * 12 * 20**2
    assert s.shape == (4, 4)
    assert np.median(s) == pytest.approx(theory, rel=0.15)


def test_matches_naive_reference():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    img = (rng.random((500, 730)) * 255).astype(np.uint8)
    gx = scipy_ndimage.sobel(img.astype(float), axis=1, mode="mirror")
    gy = scipy_ndimage.sobel(img.astype(float), axis=0, mode="mirror")
    mag = np.hypot(gx, gy)
    y0, x0, ph, pw, ny, nx = patch_grid(500, 730, 240)
    assert (y0, x0, ny, nx) == (10, 5, 2, 3)
    ref = mag[y0 : y0 + ny * ph, x0 : x0 + nx * pw].reshape(ny, ph, nx, pw).var(axis=(1, 3))
    np.testing.assert_allclose(patch_flatness(img), ref, rtol=1e-5)


def test_small_axis_is_one_patch():
    assert patch_flatness(np.zeros((100, 500), np.uint8)).shape == (1, 2)


def test_flat_decision_is_strictly_more_than_half():
    values = np.array([100.0, 900.0, 50.0, 1000.0])
    fraction, mean = flat_summary(values, 800)
    assert fraction == 0.5 and mean == pytest.approx(512.5)
    assert not is_flat(fraction, 0.5)
    assert is_flat(flat_summary(np.array([1.0, 2.0, 900.0]), 800)[0], 0.5)


def test_entropy_hand_values():
    assert entropy_bits(np.zeros((10, 10), np.uint8)) == 0.0
    two = np.zeros((10, 10), np.uint8)
    two[:, :5] = 200
    assert entropy_bits(two) == pytest.approx(1.0)
    uniform = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert entropy_bits(uniform) == pytest.approx(8.0)


def test_gray_is_bt601():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    assert to_gray(rgb).tolist() == [[76, 150, 29]]
