"""pyxtal random crystals: seeded, bit-for-bit reproducible, in the space group asked for."""

from __future__ import annotations

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.structures import get_structure, structure_source
from stemforge.simulate.structures.random_crystals import (
    DEFAULT_ELEMENTS,
    random_crystal,
    random_crystals,
)
from stemforge.simulate.structures.record import crystal_system_of

# Two groups per crystal system, low and high symmetry (cubic 225 and 227 with 96-atom cells).
SAMPLE = [1, 2, 4, 12, 19, 62, 88, 139, 148, 166, 173, 194, 198, 225]


def _same_bits(a, b) -> bool:
    return (
        a.id == b.id
        and np.array_equal(a.structure.lattice.matrix, b.structure.lattice.matrix)
        and np.array_equal(a.structure.frac_coords, b.structure.frac_coords)
        and [str(s) for s in a.structure.species] == [str(s) for s in b.structure.species]
    )


@pytest.fixture(scope="module")
def sample():
    return list(structure_source("random_crystals", seed=11, space_groups=SAMPLE))


def test_space_groups_are_the_ones_requested(sample):
    assert [r.space_group for r in sample] == SAMPLE  # spglib on the returned conventional cell
    assert {r.crystal_system for r in sample} == {crystal_system_of(g) for g in SAMPLE}
    assert len({crystal_system_of(g) for g in SAMPLE}) == 7
    assert all(len(r.structure) <= 128 for r in sample)
    assert all(
        set(r.structure.composition.chemical_system.split("-")) <= set(DEFAULT_ELEMENTS)
        for r in sample
    )


def test_same_seed_same_crystals_bit_for_bit(sample):
    np.random.seed(12345)  # noqa: NPY002 (the legacy global state must not matter)
    again = list(random_crystals(seed=11, space_groups=SAMPLE[:5]))
    assert all(_same_bits(a, b) for a, b in zip(again, sample[:5], strict=True))
    # ids alone regenerate the same crystals, independently of generation order
    assert _same_bits(get_structure(sample[7].id), sample[7])


def test_other_seed_or_index_gives_other_crystals(sample):
    other = random_crystal(139, seed=12)
    assert other.id == "pyxtal:sg139-12-0" and not _same_bits(other, sample[SAMPLE.index(139)])
    second = random_crystal(139, seed=11, index=1)
    assert second.id == "pyxtal:sg139-11-1" and not _same_bits(second, sample[SAMPLE.index(139)])


def test_options_are_part_of_the_id():
    record = random_crystal(221, seed=3, elements=["Si", "O"], max_atoms=32, volume_factor=1.2)
    # elements in a canonical order, so the same set gives the same id
    assert record.id == "pyxtal:sg221-3-0?elements=O,Si&max_atoms=32&volume_factor=1.2"
    assert set(record.structure.composition.chemical_system.split("-")) <= {"O", "Si"}
    assert len(record.structure) <= 32
    assert _same_bits(get_structure(record.id), record)
    assert (
        random_crystal(221, seed=3, elements=["O", "Si"], max_atoms=32, volume_factor=1.2).id
        == record.id
    )
    p = record.provenance
    assert p["source"] == "random_crystals" and p["seed"] == 3 and p["requested_space_group"] == 221
    assert p["generator"].startswith("pyxtal ")


def test_crystal_system_selects_its_groups():
    records = random_crystals(seed=0, crystal_system="triclinic", n_per_group=2)
    assert [r.id for r in records] == [
        "pyxtal:sg1-0-0",
        "pyxtal:sg1-0-1",
        "pyxtal:sg2-0-0",
        "pyxtal:sg2-0-1",
    ]


def test_errors():
    with pytest.raises(ConfigurationError, match="seed"):
        random_crystals(seed=-1)
    with pytest.raises(ConfigurationError, match="does not exist"):
        random_crystals(seed=0, space_groups=[231])
    with pytest.raises(ConfigurationError, match="unknown element"):
        random_crystals(seed=0, elements=["Si", "Xx"])
    with pytest.raises(ConfigurationError, match="bad options"):
        structure_source("random_crystals", space_groups=[1])  # the seed is required
    with pytest.raises(ConfigurationError, match="malformed"):
        get_structure("pyxtal:sg1-x-0")
    with pytest.raises(ConfigurationError, match="unknown option"):
        get_structure("pyxtal:sg1-0-0?colour=red")
    # 226 (Fm-3c) cannot be realised in 8 atoms: a clear error, not an endless search
    with pytest.raises(ConfigurationError, match="raise max_atoms"):
        random_crystal(226, seed=0, max_atoms=8, max_attempts=3)
