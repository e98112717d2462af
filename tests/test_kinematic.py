"""Kinematic spot lists: positions on the reciprocal lattice, extinctions, Ewald sphere."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from stemforge.core.units import electron_wavelength
from stemforge.simulate.kinematic import (
    excitation_errors,
    in_plane_rotation,
    kinematic_spots,
    reciprocal_lattice,
    tilt_rotation,
)
from stemforge.simulate.orientation import zone_axis_rotation

A_SI = 5.431


@pytest.fixture(scope="module")
def silicon():
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(A_SI), ["Si"], [[0, 0, 0]])
    return si, reciprocal_lattice(si, 2.0)


def test_silicon_001_spots_sit_on_the_reciprocal_lattice(silicon):
    si, crystal = silicon
    rotation, _ = zone_axis_rotation(si.lattice.matrix, (0, 0, 1))
    q, intensity, hkl = kinematic_spots(crystal, rotation, energy=300e3, thickness=50.0, q_max=1.2)
    # Strongest: the four {220} at |g| = √8 / a; every spot at |hkl| / a exactly.
    assert sorted(map(tuple, np.abs(hkl[:4]))) == [(2, 2, 0)] * 4
    np.testing.assert_allclose(np.linalg.norm(q[:4], axis=1), np.sqrt(8) / A_SI, rtol=1e-12)
    zolz = hkl[:, 2] == 0
    np.testing.assert_allclose(
        np.linalg.norm(q[zolz], axis=1), np.linalg.norm(hkl[zolz], axis=1) / A_SI, rtol=1e-12
    )
    # Diamond-glide extinctions: no {200}, no mixed-parity reflections.
    assert not any(tuple(np.abs(h)) in {(2, 0, 0), (0, 2, 0)} for h in hkl)
    assert np.all((hkl % 2 == 0).all(axis=1) | (hkl % 2 == 1).all(axis=1))


def test_excitation_error_is_the_distance_to_the_ewald_sphere():
    k0 = 1 / electron_wavelength(200e3)
    g = np.array([[0.5, 0.0, 0.0], [0.3, -0.4, 0.02], [1.0, 1.0, -0.05]])
    exact = (k0**2 - np.sum((g + [0, 0, k0]) ** 2, axis=1)) / (2 * k0)
    np.testing.assert_allclose(excitation_errors(g, 200e3), exact, rtol=1e-12)


def test_a_tilt_brightens_one_side_of_the_pattern(silicon):
    si, crystal = silicon
    rotation, _ = zone_axis_rotation(si.lattice.matrix, (0, 0, 1))
    pattern = {}
    for tilt in (0.0, 10.0):
        q, intensity, hkl = kinematic_spots(
            crystal, tilt_rotation(0.0, tilt) @ rotation, energy=300e3, thickness=300.0, q_max=1.2
        )
        pattern[tilt] = {tuple(h): i for h, i in zip(hkl, intensity, strict=True)}
    # Untilted: Friedel pairs equal. Tilted about y: +qx and −qx sides differ.
    plus, minus = (2, 2, 0), (-2, -2, 0)
    assert pattern[0.0][plus] == pytest.approx(pattern[0.0][minus], rel=1e-9)
    assert abs(np.log(pattern[10.0].get(plus, 1e-30) / pattern[10.0].get(minus, 1e-30))) > 1


def test_in_plane_rotation_turns_the_spots(silicon):
    si, crystal = silicon
    rotation, _ = zone_axis_rotation(si.lattice.matrix, (1, 1, 1))
    q0, i0, _ = kinematic_spots(crystal, rotation, energy=300e3, thickness=100.0, q_max=1.0)
    q1, i1, _ = kinematic_spots(
        crystal, in_plane_rotation(0.3) @ rotation, energy=300e3, thickness=100.0, q_max=1.0
    )
    c, s = np.cos(0.3), np.sin(0.3)
    np.testing.assert_allclose(q1, q0 @ np.array([[c, s], [-s, c]]), atol=1e-12)
    np.testing.assert_allclose(i1, i0, rtol=1e-9)
