"""Structure sources for the simulation factory.

Every source yields :class:`StructureRecord` ``(id, structure, provenance)``, the structure
being the conventional standard cell, and :func:`get_structure` turns any id back into
its record, so the factory stores ids only. Sources, by the name a config uses:

=====================  ===========================================  ==========================
name                   what                                         ids
=====================  ===========================================  ==========================
``aflow_prototypes``   288 AFLOW prototypes shipped with pymatgen   ``aflow-proto:A_cF4_225_a-Cu``
``random_crystals``    pyxtal random crystals, any space group      ``pyxtal:sg225-7-0``
``user_files``         CIF, POSCAR... files                         ``file:<stem>-<sha8>``
``materials_project``  Materials Project (mp-api, needs a key)      ``mp-149``
``aflow``              AFLOW database through AFLUX                 ``aflow:fc70fda6652015cb``
=====================  ===========================================  ==========================

The first three work offline; the web sources cache what they fetch (see
:mod:`~stemforge.simulate.structures.http_cache`) so that reruns are offline too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.structures import (
    aflow_api,
    aflow_prototypes,
    materials_project,
    random_crystals,
    user_files,
)
from stemforge.simulate.structures.http_cache import SourceUnavailableError
from stemforge.simulate.structures.record import (
    ANGLE_TOLERANCE,
    CRYSTAL_SYSTEMS,
    SYMPREC,
    StructureRecord,
)

__all__ = [
    "ANGLE_TOLERANCE",
    "CRYSTAL_SYSTEMS",
    "SOURCES",
    "SYMPREC",
    "SourceUnavailableError",
    "StructureRecord",
    "get_structure",
    "structure_source",
]

#: Source functions by the name a config uses.
SOURCES: dict[str, Callable[..., Iterator[StructureRecord]]] = {
    "aflow_prototypes": aflow_prototypes.aflow_prototypes,
    "random_crystals": random_crystals.random_crystals,
    "user_files": user_files.user_files,
    "materials_project": materials_project.materials_project,
    "aflow": aflow_api.aflow_search,
}


def structure_source(name: str, **options: Any) -> Iterator[StructureRecord]:
    """The records of the source called ``name``, configured by ``options``.

    Example: ``structure_source("aflow_prototypes", crystal_system="cubic", max_atoms=16)``.

    Raises
    ------
    ConfigurationError
        Unknown source name, or options that source does not take (or invalid values).
    """
    if name not in SOURCES:
        raise ConfigurationError(
            f"unknown structure source {name!r}", f"use one of {', '.join(SOURCES)}"
        )
    function = SOURCES[name]
    signature = inspect.signature(function)
    try:
        signature.bind(**options)
    except TypeError as exc:
        raise ConfigurationError(
            f"bad options for structure source {name!r} ({exc})",
            f"it takes {', '.join(signature.parameters)}",
        ) from exc
    return function(**options)


def get_structure(
    structure_id: str,
    *,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
) -> StructureRecord:
    """Resolve any structure id back to its record (same structure every time).

    Parameters
    ----------
    structure_id
        An id from any source (``aflow-proto:...``, ``pyxtal:...``, ``file:...``,
        ``mp-...``, ``aflow:...``).
    cache_dir
        Structure cache folder, for ``file:``, ``mp-`` and ``aflow:`` ids.
    endpoint
        API base URL for ``mp-`` and ``aflow:`` ids not in the cache.
    api_key
        Materials Project key for ``mp-`` ids not in the cache (default ``$MP_API_KEY``).

    Raises
    ------
    ConfigurationError
        The id belongs to no source, or names no structure of its source.
    """
    if structure_id.startswith(aflow_prototypes.PREFIX):
        return aflow_prototypes.resolve(structure_id)
    if structure_id.startswith(random_crystals.PREFIX):
        return random_crystals.resolve(structure_id)
    if structure_id.startswith(user_files.PREFIX):
        return user_files.resolve(structure_id, cache_dir=cache_dir)
    if materials_project.ID_PATTERN.match(structure_id):
        return materials_project.resolve(
            structure_id, api_key=api_key, endpoint=endpoint, cache_dir=cache_dir
        )
    if structure_id.startswith(aflow_api.PREFIX):
        return aflow_api.resolve(structure_id, endpoint=endpoint, cache_dir=cache_dir)
    raise ConfigurationError(
        f"unknown structure id {structure_id!r}",
        "ids start with aflow-proto:, pyxtal:, file:, mp- or aflow: (see stemforge.simulate.structures)",
    )
