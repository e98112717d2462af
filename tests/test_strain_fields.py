"""Strain fields: tensor algebra, SiGe elasticity, truth maps, and the synthetic scan.

The pattern simulator here is an analytic stand-in: uniform disks at the kinematic
reciprocal-lattice positions of the crystal the simulator was asked for, Si-type [001]
zone axis (diamond: h, k even with h + k = 4n), ``g' = (I + H)⁻ᵀ g`` with ``g = (h, k)/a``.
Spot positions measured in its patterns are compared with the truth maps, which are
expressed relative to the reference lattice: the two descriptions must agree.
"""

import json
import math

import numpy as np
import pytest

from stemforge.core import DataCube
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.core.units import electron_wavelength
from stemforge.simulate.strain import (
    A_GE,
    A_SI,
    C_GE,
    C_SI,
    SILICON,
    Material,
    StrainTruth,
    deformation_gradient,
    homogeneous_strain,
    linear_gradient,
    pseudomorphic_strain,
    rotated_grain,
    sige_multilayer,
    strain_from_deformation,
    strain_peaks,
    strained_scan,
    truth_from_dict,
    truth_to_dict,
)

Q, DQ, ENERGY, SEMIANGLE = 96, 0.025, 300e3, 1.5  # pixels, Å⁻¹, eV, mrad
RADIUS = SEMIANGLE * 1e-3 / electron_wavelength(ENERGY) / DQ  # disk radius, pixels (~3.0)
C = Q // 2
# Diamond [001] zero-order Laue zone reflections within 1.1 Å⁻¹ of the unstrained Si lattice.
HK = np.array(
    [
        (h, k)
        for h in range(-8, 9, 2)
        for k in range(-8, 9, 2)
        if (h + k) % 4 == 0 and math.hypot(h, k) / A_SI <= 1.1
    ],
    dtype=float,
)


def spot_positions(hk, a, F):
    """Pixel positions of reflections ``hk`` of a cubic lattice ``a`` deformed by ``F``."""
    g = hk / a / DQ
    return np.stack(strain_peaks(C + g[:, 0], C + g[:, 1], F, (C, C)), axis=1)


def render_disks(centers, radius, sub=8):
    """Sum of uniform disks, each pixel holding the fraction of its area inside."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    fine = (np.arange(Q)[:, None] + offsets).ravel()
    image = np.zeros((Q * sub, Q * sub))
    for cx, cy in centers:
        image += ((fine[:, None] - cx) ** 2 + (fine[None, :] - cy) ** 2 <= radius**2)
    return image.reshape(Q, sub, Q, sub).mean(axis=(1, 3))


class StandIn:
    """Analytic zone-axis pattern of the requested crystal; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, strain_3x3, material):
        self.calls.append((strain_3x3, material))
        return render_disks(spot_positions(HK, material.a, np.eye(3) + strain_3x3), RADIUS)


def measured_spots(pattern, predicted, window=RADIUS + 1.5):
    """Centroids of the pattern in windows around the predicted positions."""
    x = np.arange(Q)[:, None, None]
    y = np.arange(Q)[None, :, None]
    w = pattern[:, :, None] * (np.hypot(x - predicted[:, 0], y - predicted[:, 1]) <= window)
    total = w.sum(axis=(0, 1))
    return np.stack([(w * x).sum(axis=(0, 1)) / total, (w * y).sum(axis=(0, 1)) / total], axis=1)


def assert_spots_follow_truth(cube, truth, tol=0.05):
    """Every pattern has its disks where the truth strain (relative to the reference) puts them."""
    worst = 0.0
    deformation = truth.deformation()
    for rx in range(cube.shape[0]):
        for ry in range(cube.shape[1]):
            predicted = spot_positions(HK, truth.reference.a, deformation[rx, ry])
            worst = max(worst, np.abs(measured_spots(cube.data[rx, ry], predicted) - predicted).max())
    assert worst < tol
    return worst


# ---- tensor algebra -----------------------------------------------------------------------
def test_reciprocal_vectors_transform_with_the_inverse_transpose():
    # Tensile e_xx: real-space x spacing grows by 1%, spots along qx move in by 1/1.01.
    s = homogeneous_strain(0.01, 0.0, 0.0)
    np.testing.assert_allclose(s.reciprocal @ [1.0, 0.0], [1 / 1.01, 0.0], rtol=1e-15)
    np.testing.assert_allclose(s.displacement_gradient, s.tensor, atol=1e-15)
    # A counter-clockwise lattice rotation turns spots from qx toward qy by the same angle.
    r = homogeneous_strain(0.0, 0.0, 0.0, theta=0.1)
    np.testing.assert_allclose(r.reciprocal @ [1.0, 0.0], [math.cos(0.1), math.sin(0.1)], atol=1e-15)
    # General case: g' = F^-T g keeps g'·(F a) = g·a, the definition of the reciprocal lattice.
    s = homogeneous_strain(0.012, -0.007, 0.004, theta=-0.03, e_zz=0.002)
    a, g = np.array([0.3, 1.1]), np.array([-0.8, 0.5])
    assert (s.reciprocal @ g) @ (s.F[:2, :2] @ a) == pytest.approx(g @ a, rel=1e-14)
    np.testing.assert_allclose(s.tensor, s.tensor.T)
    assert s.F[2, 2] == pytest.approx(1.002) and s.F[0, 2] == s.F[2, 0] == 0
    # Spots move about the origin pixel.
    qx, qy = strain_peaks([60.0, 48.0], [48.0, 48.0], s.F, (48.0, 48.0))
    assert (qx[1], qy[1]) == (48.0, 48.0)
    np.testing.assert_allclose([qx[0] - 48, qy[0] - 48], s.reciprocal @ [12.0, 0.0])


