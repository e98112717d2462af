"""User structure files: real CIFs from py4DSTEM's test data, POSCAR, and the errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stemforge.core.errors import (
    FileFormatError,
    InvalidDataError,
    MissingFileError,
    StemforgeError,
)
from stemforge.simulate.structures import get_structure, structure_source
from stemforge.simulate.structures.user_files import read_structure_file

CIFS = Path(__file__).parent / "data" / "py4dstem"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "structures"


def test_real_cifs(cache):
    records = list(structure_source("user_files", paths=str(CIFS / "*.cif")))
    assert [r.id.split("-")[0] for r in records] == ["file:LCO", "file:Li2MnO3", "file:LiMn2O4"]
    summary = {
        r.id.split("-")[0]: (r.space_group, r.crystal_system, r.provenance["formula"])
        for r in records
    }
    assert summary == {
        "file:LCO": (166, "trigonal", "LiCoO2"),
        "file:Li2MnO3": (12, "monoclinic", "Li2MnO3"),
        "file:LiMn2O4": (227, "cubic", "LiMn2O4"),
    }
    spinel = records[2].structure
    np.testing.assert_allclose(spinel.lattice.abc, 8.245, atol=1e-3)  # the CIF's cell, conventional
    assert len(spinel) == 56
    # ids resolve from the cache, even after the file is gone
    assert all((cache / "files").glob("*.json"))
    assert get_structure(records[0].id).structure == records[0].structure


def test_id_follows_content_not_location(tmp_path):
    original = read_structure_file(CIFS / "LCO.cif")
    copy = tmp_path / "elsewhere" / "LCO.cif"
    copy.parent.mkdir()
    shutil.copy(CIFS / "LCO.cif", copy)
    assert read_structure_file(copy).id == original.id
    copy.write_text(
        copy.read_text().replace("_cell_length_a                   2.92", "_cell_length_a 2.93")
    )
    edited = read_structure_file(copy)
    assert edited.id != original.id and edited.id.startswith("file:LCO-")
    assert original.provenance["sha256"] != edited.provenance["sha256"]


def test_poscar(tmp_path):
    poscar = tmp_path / "POSCAR"
    poscar.write_text(
        "Si diamond, primitive\n1.0\n0 2.7345 2.7345\n2.7345 0 2.7345\n2.7345 2.7345 0\n"
        "Si\n2\nDirect\n0 0 0\n0.25 0.25 0.25\n"
    )
    record = next(structure_source("user_files", paths=[poscar]))
    assert record.id.startswith("file:POSCAR-")
    assert record.provenance["space_group_symbol"] == "Fd-3m" and len(record.structure) == 8


def test_errors(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        structure_source("user_files", paths=[tmp_path / "missing.cif"])
    with pytest.raises(MissingFileError, match="no file matches"):
        structure_source("user_files", paths=str(tmp_path / "*.cif"))
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a CIF\n")
    with pytest.raises(FileFormatError, match="garbage.cif") as caught:
        next(structure_source("user_files", paths=garbage))
    assert isinstance(caught.value, StemforgeError) and caught.value.fix
    truncated = tmp_path / "truncated.cif"
    truncated.write_bytes((CIFS / "LiMn2O4.cif").read_bytes()[:1500])
    with pytest.raises(FileFormatError):
        read_structure_file(truncated)
    unknown = tmp_path / "structure.xyz123"
    unknown.write_text("1 2 3\n")
    with pytest.raises(FileFormatError, match="CIF"):
        read_structure_file(unknown)
    with pytest.raises(MissingFileError, match="not in the structure cache"):
        get_structure("file:nothing-00000000")


def _cif(path, sites: str):
    path.write_text(
        "data_x\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n"
        "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\n"
        "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
        "_atom_site_fract_z\n_atom_site_occupancy\n" + sites
    )
    return path


def test_a_binary_alloy_site_reads_as_a_virtual_crystal_and_vacancies_are_refused(tmp_path):
    alloy = read_structure_file(
        _cif(tmp_path / "alloy.cif", "Fe1 Fe 0 0 0 0.5\nNi1 Ni 0 0 0 0.5\n")
    )
    assert alloy.provenance["virtual_crystal"] and alloy.provenance["space_group_number"] == 221
    vacant = _cif(tmp_path / "vacant.cif", "Fe1 Fe 0 0 0 0.5\nNi1 Ni 0 0 0 0.3\n")
    with pytest.raises(
        InvalidDataError, match="partial occupancies the virtual crystal cannot use"
    ):
        read_structure_file(vacant)
