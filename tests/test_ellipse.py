"""Elliptical distortion from a ring, its correction, and the Q pixel size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stemforge.core import (
    Calibration,
    CalibrationError,
    ConfigurationError,
    InvalidDataError,
    ShapeError,
)
from stemforge.infer.ellipse import (
    EllipseFit,
    ellipse_correction,
    fit_ellipse_ring,
    q_pixel_size_from_ellipse,
    q_pixel_size_from_spacing,
)

SHAPE = (160, 160)
CENTRE = (83.4, 76.7)  # off the detector centre (79.5, 79.5) on purpose
RADIUS = 50.0  # ring radius in the circularised frame, px
RATIO = 1.05
THETA = math.radians(30)


def _ring(ratio=RATIO, theta=THETA, centre=CENTRE, amp=1000.0, bg=10000.0) -> np.ndarray:
    """Mean-pattern-like image: an amorphous ring with a Gaussian profile (σ = 3 px) in the
    elliptical radius, on a background decaying from the centre, both distorted alike
    (the projector distorts the whole pattern). ``a·b = RADIUS²`` and ``a/b = ratio``."""
    x = np.arange(SHAPE[0])[:, None] - centre[0]
    y = np.arange(SHAPE[1])[None, :] - centre[1]
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    rho = np.sqrt(u**2 / ratio + v**2 * ratio)
    return amp * np.exp(-((rho - RADIUS) ** 2) / 18) + bg * np.exp(-rho / 20) + 25


def test_noise_free_ring_is_recovered_exactly():
    fit = fit_ellipse_ring(_ring(), r_inner=35, r_outer=65)
    assert isinstance(fit, EllipseFit)
    # Sampling the profile on rays that follow the ellipse makes every bias common to all
    # angles; what is left is bilinear interpolation error (measured 1e-5 in a/b).
    assert fit.a / fit.b == pytest.approx(RATIO, abs=1e-4)
    assert math.degrees(fit.theta) == pytest.approx(30, abs=0.05)
    assert (fit.qx0, fit.qy0) == pytest.approx(CENTRE, abs=5e-3)
    # The background slope moves the ring maximum outward by the same fraction everywhere:
    # only the overall size is biased (by ~0.1 px here), the shape is not.
    assert math.sqrt(fit.a * fit.b) == pytest.approx(RADIUS, abs=0.3)


def test_noisy_ring_meets_the_calibration_tolerances():
    rng = np.random.default_rng(0)
    fit = fit_ellipse_ring(rng.poisson(_ring()).astype(float), r_inner=35, r_outer=65)
    # Noise budget: on each ray the windowed centroid has σ_r ≈ √(Σ I (ρ - ρ_c)²) / Σ(I - bg)
    # ≈ 0.09 px (ring 1000 counts over ~850 background, window ±7.5 px); ~2πR = 314
    # independent rays give the cos 2φ amplitude to σ_r·√(2/314) = 7e-3 px, so
    # σ(a/b) ≈ 2·7e-3/R = 3e-4, σ(θ) ≈ 7e-3/(a - b) = 0.17°, σ(centre) ≈ 7e-3 px
    # (40 noise draws measured 3.2e-4, 0.17°, 0.009 px). The required a/b ± 0.002, θ ± 1°
    # and centre ± 0.1 px are thus 6σ, 6σ and > 10σ.
    assert fit.a / fit.b == pytest.approx(RATIO, abs=0.002)
    assert math.degrees(fit.theta) == pytest.approx(30, abs=1.0)
    assert math.hypot(fit.qx0 - CENTRE[0], fit.qy0 - CENTRE[1]) < 0.1
    # It also starts from a given centre 3 px off and from a negative angle convention.
    off = fit_ellipse_ring(_ring(theta=-THETA), (CENTRE[0] - 3, CENTRE[1] + 2), r_inner=35, r_outer=65)
    assert math.degrees(off.theta) == pytest.approx(-30, abs=0.05)


def test_circle_gives_unit_ratio_and_angles_wrap():
    rng = np.random.default_rng(1)
    fit = fit_ellipse_ring(rng.poisson(_ring(ratio=1.0)).astype(float), r_inner=35, r_outer=65)
    assert fit.a >= fit.b
    assert fit.a / fit.b == pytest.approx(1.0, abs=0.002)  # same noise budget as above
    # θ = 100° is the same ellipse as θ = -80°: reported in (-90°, 90°].
    wrapped = fit_ellipse_ring(_ring(theta=math.radians(100)), r_inner=35, r_outer=65)
    assert math.degrees(wrapped.theta) == pytest.approx(-80, abs=0.05)
    # At θ = 90° itself either end of the interval may come out, by rounding.
    vertical = fit_ellipse_ring(_ring(theta=math.radians(90)), r_inner=35, r_outer=65)
    assert -math.pi / 2 < vertical.theta <= math.pi / 2
    assert abs(math.degrees(vertical.theta)) == pytest.approx(90, abs=0.05)


def test_masked_beam_stop_is_ignored():
    image = _ring()
    mask = np.ones(SHAPE, bool)
    mask[:84, 70:84] = False  # a beam-stop arm over the ring, from the edge to the centre
    image[~mask] = 0
    fit = fit_ellipse_ring(image, r_inner=35, r_outer=65, mask=mask)
    assert fit.a / fit.b == pytest.approx(RATIO, abs=1e-4)
    assert math.degrees(fit.theta) == pytest.approx(30, abs=0.1)
    assert (fit.qx0, fit.qy0) == pytest.approx(CENTRE, abs=0.01)


def test_correction_maps_the_ring_onto_a_circle():
    a, b = RADIUS * math.sqrt(RATIO), RADIUS / math.sqrt(RATIO)
    t = np.linspace(0, 2 * np.pi, 361)
    qx = CENTRE[0] + a * np.cos(t) * math.cos(THETA) - b * np.sin(t) * math.sin(THETA)
    qy = CENTRE[1] + a * np.cos(t) * math.sin(THETA) + b * np.sin(t) * math.cos(THETA)
    cx, cy = ellipse_correction(qx, qy, CENTRE, a, b, THETA)
    # The b axis is stretched to a; the a axis and the centre stay put.
    assert np.allclose(np.hypot(cx - CENTRE[0], cy - CENTRE[1]), a, rtol=1e-12)
    assert (cx[0], cy[0]) == pytest.approx((qx[0], qy[0]), abs=1e-12)
    assert ellipse_correction(CENTRE[0], CENTRE[1], CENTRE, a, b, THETA) == pytest.approx(CENTRE)
    # With the ellipse fitted on the noisy image, the ring comes out round to the fit's
    # a/b accuracy (radius spread ≤ (Δ(a/b))·R ≈ 0.1 px).
    fit = fit_ellipse_ring(np.random.default_rng(2).poisson(_ring()).astype(float), r_inner=35, r_outer=65)
    fx, fy = ellipse_correction(qx, qy, (fit.qx0, fit.qy0), fit.a, fit.b, fit.theta)
    radius = np.hypot(fx - fit.qx0, fy - fit.qy0)
    assert np.ptp(radius) / radius.mean() < 0.002
    # The fit is what Calibration stores.
    assert Calibration(ellipse=fit[2:]).ellipse == pytest.approx(fit[2:])


def test_q_pixel_size_from_a_known_spacing():
    # Si {111}, d = 3.1355 Å, on a ring of 50 px: 1/(3.1355·50) Å⁻¹ per pixel.
    assert q_pixel_size_from_spacing(50, 3.1355) == pytest.approx(1 / 156.775)
    fit = EllipseFit(80.0, 80.0, 52.0, 48.0, 0.3)
    assert q_pixel_size_from_ellipse(fit, 2.0) == pytest.approx(1 / 104)  # uses a
    for bad in (0, -3.0, math.nan, math.inf, "50"):
        with pytest.raises(CalibrationError, match="radius_px"):
            q_pixel_size_from_spacing(bad, 2.0)
        with pytest.raises(CalibrationError, match="d_spacing"):
            q_pixel_size_from_spacing(50, bad)
    with pytest.raises(CalibrationError, match="semi-axis"):
        q_pixel_size_from_ellipse(EllipseFit(0, 0, -1.0, 1.0, 0), 2.0)
    with pytest.raises(CalibrationError):
        ellipse_correction(0, 0, (0, 0), 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"image": np.ones((4, 8, 8))}, ShapeError, "2D image"),
        ({"image": np.full((8, 8), np.nan)}, InvalidDataError, "NaN"),
        ({"r_inner": 40, "r_outer": 40}, ConfigurationError, "annulus"),
        ({"r_inner": 50, "r_outer": 40}, ConfigurationError, "annulus"),
        ({"r_inner": -5}, ConfigurationError, "r_inner"),
        ({"r_outer": math.nan}, ConfigurationError, "r_outer"),
        ({"r_inner": 200, "r_outer": 230}, InvalidDataError, "no ring"),  # outside the image
        ({"image": np.ones(SHAPE)}, InvalidDataError, "no ring"),  # flat
        ({"mask": np.ones((8, 8), bool)}, ShapeError, "mask"),
        ({"center": (math.nan, 3.0)}, ConfigurationError, "center"),
        ({"center": (1.0, 2.0, 3.0)}, ConfigurationError, "center"),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    args = {"image": _ring(), "r_inner": 35, "r_outer": 65} | kwargs
    with pytest.raises(error, match=words) as info:
        fit_ellipse_ring(args.pop("image"), **args)
    assert info.value.fix
