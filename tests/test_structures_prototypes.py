"""The offline default source: the AFLOW prototypes shipped with pymatgen."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.structures import CRYSTAL_SYSTEMS, SYMPREC, get_structure, structure_source
from stemforge.simulate.structures.record import crystal_system_of


@pytest.fixture(scope="module")
def records():
    return list(structure_source("aflow_prototypes"))


def test_library_size_ids_and_coverage(records):
    assert len(records) == 288
    ids = [r.id for r in records]
    assert len(set(ids)) == 288
    assert all(i.startswith("aflow-proto:") for i in ids)
    # FIELD-NOTES counts (68/60/56/42/37/23/2, 98 groups) hold at pymatgen's default
    # symprec 0.1; at SYMPREC = 0.01 spglib agrees with the AFLOW labels' own systems:
    counts = Counter(r.crystal_system for r in records)
    assert SYMPREC == 0.01
    assert counts == {
        "cubic": 66,
        "orthorhombic": 61,
        "tetragonal": 56,
        "hexagonal": 42,
        "trigonal": 37,
        "monoclinic": 22,
        "triclinic": 4,
    }
    assert set(counts) == set(CRYSTAL_SYSTEMS)
    assert len({r.space_group for r in records}) == 100
    # spglib's crystal system is that of the label for every prototype; its space group
    # for all but three (U3Si 140->123, CoAs 33->62, VAu2 38->63, special coordinates).
    assert all(
        r.crystal_system == crystal_system_of(r.provenance["label_space_group"]) for r in records
    )
    differing = {r.id for r in records if r.space_group != r.provenance["label_space_group"]}
    assert len(differing) <= 3


def test_ids_are_stable_and_named_after_the_compound(records):
    by_id = {r.id: r for r in records}
    nacl = by_id["aflow-proto:AB_cF8_225_a_b-NaCl"]
    assert nacl.space_group == 225 and nacl.provenance["space_group_symbol"] == "Fm-3m"
    assert len(nacl.structure) == 8  # conventional cell, not the 2-atom primitive one
    np.testing.assert_allclose(nacl.structure.lattice.angles, 90)
    assert by_id["aflow-proto:A_cF4_225_a-Cu"].provenance["strukturbericht"] == "A1"
    # one label, four compounds: the formula keeps the ids apart
    assert sum(i.startswith("aflow-proto:AB_oP8_62_c_c-") for i in by_id) == 4
    assert list(structure_source("aflow_prototypes"))[0].id == records[0].id  # same order each time


def test_provenance_records_symmetry_and_source(records):
    p = records[0].provenance
    assert p["source"] == "aflow_prototypes"
    assert p["symprec"] == SYMPREC and p["angle_tolerance"] == 5.0
    for key in (
        "space_group_number",
        "space_group_symbol",
        "crystal_system",
        "aflow_label",
        "spglib_version",
    ):
        assert p[key] is not None


def test_get_structure_resolves_ids(records):
    for record in records[::40]:
        again = get_structure(record.id)
        assert again.id == record.id
        assert again.structure == record.structure
        assert again.provenance == record.provenance


def test_records_are_independent_copies(records):
    first = get_structure(records[0].id)
    first.structure.scale_lattice(2 * first.structure.volume)
    assert get_structure(records[0].id).structure == records[0].structure


def test_filters():
    cubic = list(structure_source("aflow_prototypes", crystal_system="cubic"))
    assert len(cubic) == 66
    chosen = list(structure_source("aflow_prototypes", space_group=[225, 227], max_atoms=8))
    assert chosen and all(r.space_group in (225, 227) and len(r.structure) <= 8 for r in chosen)
    tiny = [
        r.id for r in structure_source("aflow_prototypes", crystal_system=["cubic"], max_atoms=2)
    ]
    assert tiny == [
        "aflow-proto:A_cP1_221_a-Po",
        "aflow-proto:A_cI2_229_a-W",
        "aflow-proto:AB_cP2_221_b_a-CsCl",
    ]


def test_errors():
    with pytest.raises(ConfigurationError, match="unknown crystal system"):
        structure_source("aflow_prototypes", crystal_system="cubicc")
    with pytest.raises(ConfigurationError, match="AB_oP8_62_c_c-SnS"):  # lists the candidates
        get_structure("aflow-proto:AB_oP8_62_c_c")
    with pytest.raises(ConfigurationError, match="unknown structure id"):
        get_structure("nonsense:1")
    with pytest.raises(ConfigurationError, match="unknown structure source"):
        structure_source("aflow_prototype")
    with pytest.raises(ConfigurationError, match="bad options"):
        structure_source("aflow_prototypes", crystalsystem="cubic")
