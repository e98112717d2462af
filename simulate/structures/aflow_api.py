"""Structures from the AFLOW database through its search API, AFLUX, over plain HTTP.

AFLUX (Rose et al., Comput. Mater. Sci. 137, 362 (2017); help at
https://aflow.org/API/aflux/?help) takes a *summons* as the whole query string: a
*matchbook* of comma-separated (AND) keywords, ``keyword(value)`` to filter and a bare
``keyword`` to ask for a property, plus directives (``paging(page,size)``,
``format(json)``, ``catalog(icsd)``). Inside parentheses ``,`` is AND, ``:`` is OR,
``a*,*b`` a closed range and ``'...'`` quotes a string. The answer is a JSON list of
entries holding the keywords asked for plus ``auid``, ``aurl`` and ``compound``; older
servers answered with an object keyed ``"1 of N"``, ``"2 of N"``..., also understood here.

A structure is built from ``geometry`` (a, b, c in Å, α, β, γ in degrees, of the relaxed
cell), ``positions_fractional`` and ``species`` x ``composition`` (atoms listed species
by species). The id of an entry is its AFLOW unique identifier, ``aflow:<16 hex digits>``.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stemforge.core.errors import ConfigurationError, InvalidDataError, StemforgeError
from stemforge.simulate.structures.http_cache import OFFLINE_FIX, JsonCache, SourceUnavailableError
from stemforge.simulate.structures.record import (
    StructureRecord,
    check_crystal_system,
    crystal_system_of,
    matches,
    space_group_range,
    standardized_record,
)

PREFIX = "aflow:"
DEFAULT_ENDPOINT = "https://aflow.org/API/aflux/"
ID_PATTERN = re.compile(r"^aflow:[0-9a-f]{16}$")
_NAMESPACE = "aflow"
#: Properties asked for besides the filters (AFLUX adds auid, aurl and compound itself).
PROPERTIES = (
    "species",
    "composition",
    "geometry",
    "positions_fractional",
    "spacegroup_relax",
    "Bravais_lattice_relax",
)
_BRAVAIS = (
    "CUB",
    "FCC",
    "BCC",
    "TET",
    "BCT",
    "ORC",
    "ORCC",
    "ORCF",
    "ORCI",
    "HEX",
    "RHL",
    "MCL",
    "MCLC",
    "TRI",
)
_PAGE_SIZE = 100


def aflow_search(
    auids: str | Iterable[str] | None = None,
    *,
    species: str | Iterable[str] | None = None,
    nspecies: int | None = None,
    compound: str | None = None,
    space_group: int | None = None,
    crystal_system: str | None = None,
    bravais_lattice: str | None = None,
    catalog: str | None = None,
    limit: int = 100,
    max_atoms: int | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    timeout: float = 60.0,
) -> Iterator[StructureRecord]:
    """AFLOW entries matching a query, in the order AFLUX returns them.

    The query runs (or is read from the cache) when this function is called; the records
    are standardised as they are iterated.

    Parameters
    ----------
    auids
        AFLOW unique ids (``'aflow:fc70fda6652015cb'``); one request each.
    species
        Elements that must all be present (``['Na', 'Cl']``).
    nspecies
        Exact number of elements.
    compound
        AFLOW's compound string of the cell (``'Ac2Br6'``: elements in alphabetical order,
        atoms per cell).
    space_group
        Space group of the relaxed cell (``spacegroup_relax``).
    crystal_system
        Crystal system, as a range of ``spacegroup_relax``.
    bravais_lattice
        AFLOW lattice type of the relaxed cell (``Bravais_lattice_relax``: CUB, FCC, BCC,
        TET, BCT, ORC, ORCC, ORCF, ORCI, HEX, RHL, MCL, MCLC, TRI).
    catalog
        AFLOW catalog (``'icsd'``, ``'lib1'``, ``'lib2'``...); default all.
    limit
        Most entries to fetch for a search (auids are fetched one by one regardless).
    max_atoms
        Keep only conventional cells with at most this many atoms (applied locally).
    endpoint
        AFLUX base URL; default ``$STEMFORGE_AFLUX_ENDPOINT``, else :data:`DEFAULT_ENDPOINT`.
    cache_dir
        Structure cache folder (see :func:`~.http_cache.cache_root`).
    refresh
        Query the API even when the cache holds an answer.
    timeout
        Seconds to wait for each HTTP request.

    Raises
    ------
    ConfigurationError
        Invalid or empty query.
    SourceUnavailableError
        AFLUX cannot be reached and the cache holds no answer.
    StemforgeError
        AFLUX refused the query or answered something that is not a list of entries.
    """
    query = _query(
        auids,
        species,
        nspecies,
        compound,
        space_group,
        crystal_system,
        bravais_lattice,
        catalog,
        limit,
    )
    client = _Client(endpoint, cache_dir, timeout)
    entries = (
        client.auids(query["auids"], refresh) if "auids" in query else client.search(query, refresh)
    )
    records = (_record(entry, query) for entry in entries)
    return (record for record in records if matches(record, max_atoms=max_atoms))


def resolve(
    structure_id: str,
    *,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = 60.0,
) -> StructureRecord:
    """The record of one AFLOW unique id, from the cache or else AFLUX."""
    query = _query(structure_id, None, None, None, None, None, None, None, 1)
    entries = _Client(endpoint, cache_dir, timeout).auids(query["auids"], refresh=False)
    return _record(entries[0], query)


def summons(query: dict[str, Any], page: int, page_size: int) -> str:
    """The AFLUX summons of a search query (no auids) for one page."""
    matchbook = []
    if "species" in query:
        matchbook.append(f"species({','.join(query['species'])})")
    if "nspecies" in query:
        matchbook.append(f"nspecies({query['nspecies']})")
    if "compound" in query:
        matchbook.append(f"compound({query['compound']})")
    if "space_group" in query:
        matchbook.append(f"spacegroup_relax({query['space_group']})")
    elif "crystal_system" in query:
        groups = space_group_range(query["crystal_system"])
        matchbook.append(f"spacegroup_relax({groups.start}*,*{groups.stop - 1})")
    if "bravais_lattice" in query:
        matchbook.append(f"Bravais_lattice_relax({query['bravais_lattice']})")
    asked = [p for p in PROPERTIES if not any(term.startswith(f"{p}(") for term in matchbook)]
    directives = [f"paging({page},{page_size})", "format(json)"]
    if "catalog" in query:
        directives.insert(0, f"catalog({query['catalog']})")
    return ",".join(matchbook + asked + directives)


def auid_summons(auid: str) -> str:
    """The AFLUX summons that fetches one entry by its unique id (quoted: ':' is AFLUX's OR)."""
    return ",".join([f"auid('{auid}')", *PROPERTIES, "paging(1,1)", "format(json)"])


def entry_structure(entry: dict[str, Any]) -> Any:
    """The pymatgen Structure of an AFLUX entry (geometry, positions_fractional, species, composition)."""
    from pymatgen.core import Lattice, Structure

    try:
        a, b, c, alpha, beta, gamma = (float(x) for x in entry["geometry"])
        species = [
            symbol
            for symbol, count in zip(entry["species"], entry["composition"], strict=True)
            for _ in range(int(count))
        ]
        positions = [[float(x) for x in position] for position in entry["positions_fractional"]]
        if len(species) != len(positions) or any(len(p) != 3 for p in positions):
            raise ValueError(
                f"{len(species)} atoms in species x composition, {len(positions)} positions"
            )
        return Structure(Lattice.from_parameters(a, b, c, alpha, beta, gamma), species, positions)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidDataError(
            f"AFLOW entry {entry.get('auid', '?')} holds no usable structure ({type(exc).__name__}: {exc})",
            "report the auid; it needs geometry, positions_fractional, species and composition",
        ) from exc


def _query(
    auids: str | Iterable[str] | None,
    species: str | Iterable[str] | None,
    nspecies: int | None,
    compound: str | None,
    space_group: int | None,
    crystal_system: str | None,
    bravais_lattice: str | None,
    catalog: str | None,
    limit: int,
) -> dict[str, Any]:
    from pymatgen.core import Element

    query: dict[str, Any] = {}
    if auids is not None:
        ids = [auids] if isinstance(auids, str) else list(auids)
        bad = [i for i in ids if not ID_PATTERN.match(str(i))]
        if bad:
            raise ConfigurationError(
                f"{bad} are not AFLOW unique ids", "auids look like aflow:fc70fda6652015cb"
            )
        query["auids"] = list(dict.fromkeys(ids))
    if species is not None:
        symbols = [species] if isinstance(species, str) else list(species)
        try:
            query["species"] = sorted({Element(s).symbol for s in symbols})
        except ValueError as exc:
            raise ConfigurationError(
                f"unknown element in {symbols}", "use symbols such as 'Si'"
            ) from exc
    if nspecies is not None:
        query["nspecies"] = int(nspecies)
    if compound is not None:
        if not re.fullmatch(r"([A-Z][a-z]?\d+)+", compound):
            raise ConfigurationError(
                f"{compound!r} is not an AFLOW compound string",
                "write it like Ac2Br6 (every count explicit)",
            )
        query["compound"] = compound
    if space_group is not None:
        crystal_system_of(int(space_group))
        query["space_group"] = int(space_group)
    if crystal_system is not None:
        query["crystal_system"] = check_crystal_system(crystal_system)
        if (
            "space_group" in query
            and crystal_system_of(query["space_group"]) != query["crystal_system"]
        ):
            raise ConfigurationError(
                f"space group {space_group} is not {crystal_system}", "drop one of the two"
            )
    if bravais_lattice is not None:
        if bravais_lattice.upper() not in _BRAVAIS:
            raise ConfigurationError(
                f"unknown AFLOW lattice type {bravais_lattice!r}",
                f"use one of {', '.join(_BRAVAIS)}",
            )
        query["bravais_lattice"] = bravais_lattice.upper()
    if catalog is not None:
        query["catalog"] = catalog.lower()
    if not query or set(query) == {"catalog"}:
        raise ConfigurationError(
            "an AFLOW query needs at least one criterion",
            "give auids, species, nspecies, compound, space_group, crystal_system or bravais_lattice",
        )
    if "auids" in query and len(query) > 1:
        raise ConfigurationError(
            "auids cannot be combined with search criteria", "give either auids or a search"
        )
    if "auids" not in query:
        if limit < 1:
            raise ConfigurationError(f"limit={limit} must be at least 1")
        query["limit"] = int(limit)
    return query


class _Client:
    """AFLUX requests with the structure cache in front."""

    def __init__(self, endpoint: str | None, cache_dir: str | Path | None, timeout: float) -> None:
        self.endpoint = endpoint or os.environ.get("STEMFORGE_AFLUX_ENDPOINT") or DEFAULT_ENDPOINT
        self.cache = JsonCache(_NAMESPACE, cache_dir)
        self.timeout = timeout

    def auids(self, auids: list[str], refresh: bool) -> list[dict[str, Any]]:
        entries = []
        for auid in auids:
            path = self.cache.entry_path(auid)
            entry = None if refresh else self.cache.load(path)
            if entry is None:
                found = self._get(auid_summons(auid))
                if not found:
                    raise ConfigurationError(f"AFLOW has no entry {auid}", "check the auid")
                entry = self._store(found[:1])[0]
            entries.append(entry)
        return entries

    def search(self, query: dict[str, Any], refresh: bool) -> list[dict[str, Any]]:
        path = self.cache.query_path(query)
        answer = None if refresh else self.cache.load(path)
        if answer is not None:
            entries = [self.cache.load(self.cache.entry_path(auid)) for auid in answer["ids"]]
            if all(entry is not None for entry in entries):
                return entries
        found: list[dict[str, Any]] = []
        page_size = min(query["limit"], _PAGE_SIZE)
        page = 1
        while len(found) < query["limit"]:
            batch = self._get(summons(query, page, page_size))
            found.extend(batch)
            if len(batch) < page_size:
                break
            page += 1
        entries = self._store(found[: query["limit"]])
        self.cache.save(path, {"query": query, "ids": [entry["id"] for entry in entries]})
        return entries

    def _store(self, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        retrieved = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        entries = []
        for raw in found:
            entry = {
                "id": raw["auid"],
                "entry": raw,
                "endpoint": self.endpoint,
                "retrieved_at": retrieved,
            }
            self.cache.save(self.cache.entry_path(entry["id"]), entry)
            entries.append(entry)
        return entries

    def _get(self, summons_text: str) -> list[dict[str, Any]]:
        import requests

        url = f"{self.endpoint}?{summons_text}"
        try:
            response = requests.get(url, timeout=self.timeout)
        except requests.exceptions.RequestException as exc:
            raise SourceUnavailableError(
                f"cannot reach AFLUX at {self.endpoint} ({type(exc).__name__}) and the cache "
                f"{self.cache.folder} holds no answer to this query",
                OFFLINE_FIX,
            ) from exc
        if response.status_code != 200:
            raise StemforgeError(
                f"AFLUX answered HTTP {response.status_code} to {url}: {response.text[:300]}",
                "check the query; see https://aflow.org/API/aflux/?help",
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise StemforgeError(
                f"AFLUX answered something that is not JSON to {url}: {response.text[:300]}"
            ) from exc
        return _entry_list(body, url)


def _entry_list(body: Any, url: str) -> list[dict[str, Any]]:
    """Entries of an AFLUX answer: a list, or the older object keyed "i of N"."""
    if isinstance(body, dict) and all(re.fullmatch(r"\d+ of \d+", key) for key in body):
        body = [body[key] for key in sorted(body, key=lambda key: int(key.split()[0]))]
    if not isinstance(body, list) or not all(
        isinstance(entry, dict) and "auid" in entry for entry in body
    ):
        raise StemforgeError(
            f"AFLUX answered something that is not a list of entries to {url}: {str(body)[:300]}",
            "check the query; see https://aflow.org/API/aflux/?help",
        )
    return body


def _record(entry: dict[str, Any], query: dict[str, Any]) -> StructureRecord:
    raw = entry["entry"]
    provenance = {
        "source": "aflow",
        "query": query,
        "auid": raw["auid"],
        "aurl": raw.get("aurl"),
        "compound": raw.get("compound"),
        "source_space_group": raw.get("spacegroup_relax"),
        "source_bravais_lattice": raw.get("Bravais_lattice_relax"),
        "endpoint": entry["endpoint"],
        "retrieved_at": entry["retrieved_at"],
    }
    return standardized_record(entry["id"], entry_structure(raw), provenance)