def test_polar_decomposition_recovers_strain_and_rotation():
    rng = np.random.default_rng(3)
    values = rng.uniform(-0.03, 0.03, size=(4, 50))
    theta = rng.uniform(-0.5, 0.5, size=50)
    F = deformation_gradient(values[0], values[1], values[2], theta, values[3])
    e_xx, e_yy, e_xy, t = strain_from_deformation(F)
    np.testing.assert_allclose(np.stack([e_xx, e_yy, e_xy, t]), np.stack([*values[:3], theta]), atol=1e-14)


# ---- SiGe elasticity ----------------------------------------------------------------------
def test_pseudomorphic_sige_follows_the_elasticity_formula():
    x = 0.3
    a = A_SI + x * (A_GE - A_SI)  # Vegard
    c11 = C_SI[0] + x * (C_GE[0] - C_SI[0])
    c12 = C_SI[1] + x * (C_GE[1] - C_SI[1])
    eps_par = (A_SI - a) / a
    eps_perp = -2 * c12 / c11 * eps_par
    assert pseudomorphic_strain(x) == pytest.approx((eps_par, eps_perp), abs=1e-12)
    # The numbers: 1.24% in-plane compression, 0.95% tetragonal expansion, 2.21% vs Si.
    assert (eps_par, eps_perp) == pytest.approx((-0.012377, 0.009484), abs=1e-6)
    expected_e_xx = a * (1 + eps_perp) / A_SI - 1
    assert expected_e_xx == pytest.approx(0.022135, abs=1e-6)

    truth = sige_multilayer((30, 3), 10.0, layers=[(100.0, 0.0), (100.0, x)])
    rows_sige = slice(10, 20)
    assert [m.name for m in truth.materials] == ["Si", "Si0.70Ge0.30"]
    assert np.all(truth.material[rows_sige] == 1) and np.all(truth.material[:10] == 0) and np.all(truth.material[20:] == 0)
    np.testing.assert_allclose(truth.e_xx[rows_sige], expected_e_xx, atol=1e-6)
    for name in ("e_yy", "e_xy", "theta", "e_zz"):
        assert np.all(getattr(truth, name) == 0)
    assert np.all(truth.e_xx[:10] == 0) and np.all(truth.e_xx[20:] == 0)
    # Relative to its own lattice, the SiGe crystal the simulator builds is tetragonal:
    # eps_perp along the growth direction x, eps_par in the growth plane (y and the beam z).
    np.testing.assert_allclose(truth.applied_strain()[15, 1], np.diag([eps_perp, eps_par, eps_par]), atol=1e-12)


# ---- scans --------------------------------------------------------------------------------
def test_multilayer_scan_one_simulation_per_layer_type_spots_at_truth():
    layers = [(30.0, 0.0), (40.0, 0.2), (30.0, 0.0), (40.0, 0.35)]
    truth = sige_multilayer((16, 3), 10.0, layers=layers)
    sim = StandIn()
    cube, out_truth = strained_scan(truth, sim, q_pixel_size=DQ, energy=ENERGY, semiangle=SEMIANGLE)
    assert out_truth is truth
    assert isinstance(cube, DataCube) and cube.shape == (16, 3, Q, Q) and cube.dtype == np.float32
    assert len(sim.calls) == 3 == cube.metadata["strain_states"]  # Si, Si0.8Ge0.2, Si0.65Ge0.35
    assert sorted(m.name for _, m in sim.calls) == ["Si", "Si0.65Ge0.35", "Si0.80Ge0.20"]
    cal = cube.calibration
    assert (cal.qx0, cal.qy0, cal.q_pixel_size, cal.q_units, cal.energy) == (48.0, 48.0, DQ, "A^-1", ENERGY)
    assert (cal.r_pixel_size, cal.r_units, cal.convergence_semiangle) == (10.0, "A", SEMIANGLE)
    assert_spots_follow_truth(cube, truth)
    # The check can fail: the SiGe spots are far from where unstrained Si would put them.
    sige = np.argwhere(truth.material == 2)[0]
    unstrained = spot_positions(HK, A_SI, np.eye(3))
    shift = np.abs(measured_spots(cube.data[tuple(sige)], unstrained) - unstrained).max()
    assert shift > 0.5


