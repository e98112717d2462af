"""The AFLOW Library of Crystallographic Prototypes as shipped by pymatgen: the offline default.

Mehl et al., Comput. Mater. Sci. 136, S1 (2017). pymatgen 2026.10 ships 288 prototypes
in 100 space groups (spglib at :data:`~.record.SYMPREC`) covering all seven crystal systems.

Ids are ``aflow-proto:<AFLOW label>-<reduced formula>``, e.g.
``aflow-proto:AB_cF8_225_a_b-NaCl``: the label alone is not unique (pymatgen has four
``AB_oP8_62_c_c`` entries: SnS, FeB, GeS, MnP), the formula of the prototype's own
compound tells them apart and keeps ids stable if the library grows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.structures.record import (
    StructureRecord,
    as_set,
    check_crystal_system,
    matches,
    standardized_record,
)

PREFIX = "aflow-proto:"


def aflow_prototypes(
    crystal_system: str | Iterable[str] | None = None,
    space_group: int | Iterable[int] | None = None,
    max_atoms: int | None = None,
) -> Iterator[StructureRecord]:
    """Records of the AFLOW prototypes, in library order, filtered.

    Parameters
    ----------
    crystal_system
        Keep only these crystal systems ('cubic', ['hexagonal', 'trigonal']...).
    space_group
        Keep only these international space-group numbers (as found by spglib).
    max_atoms
        Keep only cells with at most this many atoms in the conventional cell.
    """
    systems = as_set(crystal_system, check_crystal_system)
    groups = as_set(space_group, int)
    return (_copy(r) for r in _records().values() if matches(r, systems, groups, max_atoms))


def resolve(structure_id: str) -> StructureRecord:
    """The record of a prototype id."""
    records = _records()
    if structure_id in records:
        return _copy(records[structure_id])
    label = structure_id.removeprefix(PREFIX).split("-")[0]
    candidates = [key for key in records if key.removeprefix(PREFIX).split("-")[0] == label]
    raise ConfigurationError(
        f"unknown AFLOW prototype id {structure_id!r}",
        f"use one of {', '.join(candidates)}"
        if candidates
        else "list the ids with aflow_prototypes()",
    )


def find_prototype(name: str) -> StructureRecord:
    """The prototype a person names: its id, AFLOW label, Strukturbericht symbol or mineral.

    Case-insensitive; ``"B1"``, ``"AB_cF8_225_a_b"``, ``"Spinel"`` and
    ``"aflow-proto:AB_cF8_225_a_b-NaCl"`` all work. A mineral name may be part of the
    library's (``"rocksalt"`` matches ``"Rock Salt, Halite"``) but must name one prototype.

    Raises
    ------
    ConfigurationError
        No prototype, or several, go by that name.
    """
    key = name.strip().lower()
    records = _records()
    exact = [
        rid
        for rid, r in records.items()
        if key
        in (
            rid.lower(),
            rid.removeprefix(PREFIX).lower(),
            r.provenance["aflow_label"].lower(),
            (r.provenance["strukturbericht"] or "").lower(),
            (r.provenance["mineral"] or "").lower(),
        )
    ]
    found = exact or [
        rid
        for rid, r in records.items()
        if key and key.replace(" ", "") in (r.provenance["mineral"] or "").lower().replace(" ", "")
    ]
    if len(found) == 1:
        return _copy(records[found[0]])
    if not found:
        raise ConfigurationError(
            f"no AFLOW prototype is called {name!r}",
            "give a CIF/POSCAR file, a structure id, or an AFLOW label / Strukturbericht "
            "symbol / mineral name of pymatgen's prototype library",
        )
    raise ConfigurationError(
        f"{name!r} names {len(found)} AFLOW prototypes", f"pick one id: {', '.join(found[:12])}"
    )


def _copy(record: StructureRecord) -> StructureRecord:
    # The library is built once per process; callers get their own mutable Structure.
    return StructureRecord(record.id, record.structure.copy(), dict(record.provenance))


@functools.cache
def _records() -> dict[str, StructureRecord]:
    from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY

    records = {}
    for entry in AFLOW_PROTOTYPE_LIBRARY:
        structure = entry["snl"].structure
        tags: dict[str, Any] = entry["tags"]
        label = tags["aflow"]
        structure_id = f"{PREFIX}{label}-{structure.composition.reduced_formula}"
        provenance = {
            "source": "aflow_prototypes",
            "library": "AFLOW Library of Crystallographic Prototypes (pymatgen.analysis.prototypes)",
            "aflow_label": label,
            "label_space_group": int(label.split("_")[2]),
            "pearson_symbol": tags["pearson"],
            "strukturbericht": None
            if tags["strukturbericht"] == "None"
            else tags["strukturbericht"],
            "mineral": tags["mineral"] or None,
        }
        if structure_id in records:  # would make ids ambiguous: refuse rather than shadow
            raise ConfigurationError(
                f"two AFLOW prototypes share the id {structure_id}",
                "report this: the installed pymatgen library needs a new id scheme",
            )
        records[structure_id] = standardized_record(structure_id, structure, provenance)
    return records
