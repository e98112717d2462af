"""Bragg disk detection by Fourier-space correlation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from stemforge.core import ConfigurationError, DataCube, InvalidDataError, ShapeError
from stemforge.infer.disks import (
    DetectionParams,
    correlate,
    detect_patterns,
    find_bragg_disks,
    find_peaks,
    kernel_spectrum,
    refine_dft,
    refine_gaussian,
    refine_parabolic,
)
from stemforge.infer.origin import synthetic_disk
from stemforge.infer.templates import make_kernel, synthetic_probe
from stemforge.simulate.labels import TARGET_SIGMA, render_target

SHAPE = (64, 64)
R = 5.0
G = np.array([[17.0, 3.0], [-4.0, 18.0]])  # two Bragg vectors, px


# ---- analytic disks ---------------------------------------------------------------------
def _disks(centres, amplitudes, shape=SHAPE, radius=R, hard=False) -> np.ndarray:
    p = np.zeros(shape)
    for c, a in zip(centres, amplitudes, strict=True):
        disk = synthetic_disk(shape, tuple(c), radius, 16) if hard else None
        p += a * (disk if hard else synthetic_probe(shape, radius, center=tuple(c)))
    return p


def _lattice(seed: int, n: int, hard: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` patterns: a direct beam and ±g disks at 0.3 of it, random subpixel origin."""
    rng = np.random.default_rng(seed)
    origins = np.array(SHAPE) / 2 + rng.uniform(-2, 2, (n, 2))
    steps = np.array([[0, 0], G[0], -G[0], G[1], -G[1]])
    truth = origins[:, None, :] + steps[None]
    amps = [1.0, 0.3, 0.3, 0.3, 0.3]
    return np.stack([_disks(t, amps, hard=hard) for t in truth]), truth


