"""Origin per pattern: centre of mass, template correlation, Friedel symmetry, drift fit."""

from __future__ import annotations

import numpy as np
import pytest

from stemforge.core import (
    ConfigurationError,
    DataCube,
    InvalidDataError,
    ShapeError,
    StemforgeError,
)
from stemforge.infer.origin import (
    find_origin,
    fit_origin_drift,
    origin_com,
    origin_friedel,
    origin_xcorr,
    synthetic_disk,
)

SHAPE = (64, 64)
R = 8.0  # central disk radius, px
CENTRE = ((SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2)
# Two Bragg vectors (px); their ± disks lie 12-13 px outside the central disk edge.
G = np.array([[20.0, 3.0], [4.0, -21.0]])


def _pattern(c, bragg: float = 0.05, bg: float = 0.02, ss: int = 32) -> np.ndarray:
    """Antialiased central disk at ``c`` + weak ±g Bragg disks + flat background."""
    p = synthetic_disk(SHAPE, c, R, ss)
    for g in G:
        for sign in (1, -1):
            p += bragg * synthetic_disk(SHAPE, tuple(np.asarray(c) + sign * g), R, ss)
    return p + bg


def _centres(seed: int, n: int, spread: float = 5.0, centre=CENTRE) -> np.ndarray:
    return np.asarray(centre) + np.random.default_rng(seed).uniform(-spread, spread, (n, 2))


def _errors(found, truth) -> np.ndarray:
    return np.concatenate([np.ravel(found[0]) - truth[:, 0], np.ravel(found[1]) - truth[:, 1]])


def test_synthetic_disk_is_a_faithful_truth():
    # The ground truth of every test below: with 32x32 sub-samples per edge pixel the disk
    # area is right to 1e-4 and its centroid to ~2e-3 px (edge quantisation).
    c = (30.37, 33.81)
    d = synthetic_disk(SHAPE, c, R, 32)
    mass = d.sum()
    assert mass == pytest.approx(np.pi * R**2, rel=2e-4)
    assert (d.sum(axis=1) @ np.arange(SHAPE[0])) / mass == pytest.approx(c[0], abs=3e-3)
    assert (d.sum(axis=0) @ np.arange(SHAPE[1])) / mass == pytest.approx(c[1], abs=3e-3)
    assert d.min() >= 0 and d.max() <= 1


def test_com_recovers_subpixel_centre_with_weak_bragg_disks():
    truth = _centres(0, 16)
    stack = np.stack([_pattern(c) for c in truth])
    found = origin_com(stack)
    # Noise-free, what is left is the truth's own ~2e-3 px quantisation and the pixelated
    # window: 0.01 px is 5x that and 5x inside the 0.05 px requirement (measured 2e-3).
    assert np.abs(_errors(found, truth)).max() < 0.01
    # A scan block (rx, ry, Qx, Qy) gives (rx, ry) maps, a single pattern 0-d arrays.
    qx0, qy0 = origin_com(stack.reshape(4, 4, *SHAPE))
    assert qx0.shape == (4, 4) and np.allclose(qx0.ravel(), found[0])
    single = origin_com(stack[3])
    assert single[0].shape == () and float(single[1]) == pytest.approx(found[1][3])


def test_com_poisson_noise_matches_the_counting_limit():
    rng = np.random.default_rng(1)
    truth = _centres(2, 40)
    dose = 1e5  # electrons in the central disk: ~10 pA for 1.6 ms, a typical 4D-STEM frame
    bg = 0.5  # counts per pixel
    scale = dose / (np.pi * R**2)
    stack = np.stack([_pattern(c, bg=0.0, ss=16) * scale + bg for c in truth])
    found = origin_com(rng.poisson(stack).astype(np.float32))
    err = _errors(found, truth)
    # Counting limit per axis: each electron's x has variance R²/4 inside a uniform disk, and
    # background counts in the window (radius 1.2R + 2) add bg·πRw⁴/4; σ = √(N R²/4 + that)/N.
    rw = 1.2 * R + 2
    sigma = np.sqrt(dose * R**2 / 4 + bg * np.pi * rw**4 / 4) / dose  # = 0.0127 px
    rms = np.sqrt(np.mean(err**2))
    # 80 samples give the RMS to ±8% (1σ): [0.7, 1.4]σ holds unless the estimator is off.
    assert 0.7 * sigma < rms < 1.4 * sigma
    assert np.abs(err).max() < 0.05  # ≈ 4σ


def test_com_gives_nan_for_a_blank_frame():
    stack = np.stack([_pattern(CENTRE), np.zeros(SHAPE)])
    qx0, qy0 = origin_com(stack)
    assert np.isfinite(qx0[0]) and np.isnan(qx0[1]) and np.isnan(qy0[1])


def _structured(c) -> np.ndarray:
    """A disk with strong internal structure: a 40% linear gradient and an off-centre blob."""
    qx = np.arange(SHAPE[0])[:, None] - c[0]
    qy = np.arange(SHAPE[1])[None, :] - c[1]
    inside = 1 + 0.4 * qx / R + 0.3 * np.exp(-((qx - 3) ** 2 + (qy + 2) ** 2) / 4)
    return synthetic_disk(SHAPE, c, R, 16) * inside


def test_xcorr_is_accurate_and_robust_to_structure_inside_the_disk():
    truth = _centres(3, 16)
    template = synthetic_disk(SHAPE, CENTRE, R, 16)
    plain = origin_xcorr(np.stack([_pattern(c, ss=16) for c in truth]), template, template_origin=CENTRE)
    # Aliasing of the pixel-sampled disk edge leaves a systematic ≤ 0.02 px (measured 0.016).
    assert np.abs(_errors(plain, truth)).max() < 0.03
    # Without template_origin the template's own centre is measured (by COM, exact here).
    assert np.allclose(origin_xcorr(_pattern(truth[0], ss=16), template), truth[0], atol=0.03)

    structured = np.stack([_structured(c) for c in truth])
    com_err = np.abs(_errors(origin_com(structured), truth)).max()
    xcorr_err = np.abs(_errors(origin_xcorr(structured, template, template_origin=CENTRE), truth)).max()
    # The centre of mass follows the intensity (~0.85 px off here); the hybrid correlation
    # follows the disk edge (measured 0.04 px).
    assert com_err > 0.5
    assert xcorr_err < 0.1


def test_xcorr_parabolic_fallback_and_max_shift():
    truth = _centres(4, 8)
    template = synthetic_disk(SHAPE, CENTRE, R, 16)
    stack = np.stack([_pattern(c, ss=16) for c in truth])
    parabolic = origin_xcorr(stack, template, template_origin=CENTRE, subpixel="parabolic")
    assert np.abs(_errors(parabolic, truth)).max() < 0.1  # a parabola on the cusp: coarser
    # A Bragg disk three times brighter than the central one wins an open search...
    bright = np.stack([_pattern(c, bragg=3.0, ss=16) for c in truth])
    wrong = origin_xcorr(bright, template, template_origin=CENTRE)
    assert np.abs(_errors(wrong, truth)).max() > 10
    # ...and loses once the search is limited to the plausible descan range.
    right = origin_xcorr(bright, template, template_origin=CENTRE, max_shift=8)
    # The bright disks' correlation flanks reach the central peak and tilt it a little
    # (measured 0.09 px; 0.02 px with Bragg disks as weak as in the other tests).
    assert np.abs(_errors(right, truth)).max() < 0.15


def _beam_stop_scene(n: int, seed: int):
    """128² patterns: central disk, 4 pairs of Friedel-symmetric Bragg disks, an amorphous
    ring and a decaying background, all centred a few px off the detector centre; and a beam
    stop (a bar from the top edge with a round tip) covering part of the central disk."""
    shape = (128, 128)
    r = 10.0
    truth = _centres(seed, n, spread=4.0, centre=(63.5, 63.5))
    g1, g2 = np.array([30.0, 8.0]), np.array([-6.0, 33.0])
    qx = np.arange(shape[0])[:, None]
    qy = np.arange(shape[1])[None, :]
    stack = []
    for c in truth:
        p = synthetic_disk(shape, c, r, 16)
        for (h, k), amp in zip([(1, 0), (0, 1), (1, 1), (1, -1)], [0.3, 0.2, 0.1, 0.15], strict=True):
            for sign in (1, -1):
                p += amp * synthetic_disk(shape, tuple(c + sign * (h * g1 + k * g2)), r, 16)
        rho = np.hypot(qx - c[0], qy - c[1])
        p += 0.05 * np.exp(-((rho - 50) ** 2) / 18) + 0.02 * np.exp(-rho / 30)
        stack.append(p)
    mask = np.ones(shape, bool)
    mask[:64, 60:70] = False
    mask[np.hypot(qx - 63.5, qy - 64.5) < 5] = False
    return np.stack(stack) * mask, mask, truth, r


def test_friedel_finds_the_origin_behind_a_beam_stop():
    stack, mask, truth, r = _beam_stop_scene(12, 5)
    # The stop hides ~1/3 of the central disk on one side: the centre of mass is pulled away.
    com_err = np.hypot(*(np.asarray(origin_com(stack)) - truth.T))
    assert com_err.min() > 0.5
    exact = origin_friedel(stack, mask=mask)
    # Noise-free the masked correlation is exact up to Fourier interpolation of the
    # pixelated edges (measured 0.017 px); 0.05 px leaves room for platform differences.
    assert np.abs(_errors(exact, truth)).max() < 0.05
    # Poisson noise, 1e5 electrons in the disk: the Friedel estimate pairs every pixel with
    # its mirror, so its noise is about that of the COM (0.013 px; measured RMS 0.008) —
    # the ~0.1 px requirement is then ≥ 4σ away even with the interpolation error added.
    rng = np.random.default_rng(6)
    noisy = rng.poisson(stack * 1e5 / (np.pi * r**2)).astype(float)
    err = _errors(origin_friedel(noisy, mask=mask), truth)
    assert np.sqrt(np.mean(err**2)) < 0.03
    assert np.abs(err).max() < 0.1


def test_friedel_without_a_beam_stop_and_flat_frames():
    truth = _centres(8, 4)
    clean = np.stack([_pattern(c, ss=16) for c in truth])
    # Full detector, no mask: the same interpolation-limited accuracy (measured 0.003 px).
    assert np.abs(_errors(origin_friedel(clean), truth)).max() < 0.05
    qx0, qy0 = origin_friedel(np.stack([clean[0], np.ones(SHAPE)]))
    assert np.isfinite(qx0[0]) and np.isnan(qx0[1]) and np.isnan(qy0[1])


# ---- drift fit ----------------------------------------------------------------------------
def _plane(shape=(32, 32)):
    rx, ry = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return 31.2 + 0.05 * rx - 0.03 * ry, 33.7 - 0.02 * rx + 0.04 * ry


def test_drift_fit_ignores_wild_outliers():
    rng = np.random.default_rng(9)
    tx, ty = _plane()
    noise = 0.02  # px, a typical per-pattern origin precision
    mx = tx + noise * rng.standard_normal(tx.shape)
    my = ty + noise * rng.standard_normal(ty.shape)
    bad = rng.random(tx.shape) < 0.05  # 5% patterns where a grain diffracts strongly
    mx[bad] += rng.uniform(2, 6, bad.sum())  # one-sided, so they would drag a plain fit
    my[bad] -= rng.uniform(2, 6, bad.sum())
    fit = fit_origin_drift(mx, my, order=1)
    # A 3-term fit over ~970 good points has a fitted-value error of ~σ·√(3/970) ≈ 0.06σ
    # (≤ 0.15σ at the corners); 0.3σ bounds it with the bisquare's 95% efficiency loss.
    assert np.abs(fit.qx0 - tx).max() < 0.3 * noise
    assert np.abs(fit.qy0 - ty).max() < 0.3 * noise
    assert np.all(fit.weights[bad] == 0)
    assert np.allclose(fit.qx0_residual, mx - fit.qx0) and np.allclose(fit.qy0_residual, my - fit.qy0)
    plain = fit_origin_drift(mx, my, order=1, robust=False)
    assert np.abs(plain.qx0 - tx).max() > 5 * noise  # the outliers do pull least squares


def test_drift_fit_quadratic_nan_and_mask():
    rng = np.random.default_rng(10)
    tx, ty = _plane((20, 30))
    rx, ry = np.meshgrid(np.arange(20), np.arange(30), indexing="ij")
    tx = tx + 1e-3 * (rx - 10) ** 2
    ty = ty - 2e-3 * rx * ry / 10
    mx = tx + 0.01 * rng.standard_normal(tx.shape)
    my = ty + 0.01 * rng.standard_normal(tx.shape)
    mx[3, 4] = my[3, 4] = np.nan  # a blank frame from origin_com
    mask = np.ones(tx.shape, bool)
    mask[:, :5] = False
    mx[:, :5] += 10  # excluded region, e.g. a strongly diffracting grain outlined by hand
    fit = fit_origin_drift(mx, my, order=2, mask=mask)
    assert np.isfinite(fit.qx0).all()  # the gaps are filled
    assert np.isnan(fit.qx0_residual[3, 4])
    assert np.all(fit.weights[:, :5] == 0)
    # 6 terms over ~500 points: fitted-value error ~0.01·√(6/500) ≈ 1e-3, up to ~3x that at
    # the edges of the fitted region; extrapolating a quadratic 5 px past the data into the
    # masked stripe grows it a few times more (measured 6e-3).
    assert np.abs(fit.qx0 - tx)[mask].max() < 5e-3 and np.abs(fit.qy0 - ty)[mask].max() < 5e-3
    assert np.abs(fit.qx0 - tx).max() < 0.015 and np.abs(fit.qy0 - ty).max() < 0.015


def test_drift_fit_rejects_bad_input():
    tx, ty = _plane((6, 6))
    with pytest.raises(ConfigurationError, match="order"):
        fit_origin_drift(tx, ty, order=4)
    with pytest.raises(ShapeError):
        fit_origin_drift(tx, ty[:5])
    with pytest.raises(ShapeError):
        fit_origin_drift(tx, ty, mask=np.ones((5, 6), bool))
    with pytest.raises(InvalidDataError, match="usable"):
        fit_origin_drift(np.full((3, 3), np.nan), np.full((3, 3), np.nan))


# ---- datacube level -----------------------------------------------------------------------
def _small_cube():
    truth = _centres(11, 12, spread=3.0)
    stack = np.stack([_pattern(c, ss=8) for c in truth]).astype(np.float32)
    return stack.reshape(3, 4, *SHAPE), truth


@pytest.mark.parametrize("method", ["com", "xcorr", "friedel"])
def test_find_origin_streams_memory_and_dask_cubes(method):
    da = pytest.importorskip("dask.array")
    data, truth = _small_cube()
    template = synthetic_disk(SHAPE, CENTRE, R, 8) if method == "xcorr" else None
    kernel = {"com": origin_com, "xcorr": origin_xcorr, "friedel": origin_friedel}[method]
    args = (template,) if template is not None else ()
    expected = kernel(data, *args)
    # One row of the scan per block (64 KiB rows): several blocks, one progress step each.
    lazy = DataCube(da.from_array(data, chunks=(1, 2, *SHAPE)))
    for cube in (DataCube(data), lazy):
        qx0, qy0 = find_origin(cube, method, template, max_bytes=4 * 64 * 64 * 4)
        assert qx0.shape == (3, 4)
        assert np.allclose(qx0, expected[0], atol=1e-9) and np.allclose(qy0, expected[1], atol=1e-9)
    assert np.abs(_errors(expected, truth)).max() < 0.05


def test_find_origin_rejects_bad_input():
    data, _ = _small_cube()
    bad = data.copy()
    bad[2, 1, 5, 5] = np.nan
    with pytest.raises(InvalidDataError, match="rx=2, ry=1"):
        find_origin(DataCube(bad))
    with pytest.raises(ConfigurationError, match="unknown origin method"):
        find_origin(DataCube(data), "median")
    with pytest.raises(ConfigurationError, match="template"):
        find_origin(DataCube(data), "xcorr")
    with pytest.raises(ConfigurationError, match="takes no template"):
        find_origin(DataCube(data), "com", np.ones(SHAPE))
    with pytest.raises(ShapeError, match="template"):
        find_origin(DataCube(data), "xcorr", np.ones((32, 32)))


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: origin_com(np.ones(10)), ShapeError, "Qx, Qy"),
        (lambda: origin_com(np.ones((2, 2, 2, 8, 8))), ShapeError, "Qx, Qy"),
        (lambda: origin_com(np.full((2, 8, 8), np.nan)), InvalidDataError, "NaN"),
        (lambda: origin_com(np.ones((8, 8), complex)), InvalidDataError, "dtype"),
        (lambda: origin_com(np.ones((8, 8)), threshold=1.5), ConfigurationError, "threshold"),
        (lambda: origin_com(np.ones((8, 8)), radius=-1), ConfigurationError, "radius"),
        (lambda: origin_xcorr(np.ones((2, 8, 8)), np.ones((9, 8))), ShapeError, "template"),
        (lambda: origin_xcorr(np.ones((2, 8, 8)), np.ones((8, 8))), InvalidDataError, "flat"),
        (lambda: origin_xcorr(np.ones((8, 8)), np.eye(8), subpixel="gauss"), ConfigurationError, "subpixel"),
        (lambda: origin_xcorr(np.ones((8, 8)), np.eye(8), upsample=1), ConfigurationError, "upsample"),
        (lambda: origin_friedel(np.ones((8, 8)), mask=np.ones((7, 8))), ShapeError, "mask"),
        (lambda: origin_friedel(np.ones((8, 8)), mask=np.zeros((8, 8))), InvalidDataError, "mask"),
        (lambda: origin_friedel(np.ones((8, 8)), min_overlap=0), ConfigurationError, "min_overlap"),
        (lambda: synthetic_disk((8, 8), (4, 4), 0.0), ConfigurationError, "radius"),
    ],
)
def test_kernels_reject_bad_input(call, error, words):
    with pytest.raises(error, match=words) as info:
        call()
    assert isinstance(info.value, StemforgeError) and info.value.fix
