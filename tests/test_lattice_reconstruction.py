"""3D lattice from zone-axis nets: Bravais lattice and cell of known crystals."""

import numpy as np
import pytest
from uninformed_predictions import uninformed_predictions

from stemforge.datasets.peak_lists import augment, kinematic_peak_lists
from stemforge.models.crystal_id import aggregate
from stemforge.models.lattice_reconstruction import (
    LATTICE_VETO,
    SYMMETRY_TOLERANCES,
    LatticeReconstruction,
    LatticeSymmetry,
    lattice_symmetry,
    pattern_nets,
    reconstruct_lattice,
    reduce_bases,
    space_group_centrings,
    system_log_prior,
    system_reading,
)
from stemforge.simulate.structures import get_structure
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS

# (id, Bravais lattice, conventional a, c (Å))
CASES = [
    ("aflow-proto:A_cF4_225_a-Cu", "cF", 3.6149, 3.6149),
    ("aflow-proto:A2B_tP6_136_f_a-TiO2", "tP", 4.5922, 2.9574),
    ("aflow-proto:A_hP2_194_c-Mg", "hP", 3.2093, 5.2106),
]


def _lists(structure_id, q_max=1.6):
    return kinematic_peak_lists(
        [get_structure(structure_id)], seed=0, n_zone_axes=10, thickness=(100.0,), q_max=q_max
    )


def test_greedy_reduction_finds_the_shortest_basis():
    cubic = np.eye(3) * 0.25
    skewed = np.array([[1, 1, 0], [0, 1, 0], [2, 1, 1]]) @ cubic  # unimodular: same lattice
    reduced = reduce_bases(skewed[None])[0]
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 0.25, rtol=1e-12)
    assert abs(np.linalg.det(reduced)) == pytest.approx(0.25**3)


def test_centring_letters_of_space_groups():
    letters = space_group_centrings()
    assert [letters[g - 1] for g in (1, 12, 63, 166, 194, 225, 229)] == list("PSSRPFI")


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_exact_nets_give_the_bravais_lattice_and_cell(case):
    structure_id, bravais, a, c = case
    lists = _lists(structure_id)
    nets = pattern_nets(lists.q, lists.intensity, lists.offsets)
    assert np.isfinite(nets).all(axis=(1, 2)).sum() >= 8
    found = reconstruct_lattice(nets, scale_error=0.0)
    assert found is not None and found.explained.sum() >= 8
    symmetry = lattice_symmetry(found)
    assert symmetry.bravais == bravais
    lattice = symmetry.parameters()
    # Nets fitted through exact spot positions: the cell to 0.1 %.
    np.testing.assert_allclose(lattice[[0, 2]], [a, c], rtol=1e-3)


@pytest.mark.parametrize(
    ("case", "at_least"), zip(CASES, (3, 5, 5), strict=True), ids=[c[1] for c in CASES]
)
def test_sessions_of_measured_patterns(case, at_least):
    """Five sessions, each with one shared ±3 % calibration error and 1 % ellipticity,
    position noise and lost weak spots.

    A detector reach of 2.5 Å⁻¹: at 1.6 Å⁻¹ the high-index axes of these small cells show
    two or three spots, no net. Rutile and Mg: every session finds the lattice (8 of 8
    measured). Cu's nets rest on 3–6 spots each, too few to pin a 1 % distortion, and its
    noisy metric misses the symmetry tolerance in about one session in three (5 of 8).
    """
    structure_id, bravais, a, c = case
    lists = _lists(structure_id, q_max=2.5)
    found = []
    for seed in range(5):
        measured = augment(lists, seed, sessions=lists.structure_id)
        reconstruction = reconstruct_lattice(
            pattern_nets(measured.q, measured.intensity, measured.offsets)
        )
        symmetry = lattice_symmetry(reconstruction)
        if symmetry.bravais != bravais:
            continue
        lattice = symmetry.parameters()
        found.append(lattice)
        # Lengths: the session's calibration error (≤ 3 %) plus the fit's 0.5 %; the ratio
        # is free of the calibration.
        np.testing.assert_allclose(lattice[[0, 2]], [a, c], rtol=0.035)
        assert lattice[2] / lattice[0] == pytest.approx(c / a, rel=0.01)
    assert len(found) >= at_least


