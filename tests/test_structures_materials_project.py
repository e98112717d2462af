"""Materials Project source, driven through mp-api against a local server speaking the MP wire format.

The server answers ``GET /heartbeat`` (what MPRester asks first) and
``GET /materials/summary/?...`` with ``{"data": [...], "errors": null, "meta": {...}}``,
filtering the fixture documents the way the API does (emmet-api's query operators) and
refusing any parameter it does not know, so a change in what mp-api sends shows up here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError, StemforgeError
from stemforge.simulate.structures import SourceUnavailableError, get_structure, structure_source
from stemforge.simulate.structures.materials_project import FIELDS

FIXTURES = Path(__file__).parent / "data" / "structures" / "materials_project"
KEY = "stemforge-test-key-0123456789abc"  # MP keys are 32 characters
KNOWN_PARAMETERS = {
    "material_ids",
    "chemsys",
    "crystal_system",
    "spacegroup_number",
    "energy_above_hull_min",
    "energy_above_hull_max",
    "deprecated",
    "_fields",
    "_all_fields",
    "_limit",
    "_skip",
}


def _number(material_id: str) -> int:
    from emmet.core.mpid import AlphaID

    return int(AlphaID(material_id))  # the server knows mp-149 and mp-aaaaaaft as one material


def _respond(path: str, headers: dict[str, str]) -> tuple[int, object]:
    documents = json.loads((FIXTURES / "summary_documents.json").read_text())
    url = urlsplit(path)
    if url.path == "/heartbeat":
        return 200, json.loads((FIXTURES / "heartbeat.json").read_text())
    if url.path != "/materials/summary/":
        return 404, {"detail": "Not Found"}
    if {k.lower(): v for k, v in headers.items()}.get("x-api-key") != KEY:
        return 401, {"detail": "Invalid or missing API key"}
    params = dict(parse_qsl(url.query))
    unknown = set(params) - KNOWN_PARAMETERS
    if unknown:
        return 400, {"detail": f"unknown query parameters {sorted(unknown)}"}
    keep = []
    for doc in documents:
        symmetry = doc["symmetry"]
        if "material_ids" in params and _number(doc["material_id"]) not in {
            _number(i) for i in params["material_ids"].split(",")
        }:
            continue
        if "chemsys" in params and doc["chemsys"] not in params["chemsys"].split(","):
            continue
        if "crystal_system" in params and symmetry["crystal_system"] != params["crystal_system"]:
            continue
        if "spacegroup_number" in params and symmetry["number"] != int(params["spacegroup_number"]):
            continue
        if (
            not float(params.get("energy_above_hull_min", "-inf"))
            <= doc["energy_above_hull"]
            <= float(params.get("energy_above_hull_max", "inf"))
        ):
            continue
        if doc["deprecated"] != (params.get("deprecated", "false").lower() == "true"):
            continue
        keep.append(doc)
    if "_fields" in params:
        fields = params["_fields"].split(",")
        keep = [{f: doc[f] for f in fields if f in doc} for doc in keep]
    skip, limit = int(params.get("_skip", 0)), int(params.get("_limit", 1000))
    meta = {
        "api_version": "0.87.3",
        "time_stamp": "2025-09-25T00:00:00",
        "total_doc": len(keep),
        "facet": None,
    }
    return 200, {"data": keep[skip : skip + limit], "errors": None, "meta": meta}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MP_API_KEY", KEY)
    return tmp_path / "cache" / "structures"


@pytest.fixture
def server(local_server):
    return local_server(_respond)


def _summary_requests(server) -> list[dict[str, str]]:
    return [
        dict(parse_qsl(urlsplit(p).query))
        for p, _ in server.requests
        if p.startswith("/materials/summary/")
    ]


def test_ids_through_mp_api_then_offline_from_cache(server, monkeypatch):
    records = list(
        structure_source("materials_project", material_ids=["mp-149", "mp-13"], endpoint=server.url)
    )
    assert [r.id for r in records] == ["mp-13", "mp-149"]
    fe, si = records
    assert (si.space_group, si.crystal_system, len(si.structure)) == (
        227,
        "cubic",
        8,
    )  # conventional cell
    np.testing.assert_allclose(si.structure.lattice.abc, 5.469, atol=1e-6)
    assert (fe.space_group, len(fe.structure)) == (229, 2)
    np.testing.assert_allclose(fe.structure.lattice.abc, 2.833, atol=1e-6)
    assert si.provenance["source_symmetry"]["symbol"] == "Fd-3m"
    assert (
        si.provenance["database_version"] == "2025_09_25"
        and si.provenance["endpoint"] == server.url
    )

    # what mp-api put on the wire
    paths = [p for p, _ in server.requests]
    assert paths[0] == "/heartbeat" and all(
        p.startswith(("/heartbeat", "/materials/summary/?")) for p in paths
    )
    (params,) = _summary_requests(server)
    assert params["material_ids"] == "mp-13,mp-149"
    assert params["_fields"].split(",") == list(FIELDS)
    summary_headers = [h for p, h in server.requests if p.startswith("/materials/summary/")][0]
    assert {k.lower(): v for k, v in summary_headers.items()}["x-api-key"] == KEY

    # second run: server gone, no key needed, same records
    server.stop()
    monkeypatch.delenv("MP_API_KEY")
    again = list(structure_source("materials_project", material_ids="mp-149", endpoint=server.url))
    assert [r.id for r in again] == ["mp-149"] and again[0].structure == si.structure
    assert get_structure("mp-13").structure == fe.structure
    assert get_structure("mp-13").provenance["retrieved_at"] == fe.provenance["retrieved_at"]


def test_search_criteria_on_the_wire(server):
    stable_carbon = list(
        structure_source(
            "materials_project", chemsys="C", energy_above_hull_max=0.05, endpoint=server.url
        )
    )
    assert [r.id for r in stable_carbon] == ["mp-48"]
    assert stable_carbon[0].crystal_system == "hexagonal"
    hexagonal = list(
        structure_source("materials_project", crystal_system="hexagonal", endpoint=server.url)
    )
    assert [r.id for r in hexagonal] == ["mp-48"]
    diamond_type = list(structure_source("materials_project", space_group=227, endpoint=server.url))
    assert [r.id for r in diamond_type] == [
        "mp-66",
        "mp-149",
    ]  # numeric order, whatever the wire id form
    small = list(
        structure_source("materials_project", space_group=227, max_atoms=4, endpoint=server.url)
    )
    assert small == []  # applied locally on the 8-atom conventional cells

    sent = _summary_requests(server)
    assert {
        k: sent[0][k] for k in ("chemsys", "energy_above_hull_min", "energy_above_hull_max")
    } == {
        "chemsys": "C",
        "energy_above_hull_min": "0.0",
        "energy_above_hull_max": "0.05",
    }
    assert sent[1]["crystal_system"] == "Hexagonal"
    assert sent[2]["spacegroup_number"] == "227"
    assert len(sent) == 3  # the max_atoms query was the cached space-group one

    server.stop()
    cached = list(
        structure_source("materials_project", crystal_system="Hexagonal", endpoint=server.url)
    )
    assert [r.id for r in cached] == ["mp-48"]


def test_no_key_and_no_cache(monkeypatch):
    monkeypatch.delenv("MP_API_KEY")
    with pytest.raises(ConfigurationError, match="MP_API_KEY") as caught:
        structure_source("materials_project", material_ids=["mp-149"])
    assert "export MP_API_KEY" in caught.value.fix


def test_unreachable_server_and_no_cache(local_server):
    gone = local_server(_respond)
    gone.stop()
    with pytest.raises(
        SourceUnavailableError, match="cannot reach the Materials Project API"
    ) as caught:
        structure_source("materials_project", material_ids=["mp-149"], endpoint=gone.url)
    assert "offline" in caught.value.fix and "cache" in caught.value.fix
    assert KEY not in str(caught.value)


def test_refused_query(server, monkeypatch):
    monkeypatch.setenv("MP_API_KEY", "x" * 32)  # well-formed but wrong
    with pytest.raises(StemforgeError, match="401") as caught:
        structure_source("materials_project", material_ids=["mp-149"], endpoint=server.url)
    assert "MP_API_KEY" in caught.value.fix


def test_api_key_never_leaks(server, cache, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    records = list(structure_source("materials_project", chemsys=["Si", "Fe"], endpoint=server.url))
    assert [r.id for r in records] == ["mp-13", "mp-149"]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(files) == 3  # two materials and one query
    assert all(KEY not in p.read_text() for p in files)
    assert KEY not in json.dumps([r.provenance for r in records])
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err


def test_fixtures_follow_emmet_summary_schema():
    from emmet.core.summary import SummaryDoc

    documents = json.loads((FIXTURES / "summary_documents.json").read_text())
    for doc in documents:
        SummaryDoc.model_validate(doc)
    assert {d["material_id"] for d in documents} == {
        "mp-aaaaaaft",
        "mp-13",
        "mp-aaaaaaco",
        "mp-aaaaaabw",
    }


def test_bad_queries():
    with pytest.raises(ConfigurationError, match="at least one criterion"):
        structure_source("materials_project")
    with pytest.raises(ConfigurationError, match="not a Materials Project id"):
        structure_source("materials_project", material_ids=["149"])
    with pytest.raises(ConfigurationError, match="chemical system"):
        structure_source("materials_project", chemsys="Si-Qq")
