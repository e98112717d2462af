"""Systematic absences of space groups, and the aggregate reading them off indexed patterns."""

from dataclasses import replace

import numpy as np
import pytest
from uninformed_predictions import uninformed_predictions

from stemforge.datasets.peak_lists import kinematic_peak_lists
from stemforge.models.crystal_id import aggregate
from stemforge.models.extinctions import forbidden
from stemforge.simulate.structures import get_structure


@pytest.mark.parametrize(
    "group, absent, present",
    [
        (225, [[1, 0, 0], [1, 1, 0], [2, 1, 0]], [[1, 1, 1], [2, 0, 0], [2, 2, 0]]),  # F
        # d glide; (222) is absent from diamond by its special position, not by the group
        (227, [[2, 0, 0], [0, 4, 2], [4, 2, 0]], [[1, 1, 1], [4, 0, 0], [2, 2, 2]]),
        (14, [[1, 0, 1], [0, 1, 0], [0, 3, 0]], [[1, 0, 2], [0, 2, 0], [1, 1, 1]]),  # 2₁/c
        (194, [[0, 0, 1], [1, 1, 1], [0, 0, 3]], [[1, 0, 1], [0, 0, 2], [1, 1, 2]]),  # 6₃/mmc
        (62, [[0, 1, 0], [0, 1, 2], [1, 1, 0]], [[0, 1, 1], [2, 0, 0], [1, 1, 1]]),  # Pnma
    ],
    ids=["Fm-3m", "Fd-3m", "P2_1/c", "P6_3/mmc", "Pnma"],
)
def test_reflection_conditions_of_known_groups(group, absent, present):
    assert forbidden(group, np.array(absent)).all()
    assert not forbidden(group, np.array(present)).any()


def test_the_aggregate_reads_the_absences_of_hcp_magnesium():
    lists = kinematic_peak_lists(
        [get_structure("aflow-proto:A_hP2_194_c-Mg")], seed=0, n_zone_axes=10, thickness=(100.0,)
    )
    # A model that cannot tell the groups apart: the patterns decide.
    predictions = uninformed_predictions(lists)
    result = aggregate(predictions)
    assert result.crystal_system == "hexagonal"
    # (0001) and (11-21) absent, (10-11) present: a 6₃ screw and a c glide, as P6₃/mmc
    # (or P6₃mc, P-62c: the same conditions; kinematic intensities cannot tell them).
    assert forbidden(result.space_group, np.array([[0, 0, 1], [1, 1, 1]])).all()
    assert not forbidden(result.space_group, np.array([[1, 0, 1]])).any()
    assert result.space_group in (186, 190, 194)


def test_a_biased_group_model_does_not_outvote_the_absences_ten_times():
    """Every pattern's model favours P6/mmm (no reflection conditions) 20:1 over each other
    group: one prior, shared by all ten patterns. Mg's absences, read from the ten patterns
    together, favour the 6₃ screw and c glide by more than that once, less than ten times."""
    lists = kinematic_peak_lists(
        [get_structure("aflow-proto:A_hP2_194_c-Mg")], seed=0, n_zone_axes=10, thickness=(100.0,)
    )
    biased = uninformed_predictions(lists)
    groups = biased.group_probability.copy()
    groups[:, 191 - 1] *= 20.0
    groups /= groups.sum(axis=1, keepdims=True)
    result = aggregate(replace(biased, group_probability=groups))
    assert result.crystal_system == "hexagonal"
    assert result.space_group in (186, 190, 194)


def test_an_unseen_node_weighs_by_how_often_the_crystal_leaves_allowed_nodes_dark():
    """P2₁2₁2₁ against P222 on one orthorhombic [001]-like pattern set: h00 and 0k0 of odd
    index unseen. Where every other node shows a spot, the dark odd axial nodes are strong
    evidence for the screws; where the crystal leaves many allowed nodes dark anyway, the same
    dark nodes say less."""
    from stemforge.models.extinctions import absence_log_likelihood

    screws = np.array([[1, 0, 0], [3, 0, 0], [0, 1, 0], [0, 3, 0]])
    allowed = np.array([[h, k, 0] for h in range(1, 4) for k in range(1, 4)])
    groups = np.array([19, 16])  # P2₁2₁2₁, P222

    def evidence(seen: np.ndarray, dark: np.ndarray) -> float:
        spots = [(seen, np.ones(len(seen)))]
        ratio = absence_log_likelihood(groups, spots, [dark], np.eye(3, dtype=int), "orthorhombic")
        assert ratio[1] == 0.0  # P222 forbids nothing
        return float(ratio[0])

    bright = evidence(allowed, screws)
    p = 4 / (4 + 9)
    assert bright == pytest.approx(4 * np.log(0.95 / p))
    dim = evidence(allowed[:3], np.concatenate([screws, allowed[3:]]))
    assert dim == pytest.approx(4 * np.log(0.95 / (10 / 13)))
    assert 0 < dim < bright
