"""Zone-axis orientation: beam along [uvw], the in-plane convention, residual strain, sampling."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.orientation import (
    apply_strain,
    conventional_standard_structure,
    low_index_zone_axes,
    orient,
    polar_strain,
    random_mistilts,
    zone_axes,
)


@pytest.fixture(scope="module")
def si():
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def gan():
    return Structure.from_spacegroup(
        "P6_3mc",
        Lattice.hexagonal(3.189, 5.185),
        ["Ga", "N"],
        [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]],
    )


@pytest.mark.parametrize(
    ("uvw", "n_atoms", "x_hkl"),
    [((0, 0, 1), 8, (1, 0, 0)), ((1, 1, 0), 16, (0, 0, 1)), ((1, 1, 1), 48, (1, 0, -1))],
)
def test_beam_along_zone_axis_and_x_along_reflection(si, uvw, n_atoms, x_hkl):
    cell = orient(si, uvw)
    assert len(cell.atoms) == n_atoms
    assert cell.residual_strain < 1e-9
    np.testing.assert_allclose(
        np.asarray(cell.atoms.cell), np.diag(np.diag(cell.atoms.cell)), atol=1e-9
    )
    lattice = conventional_standard_structure(si).lattice.matrix
    beam = cell.rotation @ (np.asarray(uvw) @ lattice)
    np.testing.assert_allclose(beam / np.linalg.norm(beam), [0, 0, 1], atol=1e-12)
    assert cell.x_reflection == x_hkl
    g = cell.rotation @ (np.asarray(x_hkl) @ np.linalg.inv(lattice).T)
    np.testing.assert_allclose(g / np.linalg.norm(g), [1, 0, 0], atol=1e-12)
    # the cell is a whole supercell: every conventional site is there, once
    assert round(abs(np.linalg.det(cell.supercell))) * 8 == n_atoms


def test_residual_strain_is_measured_and_bounded(si, gan):
    with pytest.raises(ConfigurationError, match="raise max_repetitions"):
        orient(si, (1, 2, 3), max_repetitions=4)  # 2.6 % strained
    assert orient(si, (1, 2, 3), max_repetitions=8).residual_strain < 1e-9
    with pytest.raises(ConfigurationError, match="strained by 2.76%"):
        orient(gan, (1, 1, 1), max_repetitions=4)
    cell = orient(gan, (1, 1, 1), max_repetitions=8)
    assert 0.001 < cell.residual_strain < 0.003
    # independent check: the cell vectors against the exact lattice vectors they replace
    exact = cell.supercell @ cell.conventional_cell
    simulated = np.asarray(cell.atoms.cell)
    length_change = np.linalg.norm(simulated, axis=1) / np.linalg.norm(exact, axis=1) - 1
    assert np.abs(length_change).max() <= np.linalg.norm(polar_strain(cell.deformation), 2) + 1e-12
    assert np.abs(length_change).max() > 1e-4
    with pytest.raises(ConfigurationError, match="max_repetitions ≥ 9"):
        orient(si, (1, 0, 9), max_repetitions=8)


def test_bad_indices_are_refused(si):
    with pytest.raises(ConfigurationError, match="no direction"):
        orient(si, (0, 0, 0))
    with pytest.raises(ConfigurationError, match="zero-order Laue zone"):
        orient(si, (0, 0, 1), x_reflection=(1, 0, 1))
    assert orient(si, (0, 0, 2)).zone_axis == (0, 0, 1)


def test_apply_strain_scales_cell_and_atoms(si):
    cell = orient(si, (0, 0, 1)).atoms
    eps = np.array([[0.01, 0.002, 0], [0.002, -0.005, 0], [0, 0, 0.003]])
    strained = apply_strain(cell, eps)
    np.testing.assert_allclose(
        np.asarray(strained.cell), np.asarray(cell.cell) @ (np.eye(3) + eps).T
    )
    np.testing.assert_allclose(strained.positions, cell.positions @ (np.eye(3) + eps).T, atol=1e-12)
    with pytest.raises(ConfigurationError, match="mistilt"):
        apply_strain(cell, np.array([[0, 0, 0.01], [0, 0, 0], [0, 0, 0]]))
    with pytest.raises(ConfigurationError, match="3×3"):
        apply_strain(cell, np.zeros((4, 4)))


def test_zone_axis_lists(si, gan):
    assert len(zone_axes(1)) == 13
    assert zone_axes(1, conventional_standard_structure(si)) == [(0, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert low_index_zone_axes(conventional_standard_structure(si)) == [
        (0, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
        (0, 1, 2),
        (1, 1, 2),
        (1, 2, 2),
    ]
    hexagonal = zone_axes(1, conventional_standard_structure(gan))
    assert (0, 0, 1) in hexagonal and len(hexagonal) < 13


def test_random_mistilts_are_seeded_and_bounded():
    a, b = random_mistilts(500, 5.0, seed=3), random_mistilts(500, 5.0, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_mistilts(500, 5.0, seed=4))
    radius = np.hypot(*a.T)
    assert radius.max() <= 5.0
    assert abs(np.mean(radius**2) - 12.5) < 1.5  # uniform over the disc: <r²> = R²/2
