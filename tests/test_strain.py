"""Strain maps: homogeneous strains, rotation, gradients, references, scan frame, errors.

Peak tables are generated from a reference reciprocal basis ``G_ref`` deformed per position
by ``F = R(θ)(I + ε)`` (the truth convention of :mod:`stemforge.simulate.strain`): the
reciprocal basis becomes ``F⁻ᵀ G_ref``. Position noise σ = 0.05 px per peak gives a
per-position strain error ``σ_e ≈ σ √((DᵀD)⁻¹) / |g|`` (:func:`_strain_sigma`, least
squares over the ~45 reflections in the detector: ≈ 2.3·10⁻⁴); map means over N positions
carry ``σ_e / √N``, so the ±0.02 % (2·10⁻⁴) target on means is a > 5σ bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic_peaks import DETECTOR, ORIGIN, lattice_peaks, nodes

from stemforge.core import BraggPeaks, Calibration, ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.lattice import LatticeFit, choose_basis, fit_lattice
from stemforge.infer.strain import (
    ReferenceLattice,
    StrainMap,
    deformation_from_bases,
    reference_lattice,
    strain_map,
)
from stemforge.simulate.strain import deformation_gradient

CAL = Calibration(qx0=ORIGIN[0], qy0=ORIGIN[1])
#: Reference reciprocal basis, columns g1, g2, pixels (oblique, reduced).
G_REF = np.array([[14.0, -3.0], [2.0, 15.5]])
REF = ReferenceLattice(G_REF[:, 0], G_REF[:, 1])
SIGMA = 0.05
P_MISSING = 0.2
#: The ±0.02 % accuracy target for homogeneous strain.
TARGET = 2e-4


def strained_peaks(
    e_xx: object = 0.0,
    e_yy: object = 0.0,
    e_xy: object = 0.0,
    theta: object = 0.0,
    scan_shape: tuple[int, int] = (8, 8),
    seed: int = 0,
) -> BraggPeaks:
    """Peaks of ``G_ref`` deformed by ``F = R(θ)(I + ε)`` at every position.

    Components are scalars or ``(Rx, Ry)`` maps; reflections as in
    :func:`synthetic_peaks.lattice_peaks`, missing with ``P_MISSING``, two weak spurious
    peaks per position, Gaussian position noise ``SIGMA``.
    """
    comps = [np.broadcast_to(np.asarray(c, float), scan_shape) for c in (e_xx, e_yy, e_xy, theta)]
    F = deformation_gradient(*comps)[..., :2, :2]
    G = np.swapaxes(np.linalg.inv(F), -1, -2) @ G_REF  # reciprocal basis F⁻ᵀ G_ref
    return lattice_peaks(G, scan_shape, sigma=SIGMA, p_missing=P_MISSING, n_spurious=2, seed=seed)


def _strain_sigma() -> float:
    """Per-position 1σ strain error: ``σ √((DᵀD)⁻¹)`` of a basis component over the
    reflections in the detector (fewer by the missing fraction), divided by the shortest
    ``|g|``. The intensity envelope here (Gaussian, 50 px) is broad enough that intensity
    weights change this little."""
    hk = nodes()
    pos = np.asarray(ORIGIN) + hk @ G_REF.T
    hk = hk[((pos >= 3) & (pos <= np.asarray(DETECTOR) - 4)).all(-1)]
    d = np.c_[np.ones(len(hk)), hk]
    cov = np.linalg.inv(d.T @ d * (1 - P_MISSING))
    return SIGMA * math.sqrt(max(cov[1, 1], cov[2, 2])) / np.hypot(*G_REF[:, 0])


def _measure(peaks: BraggPeaks, reference: object = REF, **kw: object) -> StrainMap:
    basis = choose_basis(peaks, CAL)
    return strain_map(fit_lattice(peaks, basis.g1, basis.g2, CAL), reference, **kw)


# ---- physics of the strain kernel (exact bases, no noise) -----------------------------------
def test_stretched_real_lattice_is_tensile_positive():
    """+1 % in real space = reciprocal vectors 1 % shorter = e = +0.01, exactly."""
    fit = LatticeFit(
        g1=(G_REF[:, 0] / 1.01)[None, None],
        g2=(G_REF[:, 1] / 1.01)[None, None],
        origin=np.zeros((1, 1, 2)),
        residual=np.zeros((1, 1)),
        n_peaks=np.full((1, 1), 40),
        mask=np.ones((1, 1), bool),
    )
    s = strain_map(fit, REF)
    assert s.e_xx[0, 0] == pytest.approx(0.01, abs=1e-12)
    assert s.e_yy[0, 0] == pytest.approx(0.01, abs=1e-12)
    assert abs(s.e_xy[0, 0]) < 1e-12 and abs(s.theta[0, 0]) < 1e-12


@pytest.mark.parametrize("state", [(0.08, -0.05, 0.03, 0.2), (0.0, 0.0, 0.0, -0.5)])
def test_finite_strain_and_rotation_are_inverted_exactly(state):
    """Biot strain of F = R U: large strains and rotations come back without a
    small-strain error (the infinitesimal sym(F) − I would be off by ~ε²/2)."""
    F = deformation_gradient(*state)[:2, :2]
    G = np.linalg.inv(F).T @ G_REF
    f = deformation_from_bases(G[:, 0], G[:, 1], G_REF[:, 0], G_REF[:, 1])
    assert np.allclose(f, F, atol=1e-12)
    fit = LatticeFit(
        G[:, 0][None, None], G[:, 1][None, None], np.zeros((1, 1, 2)),
        np.zeros((1, 1)), np.ones((1, 1), int), np.ones((1, 1), bool),
    )  # fmt: skip
    s = strain_map(fit, REF)
    got = (s.e_xx[0, 0], s.e_yy[0, 0], s.e_xy[0, 0], s.theta[0, 0])
    assert got == pytest.approx(state, abs=1e-12)


# ---- end to end from peak tables ------------------------------------------------------------
@pytest.mark.parametrize(
    "strain",
    [(0.01, 0.0, 0.0), (0.0, 0.01, 0.0), (0.0, 0.0, 0.01), (0.01, 0.01, 0.0)],
    ids=["uniaxial-x", "uniaxial-y", "shear", "biaxial"],
)
def test_homogeneous_strain_recovered(strain):
    s = _measure(strained_peaks(*strain, seed=1))
    assert s.mask.all() and s.frame == "detector" and s.reference is REF
    tol = 5 * _strain_sigma()
    for name, truth in zip(("e_xx", "e_yy", "e_xy", "theta"), (*strain, 0.0), strict=True):
        values = getattr(s, name)
        assert values.mean() == pytest.approx(truth, abs=TARGET), name
        assert np.abs(values - truth).max() < tol, name


def test_rotation_of_one_degree_recovered():
    theta = math.radians(1.0)
    s = _measure(strained_peaks(theta=theta, seed=2))
    assert s.theta.mean() == pytest.approx(theta, abs=TARGET)
    assert np.abs(s.theta - theta).max() < 5 * _strain_sigma()
    for name in ("e_xx", "e_yy", "e_xy"):
        assert abs(getattr(s, name).mean()) < TARGET


def test_linear_gradient_recovered_position_by_position():
    scan = (12, 6)
    rx, ry = np.meshgrid(np.arange(scan[0]), np.arange(scan[1]), indexing="ij")
    e_xx = 0.02 * (rx / (scan[0] - 1) - 0.5)  # -1 % .. +1 % along scan x
    e_xy = 0.01 * ry / (scan[1] - 1)
    theta = np.radians(0.5) * rx / (scan[0] - 1)
    s = _measure(strained_peaks(e_xx, 0.0, e_xy, theta, scan_shape=scan, seed=3))
    tol = 5 * _strain_sigma()
    for name, truth in (("e_xx", e_xx), ("e_yy", 0 * e_xx), ("e_xy", e_xy), ("theta", theta)):
        assert np.abs(getattr(s, name) - truth).max() < tol, name
    # The fitted slope of e_xx along x: 0.02 over the scan, to the target.
    slope = np.polyfit(rx.ravel(), s.e_xx.ravel(), 1)[0] * (scan[0] - 1)
    assert slope == pytest.approx(0.02, abs=TARGET)


def test_reference_from_roi_and_from_median():
    """Columns ry < 7 unstrained, ry >= 7 with e_xx = 1 %: the median (7 of 10 columns) and an
    ROI over the unstrained part give the same reference; an ROI over the strained stripe
    moves the zero there, so the rest reads F = diag(1/1.01, 1): e_xx = 1/1.01 − 1."""
    scan = (6, 10)
    e_xx = np.zeros(scan)
    e_xx[:, 7:] = 0.01
    peaks = strained_peaks(e_xx, scan_shape=scan, seed=4)
    basis = choose_basis(peaks, CAL)
    fit = fit_lattice(peaks, basis.g1, basis.g2, CAL)
    median = strain_map(fit)
    roi = strain_map(fit, (slice(0, 6), slice(0, 7)))
    assert median.reference.source == "median" and roi.reference.source == "roi"
    # Both references average ≥ 36 positions of ~3e-3 px error: they agree to ~1e-3 px.
    assert np.allclose(median.reference.g1, roi.reference.g1, atol=2e-3)
    assert np.allclose(median.reference.g2, roi.reference.g2, atol=2e-3)
    for s in (median, roi):
        assert s.e_xx[:, 7:].mean() == pytest.approx(0.01, abs=TARGET)
        assert abs(s.e_xx[:, :7].mean()) < TARGET
    stripe = strain_map(fit, (slice(None), slice(7, 10)))
    assert stripe.e_xx[:, :7].mean() == pytest.approx(1 / 1.01 - 1, abs=TARGET)
    # A boolean mask works as an ROI too.
    mask = np.zeros(scan, bool)
    mask[:, :7] = True
    assert np.allclose(reference_lattice(fit, mask).g1, roi.reference.g1)


def test_scan_frame_applies_flip_then_qr_rotation():
    fit = _exact_fit(e_xx=0.01, theta=0.02)
    det = strain_map(fit, REF)
    assert det.e_xx[0, 0] == pytest.approx(0.01) and det.theta[0, 0] == pytest.approx(0.02)
    # qr_rotation 90° (detector x lies along scan y): the strain appears along scan y.
    s = strain_map(fit, REF, frame="scan", calibration=Calibration(qr_rotation=math.pi / 2))
    assert s.frame == "scan"
    assert (s.e_xx[0, 0], s.e_yy[0, 0], s.e_xy[0, 0]) == pytest.approx((0, 0.01, 0), abs=1e-12)
    assert s.theta[0, 0] == pytest.approx(0.02, abs=1e-12)  # a proper rotation keeps θ
    # A flip alone swaps x and y and reverses the sense of rotation.
    s = strain_map(fit, REF, frame="scan", calibration=Calibration(qr_flip=True))
    assert (s.e_xx[0, 0], s.e_yy[0, 0]) == pytest.approx((0, 0.01), abs=1e-12)
    assert s.theta[0, 0] == pytest.approx(-0.02, abs=1e-12)
    # Flip, then rotate by 90°: x → y → -x, the strain comes back along scan x.
    s = strain_map(
        fit, REF, frame="scan", calibration=Calibration(qr_rotation=math.pi / 2, qr_flip=True)
    )
    assert (s.e_xx[0, 0], s.e_yy[0, 0]) == pytest.approx((0.01, 0), abs=1e-12)
    # A general angle rotates the tensor: ε_scan = R ε Rᵀ, e.g. 30°.
    phi = math.radians(30)
    s = strain_map(fit, REF, frame="scan", calibration=Calibration(qr_rotation=phi))
    c, n = math.cos(phi), math.sin(phi)
    assert (s.e_xx[0, 0], s.e_yy[0, 0], s.e_xy[0, 0]) == pytest.approx(
        (0.01 * c * c, 0.01 * n * n, 0.01 * c * n), abs=1e-12
    )


def _exact_fit(e_xx: float = 0.0, theta: float = 0.0) -> LatticeFit:
    F = deformation_gradient(e_xx, 0.0, 0.0, theta)[:2, :2]
    G = np.linalg.inv(F).T @ G_REF
    return LatticeFit(
        G[:, 0][None, None], G[:, 1][None, None], np.zeros((1, 1, 2)),
        np.zeros((1, 1)), np.ones((1, 1), int), np.ones((1, 1), bool),
    )  # fmt: skip


def test_masked_positions_stay_nan():
    scan = (3, 3)
    peaks = strained_peaks(0.01, scan_shape=scan, seed=5)
    few = (peaks.rx == 1) & (peaks.ry == 1) & (peaks.intensity < 900)
    fit = fit_lattice(peaks.select(~few), G_REF[:, 0], G_REF[:, 1], CAL)
    s = strain_map(fit, REF)
    assert not s.mask[1, 1] and s.mask.sum() == 8
    assert np.isnan(s.e_xx[1, 1]) and np.isnan(s.theta[1, 1])
    assert np.abs(s.e_xx[s.mask] - 0.01).max() < 5 * _strain_sigma()


def test_bad_inputs_raise_clear_errors():
    fit = _exact_fit()
    with pytest.raises(ShapeError, match="outside the scan"):
        strain_map(fit, (slice(0, 5), slice(0, 1)))
    with pytest.raises(ShapeError, match="empty"):
        strain_map(fit, (slice(1, 1), slice(0, 1)))
    with pytest.raises(ShapeError, match="ROI"):
        strain_map(fit, np.ones((2, 2), bool))
    masked = LatticeFit(
        fit.g1 * np.nan, fit.g2 * np.nan, fit.origin, fit.residual, fit.n_peaks, ~fit.mask
    )
    with pytest.raises(InvalidDataError, match="no position in the scan"):
        strain_map(masked)
    with pytest.raises(InvalidDataError, match="inside the ROI"):
        strain_map(masked, (slice(0, 1), slice(0, 1)))
    with pytest.raises(ConfigurationError, match="collinear"):
        ReferenceLattice((10.0, 0.0), (-20.0, 0.0))
    with pytest.raises(ConfigurationError, match="not finite"):
        ReferenceLattice((np.nan, 0.0), (0.0, 10.0))
    with pytest.raises(ConfigurationError, match="frame"):
        strain_map(fit, REF, frame="lab")
    with pytest.raises(ConfigurationError, match="calibration"):
        strain_map(fit, REF, frame="scan")