def test_gradient_scan_with_quantised_states():
    start, end = {"e_xx": -0.01, "e_xy": 0.0}, {"e_xx": 0.015, "e_xy": 0.006, "theta": 0.01}
    truth = linear_gradient((21, 2), 5.0, start, end, axis=0)
    np.testing.assert_allclose(truth.e_xx[:, 0], np.linspace(-0.01, 0.015, 21), atol=1e-15)
    assert np.all(truth.e_xx[:, 0] == truth.e_xx[:, 1])
    sim = StandIn()
    cube, q_truth = strained_scan(truth, sim, q_pixel_size=DQ, energy=ENERGY, quantum=2e-3)
    for name in ("e_xx", "e_xy", "theta"):
        values = getattr(q_truth, name)
        np.testing.assert_allclose(values / 2e-3, np.round(values / 2e-3), atol=1e-9)
        assert np.abs(values - getattr(truth, name)).max() <= 1e-3 + 1e-12
    distinct = {tuple(np.round([q_truth.e_xx[i, 0], q_truth.e_xy[i, 0], q_truth.theta[i, 0]], 12)) for i in range(21)}
    assert len(sim.calls) == len(distinct) < 21
    assert_spots_follow_truth(cube, q_truth)


def test_rotated_grain_scan():
    truth = rotated_grain((9, 9), 10.0, theta=0.04, radius=25.0, strain={"e_yy": 0.005})
    inside = truth.theta != 0
    assert inside.sum() == 21 and inside[4, 4] and not inside[0, 0]  # |(dx, dy)| <= 2.5 steps
    assert np.all(truth.e_yy[inside] == 0.005) and np.all(truth.e_yy[~inside] == 0)
    sim = StandIn()
    cube, _ = strained_scan(truth, sim, q_pixel_size=DQ, energy=ENERGY)
    assert len(sim.calls) == 2
    assert_spots_follow_truth(cube, truth)


def test_truth_round_trips_through_a_dict():
    truth = sige_multilayer((12, 2), 10.0, layers=[(40.0, 0.25)], substrate_x_ge=0.1)
    d = truth_to_dict(truth)
    json.dumps(d["attrs"])  # everything that is not an array is JSON-ready
    assert d["material"].dtype.kind == "i" and d["e_xx"].shape == (12, 2)
    back = truth_from_dict(d)
    for name in ("e_xx", "e_yy", "e_xy", "theta", "e_zz", "material"):
        np.testing.assert_array_equal(getattr(back, name), getattr(truth, name))
    assert back.materials == truth.materials and back.reference == truth.reference and back.step == truth.step
    # On a relaxed Si0.9Ge0.1 virtual substrate, a Si0.75Ge0.25 layer is still compressed in-plane.
    assert truth.reference.name == "Si0.90Ge0.10" and truth.e_xx[0, 0] > 0


# ---- errors -------------------------------------------------------------------------------
def test_wrong_inputs_raise_clear_errors():
    truth = rotated_grain((4, 4), 10.0, theta=0.1, radius=12.0)
    with pytest.raises(ShapeError, match="same detector grid"):
        sizes = iter([(Q, Q), (Q + 2, Q + 2)])
        strained_scan(truth, lambda h, m: np.zeros(next(sizes)), q_pixel_size=DQ, energy=ENERGY)
    with pytest.raises(InvalidDataError, match="NaN"):
        strained_scan(truth, lambda h, m: np.full((Q, Q), np.nan), q_pixel_size=DQ, energy=ENERGY)
    with pytest.raises(ConfigurationError, match="quantum"):
        strained_scan(truth, StandIn(), q_pixel_size=DQ, energy=ENERGY, quantum=0)
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        sige_multilayer((4, 4), 10.0, layers=[(40.0, 1.3)])
    with pytest.raises(ConfigurationError, match="thickness"):
        sige_multilayer((4, 4), 10.0, layers=[(-5.0, 0.2)])
    with pytest.raises(ConfigurationError, match="unknown strain component"):
        linear_gradient((4, 4), 10.0, {"exx": 0.01}, {})
    with pytest.raises(ShapeError, match="scan shape"):
        StrainTruth(
            *(np.zeros((3, 3)),) * 4, np.zeros((3, 4)), np.zeros((3, 3), int), (SILICON,), SILICON, 1.0
        )
    with pytest.raises(ShapeError, match="materials"):
        StrainTruth(*(np.zeros((3, 3)),) * 5, np.ones((3, 3), int), (SILICON,), SILICON, 1.0)
    with pytest.raises(ShapeError, match=r"\(Rx, Ry\)"):
        rotated_grain((4,), 10.0, theta=0.1, radius=12.0)
    assert isinstance(Material("X", 4.0, (("Si", 1.0),)).to_dict()["composition"], list)