@pytest.mark.parametrize(
    ("structure_id", "bravais"),
    [("pyxtal:sg108-31-0", "tI"), ("pyxtal:sg129-31-0", "tP")],
    ids=["tI", "tP-long-c"],
)
def test_every_session_finds_cells_whose_candidates_rank_late(structure_id, bravais):
    """Random tetragonal crystals (of the tuning seed 31: a = 7.67, c = 5.92 Å and a = 5.95,
    c = 17.87 Å with pyxtal 1.x) whose true lattice is one of thousands of candidates, ranked
    past the first thousand, and whose nets a lattice with a slightly larger (not twice as
    large) reciprocal cell also explains: each of four sessions must score every candidate
    and let the fit, not the cell size, decide."""
    record = get_structure(structure_id)
    a, _, c = record.structure.lattice.abc  # conventional standard cell
    lists = kinematic_peak_lists([record], seed=0, n_zone_axes=10, thickness=(100.0,), q_max=1.6)
    for seed in range(4):
        measured = augment(lists, seed, sessions=lists.structure_id)
        found = reconstruct_lattice(pattern_nets(measured.q, measured.intensity, measured.offsets))
        assert found is not None
        symmetry = lattice_symmetry(found)
        assert symmetry.bravais == bravais
        # The session's calibration error (≤ 3 %) plus the fit's.
        np.testing.assert_allclose(symmetry.parameters()[[0, 2]], [a, c], rtol=0.035)


def test_one_zone_axis_has_no_third_dimension():
    lists = _lists(CASES[0][0])
    first = lists.select(np.zeros(len(lists), int))  # the same pattern ten times
    nets = pattern_nets(first.q, first.intensity, first.offsets)
    assert reconstruct_lattice(np.repeat(nets, 10, axis=0)) is None


def test_the_lattice_overrides_an_unsure_model_in_the_aggregate():
    lists = _lists(CASES[0][0])
    # A model that cannot tell: equal system and group probabilities.
    predictions = uninformed_predictions(lists)
    result = aggregate(predictions)
    assert result.crystal_system == "cubic"
    assert result.bravais_lattice == "cF"
    assert space_group_centrings()[result.space_group - 1] == "F"
    assert result.lattice[0] == pytest.approx(3.6149, rel=1e-3)
    assert result.to_dict()["bravais_lattice"] == "cF"


@pytest.mark.parametrize("cubic", [0.9, 0.4])
def test_patterns_that_agree_outvote_a_lattice_that_rules_their_system_out(cubic):
    """Rutile's nets make a tP lattice. Ten patterns each 90 % sure of cubic (a wrong
    reconstruction, as of a cubic crystal read oS) keep cubic, and the tP cell is set aside
    for the patterns' own cubic lattice; at 40 % the lattice decides."""
    from dataclasses import replace

    lists = _lists(CASES[1][0])
    n = len(lists)
    system = np.full((n, 7), (1 - cubic) / 6)
    system[:, CRYSTAL_SYSTEMS.index("cubic")] = cubic
    lattice = np.zeros((n, 7, 6))
    lattice[:, CRYSTAL_SYSTEMS.index("cubic")] = [4.0, 4.0, 4.0, 90, 90, 90]
    predictions = replace(uninformed_predictions(lists), system_probability=system, lattice=lattice)
    result = aggregate(predictions)
    if cubic > 0.5:
        assert result.crystal_system == "cubic" and result.bravais_lattice is None
        np.testing.assert_allclose(result.lattice, [4.0, 4.0, 4.0, 90, 90, 90])
    else:
        assert result.crystal_system == "tetragonal" and result.bravais_lattice == "tP"
        assert result.lattice[0] == pytest.approx(CASES[1][2], rel=0.01)


