"""Lattice refinement from measured spacings: indexing with a coarse prior."""

import numpy as np
import pytest

from stemforge.datasets.peak_lists import augment, kinematic_peak_lists
from stemforge.models.lattice_refinement import refine_lattice
from stemforge.models.peak_features import PeakFeatures
from stemforge.simulate.structures import get_structure

# (id, system, true free lengths, a prior 15–30 % off in both directions)
CASES = [
    ("aflow-proto:A_cF4_225_a-Cu", "cubic", [3.6149], [3.61 * 1.3]),
    ("aflow-proto:A2B_tP6_136_f_a-TiO2", "tetragonal", [4.5922, 2.9574], [4.59 * 0.8, 2.96 * 1.2]),
    ("aflow-proto:A_hP2_194_c-Mg", "hexagonal", [3.2093, 5.2106], [3.21 * 1.2, 5.21 * 0.85]),
]


@pytest.fixture(scope="module")
def spacings():
    features = PeakFeatures()
    out = {}
    for structure_id, *_ in CASES:
        lists = kinematic_peak_lists([get_structure(structure_id)], seed=0, n_zone_axes=10, thickness=(100.0,))
        for noisy in (False, True):
            measured = augment(lists, 5) if noisy else lists
            x = features(measured.q, measured.intensity, measured.offsets)
            out[structure_id, noisy] = features.spacings(x)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_exact_spacings_give_the_lattice(spacings, case):
    structure_id, system, truth, prior = case
    found = refine_lattice(system, np.array(prior), spacings[structure_id, False], scale_error=0.0)
    # Grid steps: 0.12 % (cubic) and 0.2 % (fine pass, two lengths) of the lattice.
    np.testing.assert_allclose(found, truth, rtol=0.004)


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_per_pattern_calibration_errors_average_out(spacings, case):
    """±3 % calibration, 1 % ellipticity and position noise per pattern, ten patterns:
    the mean of ten uniform ±3 % scale errors has σ ≈ 0.55 %, so ≈ 1.5 % at 3σ."""
    structure_id, system, truth, prior = case
    found = refine_lattice(system, np.array(prior), spacings[structure_id, True])
    np.testing.assert_allclose(found, truth, rtol=0.015)


def test_nothing_to_refine_keeps_the_prior():
    prior = np.array([5.0, 6.0, 7.0])
    assert np.array_equal(refine_lattice("orthorhombic", prior, np.ones((3, 4))), prior)
    assert np.array_equal(refine_lattice("cubic", np.array([4.0]), np.zeros((3, 4))), [4.0])
