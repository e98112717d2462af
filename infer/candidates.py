"""Candidate structures named on the command line: files, structure ids or prototype names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_candidate(spec: str) -> tuple[str, Any]:
    """``(label, pymatgen Structure)`` of one candidate.

    ``spec`` is a structure file (CIF, POSCAR, anything pymatgen reads), a structure id of
    any source (``mp-149``, ``aflow-proto:...``, ``pyxtal:...``; Materials Project ids need
    ``MP_API_KEY`` or the cache), or a prototype of pymatgen's AFLOW library by label,
    Strukturbericht symbol or mineral name (``B1``, ``Spinel``). The label is the reduced
    formula with the spec in brackets.
    """
    from stemforge.simulate.structures import get_structure
    from stemforge.simulate.structures.aflow_prototypes import find_prototype
    from stemforge.simulate.structures.user_files import read_structure_file

    if Path(spec).is_file():
        record = read_structure_file(spec)
        source = Path(spec).name
    elif ":" in spec or spec.lower().startswith("mp-"):
        record = get_structure(spec)
        source = spec
    else:
        record = find_prototype(spec)
        source = spec
    return f"{record.structure.composition.reduced_formula} ({source})", record.structure


def load_candidates(specs: Sequence[str]) -> dict[str, Any]:
    """Structures by label, in the order given (see :func:`load_candidate`)."""
    return dict(load_candidate(spec) for spec in specs)
