"""AFLOW source through AFLUX, against a local server that evaluates AFLUX summonses.

The fixture entries are two real AFLOW entries (fcc Ac from LIB1 and hexagonal AcBr3 from
the ICSD catalog, values as in aflowlib.json), reduced to the keywords this source asks for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError, InvalidDataError, StemforgeError
from stemforge.simulate.structures import (
    SourceUnavailableError,
    aflow_api,
    get_structure,
    structure_source,
)

ENTRIES = json.loads(
    (Path(__file__).parent / "data" / "structures" / "aflow" / "entries.json").read_text()
)
AC, ACBR3 = "aflow:075dbbb922a0e4d7", "aflow:fc70fda6652015cb"


def _terms(text: str) -> list[str]:
    """Split on commas outside parentheses and quotes."""
    terms, depth, quoted, current = [], 0, False, ""
    for char in text:
        quoted ^= char == "'"
        depth += (char == "(") - (char == ")") if not quoted else 0
        if char == "," and depth == 0 and not quoted:
            terms.append(current)
            current = ""
        else:
            current += char
    return [*terms, current] if current else terms


def _matches(entry: dict, name: str, argument: str) -> bool:
    if name == "species":
        return set(argument.split(",")) <= set(entry["species"])
    if name in ("nspecies", "spacegroup_relax"):
        if "*" in argument:
            low, high = argument.split(",")
            return float(low.rstrip("*")) <= entry[name] <= float(high.lstrip("*"))
        return entry[name] == int(argument)
    if name in ("compound", "Bravais_lattice_relax"):
        return entry[name] == argument
    if name == "auid":
        return entry["auid"] == argument.strip("'")
    raise KeyError(name)


def _aflux(legacy: bool = False):
    def respond(path: str, headers: dict[str, str]) -> tuple[int, object]:
        url = urlsplit(path)
        if url.path != "/":
            return 404, {"error": "not found"}
        page, size, asked, selected = 1, 64, [], list(ENTRIES)
        for term in _terms(unquote(url.query)):
            match = re.fullmatch(r"(\w+)(?:\((.*)\))?", term)
            name, argument = match.groups()
            if name == "paging":
                page, size = (int(x) for x in argument.split(","))
            elif name == "format":
                assert argument == "json"
            elif name == "catalog":
                selected = [e for e in selected if e["catalog"].lower() == argument]
            elif argument is None:
                if name not in ENTRIES[0]:
                    return 400, {"error": f"unknown keyword {name}"}
                asked.append(name)
            else:
                try:
                    selected = [e for e in selected if _matches(e, name, argument)]
                except KeyError:
                    return 400, {"error": f"unknown keyword {name}"}
                asked.append(name)
        shown = ["auid", "aurl", "compound", *asked]
        found = [{k: e[k] for k in shown} for e in selected][(page - 1) * size : page * size]
        if legacy:
            return 200, {f"{i + 1} of {len(selected)}": e for i, e in enumerate(found)}
        return 200, found

    return respond


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STEMFORGE_AFLUX_ENDPOINT", raising=False)
    return tmp_path / "cache" / "structures"


def _summonses(server) -> list[str]:
    return [unquote(urlsplit(p).query) for p, _ in server.requests]


def test_search_then_offline_from_cache(local_server):
    server = local_server(_aflux())
    records = list(structure_source("aflow", species="Ac", endpoint=server.url))
    assert [r.id for r in records] == [AC, ACBR3]
    assert _summonses(server) == [
        "species(Ac),composition,geometry,positions_fractional,spacegroup_relax,Bravais_lattice_relax,paging(1,100),format(json)"
    ]
    ac, acbr3 = records
    # fcc Ac: AFLOW stores the 1-atom primitive cell; the record is the 4-atom cube,
    # with AFLOW's own conventional lattice constant (anrl_parameter_values_relax)
    assert (ac.space_group, len(ac.structure)) == (225, 4)
    np.testing.assert_allclose(
        ac.structure.lattice.abc, ENTRIES[0]["anrl_parameter_values_relax"][0], atol=1e-4
    )
    assert (acbr3.space_group, acbr3.provenance["space_group_symbol"], len(acbr3.structure)) == (
        176,
        "P6_3/m",
        8,
    )
    assert acbr3.provenance["source_space_group"] == 176
    assert acbr3.provenance["aurl"].endswith("Ac1Br3_ICSD_31578")

    server.stop()
    again = list(structure_source("aflow", species=["Ac"], endpoint=server.url))
    assert [r.structure for r in again] == [r.structure for r in records]
    assert get_structure(ACBR3).structure == acbr3.structure


def test_criteria_in_the_summons(local_server):
    server = local_server(_aflux())
    cubic = list(structure_source("aflow", crystal_system="cubic", endpoint=server.url))
    by_group = list(structure_source("aflow", space_group=176, nspecies=2, endpoint=server.url))
    by_lattice = list(
        structure_source("aflow", bravais_lattice="hex", catalog="ICSD", endpoint=server.url)
    )
    by_compound = list(structure_source("aflow", compound="Ac2Br6", endpoint=server.url))
    assert [r.id for r in cubic] == [AC]
    assert (
        [r.id for r in by_group]
        == [r.id for r in by_lattice]
        == [r.id for r in by_compound]
        == [ACBR3]
    )
    sent = _summonses(server)
    assert sent[0].startswith("spacegroup_relax(195*,*230),species,")
    assert sent[1].startswith("nspecies(2),spacegroup_relax(176),species,")
    assert sent[2].startswith("Bravais_lattice_relax(HEX),species,") and sent[2].endswith(
        "catalog(icsd),paging(1,100),format(json)"
    )
    assert sent[3].startswith("compound(Ac2Br6),species,")


def test_auid_lookup_and_paging(local_server, monkeypatch):
    server = local_server(_aflux())
    (record,) = structure_source("aflow", auids=ACBR3, endpoint=server.url)
    assert record.id == ACBR3
    assert _summonses(server) == [
        f"auid('{ACBR3}'),species,composition,geometry,positions_fractional,spacegroup_relax,"
        "Bravais_lattice_relax,paging(1,1),format(json)"
    ]
    monkeypatch.setattr(aflow_api, "_PAGE_SIZE", 1)
    paged = list(structure_source("aflow", species="Ac", limit=5, endpoint=server.url))
    assert [r.id for r in paged] == [AC, ACBR3]
    pages = [re.search(r"paging\(\d+,\d+\)", s).group() for s in _summonses(server)[1:]]
    assert pages == ["paging(1,1)", "paging(2,1)", "paging(3,1)"]  # stops at the short (empty) page
    first = list(structure_source("aflow", species="Ac", nspecies=1, limit=1, endpoint=server.url))
    assert [r.id for r in first] == [AC]


def test_older_answer_format(local_server):
    server = local_server(_aflux(legacy=True))
    records = list(structure_source("aflow", species="Ac", endpoint=server.url))
    assert [r.id for r in records] == [AC, ACBR3]


def test_unreachable_and_refused(local_server):
    gone = local_server(_aflux())
    gone.stop()
    with pytest.raises(SourceUnavailableError, match="cannot reach AFLUX") as caught:
        structure_source("aflow", species="Ac", endpoint=gone.url)
    assert "offline" in caught.value.fix
    refusing = local_server(lambda path, headers: (400, {"error": "bad summons"}))
    with pytest.raises(StemforgeError, match="HTTP 400"):
        structure_source("aflow", species="Ac", endpoint=refusing.url)
    odd = local_server(lambda path, headers: (200, {"error": "unknown keyword"}))
    with pytest.raises(StemforgeError, match="not a list of entries"):
        structure_source("aflow", species="Ac", endpoint=odd.url)


def test_entries_without_a_structure():
    broken = {key: value for key, value in ENTRIES[1].items() if key != "positions_fractional"}
    with pytest.raises(InvalidDataError, match=ACBR3):
        aflow_api.entry_structure(broken)
    short = {**ENTRIES[1], "composition": [2, 5]}
    with pytest.raises(InvalidDataError, match="7 atoms"):
        aflow_api.entry_structure(short)


def test_bad_queries():
    with pytest.raises(ConfigurationError, match="at least one criterion"):
        structure_source("aflow", catalog="icsd")
    with pytest.raises(ConfigurationError, match="not AFLOW unique ids"):
        structure_source("aflow", auids=["aflow:xyz"])
    with pytest.raises(ConfigurationError, match="lattice type"):
        structure_source("aflow", bravais_lattice="XYZ")
    with pytest.raises(ConfigurationError, match="is not cubic"):
        structure_source("aflow", space_group=176, crystal_system="cubic")
    with pytest.raises(ConfigurationError, match="compound string"):
        structure_source("aflow", compound="AcBr3")
