"""Lattice fitting: calibrated view, origin estimate, basis choice, indexing, per-position fit.

Synthetic peak tables come from known lattices: every reflection ``origin + h·g1 + k·g2``
inside the detector, a bright direct beam, some reflections dropped, weak spurious peaks
added and Gaussian position noise ``σ``. Tolerances on fitted vectors come from the
least-squares covariance ``σ² (DᵀD)⁻¹`` of the design ``D = (1, h, k)`` over the expected
reflections (:func:`_lsq_sigma`), with a 5σ margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic_peaks import DETECTOR, ORIGIN, lattice_peaks, nodes

from stemforge.core import (
    BraggPeaks,
    Calibration,
    CalibrationError,
    ConfigurationError,
    InvalidDataError,
    ShapeError,
)
from stemforge.infer.ellipse import ellipse_correction
from stemforge.infer.lattice import (
    LatticeFit,
    centered_peaks,
    choose_basis,
    conventional_basis,
    estimate_origin,
    fit_lattice,
    fit_net,
    index_peaks,
    reduce_basis,
)

#: An oblique reciprocal basis (columns g1, g2), pixels; reduced and conventional as given.
G_OBLIQUE = np.array([[14.0, -3.0], [2.0, 15.5]])


def _lsq_sigma(G: np.ndarray, sigma: float, p_missing: float) -> float:
    """1σ error of a fitted basis-vector component with uniform weights.

    ``σ √((DᵀD)⁻¹)`` for the largest of the g1, g2 diagonal terms, over the reflections
    inside the detector, the count reduced by the missing fraction.
    """
    hk = nodes()
    pos = np.asarray(ORIGIN) + hk @ G.T
    hk = hk[((pos >= 3) & (pos <= np.asarray(DETECTOR) - 4)).all(-1)]
    d = np.c_[np.ones(len(hk)), hk]
    cov = np.linalg.inv(d.T @ d * (1 - p_missing))
    return sigma * math.sqrt(max(cov[1, 1], cov[2, 2]))


CAL = Calibration(qx0=ORIGIN[0], qy0=ORIGIN[1])


# ---- calibrated view ------------------------------------------------------------------------
def test_centered_peaks_remove_origin_and_ellipse_and_convert_units():
    rng = np.random.default_rng(3)
    scan = (4, 5)
    qx0 = 60 + rng.uniform(-2, 2, scan)  # descan: one origin per pattern
    qy0 = 66 + rng.uniform(-2, 2, scan)
    peaks = lattice_peaks(G_OBLIQUE, scan, origin=np.stack([qx0, qy0], -1), sigma=0, n_spurious=0)
    a, b, theta = 1.03, 1.0, math.radians(20)
    # Distort: the inverse of the correction stretches the b axis by b/a instead of a/b.
    x0, y0 = qx0[peaks.rx, peaks.ry], qy0[peaks.rx, peaks.ry]
    dqx, dqy = ellipse_correction(peaks.qx, peaks.qy, (x0, y0), b, a, theta)
    distorted = BraggPeaks.from_columns(
        peaks.rx, peaks.ry, dqx, dqy, peaks.intensity, scan, DETECTOR
    )
    cal = Calibration(qx0=qx0, qy0=qy0, ellipse=(a, b, theta), q_pixel_size=0.01, q_units="A^-1")
    kx, ky = centered_peaks(distorted, cal)
    assert np.allclose(kx, peaks.qx - x0, atol=1e-9) and np.allclose(ky, peaks.qy - y0, atol=1e-9)
    kx_a, ky_a = centered_peaks(distorted, cal, units="Å^-1")
    assert np.allclose(kx_a, 0.01 * kx) and np.allclose(ky_a, 0.01 * ky)
    # The raw table is untouched: the view is computed.
    assert np.array_equal(distorted.qx, dqx)
    with pytest.raises(CalibrationError, match="pixels"):
        centered_peaks(distorted, Calibration(qx0=qx0, qy0=qy0), units="A^-1")
    with pytest.raises(ConfigurationError, match="units"):
        centered_peaks(distorted, cal, units="mrad")


def test_origin_estimate_takes_the_brightest_peak_near_the_centre():
    rng = np.random.default_rng(4)
    scan = (3, 4)
    origin = np.stack([62 + rng.uniform(-3, 3, scan), 65 + rng.uniform(-3, 3, scan)], -1)
    peaks = lattice_peaks(G_OBLIQUE, scan, origin=origin, sigma=0, n_spurious=0)
    # A very bright reflection far from the centre does not count; one pattern loses its
    # direct beam and takes the median origin of the others.
    direct = peaks.intensity > 900
    lost = direct & (peaks.rx == 2) & (peaks.ry == 3)
    intensity = np.where(np.hypot(peaks.qx - 63.5, peaks.qy - 63.5) > 40, 5000, peaks.intensity)
    table = BraggPeaks.from_columns(
        peaks.rx[~lost],
        peaks.ry[~lost],
        peaks.qx[~lost],
        peaks.qy[~lost],
        intensity[~lost],
        scan,
        DETECTOR,
    )
    qx0, qy0 = estimate_origin(table, radius=10)
    expected = origin.copy()
    expected[2, 3] = np.median(np.delete(origin.reshape(-1, 2), 11, axis=0), axis=0)
    assert np.allclose(np.stack([qx0, qy0], -1), expected, atol=1e-12)
    # centered_peaks falls back to the estimate without a calibrated origin.
    kx, _ = centered_peaks(table, Calibration(), origin_radius=10)
    assert np.allclose(kx, table.qx - qx0[table.rx, table.ry])
    far = BraggPeaks.from_columns([0], [0], [2.0], [2.0], [1.0], (1, 1), DETECTOR)
    with pytest.raises(InvalidDataError, match="origin"):
        estimate_origin(far, radius=10)


# ---- bases ---------------------------------------------------------------------------------
def test_reduction_and_convention_of_a_basis():
    g1, g2 = G_OBLIQUE[:, 0], G_OBLIQUE[:, 1]
    # Any unimodular recombination of the same lattice reduces back to it.
    for a, b in [(g1 + g2, g1 + 2 * g2), (2 * g1 - g2, -g1 + g2), (g2, g1)]:
        r1, r2 = conventional_basis(a, b)
        assert np.allclose(r1, g1) and np.allclose(r2, g2)
    r1, r2 = reduce_basis(g1 + 3 * g2, g2)
    assert np.hypot(*r1) <= np.hypot(*r2) and abs(r1 @ r2) <= r1 @ r1 / 2 + 1e-9
    assert r1[0] * r2[1] - r1[1] * r2[0] > 0
    # Hexagonal: g1 nearest +x, g2 at +60° rather than +120°.
    c = np.array([math.cos(math.radians(100)), math.sin(math.radians(100))]) * 12
    d = np.array([math.cos(math.radians(160)), math.sin(math.radians(160))]) * 12
    h1, h2 = conventional_basis(c, d)
    assert np.allclose(
        h1, 12 * np.array([math.cos(math.radians(-20)), math.sin(math.radians(-20))])
    )
    assert np.allclose(h2, 12 * np.array([math.cos(math.radians(40)), math.sin(math.radians(40))]))


HEXAGONAL = 13.0 * np.array(
    [[math.cos(0.3), math.cos(0.3 + math.pi / 3)], [math.sin(0.3), math.sin(0.3 + math.pi / 3)]]
)
RECTANGULAR = np.array([[11.0, 0.0], [0.0, 17.0]])


@pytest.mark.parametrize(
    "G", [G_OBLIQUE, HEXAGONAL, RECTANGULAR], ids=["oblique", "hexagonal", "rectangular"]
)
@pytest.mark.parametrize("brightness", ["low orders", "high orders"])
def test_automatic_basis_is_the_reduced_basis(G, brightness):
    peaks = lattice_peaks(G, (6, 6), brightness=brightness, seed=5)
    basis = choose_basis(peaks, CAL)
    e1, e2 = conventional_basis(G[:, 0], G[:, 1])
    # The map spots average ~1000 peaks of σ = 0.05 px: the refined basis is far better
    # than 0.02 px, while any other lattice vector is pixels away.
    assert np.allclose(basis.g1, e1, atol=0.02) and np.allclose(basis.g2, e2, atol=0.02)
    assert basis.indexed.sum() >= 0.9 * len(basis.spots)


def test_automatic_basis_survives_a_missing_short_reflection():
    """With g2 absent from every pattern, the spots g1, g1 + g2, 2·g2... still generate the
    lattice; the basis is its reduced one, not (g1, g1 + g2) or (g1, 2·g2)."""
    peaks = lattice_peaks(RECTANGULAR, (6, 6), seed=6, n_spurious=0)
    kx, ky = centered_peaks(peaks, CAL)
    g2 = RECTANGULAR[:, 1]
    absent = (np.hypot(kx - g2[0], ky - g2[1]) < 1) | (np.hypot(kx + g2[0], ky + g2[1]) < 1)
    basis = choose_basis(peaks.select(~absent), CAL)
    assert np.allclose(basis.g1, RECTANGULAR[:, 0], atol=0.02)
    assert np.allclose(basis.g2, g2, atol=0.02)


def test_manual_basis_is_kept_and_refined():
    g1, g2 = G_OBLIQUE[:, 0], G_OBLIQUE[:, 1]
    peaks = lattice_peaks(G_OBLIQUE, (6, 6), seed=7)
    # A non-reduced but primitive basis, given 0.3 px off: the choice stays, the error goes.
    guess1, guess2 = g1 + g2 + 0.3, g1 + 2 * g2 - 0.3
    basis = choose_basis(peaks, CAL, g1=guess1, g2=guess2)
    assert np.allclose(basis.g1, g1 + g2, atol=0.02) and np.allclose(
        basis.g2, g1 + 2 * g2, atol=0.03
    )
    kept = choose_basis(peaks, CAL, g1=guess1, g2=guess2, refine=False)
    assert np.array_equal(kept.g1, guess1) and np.array_equal(kept.g2, guess2)


def test_index_peaks_rounds_and_flags():
    g1, g2 = G_OBLIQUE[:, 0], G_OBLIQUE[:, 1]
    hk = np.array([[0, 0], [1, 0], [-2, 3], [4, -1], [1, 1]])
    pos = hk @ G_OBLIQUE.T + np.array([0.5, -0.4])  # lattice offset g0
    pos[4] += (1.0, 2.5)  # 2.7 px off its node
    idx = index_peaks(pos[:, 0], pos[:, 1], g1, g2, origin=(0.5, -0.4), max_error=2.0)
    assert np.array_equal(np.c_[idx.h, idx.k][:4], hk[:4])
    assert idx.indexed.tolist() == [True, True, True, True, False]
    assert idx.error[4] == pytest.approx(math.hypot(1.0, 2.5))
    # Per-peak bases (e.g. per scan position) broadcast row by row.
    per_row = index_peaks(
        pos[:, 0], pos[:, 1], np.tile(g1, (5, 1)), np.tile(g2, (5, 1)), (0.5, -0.4), 2.0
    )
    assert np.array_equal(per_row.h, idx.h) and per_row.indexed.tolist() == idx.indexed.tolist()
    # The default tolerance is 0.2 of the node spacing |g1| = 14.1 px: 2.83 px.
    assert index_peaks(pos[:, 0], pos[:, 1], g1, g2, (0.5, -0.4)).indexed.all()


# ---- per-position fit ------------------------------------------------------------------------
def test_fit_recovers_a_per_position_lattice():
    scan = (12, 9)
    rx, ry = np.meshgrid(np.arange(scan[0]), np.arange(scan[1]), indexing="ij")
    # Up to ±3 % change of the reciprocal basis across the scan, plus a lattice offset.
    scale = 1 + 0.06 * (rx / (scan[0] - 1) - 0.5)
    shear = 0.03 * (ry / (scan[1] - 1) - 0.5)
    G = np.einsum(
        "xyij,jk->xyik",
        np.stack([np.stack([scale, shear], -1), np.stack([0 * scale, 1 + 0 * scale], -1)], -2),
        G_OBLIQUE,
    )
    sigma, p_missing = 0.05, 0.3
    peaks = lattice_peaks(G, scan, sigma=sigma, p_missing=p_missing, seed=8)
    fit = fit_lattice(peaks, *choose_basis(peaks, CAL)[:2], CAL)
    assert isinstance(fit, LatticeFit) and fit.scan_shape == scan and fit.mask.all()
    # 5σ of the uniform-weight error: the broad intensity envelope changes it little.
    tol = 5 * _lsq_sigma(G_OBLIQUE, sigma, p_missing)
    assert np.abs(fit.g1 - G[..., 0]).max() < tol
    assert np.abs(fit.g2 - G[..., 1]).max() < tol
    assert np.abs(fit.origin).max() < 0.05  # the direct beam pins g0 (weight 900 vs ~100)
    # Residual: RMS of 2D Gaussian noise, σ√2, within the sampling spread.
    assert np.nanmedian(fit.residual) == pytest.approx(sigma * math.sqrt(2), rel=0.25)
    assert (fit.n_peaks >= 25).all()


def test_strongly_strained_positions_keep_their_high_orders():
    """6 % smaller reciprocal vectors move the 4th order 0.24·|g| off the reference nodes:
    the first pass misses them, the second (indexing with the position's own fit) keeps them."""
    scan = (1, 2)
    G = np.stack([G_OBLIQUE, G_OBLIQUE / 1.06])[None]
    peaks = lattice_peaks(G, scan, sigma=0.02, p_missing=0, n_spurious=0)
    fit = fit_lattice(peaks, G_OBLIQUE[:, 0], G_OBLIQUE[:, 1], CAL)
    assert fit.n_peaks.tolist() == peaks.counts().tolist()
    assert np.allclose(fit.g1[0, 1], G_OBLIQUE[:, 0] / 1.06, atol=0.01)


def _with_extra_peaks(peaks: BraggPeaks, offsets: np.ndarray, intensity: float) -> BraggPeaks:
    """``peaks`` plus, at every scan position, peaks at ``ORIGIN + offsets`` (``(m, 2)``)."""
    rx, ry = np.meshgrid(*(np.arange(n) for n in peaks.scan_shape), indexing="ij")
    rx, ry = np.repeat(rx.ravel(), len(offsets)), np.repeat(ry.ravel(), len(offsets))
    q = np.asarray(ORIGIN) + np.tile(offsets, (peaks.scan_shape[0] * peaks.scan_shape[1], 1))
    return BraggPeaks.from_columns(
        np.r_[peaks.rx, rx],
        np.r_[peaks.ry, ry],
        np.r_[peaks.qx, q[:, 0]],
        np.r_[peaks.qy, q[:, 1]],
        np.r_[peaks.intensity, np.full(len(rx), intensity)],
        peaks.scan_shape,
        DETECTOR,
    )


def test_outlier_rejection_drops_a_spurious_peak_near_a_node():
    """A bright spurious maximum 2 px off node (2, -1), inside the 2.8 px indexing tolerance,
    at every position: fitted, it drags the basis by 0.05 px (15σ); rejected (2 px > 3 × the
    ~0.07 px median distance and > the 0.5 px floor), the fit is the clean one."""
    g1, g2 = G_OBLIQUE[:, 0], G_OBLIQUE[:, 1]
    sigma = 0.05
    clean = lattice_peaks(G_OBLIQUE, (4, 4), sigma=sigma, p_missing=0, n_spurious=0, seed=10)
    node = 2 * g1 - g2
    peaks = _with_extra_peaks(clean, (node + [1.6, -1.2])[None], 300.0)
    tol = 5 * _lsq_sigma(G_OBLIQUE, sigma, 0.0)
    kept = fit_lattice(peaks, g1, g2, CAL, reject=None)
    assert np.abs(kept.g1 - g1).max() > 2 * tol
    fit = fit_lattice(peaks, g1, g2, CAL)
    assert np.abs(fit.g1 - g1).max() < tol and np.abs(fit.g2 - g2).max() < tol
    assert np.array_equal(fit.n_peaks, kept.n_peaks - 1)
    reference = fit_lattice(clean, g1, g2, CAL, reject=None)
    np.testing.assert_allclose(fit.g1, reference.g1, atol=1e-12)


def test_rejection_keeps_systematic_offsets_below_the_floor():
    """Dynamical contrast moves whole reflections by tenths of a pixel in thick crystals;
    dropping them at some positions only would turn their offsets into strain steps. A
    reflection family 0.3 px off its nodes stays in the fit (under the 0.5 px floor)."""
    peaks = lattice_peaks(G_OBLIQUE, (3, 3), sigma=0.01, p_missing=0, n_spurious=0, seed=11)
    kx, ky = centered_peaks(peaks, CAL)
    idx = index_peaks(kx, ky, G_OBLIQUE[:, 0], G_OBLIQUE[:, 1])
    family = np.abs(idx.h) == 2
    shifted = BraggPeaks.from_columns(
        peaks.rx,
        peaks.ry,
        peaks.qx + 0.3 * family * np.sign(idx.h),
        peaks.qy,
        peaks.intensity,
        peaks.scan_shape,
        DETECTOR,
    )
    fit = fit_lattice(shifted, G_OBLIQUE[:, 0], G_OBLIQUE[:, 1], CAL)
    assert np.array_equal(fit.n_peaks, peaks.counts())


def test_basis_ignores_weak_features_off_the_lattice():
    """Dense thick-crystal patterns (40 nm Si [110]: 111 at 32 px, 10 px disks) hold weak
    correlation maxima at fixed places between bright disks, spots as frequent as any
    reflection. Here 4 of 16 spots, at 3 % of the 111 height: by counts only 75 % of the map
    is on the lattice, by intensity 98 %. One of them and 220 span a dense lattice (shortest
    vector 15.8 px) whose nodes lie within 15 % of the pair's lengths (5.8 px) of every bright
    spot: indexing is to 15 % of the reduced basis' shortest vector (2.4 px)."""
    G = np.array([[18.2, 18.2], [26.0, -26.0]])  # columns: 111 and 11-1 of Si [110]
    hk = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [1, 1], [-1, -1], [1, -1], [-1, 1]])
    hk = np.r_[hk, [[2, 0], [0, 2], [-2, 0], [0, -2]]]
    level = [1.0] * 4 + [0.1] * 2 + [0.8] * 2 + [0.012] * 4  # 111, 002, 220, 2-22
    scan = (6, 6)
    rng = np.random.default_rng(12)
    n = scan[0] * scan[1]
    pos = np.asarray(ORIGIN) + (hk @ G.T)[None] + 0.05 * rng.standard_normal((n, len(hk), 2))
    rx, ry = np.divmod(np.repeat(np.arange(n), len(hk)), scan[1])
    lattice = BraggPeaks.from_columns(
        np.r_[rx, np.arange(n) // scan[1]],
        np.r_[ry, np.arange(n) % scan[1]],
        np.r_[pos[..., 0].ravel(), np.full(n, ORIGIN[0])],
        np.r_[pos[..., 1].ravel(), np.full(n, ORIGIN[1])],
        np.r_[np.tile(level, n), np.full(n, 0.75)],
        scan,
        DETECTOR,
    )
    ghosts = np.array([[7.7, 38.2], [-7.7, 38.2], [7.7, -38.2], [-7.7, -38.2]])
    peaks = _with_extra_peaks(lattice, ghosts, 0.03)
    basis = choose_basis(peaks, CAL)
    e1, e2 = conventional_basis(G[:, 0], G[:, 1])
    assert np.allclose(basis.g1, e1, atol=0.02) and np.allclose(basis.g2, e2, atol=0.02)
    off_origin = np.hypot(*basis.spots.T) > 5
    assert basis.counts[basis.indexed & off_origin].sum() < 0.8 * basis.counts[off_origin].sum()


def test_too_few_or_collinear_peaks_are_masked():
    scan = (2, 3)
    peaks = lattice_peaks(G_OBLIQUE, scan, sigma=0.02, p_missing=0.5, n_spurious=1, seed=9)
    kx, ky = centered_peaks(peaks, CAL)
    idx = index_peaks(kx, ky, G_OBLIQUE[:, 0], G_OBLIQUE[:, 1], max_error=1.0)
    flat = peaks.rx * scan[1] + peaks.ry
    drop = np.zeros(len(peaks), bool)
    drop |= (flat == 1) & ~((idx.h == 0) & (np.abs(idx.k) <= 1) & idx.indexed)  # 3 collinear
    drop |= (flat == 2) & ~((idx.k == 0) & idx.indexed)  # one row only: collinear nodes
    drop |= (flat == 3) & ~(idx.indexed & (np.abs(idx.h) <= 1) & (np.abs(idx.k) <= 1))
    drop &= ~((flat == 3) & (np.arange(len(peaks)) % 2 == 0))  # keep some spurious there
    fit = fit_lattice(peaks.select(~drop), G_OBLIQUE[:, 0], G_OBLIQUE[:, 1], CAL, min_peaks=5)
    mask = fit.mask.ravel()
    assert not mask[1] and not mask[2]
    assert mask[0] and mask[4] and mask[5]
    assert (
        np.isnan(fit.g1.reshape(-1, 2)[[1, 2]]).all()
        and np.isnan(fit.residual.ravel()[[1, 2]]).all()
    )
    assert fit.n_peaks.ravel()[2] >= 5  # enough peaks, but all on one line
    # Position 5 gets none of its peaks: counted as zero, masked.
    none = fit_lattice(peaks.select(flat != 5), G_OBLIQUE[:, 0], G_OBLIQUE[:, 1], CAL)
    assert none.n_peaks.ravel()[5] == 0 and not none.mask.ravel()[5]


def test_bad_inputs_raise_clear_errors():
    peaks = lattice_peaks(G_OBLIQUE, (2, 2), n_spurious=0)
    g1, g2 = G_OBLIQUE[:, 0], G_OBLIQUE[:, 1]
    empty = BraggPeaks.empty((2, 2), DETECTOR)
    with pytest.raises(InvalidDataError, match="empty"):
        choose_basis(empty, CAL)
    with pytest.raises(InvalidDataError, match="empty"):
        fit_lattice(empty, g1, g2, CAL)
    with pytest.raises(ConfigurationError, match="collinear"):
        fit_lattice(peaks, g1, 2 * g1 + 0.01, CAL)
    with pytest.raises(ConfigurationError, match="collinear"):
        index_peaks([1.0], [2.0], g1, -g1)
    with pytest.raises(ConfigurationError, match="not finite"):
        fit_lattice(peaks, (np.nan, 1.0), g2, CAL)
    with pytest.raises(ShapeError, match="2-vector"):
        fit_lattice(peaks, (1.0, 2.0, 3.0), g2, CAL)
    with pytest.raises(InvalidDataError, match="NaN"):
        index_peaks([np.nan], [2.0], g1, g2)
    with pytest.raises(InvalidDataError, match="negative"):
        fit_lattice(peaks, g1, g2, CAL, weights=-peaks.intensity)
    with pytest.raises(ConfigurationError, match="weights"):
        fit_lattice(peaks, g1, g2, CAL, weights="brightest")
    with pytest.raises(ConfigurationError, match="min_peaks"):
        fit_lattice(peaks, g1, g2, CAL, min_peaks=2)
    with pytest.raises(ConfigurationError, match="reject"):
        fit_lattice(peaks, g1, g2, CAL, reject=1.0)
    with pytest.raises(ConfigurationError, match="reject_floor"):
        fit_lattice(peaks, g1, g2, CAL, reject_floor=-0.1)
    with pytest.raises(ConfigurationError, match="only one"):
        choose_basis(peaks, CAL, g1=g1)
    # Spots on one line (a systematic row) do not make a 2D lattice.
    row = BraggPeaks.from_columns(
        [0] * 5,
        [0] * 5,
        ORIGIN[0] + 14.0 * np.arange(-2, 3),
        [ORIGIN[1]] * 5,
        [1.0] * 5,
        (1, 1),
        DETECTOR,
    )
    with pytest.raises(InvalidDataError, match="independent"):
        choose_basis(row, CAL)


@pytest.mark.parametrize("odd_weight", [0.3, 1.0])
def test_fit_net_finds_rows_that_extinctions_empty_near_the_origin(odd_weight):
    """A rectangular net (0.1, 0) × (0, 0.3) Å⁻¹ whose odd-h spots are extinct in the rows
    k = 0, ±1 (a glide): the shortest spots span twice the cell, and only the rows k = ±2
    show the odd nodes. Weak odd spots (below a tenth of the weight) used to leave the
    coarse net; strong ones left no net at all."""
    h, k = np.meshgrid(np.arange(-6, 7), np.arange(-3, 4), indexing="ij")
    h, k = h.ravel(), k.ravel()
    keep = ((h % 2 == 0) | (np.abs(k) >= 2)) & ((h != 0) | (k != 0))
    h, k = h[keep], k[keep]
    spots = np.stack([0.1 * h, 0.3 * k], axis=1)
    weights = np.where(h % 2 == 0, 1.0, odd_weight)
    g1, g2 = fit_net(spots, weights)
    assert abs(g1[0] * g2[1] - g1[1] * g2[0]) == pytest.approx(0.03, rel=1e-6)
    # Without the rows k = ±2 the coarse net is the pattern's, and two spots off it (a
    # higher-order Laue zone near the origin) do not halve it.
    inner = np.vstack([spots[np.abs(k) < 2], [[0.05, 0.07], [-0.05, -0.07]]])
    g1, g2 = fit_net(inner, np.r_[np.ones(int(np.sum(np.abs(k) < 2))), 0.2, 0.2])
    assert abs(g1[0] * g2[1] - g1[1] * g2[0]) == pytest.approx(0.06, rel=1e-6)
