"""Bragg vector map: bilinear deposition, origin centring, upsampling, ellipse round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stemforge.core import ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.bragg_vector_map import bragg_vector_map
from stemforge.infer.ellipse import fit_ellipse_ring

SHAPE = (128, 96)


def _centroid(image: np.ndarray) -> tuple[float, float]:
    total = image.sum()
    return (
        float(image.sum(axis=1) @ np.arange(image.shape[0]) / total),
        float(image.sum(axis=0) @ np.arange(image.shape[1]) / total),
    )


@pytest.mark.parametrize("sampling", [1, 2, 4])
def test_single_peak_keeps_its_intensity_and_subpixel_position(sampling):
    bvm = bragg_vector_map([40.3], [61.77], [2.5], SHAPE, sampling=sampling)
    assert bvm.shape == (SHAPE[0] * sampling, SHAPE[1] * sampling)
    # Bilinear weights sum to 1 and have first moment equal to the position: both exact.
    assert bvm.sum() == pytest.approx(2.5, rel=1e-12)
    assert np.count_nonzero(bvm) == 4
    cx, cy = _centroid(bvm)
    assert (cx / sampling, cy / sampling) == pytest.approx((40.3, 61.77), abs=1e-10)
    # A peak on a pixel centre goes to that one pixel.
    on_grid = bragg_vector_map([10.0], [20.0], [1.0], SHAPE, sampling=sampling)
    assert on_grid[10 * sampling, 20 * sampling] == 1.0 and on_grid.sum() == 1.0


def test_many_peaks_conserve_intensity_and_drop_the_outside():
    rng = np.random.default_rng(0)
    qx = rng.uniform(0, SHAPE[0] - 1, 5000)
    qy = rng.uniform(0, SHAPE[1] - 1, 5000)
    w = rng.uniform(0.1, 3.0, 5000)
    bvm = bragg_vector_map(qx, qy, w, SHAPE)
    assert bvm.sum() == pytest.approx(w.sum(), rel=1e-12)
    mean = (np.average(qx, weights=w), np.average(qy, weights=w))
    assert _centroid(bvm) == pytest.approx(mean, abs=1e-9)
    fine = bragg_vector_map(qx, qy, w, SHAPE, sampling=2)
    assert np.divide(_centroid(fine), 2) == pytest.approx(mean, abs=1e-9)
    # A peak half a pixel beyond the last row keeps only its on-map half.
    edge = bragg_vector_map([SHAPE[0] - 0.5], [10.0], [1.0], SHAPE)
    assert edge.sum() == pytest.approx(0.5)
    assert bragg_vector_map([-5.0, 500.0], [3.0, 3.0], 1.0, SHAPE).sum() == 0


def test_origins_land_on_the_map_centre():
    rng = np.random.default_rng(1)
    qx0 = 60 + rng.uniform(-4, 4, 200)  # descan: the origin wanders from pattern to pattern
    qy0 = 50 + rng.uniform(-4, 4, 200)
    # The unscattered beam of every pattern, plus one reflection at +(10.25, -7.5) from it.
    qx = np.concatenate([qx0, qx0 + 10.25])
    qy = np.concatenate([qy0, qy0 - 7.5])
    origin = np.tile(qx0, 2), np.tile(qy0, 2)
    bvm = bragg_vector_map(qx, qy, 1.0, SHAPE, *origin, sampling=2)
    centre = (SHAPE[0] // 2, SHAPE[1] // 2)
    assert bvm[2 * centre[0], 2 * centre[1]] == pytest.approx(200)  # one sharp spot
    spot = bvm[2 * (centre[0] + 10) : 2 * (centre[0] + 11) + 1, 2 * (centre[1] - 8) : 2 * (centre[1] - 7) + 1]
    assert spot.sum() == pytest.approx(200)
    assert np.count_nonzero(bvm) == 1 + 2  # 10.25·2 = 20.5 and -7.5·2 = -15: two pixels


def test_peaks_on_an_ellipse_give_the_ellipse_back():
    rng = np.random.default_rng(2)
    n = 10000  # a polycrystalline ring: peaks at random angles, per-pattern origins
    a, b, theta = 42 * math.sqrt(1.05), 42 / math.sqrt(1.05), math.radians(-25)
    t = rng.uniform(0, 2 * np.pi, n)
    u, v = a * np.cos(t), b * np.sin(t)
    r = 1 + 0.2 / 42 * rng.standard_normal(n)  # 0.2 px radial scatter of peak positions
    qx0 = 60 + rng.uniform(-3, 3, n)
    qy0 = 50 + rng.uniform(-3, 3, n)
    qx = qx0 + r * (u * math.cos(theta) - v * math.sin(theta))
    qy = qy0 + r * (u * math.sin(theta) + v * math.cos(theta))
    sampling = 2
    bvm = bragg_vector_map(qx, qy, rng.uniform(0.5, 1.5, n), SHAPE, qx0, qy0, sampling=sampling)
    fit = fit_ellipse_ring(bvm, r_inner=30 * sampling, r_outer=54 * sampling)
    # The cos 2φ amplitude of the ring radius is known to ~0.2·√(2/n) = 3e-3 px from the
    # scatter, to which the uneven angular coverage of random peaks adds as much: over 20
    # seeds σ(a/b) = 1.9e-4, σ(θ) = 0.13°, σ(centre) = 0.003 px (means within 1σ of zero).
    # The calibration tolerances a/b ± 0.002, θ ± 1°, centre ± 0.1 px are ≥ 8σ.
    assert fit.a / fit.b == pytest.approx(a / b, abs=0.002)
    assert math.degrees(fit.theta) == pytest.approx(-25, abs=1.0)
    assert fit.qx0 / sampling == pytest.approx(SHAPE[0] // 2, abs=0.1)
    assert fit.qy0 / sampling == pytest.approx(SHAPE[1] // 2, abs=0.1)
    assert math.sqrt(fit.a * fit.b) / sampling == pytest.approx(42, abs=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"qy": [1.0, 2.0, 3.0]}, ShapeError, "qx and qy"),
        ({"intensity": [1.0, 2.0, 3.0]}, ShapeError, "intensity"),
        ({"qx": [1.0, math.nan]}, InvalidDataError, "qx"),
        ({"shape": (128,)}, ShapeError, "shape"),
        ({"shape": (0, 96)}, ShapeError, "shape"),
        ({"sampling": 1.5}, ConfigurationError, "sampling"),
        ({"sampling": 0}, ConfigurationError, "sampling"),
        ({"qx0": 3.0}, ConfigurationError, "qx0"),
        ({"qx0": [1.0, 2.0, 3.0], "qy0": 1.0}, ShapeError, "qx0"),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    args = {"qx": [1.0, 2.0], "qy": [3.0, 4.0], "intensity": [1.0, 1.0], "shape": SHAPE} | kwargs
    with pytest.raises(error, match=words) as info:
        bragg_vector_map(**args)
    assert info.value.fix
