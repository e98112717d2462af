"""Probe templates and correlation kernels for disk detection."""

from __future__ import annotations

import numpy as np
import pytest

from stemforge.core import ConfigurationError, DataCube, InvalidDataError, ShapeError
from stemforge.infer.disks import DetectionParams, detect_patterns
from stemforge.infer.templates import (
    center_probe,
    estimate_probe_radius,
    kernel_radius,
    make_kernel,
    probe_center,
    probe_from_datacube,
    shift_image,
    synthetic_probe,
)

SHAPE = (64, 72)  # unequal sides catch swapped axes
R = 7.0


def _com(image: np.ndarray) -> tuple[float, float]:
    m = image.sum()
    return (
        float(image.sum(axis=1) @ np.arange(image.shape[0]) / m),
        float(image.sum(axis=0) @ np.arange(image.shape[1]) / m),
    )


def test_synthetic_probe_is_a_soft_disk_of_the_given_radius():
    p = synthetic_probe(SHAPE, R)
    c = (SHAPE[0] // 2, SHAPE[1] // 2)
    assert p[c] == pytest.approx(1.0, abs=1e-6)
    # Half height exactly on the radius, 10 % / 90 % at ±1.1 edge widths (tanh profile).
    edge = synthetic_probe(SHAPE, R, edge_width=2.0)
    assert edge[c[0] + 7, c[1]] == pytest.approx(0.5)
    assert edge[c[0] + 9, c[1]] == pytest.approx((1 - np.tanh(1.0)) / 2)
    # Area of a disk with a logistic edge of scale s = w/2: π(R² + π²s²/3).
    assert p.sum() == pytest.approx(np.pi * (R**2 + np.pi**2 / 12), rel=1e-4)
    assert _com(p) == pytest.approx(c, abs=1e-9)
    off = synthetic_probe(SHAPE, R, center=(30.3, 40.7))
    assert _com(off) == pytest.approx((30.3, 40.7), abs=1e-3)


def test_estimate_probe_radius_on_probes_and_wrapped_kernels():
    for radius in (3.0, 7.0, 12.5):
        p = synthetic_probe(SHAPE, radius)
        # Counting pixel centres inside the half-height circle: the count strays from πR² by
        # a few boundary pixels (Gauss's circle problem: 149 inside r = 7, not 153.9).
        assert estimate_probe_radius(p) == pytest.approx(radius, abs=0.15)
        # The trench's inner edge pulls the pixels at r ≈ R just under half height: the
        # estimate reads ~0.2 px small, harmless for the defaults it sets.
        assert estimate_probe_radius(make_kernel(p, "trench")) == pytest.approx(radius, abs=0.3)


def test_center_probe_moves_the_centre_of_mass_to_the_middle_subpixel():
    truth = (27.37, 41.81)
    p = synthetic_probe(SHAPE, R, center=truth) * 100 + 3.0  # a flat dark level
    assert probe_center(p) == pytest.approx(truth, abs=1e-3)
    centred = center_probe(p)
    # The 1-px edge is not quite band-limited: a Fourier shift leaves ~2e-3 px of aliasing.
    assert probe_center(centred) == pytest.approx((SHAPE[0] // 2, SHAPE[1] // 2), abs=5e-3)
    # A band-limited disk is moved, not reshaped: it matches the synthetic centred disk.
    expected = synthetic_probe(SHAPE, R) * 100 + 3.0
    assert np.abs(centred - expected).max() < 1.0  # 1 % of the disk height


def test_shift_image_is_exact_for_whole_pixels():
    p = synthetic_probe(SHAPE, R)
    np.testing.assert_allclose(
        shift_image(p, (3, -5)), np.roll(p, (3, -5), axis=(0, 1)), atol=1e-12
    )


def test_probe_from_datacube_averages_and_centres_a_vacuum_region():
    rng = np.random.default_rng(0)
    beam = synthetic_probe(SHAPE, R, center=(33.4, 34.2)) * 400
    data = rng.poisson(np.broadcast_to(beam, (4, 5, *SHAPE))).astype(np.float32)
    cube = DataCube(data)
    probe = probe_from_datacube(cube, slice(0, 2), slice(1, 5))
    assert probe.shape == SHAPE
    # Eight frames of ~60 000 counts: the mean centre is known to ~1e-3 px.
    assert probe_center(probe) == pytest.approx((SHAPE[0] // 2, SHAPE[1] // 2), abs=0.02)
    assert probe.sum() == pytest.approx(beam.sum(), rel=0.01)
    single = probe_from_datacube(cube, 3, 4)
    assert single.sum() == pytest.approx(data[3, 4].sum(), rel=1e-6)
    with pytest.raises(ShapeError, match="empty"):
        probe_from_datacube(cube, slice(4, 9), slice(0, 2))


def test_plain_kernel_has_unit_sum_and_is_wrapped():
    k = make_kernel(synthetic_probe(SHAPE, R), "plain")
    assert k.shape == SHAPE
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    # Wrapped: the maximum sits on pixel (0, 0); fftshift brings the centre to (Qx//2, Qy//2).
    assert np.unravel_index(np.argmax(k), SHAPE) == (0, 0)
    assert _com(np.fft.fftshift(k)) == pytest.approx((SHAPE[0] // 2, SHAPE[1] // 2), abs=1e-9)


@pytest.mark.parametrize("mode", ["gaussian", "trench"])
def test_zero_mean_kernels_sum_to_zero_and_ignore_a_flat_background(mode):
    probe = synthetic_probe(SHAPE, R)
    k = make_kernel(probe, mode)
    assert abs(k.sum()) < 1e-12
    if mode == "trench":
        # The positive lobe is the unit-sum probe less its outer edge (~3 % of the disk
        # lies beyond R + 0.75 px), where the ring starts to dominate.
        assert 0.9 < np.clip(k, 0, None).sum() < 1.0
    # Correlating any constant gives 0.
    flat = np.fft.irfft2(np.fft.rfft2(np.full(SHAPE, 5.0)) * np.conj(np.fft.rfft2(k)), s=SHAPE)
    assert np.abs(flat).max() < 1e-12


@pytest.mark.parametrize("edge_width", [1.0, 2.0])
@pytest.mark.parametrize("radius", [3.0, 7.0, 12.5])
def test_kernel_radius_reads_the_disk_edge_of_every_mode(radius, edge_width):
    p = synthetic_probe(SHAPE, radius, edge_width)
    # Plain and edge kernels fall fastest at R; the 1-px ring binning leaves ±0.25 px.
    for kernel in (make_kernel(p, "plain"), make_kernel(p), make_kernel(p, "gaussian", 2.0)):
        assert kernel_radius(kernel) == pytest.approx(radius, abs=0.25)
    # The trench's steepest fall is from the disk's edge into the ring that starts 1.5 px
    # beyond it: up to one edge width outside R.
    assert radius <= kernel_radius(make_kernel(p, "trench")) <= radius + 1.0 * edge_width + 0.25


def test_default_kernel_is_the_disk_edge():
    """σ = 1 px ≪ R: ``P − G ∗ P ≈ −(σ²/2)∇²P``, positive just inside the edge, negative just
    outside, ~0 in the interior (the Laplacian of a flat plateau)."""
    k = np.fft.fftshift(make_kernel(synthetic_probe(SHAPE, R)))
    c = (SHAPE[0] // 2, SHAPE[1] // 2)
    profile = k[c[0], c[1] :]
    rim = profile.max()
    assert int(np.argmax(profile)) in (int(R) - 1, int(R))
    assert R <= int(np.argmin(profile)) <= R + 1.5
    # The plateau, 3 px in: the logistic edge has decayed to e^-6 there.
    assert np.abs(profile[: int(R) - 3]).max() < 0.03 * rim
    assert abs(k.sum()) < 1e-12


def test_edge_kernel_resists_an_interior_intensity_gradient():
    """Dynamical contrast makes one side of a thick-crystal disk brighter. A disk 30 % brighter
    at one edge than at its centre (1-px edge, R = 10): the plain match follows the intensity
    centroid (measured 0.51 px off), the edge kernel the edges (0.15 px)."""
    shape, radius, centre = (96, 96), 10.0, (48.3, 47.8)
    disk = synthetic_probe(shape, radius, center=centre)
    gradient = 1 + 0.3 * (np.arange(shape[0])[:, None] - centre[0]) / radius
    probe = synthetic_probe(shape, radius)
    offsets = {}
    for mode in ("plain", "gaussian"):
        params = DetectionParams(max_peaks=1)
        found = detect_patterns((disk * gradient)[None], make_kernel(probe, mode), params)
        offsets[mode] = float(np.hypot(*(found[0][0, :2] - centre)))
    assert offsets["gaussian"] < 0.2 and offsets["plain"] > 0.4


def test_trench_lies_just_outside_the_disk():
    k = np.fft.fftshift(make_kernel(synthetic_probe(SHAPE, R), "trench", trench_width=3.0))
    c = (SHAPE[0] // 2, SHAPE[1] // 2)
    profile = k[c[0], c[1] :]
    assert profile[: int(R) - 1].min() > 0  # the disk
    trough = int(np.argmin(profile))
    assert R + 1.5 <= trough <= R + 4.5  # the ring from R + 1.5 to R + 4.5
    assert np.abs(profile[int(R) + 8 :]).max() < 1e-3  # nothing beyond it


def test_make_kernel_recentres_an_off_centre_probe():
    off = synthetic_probe(SHAPE, R, center=(20.6, 50.2))
    k = make_kernel(off, "plain")
    assert _com(np.fft.fftshift(k)) == pytest.approx((SHAPE[0] // 2, SHAPE[1] // 2), abs=5e-3)


def test_bad_probes_and_options_raise_clear_errors():
    good = synthetic_probe(SHAPE, R)
    with pytest.raises(InvalidDataError, match="NaN"):
        make_kernel(np.where(good > 0.9, np.nan, good))
    with pytest.raises(InvalidDataError, match="no positive"):
        make_kernel(np.zeros(SHAPE))
    with pytest.raises(ShapeError, match="2D"):
        make_kernel(np.stack([good, good]))
    with pytest.raises(ConfigurationError, match="unknown kernel mode"):
        make_kernel(good, "sigmoid")
    with pytest.raises(ConfigurationError, match="gaussian"):
        make_kernel(good, "trench", sigma=2.0)
    with pytest.raises(ConfigurationError, match="trench"):
        make_kernel(good, "plain", trench_width=2.0)
    with pytest.raises(ConfigurationError, match="positive"):
        make_kernel(good, "gaussian", sigma=-1.0)
    with pytest.raises(ConfigurationError, match="radius"):
        synthetic_probe(SHAPE, 0.0)
    with pytest.raises(ConfigurationError, match="edge_width"):
        synthetic_probe(SHAPE, R, edge_width=0.0)
    with pytest.raises(ConfigurationError, match="DataCube"):
        probe_from_datacube(np.zeros((2, 2, *SHAPE)), 0, 0)
