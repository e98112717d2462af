"""The record every structure source yields, and the one place where cells are standardised.

Every source hands its raw structure to :func:`standardized_record`, so all records share
one convention: the conventional standard cell of spglib (through pymatgen), found with
the tolerances below, with the symmetry that was found written into the provenance.
Zone axes [uvw] of the simulation refer to this cell.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.simulate.virtual_crystal import site_arrays

if TYPE_CHECKING:
    from pymatgen.core import Structure

#: spglib distance tolerance (Å). Tight enough to keep the intended symmetry of slightly
#: distorted structures (at pymatgen's default of 0.1, 9 of the 288 AFLOW prototypes come
#: out in a group other than their label's, a P1 one as Pa-3 with its atoms moved; at
#: 0.01, 3), loose enough for CIF coordinates rounded to 4 decimals and relaxed DFT cells.
SYMPREC = 0.01
#: spglib angle tolerance (degrees), pymatgen's default.
ANGLE_TOLERANCE = 5.0

CRYSTAL_SYSTEMS = (
    "triclinic",
    "monoclinic",
    "orthorhombic",
    "tetragonal",
    "trigonal",
    "hexagonal",
    "cubic",
)
#: First international space-group number of each crystal system, in the order above
#: (231 closes the last range).
FIRST_SPACE_GROUP = (1, 3, 16, 75, 143, 168, 195, 231)


@dataclass(frozen=True)
class StructureRecord:
    """One crystal structure, ready for simulation.

    Parameters
    ----------
    id
        Stable, globally unique identifier; :func:`stemforge.simulate.structures.get_structure`
        resolves it back to the same structure.
    structure
        The conventional standard cell (spglib's standardisation through pymatgen).
    provenance
        JSON-serialisable description of where the structure came from (``source``,
        ``query``...) and of its symmetry (``symprec``, ``angle_tolerance``,
        ``space_group_number``, ``space_group_symbol``, ``crystal_system``, library versions).
    """

    id: str
    structure: Structure
    provenance: dict[str, Any]

    @property
    def space_group(self) -> int:
        """International space-group number found by spglib."""
        return self.provenance["space_group_number"]

    @property
    def crystal_system(self) -> str:
        """Crystal system found by spglib ('triclinic' ... 'cubic')."""
        return self.provenance["crystal_system"]


def crystal_system_of(space_group: int) -> str:
    """Crystal system of an international space-group number (1..230)."""
    if not 1 <= space_group <= 230:
        raise ConfigurationError(
            f"space group {space_group} does not exist", "use a number from 1 to 230"
        )
    return next(
        name
        for name, first, stop in zip(CRYSTAL_SYSTEMS, FIRST_SPACE_GROUP, FIRST_SPACE_GROUP[1:], strict=True)
        if first <= space_group < stop
    )


def space_group_range(crystal_system: str) -> range:
    """Space-group numbers of a crystal system."""
    i = CRYSTAL_SYSTEMS.index(check_crystal_system(crystal_system))
    return range(FIRST_SPACE_GROUP[i], FIRST_SPACE_GROUP[i + 1])


def check_crystal_system(name: str) -> str:
    """Return ``name`` in lower case, or raise if it is no crystal system."""
    lowered = str(name).lower()
    if lowered not in CRYSTAL_SYSTEMS:
        raise ConfigurationError(
            f"unknown crystal system {name!r}", f"use one of {', '.join(CRYSTAL_SYSTEMS)}"
        )
    return lowered


def as_set(value: Any, convert: Callable[[Any], Any]) -> frozenset | None:
    """Normalise a filter given as one value or a list of values (None means no filter)."""
    if value is None:
        return None
    values = [value] if isinstance(value, str | int) else list(value)
    return frozenset(convert(v) for v in values)


def matches(
    record: StructureRecord,
    crystal_system: frozenset[str] | None = None,
    space_group: frozenset[int] | None = None,
    max_atoms: int | None = None,
) -> bool:
    """Whether a record passes the common filters (None lets everything through)."""
    return (
        (crystal_system is None or record.crystal_system in crystal_system)
        and (space_group is None or record.space_group in space_group)
        and (max_atoms is None or len(record.structure) <= max_atoms)
    )


def standardized_record(
    structure_id: str, structure: Structure, provenance: dict[str, Any]
) -> StructureRecord:
    """Standardise ``structure`` to its conventional cell and record its symmetry.

    Parameters
    ----------
    structure_id
        The id of the new record.
    structure
        Any periodic structure whose sites hold one species, or two that share a fully
        occupied site (an alloy, simulated as a virtual crystal: provenance
        ``virtual_crystal``).
    provenance
        Source-specific provenance; the symmetry keys are added to a copy of it.

    Raises
    ------
    InvalidDataError
        If a site holds more than two species or is not fully occupied, or spglib finds no
        symmetry for the structure.
    """
    import spglib
    from pymatgen.core import __version__ as pymatgen_version
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    if not structure.is_ordered:
        try:
            site_arrays(structure)
        except ConfigurationError as exc:
            raise InvalidDataError(
                f"structure {structure_id} has partial occupancies the virtual crystal cannot "
                f"use ({exc.problem})",
                "keep one or two species on each fully occupied site, or order the cell, e.g. "
                "with pymatgen's OrderDisorderedStructureTransformation",
            ) from None
    try:
        with warnings.catch_warnings():
            # spglib >= 2.5 warns on every call pymatgen makes the old way; nothing to act on here
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="spglib")
            analyzer = SpacegroupAnalyzer(
                structure, symprec=SYMPREC, angle_tolerance=ANGLE_TOLERANCE
            )
            conventional = analyzer.get_conventional_standard_structure()
            space_group = analyzer.get_space_group_number(), analyzer.get_space_group_symbol()
            crystal_system = analyzer.get_crystal_system()
    except (ValueError, TypeError) as exc:  # spglib's "symmetry detection failed" and friends
        raise InvalidDataError(
            f"spglib could not analyse structure {structure_id} ({exc})",
            "check the structure for overlapping atoms or a degenerate cell",
        ) from exc
    symmetry = {
        "symprec": SYMPREC,
        "angle_tolerance": ANGLE_TOLERANCE,
        "space_group_number": space_group[0],
        "space_group_symbol": space_group[1],
        "crystal_system": crystal_system,
        "formula": conventional.composition.reduced_formula,
        "n_atoms": len(conventional),
        "spglib_version": spglib.__version__,
        "pymatgen_version": pymatgen_version,
        "virtual_crystal": not structure.is_ordered,
    }
    return StructureRecord(structure_id, conventional, {**provenance, **symmetry})