def _errors(found: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Distance from each true disk to the nearest detected peak, (n, k)."""
    return np.array(
        [[np.hypot(*(f[:, :2] - c).T).min() for c in t] for f, t in zip(found, truth, strict=True)]
    )


# DFT error bounds, px, soft / hard edge. Plain kernel: the parabola misfits the rounded cone
# of a disk correlation (measured 0.007 / 0.012 px), the DFT evaluates the exact interpolant
# (3e-4 px; 0.003 px where the pixel-sampled hard edge aliases). The default edge kernel
# passes more of the near-Nyquist band where that aliasing lives (measured 0.0022 / 0.0059
# px; the parabola 0.018 / 0.025 px on its sharper peak).
SUBPIXEL_CASES = [("plain", 0.001, 0.008), ("gaussian", 0.003, 0.008)]


@pytest.mark.parametrize("hard", [False, True], ids=["soft-edge", "hard-edge"])
@pytest.mark.parametrize(
    ("mode", "soft_bound", "hard_bound"), SUBPIXEL_CASES, ids=["plain", "edge"]
)
def test_subpixel_positions_of_analytic_disks(hard, mode, soft_bound, hard_bound):
    stack, truth = _lattice(0, 12, hard)
    probe = synthetic_disk(SHAPE, (32, 32), R, 16) if hard else synthetic_probe(SHAPE, R)
    kernel = make_kernel(probe, mode)
    err = {}
    for method in ("parabolic", "dft"):
        params = DetectionParams(subpixel=method)
        found = detect_patterns(stack, kernel, params, "numpy")
        assert [len(f) for f in found] == [5] * len(stack)
        err[method] = _errors(found, truth)
        assert err[method].max() < 0.1
    assert err["dft"].max() < 0.5 * err["parabolic"].max()
    assert err["dft"].max() < (hard_bound if hard else soft_bound)


def test_pure_kernels_chain_to_the_same_result_as_detect_patterns():
    stack, _ = _lattice(1, 4)
    kernel = make_kernel(synthetic_probe(SHAPE, R), "trench")
    params = DetectionParams().resolved(R)
    corr, spec = correlate(stack, kernel_spectrum(kernel, SHAPE), params.exponent, params.sigma)
    peaks = find_peaks(corr, params)
    for method, refined in (
        ("parabolic", refine_parabolic(corr, peaks)),
        ("dft", refine_dft(spec, SHAPE, peaks, params.upsample)),
        ("gaussian", refine_gaussian(corr, peaks)),
    ):
        direct = detect_patterns(stack, kernel, DetectionParams(subpixel=method), "numpy")
        for a, b in zip(refined, direct, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # Integer peaks are maxima of the correlation itself, strongest first.
    for c, p in zip(corr, peaks, strict=True):
        i, j = p[:, :2].astype(int).T
        np.testing.assert_array_equal(p[:, 2], c[i, j])
        assert np.all(np.diff(p[:, 2]) <= 0)


def test_gaussian_refinement_places_sampled_gaussians_exactly():
    """FCU-Net draws Gaussians of 0.75 px sampled at pixel centres: a Gaussian through the
    maximum and its neighbours recovers any sub-pixel position, where the band-limited DFT
    interpolation of so narrow a peak misplaces it with the sub-pixel phase (measured up to
    0.097 px here)."""
    rng = np.random.default_rng(3)
    centres = np.array([[16.0, 16.0], [16.0, 48.0], [48.0, 16.0], [48.0, 48.0]])
    truth = centres[None] + rng.uniform(-0.5, 0.5, (8, 4, 2))
    heights = np.array([1.0, 0.5, 0.1, 0.02])
    images = np.stack([render_target(t, heights, 64, TARGET_SIGMA) for t in truth])
    params = DetectionParams(sigma=0, min_spacing=3, edge=2, min_relative_intensity=0.005)
    peaks = find_peaks(images, params)
    gaussian = refine_gaussian(images, peaks)
    dft = refine_dft(np.fft.rfft2(images), images.shape[1:], peaks, 16)
    assert _errors(gaussian, truth).max() < 1e-4
    for table in gaussian:
        np.testing.assert_allclose(np.sort(table[:, 2]), np.sort(heights), rtol=1e-4)
    assert _errors(dft, truth).max() > 0.05


# ---- thresholds ---------------------------------------------------------------------------
def test_a_small_cell_keeps_all_its_disks_by_default():
    """A 128² pattern of a 12×12 grid of small disks (a small cell, as the FCU-Net benchmark
    holds): 144 disks, all found with the default cap, and the strongest 100 with 100."""
    spots = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    centres = 9.5 + 10.0 * spots + 0.1 * spots[:, ::-1]
    amps = np.linspace(1.0, 0.05, len(centres))
    pattern = _disks(centres, amps, (128, 128), 2.5)
    kernel = make_kernel(synthetic_probe((128, 128), 2.5), "plain")
    found = detect_patterns(pattern[None], kernel, DetectionParams(), "numpy")[0]
    # 0.027 px measured: at 10 px spacing the neighbours' correlation tails pull each peak
    assert len(found) == len(centres) and _errors([found], centres[None]).max() < 0.04
    capped = detect_patterns(pattern[None], kernel, DetectionParams(max_peaks=100), "numpy")[0]
    assert len(capped) == 100 and capped[:, 2].min() >= np.sort(found[:, 2])[-100]


BIG = (96, 96)
PEAKS = np.array([[48.0, 48.0], [48.0, 20.0], [20.0, 48.0], [76.0, 48.0], [48.0, 76.0]])
AMPS = [1.0, 0.5, 0.2, 0.05, 0.01]


def _found(pattern: np.ndarray, **options) -> np.ndarray:
    kernel = make_kernel(synthetic_probe(BIG, 4.0), "plain")
    params = DetectionParams(subpixel="none", **options)
    return detect_patterns(pattern[None], kernel, params, "numpy")[0]


def _amplitudes_found(found: np.ndarray) -> list[float]:
    """The amplitude of the true disk under each found peak, in detection order."""
    return [AMPS[int(np.argmin(np.hypot(*(PEAKS - f[:2]).T)))] for f in found]


def test_intensity_thresholds_and_max_peaks():
    pattern = _disks(PEAKS, AMPS, BIG, 4.0)
    assert _amplitudes_found(_found(pattern)) == AMPS  # 0.005 of the brightest keeps all
    assert _amplitudes_found(_found(pattern, max_peaks=2)) == [1.0, 0.5]
    assert _amplitudes_found(_found(pattern, min_relative_intensity=0.3)) == [1.0, 0.5]
    # Relative to the second brightest (0.5): 0.3 of it keeps the 0.2 disk.
    found = _found(pattern, min_relative_intensity=0.3, relative_to_peak=1)
    assert _amplitudes_found(found) == [1.0, 0.5, 0.2]
    # Cross-correlation is linear: heights in proportion to the disk amplitudes, unsmoothed
    # ΣP²/ΣP for a unit-height probe P (0.76 for R = 4 with its 1-px edge).
    heights = _found(pattern)[:, 2]
    np.testing.assert_allclose(heights / AMPS, heights[0], rtol=1e-6)
    probe = synthetic_probe(BIG, 4.0)
    top = _found(pattern, sigma=0.0)[0, 2]
    assert top == pytest.approx((probe**2).sum() / probe.sum(), rel=1e-9)
    found = _found(pattern, min_absolute_intensity=0.1)
    assert _amplitudes_found(found) == [1.0, 0.5, 0.2]


def test_edge_margin():
    pattern = _disks([[48, 48], [48, 6.0]], [1.0, 0.5], BIG, 4.0)
    assert len(_found(pattern, edge=3)) == 2
    # The disk at qy = 6 is 6.5 px from the detector's outer boundary (pixel 0 spans ±0.5).
    assert len(_found(pattern, edge=6.5)) == 2
    assert len(_found(pattern, edge=6.6)) == 1
    assert len(_found(pattern)) == 2  # default edge = probe radius + 1 ≈ 5


def test_edge_margin_applies_to_refined_positions():
    """At qy = 5.8 the integer maximum (pixel 6, 6.5 px in) passes a 6.4 px margin, the
    refined position (6.3 px in) does not: a disk is kept only if its centre is inside."""
    pattern = _disks([[48, 48], [48, 5.8]], [1.0, 0.5], BIG, 4.0)
    kernel = make_kernel(synthetic_probe(BIG, 4.0))
    for method, n in (("none", 2), ("parabolic", 1), ("dft", 1)):
        found = detect_patterns(pattern[None], kernel, DetectionParams(edge=6.4, subpixel=method))
        assert len(found[0]) == n, method


def test_min_spacing_drops_weaker_neighbours_greedily():
    # A (1.0) - 14 px - B (0.6) - 14 px - C (0.4): B falls to A; C is 28 px from A and
    # stays, although it was within reach of the (dropped) B.
    centres = [[48, 20.0], [48, 34.0], [48, 48.0]]
    pattern = _disks(centres, [1.0, 0.6, 0.4], BIG, 4.0)
    assert len(_found(pattern, min_spacing=5)) == 3
    found = _found(pattern, min_spacing=16)
    np.testing.assert_array_equal(found[:, :2], [[48, 20], [48, 48]])


def test_default_spacing_drops_noise_maxima_on_a_disk_skirt():
    """The edge kernel's correlation of a disk, ``−∇²`` of its autocorrelation, has a positive
    skirt out to √2 R falling as 1/s; counting noise there makes maxima that a spacing of R
    lets through and the default 1.5 R does not. A direct beam and a disk at 5 % of it, 4 R
    away, 30 electrons per direct-beam pixel: the weak disk holds ~170 electrons."""
    radius = 6.0
    centres = np.array([[48.0, 48.0], [48.0, 48.0 + 4 * radius]])
    pattern = _disks(centres, [1.0, 0.05], BIG, radius)
    stack = np.random.default_rng(0).poisson(pattern * 30, (32, *BIG)).astype(float)
    kernel = make_kernel(synthetic_probe(BIG, radius))

    def skirt_and_weak(params: DetectionParams) -> tuple[float, float]:
        found = detect_patterns(stack, kernel, params, "numpy")
        # Distance of every peak to the nearer disk.
        d = [np.linalg.norm(f[:, None, :2] - centres, axis=-1).min(axis=1) for f in found]
        skirt = np.mean([((x > 0.5 * radius) & (x < np.sqrt(2) * radius)).sum() for x in d])
        weak = np.mean([np.hypot(*(f[:, :2] - centres[1]).T).min() < 0.5 for f in found])
        return skirt, weak

    # Measured: 0.53 skirt maxima per pattern at a spacing of R, none at 1.5 R; the weak
    # disk is found within 0.5 px (its centroid scatters by ~0.25 px) as often either way.
    skirt_r, weak_r = skirt_and_weak(DetectionParams(min_spacing=radius))
    skirt, weak = skirt_and_weak(DetectionParams())
    assert skirt_r > 0.3 and skirt == 0
    assert weak == weak_r > 0.5


def test_all_zero_patterns_give_no_peaks():
    kernel = make_kernel(synthetic_probe(SHAPE, R), "trench")
    stack = np.zeros((3, *SHAPE))
    stack[1] = _disks([[32, 32]], [1.0])
    for backend in ("numpy", "torch"):
        found = detect_patterns(stack, kernel, backend=backend)
        assert [f.shape for f in found] == [(0, 3), (1, 3), (0, 3)]


# ---- simulated silicon ------------------------------------------------------------------
@pytest.fixture(scope="module")
def silicon():
    """Si [001] CBED at 300 kV, 2 mrad (disk radius 4.1 px), 50 Å and 200 Å thick."""
    from pymatgen.core import Lattice, Structure

    from stemforge.simulate.pattern import simulate_patterns

    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    thin, thick = simulate_patterns(
        si,
        [0, 0, 1],
        thicknesses=[50.0, 200.0],
        energy=300e3,
        semiangle=2.0,
        n_pixels=96,
        q_pixel_size=0.025,
        engine="fast",
    )
    return thin, thick


def _strong(sample) -> np.ndarray:
    """Positions (px) of the direct beam and the four 220 reflections."""
    p = sample.peaks
    keep = (np.abs(p["h"]) == np.abs(p["k"])) & (np.abs(p["h"]) <= 2) & (p["l"] == 0)
    assert keep.sum() == 5
    return np.stack([p["qx"][keep], p["qy"][keep]], axis=1)


@pytest.mark.parametrize("method", ["parabolic", "dft"])
def test_thin_silicon_lattice_matches_the_labels(silicon, method):
    thin, _ = silicon
    truth = _strong(thin)
    found = detect_patterns(
        thin.cbed[None], make_kernel(thin.probe), DetectionParams(subpixel=method)
    )
    # At 50 Å the excitation error varies across each 220 disk by ±θg = ±0.001 Å⁻¹ around
    # the Ewald offset λg²/2 = 0.0027 Å⁻¹: ~5 % intensity slope, which pulls the intensity-
    # weighted match ~0.05 px towards the brighter side (measured 0.065 / 0.076 px).
    assert _errors(found, truth[None]).max() < 0.1
    # The 9 disks of the ZOLZ that lie whole on the detector and above 0.5 % are all found.
    assert len(found[0]) == 9


def test_exponents_find_the_lattice_of_a_thick_crystal(silicon):
    _, thick = silicon
    truth = _strong(thick)
    kernel = make_kernel(thick.probe)
    for exponent, tol in ((1.0, 1.35), (0.5, 0.8), (0.0, 0.3)):
        found = detect_patterns(thick.cbed[None], kernel, DetectionParams(exponent=exponent))
        # At 200 Å the direct and 220 beams are equally bright (0.17 each) and the disks
        # carry strong dynamical contrast: cross-correlation follows it, up to R/3 = 1.35 px
        # off the disk centre (measured 1.06), the hybrid less (0.51), and the phase
        # correlation, which sees only the disk edges, least (0.15).
        assert _errors([found[0][:5]], truth[None]).max() < tol, exponent


def test_phase_correlation_loses_weak_disks_beside_a_dominant_direct_beam(silicon):
    thin, _ = silicon
    # Pattern spectrum = probe spectrum × A(f), A = 1 + Σ a_g cos(2π f·g) > 0 for a
    # centrosymmetric pattern whose direct beam dominates (a_220 = 0.03): whitened, A is 1
    # and only the direct beam is left (see DetectionParams).
    found = detect_patterns(thin.cbed[None], make_kernel(thin.probe), DetectionParams(exponent=0))
    assert len(found[0]) == 1
    assert np.hypot(*(found[0][0, :2] - 48.0)) < 0.01


def test_poisson_noise_at_a_realistic_dose(silicon):
    thin, _ = silicon
    truth = _strong(thin)
    dose = 1e5  # electrons per pattern: 16 pA for 1 ms
    rng = np.random.default_rng(7)
    stack = rng.poisson(np.clip(thin.cbed, 0, None) * dose, (16, *thin.cbed.shape))
    found = detect_patterns(stack.astype(np.float32), make_kernel(thin.probe))
    err = _errors([f[:5] for f in found], np.broadcast_to(truth, (16, 5, 2)))
    # A 220 disk holds 0.025·dose = 2500 electrons: its centroid scatters by
    # R / (2 √N) = 0.04 px per axis. Bound: the noise-free 0.1 px plus 4σ radially.
    sigma = 4.06 / (2 * np.sqrt(0.025 * dose))
    assert err.max() < 0.1 + 4 * np.sqrt(2) * sigma
    assert np.sqrt((err**2).mean()) < 0.1 + np.sqrt(2) * sigma


def test_numpy_and_torch_backends_agree(silicon):
    thin, _ = silicon
    rng = np.random.default_rng(3)
    stack = rng.poisson(np.clip(thin.cbed, 0, None) * 1e5, (6, *thin.cbed.shape))
    for kernel_mode, exponent in (("plain", 1.0), ("trench", 0.5)):
        kernel = make_kernel(thin.probe, kernel_mode)
        for method in ("none", "parabolic", "dft"):
            params = DetectionParams(exponent=exponent, subpixel=method)
            for dtype, tol in ((np.float64, 1e-9), (np.float32, 2e-3)):
                a = detect_patterns(stack.astype(dtype), kernel, params, "numpy")
                b = detect_patterns(stack.astype(dtype), kernel, params, "torch")
                for x, y in zip(a, b, strict=True):
                    assert x.shape == y.shape
                    # float32 may order two equally bright disks differently.
                    x, y = (t[np.lexsort((t[:, 1], t[:, 0]))] for t in (x, y))
                    np.testing.assert_allclose(x[:, :2], y[:, :2], atol=tol)
                    np.testing.assert_allclose(x[:, 2], y[:, 2], rtol=tol)


# ---- datacubes ------------------------------------------------------------------------------
def test_find_bragg_disks_in_memory_and_dask_agree(silicon):
    thin, _ = silicon
    rng = np.random.default_rng(5)
    data = rng.poisson(np.clip(thin.cbed, 0, None) * 1e5, (4, 3, *thin.cbed.shape))
    data = data.astype(np.float32)
    kernel = make_kernel(thin.probe, "trench")
    row = 3 * 96 * 96 * 4  # bytes of one scan row as float32
    eager = find_bragg_disks(DataCube(data), kernel, max_bytes=row, backend="numpy")
    lazy_cube = DataCube(da.from_array(data, chunks=(1, 2, 96, 96)))
    lazy = find_bragg_disks(lazy_cube, kernel, max_bytes=2 * row, backend="numpy")
    whole = find_bragg_disks(DataCube(data), kernel, max_bytes="1GB", backend="numpy")
    for other in (lazy, whole):
        assert other.scan_shape == (4, 3) and other.detector_shape == (96, 96)
        for name, col in eager.columns().items():
            np.testing.assert_array_equal(col, getattr(other, name))
    stack = detect_patterns(data.reshape(12, 96, 96), kernel, backend="numpy")
    for rx in range(4):
        for ry in range(3):
            np.testing.assert_array_equal(eager.at(rx, ry), stack[rx * 3 + ry])
    assert eager.counts().min() == 9


# ---- bad input ------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    kernel = make_kernel(synthetic_probe(SHAPE, R))
    stack = np.stack([_disks([[32, 32]], [1.0])] * 4)
    with pytest.raises(ShapeError, match="kernel has shape"):
        detect_patterns(stack, make_kernel(synthetic_probe((48, 48), R)))
    bad = stack.copy()
    bad[3, 10, 10] = np.nan
    with pytest.raises(InvalidDataError, match="index 3"):
        detect_patterns(bad, kernel)
    with pytest.raises(InvalidDataError, match=r"rx=1, ry=1"):
        find_bragg_disks(DataCube(bad.reshape(2, 2, *SHAPE)), kernel)
    with pytest.raises(InvalidDataError, match="NaN"):
        detect_patterns(stack, np.where(kernel > 0, np.nan, kernel))
    with pytest.raises(InvalidDataError, match="all zero"):
        detect_patterns(stack, np.zeros(SHAPE))
    with pytest.raises(ShapeError, match="no patterns"):
        detect_patterns(np.zeros((0, *SHAPE)), kernel)
    with pytest.raises(ShapeError, match="empty axis"):
        DataCube(np.zeros((0, 2, *SHAPE)))
    with pytest.raises(ShapeError, match=r"\(N, Qx, Qy\)"):
        detect_patterns(stack[0], kernel)
    with pytest.raises(ConfigurationError, match="DataCube"):
        find_bragg_disks(stack.reshape(2, 2, *SHAPE), kernel)
    with pytest.raises(ConfigurationError, match="backend"):
        detect_patterns(stack, kernel, backend="cupy")
    with pytest.raises(ConfigurationError, match="resolved"):
        find_peaks(np.zeros((1, *SHAPE)), DetectionParams())


@pytest.mark.parametrize(
    "options",
    [
        {"exponent": 1.5},
        {"exponent": -0.1},
        {"sigma": -1.0},
        {"min_relative_intensity": 2.0},
        {"min_absolute_intensity": -1.0},
        {"min_spacing": -3.0},
        {"edge": float("nan")},
        {"max_peaks": 0},
        {"relative_to_peak": 1.5},
        {"subpixel": "lorentzian"},
        {"upsample": 1},
    ],
)
def test_invalid_parameters_are_refused(options):
    with pytest.raises(ConfigurationError):
        DetectionParams(**options)


def test_defaults_follow_the_probe_radius():
    # Spacing beyond the √2 R skirt of a disk's edge correlation; edge: the radius plus the
    # probe's soft edge; smoothing 1 px, more for disks under 3.5 px.
    params = DetectionParams().resolved(6.5)
    assert params.min_spacing == 1.5 * 6.5 and params.edge == 6.5 + 1.0
    assert params.sigma == 1.0 and DetectionParams().resolved(2.5).sigma == 1.4
    kept = DetectionParams(sigma=0.0, min_spacing=3.0, edge=0.0).resolved(6.5)
    assert (kept.sigma, kept.min_spacing, kept.edge) == (0.0, 3.0, 0.0)
    with pytest.raises(ConfigurationError, match="probe_radius"):
        DetectionParams().resolved(0.0)


def test_the_intensity_floor_defaults_to_the_detectors_own():
    """Unset, the floor is correlation's 0.005 unless the detector names its own (FCU-Net:
    0.001); a value given is kept, and an unset floor is refused by the peak picker."""
    from stemforge.infer.fcunet_detect import MIN_RELATIVE_INTENSITY

    assert DetectionParams().resolved(5.0).min_relative_intensity == 0.005
    assert DetectionParams().resolved(5.0, MIN_RELATIVE_INTENSITY).min_relative_intensity == 0.001
    given = DetectionParams(min_relative_intensity=0.02)
    assert given.resolved(5.0, MIN_RELATIVE_INTENSITY).min_relative_intensity == 0.02
    unset = DetectionParams(sigma=0.0, min_spacing=3.0, edge=2.0)
    assert not unset.is_resolved
    with pytest.raises(ConfigurationError, match="min_relative_intensity"):
        find_peaks(np.zeros((1, *SHAPE)), unset)