def test_on_a_shared_lattice_the_intensities_decide():
    """Magnesium (P6₃/mmc) on its hP lattice, ten patterns each twice as sure of trigonal
    as of hexagonal: one pattern rarely tells a 3-fold axis from a 6-fold one, the
    intensities of all patterns together do (6/mmm), and they decide."""
    from dataclasses import replace

    from stemforge.models.crystal_id import PROBABILITY_FLOOR

    lists = _lists(CASES[2][0])
    system = np.full((len(lists), 7), 0.1 / 5)
    system[:, CRYSTAL_SYSTEMS.index("trigonal")] = 0.6
    system[:, CRYSTAL_SYSTEMS.index("hexagonal")] = 0.3
    predictions = replace(uninformed_predictions(lists), system_probability=system)
    result = aggregate(predictions)
    assert result.bravais_lattice == "hP" and result.crystal_system == "hexagonal"
    # The classifiers still count: patterns that all rule hexagonal out outweigh them.
    system[:, CRYSTAL_SYSTEMS.index("hexagonal")] = PROBABILITY_FLOOR
    assert aggregate(replace(predictions, system_probability=system)).crystal_system == "trigonal"


def test_system_prior_from_strict_and_loose_readings():
    strict = LatticeSymmetry("mP", ("monoclinic",), "P", np.eye(3), np.eye(3, dtype=int))
    loose = LatticeSymmetry("cP", ("cubic",), "P", np.eye(3), np.eye(3, dtype=int))
    prior = dict(zip(CRYSTAL_SYSTEMS, system_log_prior([strict, loose], 5.0, 3.0), strict=True))
    assert prior["monoclinic"] == 0 and prior["triclinic"] == -5  # lower than the lattice
    assert prior["cubic"] == -3  # only the loose reading allows it
    assert prior["tetragonal"] == -8 and prior["orthorhombic"] == -8  # below the loose one
    assert prior["hexagonal"] == -LATTICE_VETO  # no reading allows a hexagonal lattice


def _reconstruction(direct: np.ndarray) -> LatticeReconstruction:
    return LatticeReconstruction(
        np.linalg.inv(direct @ direct.T), np.ones(1, bool), np.ones(1), np.zeros((1, 2, 3), int)
    )


def test_a_monoclinic_cell_near_orthorhombic_keeps_the_monoclinic_answer_open():
    """A P2 cell of the tuning seed's kind with β = 91°: spglib finds it orthorhombic at 4 %
    of the cell's edge (the default reading) but not at 2 % (monoclinic from 90.7° on at 2 %,
    from 91.4° on at 4 %). Read at 2, 4 and 8 %, orthorhombic costs only the loose penalty
    instead of monoclinic costing the full one, so the intensities can still decide."""
    a, b, c, beta = 3.36, 6.92, 5.15, np.radians(91.0)
    direct = np.array([[a, 0, 0], [0, b, 0], [c * np.cos(beta), 0, c * np.sin(beta)]])
    found = _reconstruction(direct)
    assert lattice_symmetry(found).bravais == "oP"
    readings = [lattice_symmetry(found, t) for t in SYMMETRY_TOLERANCES]
    assert [r.bravais for r in readings] == ["mP", "oP", "oP"]
    prior = dict(zip(CRYSTAL_SYSTEMS, system_log_prior(readings, 5.0, 3.0), strict=True))
    assert prior["monoclinic"] == 0 and prior["orthorhombic"] == -3


def test_a_tetragonal_answer_on_a_near_cubic_metric_gets_the_tetragonal_cell():
    """A P4₁ cell of the tuning seed (a = 6.63, c = 6.745 Å: c 1.7 % longer) reads cubic at
    every default tolerance. Its reflection conditions (00l: l = 4n) hold along c only, so a
    tetragonal answer must come with the cell whose unique axis is the long one, whichever
    axis of the reconstruction's basis that is."""
    found = _reconstruction(np.diag([6.63, 6.745, 6.63]))
    readings = [lattice_symmetry(found, t) for t in SYMMETRY_TOLERANCES]
    assert {r.bravais for r in readings} == {"cP"}
    assert system_reading(found, readings, "cubic") is readings[0]
    tetragonal = system_reading(found, readings, "tetragonal")
    assert tetragonal.bravais == "tP"
    np.testing.assert_allclose(tetragonal.parameters("tetragonal")[:3], [6.63, 6.63, 6.745])
    # The unique axis: the reconstruction's second basis vector is the conventional c.
    assert np.array_equal(np.abs(tetragonal.to_conventional[:, 2]), [0, 1, 0])
    # A system that no reading allows falls back to the strictest default reading.
    assert system_reading(found, readings, "hexagonal") is readings[0]
