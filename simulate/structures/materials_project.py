"""Structures from the Materials Project, through its client ``mp-api`` (``MPRester``).

The API key comes from the ``api_key`` argument or the ``MP_API_KEY`` environment
variable; it travels only in the request header that mp-api sets and is never written to
the cache, the provenance, an error message or a log. The endpoint defaults to mp-api's
(``MP_API_ENDPOINT``, else https://api.materialsproject.org/) and can be overridden.

Answers are cached (see :mod:`~.http_cache`): one JSON document per material and one per
query, so a query or an id seen once resolves offline afterwards. Ids are the legacy
form of the material id (``mp-149``), whichever form the server sends (emmet-core 0.87
serialises ``mp-149`` as the padded AlphaID ``mp-aaaaaaft``).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stemforge.core.errors import ConfigurationError, StemforgeError
from stemforge.simulate.structures.http_cache import OFFLINE_FIX, JsonCache, SourceUnavailableError
from stemforge.simulate.structures.record import (
    StructureRecord,
    check_crystal_system,
    crystal_system_of,
    matches,
    standardized_record,
)

ID_PATTERN = re.compile(r"^(mp|mvc)-[0-9a-z]+$")
_NAMESPACE = "materials_project"
#: Summary fields requested (``_fields``); the structure plus what provenance keeps.
FIELDS = (
    "material_id",
    "formula_pretty",
    "chemsys",
    "nsites",
    "structure",
    "symmetry",
    "energy_above_hull",
    "is_stable",
    "theoretical",
)


def materials_project(
    material_ids: str | Iterable[str] | None = None,
    *,
    chemsys: str | Iterable[str] | None = None,
    crystal_system: str | None = None,
    space_group: int | None = None,
    energy_above_hull_max: float | None = None,
    max_atoms: int | None = None,
    api_key: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> Iterator[StructureRecord]:
    """Materials Project structures matching a query, sorted by id.

    The query runs (or is read from the cache) when this function is called; the records
    are standardised as they are iterated.

    Parameters
    ----------
    material_ids
        Material ids (``'mp-149'``).
    chemsys
        Chemical system(s), e.g. ``'Si-O'``: materials made of exactly these elements.
    crystal_system
        'cubic', 'hexagonal'... (the Materials Project's own symmetry, symprec 0.1).
    space_group
        International space-group number (the Materials Project's own symmetry).
    energy_above_hull_max
        Keep materials at most this far above the convex hull (eV/atom); 0 = stable only.
    max_atoms
        Keep only conventional cells with at most this many atoms (applied locally).
    api_key
        Materials Project API key; default ``$MP_API_KEY``.
    endpoint
        API base URL; default mp-api's.
    cache_dir
        Structure cache folder (see :func:`~.http_cache.cache_root`).
    refresh
        Query the API even when the cache holds an answer.

    Raises
    ------
    ConfigurationError
        No search criterion, or no API key and no cached answer.
    SourceUnavailableError
        The API cannot be reached and the cache holds no answer.
    StemforgeError
        The API refused the query.
    """
    query = _query(material_ids, chemsys, crystal_system, space_group, energy_above_hull_max)
    entries = _entries(query, api_key, endpoint, cache_dir, refresh)
    records = (_record(entry, query) for entry in entries)
    return (record for record in records if matches(record, max_atoms=max_atoms))


def resolve(
    structure_id: str,
    *,
    api_key: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> StructureRecord:
    """The record of one material id, from the cache or else the API."""
    query = _query([structure_id], None, None, None, None)
    entries = _entries(query, api_key, endpoint, cache_dir, refresh=False)
    if not entries:
        raise ConfigurationError(
            f"the Materials Project has no material {structure_id}", "check the id"
        )
    return _record(entries[0], query)


def canonical_id(material_id: str) -> str:
    """The legacy form of a material id (``mp-aaaaaaft`` and ``mp-149`` give ``mp-149``)."""
    from emmet.core.mpid import AlphaID

    if not ID_PATTERN.match(str(material_id)):
        raise ConfigurationError(
            f"{material_id!r} is not a Materials Project id", "ids look like mp-149"
        )
    try:
        return AlphaID(material_id).string
    except ValueError as exc:
        raise ConfigurationError(
            f"{material_id!r} is not a Materials Project id ({exc})", "ids look like mp-149"
        ) from exc


def _query(
    material_ids: str | Iterable[str] | None,
    chemsys: str | Iterable[str] | None,
    crystal_system: str | None,
    space_group: int | None,
    energy_above_hull_max: float | None,
) -> dict[str, Any]:
    """The normalised query: equal queries hash equally whatever their spelling."""
    from pymatgen.core import Element

    query: dict[str, Any] = {}
    if material_ids is not None:
        ids = [material_ids] if isinstance(material_ids, str) else list(material_ids)
        query["material_ids"] = sorted({canonical_id(i) for i in ids})
    if chemsys is not None:
        systems = [chemsys] if isinstance(chemsys, str) else list(chemsys)
        try:
            query["chemsys"] = sorted(
                {"-".join(sorted({Element(e).symbol for e in s.split("-")})) for s in systems}
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"bad chemical system in {systems} ({exc})", "write it like 'Si-O'"
            ) from exc
    if crystal_system is not None:
        query["crystal_system"] = check_crystal_system(crystal_system)
    if space_group is not None:
        crystal_system_of(int(space_group))
        query["space_group"] = int(space_group)
    if energy_above_hull_max is not None:
        if energy_above_hull_max < 0:
            raise ConfigurationError(
                f"energy_above_hull_max={energy_above_hull_max} is negative",
                "use 0 for stable materials only",
            )
        query["energy_above_hull_max"] = float(energy_above_hull_max)
    if not query:
        raise ConfigurationError(
            "a Materials Project query needs at least one criterion",
            "give material_ids, chemsys, crystal_system, space_group or energy_above_hull_max "
            "(an empty query would download the whole database)",
        )
    return query


def _entries(
    query: dict[str, Any],
    api_key: str | None,
    endpoint: str | None,
    cache_dir: str | Path | None,
    refresh: bool,
) -> list[dict[str, Any]]:
    cache = JsonCache(_NAMESPACE, cache_dir)
    if not refresh and (cached := _cached(cache, query)) is not None:
        return cached
    key = api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise ConfigurationError(
            f"no Materials Project API key (MP_API_KEY is not set) and no cached answer to {query} in {cache.folder}",
            "get a free key at https://materialsproject.org/api and `export MP_API_KEY=<key>` "
            "(or pass api_key=...), or use an offline source such as aflow_prototypes",
        )
    entries = _download(query, key, endpoint, cache.folder)
    for entry in entries:
        cache.save(cache.entry_path(entry["id"]), entry)
    cache.save(cache.query_path(query), {"query": query, "ids": [entry["id"] for entry in entries]})
    return entries


def _cached(cache: JsonCache, query: dict[str, Any]) -> list[dict[str, Any]] | None:
    if set(query) == {"material_ids"}:  # an id lookup needs only the per-material documents
        ids = query["material_ids"]
    else:
        answer = cache.load(cache.query_path(query))
        if answer is None:
            return None
        ids = answer["ids"]
    entries = [cache.load(cache.entry_path(i)) for i in ids]
    return None if any(entry is None for entry in entries) else entries


def _download(
    query: dict[str, Any], key: str, endpoint: str | None, cache_folder: Path
) -> list[dict[str, Any]]:
    import requests
    from mp_api.client import MPRester
    from mp_api.client.core import MPRestError
    from mp_api.client.core.settings import MAPI_CLIENT_SETTINGS

    criteria: dict[str, Any] = {"fields": list(FIELDS)}
    if "material_ids" in query:
        criteria["material_ids"] = query["material_ids"]
    if "chemsys" in query:
        criteria["chemsys"] = query["chemsys"]
    if "crystal_system" in query:  # the API spells them as emmet's CrystalSystem: 'Cubic'
        criteria["crystal_system"] = query["crystal_system"].capitalize()
    if "space_group" in query:
        criteria["spacegroup_number"] = query["space_group"]
    if "energy_above_hull_max" in query:
        criteria["energy_above_hull"] = (0.0, query["energy_above_hull_max"])
    where = endpoint or MAPI_CLIENT_SETTINGS.ENDPOINT
    try:
        with MPRester(
            api_key=key, endpoint=endpoint, mute_progress_bars=True, use_document_model=False
        ) as rester:
            where = rester.endpoint
            documents = rester.materials.summary.search(**criteria)
            database_version = rester.db_version or None
    except requests.exceptions.RequestException as exc:  # raised unwrapped by MPRester's heartbeat
        raise _offline(where, exc, cache_folder) from exc
    except MPRestError as exc:
        if isinstance(exc.__context__, requests.exceptions.RequestException):
            raise _offline(where, exc.__context__, cache_folder) from exc
        raise StemforgeError(
            f"the Materials Project API at {where} refused the query {query}: {exc}",
            "check the query and that MP_API_KEY holds your current key (https://materialsproject.org/api)",
        ) from exc
    retrieved = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entries = [
        {
            "id": canonical_id(document["material_id"]),
            "document": document,
            "endpoint": where,
            "database_version": database_version,
            "retrieved_at": retrieved,
        }
        for document in documents
    ]
    return sorted(entries, key=lambda entry: _id_order(entry["id"]))


def _offline(where: str, exc: BaseException, cache_folder: Path) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"cannot reach the Materials Project API at {where} ({type(exc).__name__}) and the cache "
        f"{cache_folder} holds no answer to this query",
        OFFLINE_FIX,
    )


def _id_order(material_id: str) -> tuple[str, int]:
    from emmet.core.mpid import AlphaID

    prefix = material_id.split("-")[0]
    return prefix, int(AlphaID(material_id))


def _record(entry: dict[str, Any], query: dict[str, Any]) -> StructureRecord:
    from pymatgen.core import Structure

    document = entry["document"]
    provenance = {
        "source": "materials_project",
        "query": query,
        "material_id": entry["id"],
        "endpoint": entry["endpoint"],
        "database_version": entry["database_version"],
        "retrieved_at": entry["retrieved_at"],
        "formula_pretty": document.get("formula_pretty"),
        "energy_above_hull": document.get("energy_above_hull"),
        "is_stable": document.get("is_stable"),
        "theoretical": document.get("theoretical"),
        "source_symmetry": document.get("symmetry"),
    }
    return standardized_record(entry["id"], Structure.from_dict(document["structure"]), provenance)
