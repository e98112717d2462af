"""The model zoo: registry resolution, real pooch downloads from 127.0.0.1, hashes, loading, CLI."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from stemforge.core.cli import cli
from stemforge.core.errors import (
    ChecksumError,
    ConfigurationError,
    FileFormatError,
    MissingFileError,
)
from stemforge.models import zoo
from stemforge.models.zoo import registry as zoo_registry
from stemforge.models.zoo.registry import latest_version, version_key

ARCH = "zoo-test-tiny"


class Tiny(torch.nn.Module):
    """A two-layer module with a buffer, small enough to save and load in milliseconds."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, width)
        self.outer = torch.nn.Linear(width, 1)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(x))) * self.scale


zoo.register_architecture(ARCH, Tiny)


def export(path: Path, width: int = 4, seed: int = 0) -> Tiny:
    """Save a Tiny as the training stage does: tensors plus JSON metadata."""
    torch.manual_seed(seed)
    model = Tiny(width)
    metadata = {
        "model": ARCH,
        "config": json.dumps({"width": width}),
        "normalization": json.dumps({"mean": 0.0, "std": 1.0}),
        "data": json.dumps({"dataset": "toy", "n": 8}),
        "seed": str(seed),
        "metrics": json.dumps({"mse": 0.25}),
    }
    save_file(model.state_dict(), str(path), metadata=metadata)
    return model


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry(name: str, version: str, file: Path, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "file": file.name,
        "sha256": sha256(file),
        "size": file.stat().st_size,
        "architecture": ARCH,
        "config": {"width": 4},
        "metrics": {"mse": 0.25},
        "training": {"seed": 0},
        "embedded": False,
        **extra,
    }


def write_registry(path: Path, *entries: dict[str, object]) -> Path:
    path.write_text(json.dumps({"models": list(entries)}))
    return path


@dataclass
class FileServer:
    """Static files of a folder over HTTP on 127.0.0.1, logging the paths requested."""

    root: Path
    server: ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "served"
    root.mkdir()
    log: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            log.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    files = FileServer(root, server, log)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield files
    if server.socket.fileno() != -1:
        files.stop()


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty stand-in for the package folder of the shipped registry (only its root moves)."""
    root = tmp_path / "package"
    root.mkdir()
    write_registry(root / "registry.json")
    monkeypatch.setattr(zoo_registry, "shipped_root", lambda: root)
    return root


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache, no user registry and no progress bars."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("STEMFORGE_ZOO_CACHE", str(cache))
    monkeypatch.delenv("STEMFORGE_ZOO_REGISTRY", raising=False)
    monkeypatch.setenv("STEMFORGE_PROGRESS", "0")
    return cache


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ---- registry -------------------------------------------------------------------------------
def test_semver_precedence_and_latest():
    ordered = ["0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert latest_version(["1.0.0", "1.10.0", "2.0.0-rc.1"]) == "1.10.0"  # releases first
    assert latest_version(["2.0.0-rc.1", "2.0.0-rc.2"]) == "2.0.0-rc.2"
    with pytest.raises(ConfigurationError, match="semantic version"):
        version_key("1.0")


def test_resolve_versions_latest_and_unknown(tmp_path, shipped, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    export(weights)
    versions = ["0.9.0", "1.0.0", "1.10.0", "2.0.0-rc.1"]
    user = write_registry(
        tmp_path / "mine.json",
        *(entry("tiny", v, weights, url=f"https://example.org/{v}/tiny.safetensors") for v in versions),
        entry("tinier", "0.1.0", weights, url="https://example.org/tinier.safetensors"),
    )
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(user))

    assert zoo.resolve("tiny").version == "1.10.0"
    assert zoo.resolve("tiny@latest").version == "1.10.0"
    assert zoo.resolve("tiny@1.0.0").spec == "tiny@1.0.0"
    assert zoo.resolve("tiny@2.0.0-rc.1").url == "https://example.org/2.0.0-rc.1/tiny.safetensors"
    assert [e.spec for e in zoo.list_models()][:2] == ["tinier@0.1.0", "tiny@0.9.0"]

    with pytest.raises(ConfigurationError, match=r"no model named 'tinyy'.*did you mean 'tiny'.*tiny \(0\.9\.0, 1\.0\.0"):
        zoo.resolve("tinyy")
    with pytest.raises(ConfigurationError, match="no version 3.0.0; available: 0.9.0, 1.0.0, 1.10.0"):
        zoo.resolve("tiny@3.0.0")
    for bad in ("tiny@", "tiny@1.0", "@1.0.0", "a/b"):
        with pytest.raises(ConfigurationError, match="spec|semantic version"):
            zoo.resolve(bad)


def test_empty_zoo_says_how_to_fill_it(shipped):
    with pytest.raises(ConfigurationError, match=r"no models in the zoo yet; train one with `stemforge train"):
        zoo.resolve("fcunet")
    result = CliRunner().invoke(cli, ["zoo", "list"])
    assert result.exit_code == 0 and "No models in the zoo yet" in result.output and "add_model" in result.output


def test_shipped_registry_is_valid_and_its_embedded_models_verify():
    entries = zoo.load_registry().entries()  # the real one inside the package
    for model in entries:
        assert model.embedded or model.url, model.spec
        if model.embedded:
            zoo.verify(model)


def test_broken_registries_are_named(tmp_path, shipped, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    export(weights)
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(tmp_path / "missing.json"))
    with pytest.raises(MissingFileError, match="STEMFORGE_ZOO_REGISTRY names the registry"):
        zoo.list_models()
    bad = {**entry("tiny", "1.0.0", weights), "file": "../tiny.safetensors"}
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "bad.json", bad)))
    with pytest.raises(FileFormatError, match=r"bad\.json, entry tiny@1\.0\.0: file '\.\./tiny\.safetensors'"):
        zoo.list_models()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        zoo.list_models()


# ---- download, cache, hashes ----------------------------------------------------------------
def test_pull_downloads_once_then_works_offline(tmp_path, shipped, file_server, isolated, monkeypatch):
    original = export(file_server.root / "tiny.safetensors")
    model = entry("tiny", "1.0.0", file_server.root / "tiny.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))

    path = zoo.pull("tiny")
    assert path == isolated / "tiny" / "1.0.0" / "tiny.safetensors"
    assert path.read_bytes() == (file_server.root / "tiny.safetensors").read_bytes()
    assert file_server.requests == ["/tiny.safetensors"]

    file_server.stop()  # offline from now on
    assert zoo.pull("tiny@1.0.0") == path
    assert zoo.verify("tiny") == path
    state, metadata = zoo.load_weights("tiny")
    assert torch.equal(state["inner.weight"], original.inner.weight)
    assert metadata["model"] == ARCH and metadata["config"] == {"width": 4} and metadata["seed"] == 0
    assert file_server.requests == ["/tiny.safetensors"]


def test_offline_without_cache_is_a_clear_error(tmp_path, shipped, file_server, monkeypatch):
    export(file_server.root / "tiny.safetensors")
    model = entry("tiny", "1.0.0", file_server.root / "tiny.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))
    file_server.stop()
    with pytest.raises(zoo.ModelUnavailableError, match=r"cannot download model tiny@1\.0\.0.*not in the cache.*connect to the network"):
        zoo.pull("tiny")
    with pytest.raises(MissingFileError, match=r"not in the cache.*stemforge zoo pull tiny@1\.0\.0"):
        zoo.verify("tiny")


def test_server_error_is_a_clear_error(tmp_path, shipped, file_server, monkeypatch):
    export(tmp_path / "tiny.safetensors")  # published, but never uploaded
    model = entry("tiny", "1.0.0", tmp_path / "tiny.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))
    with pytest.raises(zoo.ModelUnavailableError, match="404.*check the url"):
        zoo.pull("tiny")


def test_wrong_hash_is_refused_and_leaves_no_file(tmp_path, shipped, file_server, isolated, monkeypatch):
    served = file_server.root / "tiny.safetensors"
    export(served, seed=1)
    export(tmp_path / "published.safetensors", seed=2)  # what the registry entry describes
    model = entry("tiny", "1.0.0", tmp_path / "published.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))
    with pytest.raises(ChecksumError) as error:
        zoo.pull("tiny")
    message = str(error.value)
    assert "tiny@1.0.0" in message and sha256(served) in message and model["sha256"] in message
    assert files_under(isolated) == []


def test_tampered_cache_is_refused_until_pulled_again(tmp_path, shipped, file_server, monkeypatch):
    export(file_server.root / "tiny.safetensors")
    model = entry("tiny", "1.0.0", file_server.root / "tiny.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))
    path = zoo.pull("tiny")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    for action in (zoo.verify, zoo.pull, zoo.load_weights, zoo.load_model):
        with pytest.raises(ChecksumError, match=r"tiny@1\.0\.0 has sha256 .*--force"):
            action("tiny")
    assert path.read_bytes() == bytes(data)  # refused, not silently replaced
    assert zoo.pull("tiny", force=True) == path
    assert zoo.verify("tiny") == path


def test_registry_served_over_http_is_cached_for_offline_use(tmp_path, shipped, file_server, monkeypatch):
    weights = file_server.root / "tiny.safetensors"
    export(weights)
    write_registry(file_server.root / "registry.json", entry("tiny", "1.0.0", weights))  # no url: next to it
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", file_server.url + "registry.json")
    assert zoo.resolve("tiny").url == file_server.url + "tiny.safetensors"
    path = zoo.pull("tiny")

    file_server.stop()
    with pytest.warns(UserWarning, match="using the copy cached"):
        assert zoo.pull("tiny") == path
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", file_server.url + "other.json")
    with pytest.raises(zoo.ModelUnavailableError, match="cannot fetch the zoo registry"):
        zoo.list_models()


# ---- embedded models ------------------------------------------------------------------------
def test_embedded_model_resolves_inside_the_package(shipped, isolated):
    weights = shipped / "tiny.safetensors"
    export(weights)
    write_registry(shipped / "registry.json", entry("tiny", "1.0.0", weights, embedded=True))
    assert zoo.pull("tiny") == weights
    assert zoo.verify("tiny") == weights
    assert isinstance(zoo.load_model("tiny"), Tiny)
    assert files_under(isolated) == []  # nothing copied to the cache

    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    with pytest.raises(ChecksumError, match="reinstall stemforge"):
        zoo.verify("tiny")
    with pytest.raises(ChecksumError):
        zoo.load_weights("tiny")
    weights.unlink()
    with pytest.raises(MissingFileError, match="embedded model tiny@1.0.0"):
        zoo.pull("tiny")


# ---- loading --------------------------------------------------------------------------------
def test_load_model_round_trip_gives_identical_outputs(tmp_path, shipped, monkeypatch):
    registry = tmp_path / "zoo" / "registry.json"
    original = export(tmp_path / "tiny.safetensors", width=5).eval()
    zoo.add_model(tmp_path / "tiny.safetensors", "tiny", "1.0.0", registry, embedded=True)
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(registry))

    loaded = zoo.load_model("tiny@1.0.0")
    assert not loaded.training
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert loaded.zoo_metadata["normalization"] == {"mean": 0.0, "std": 1.0}


def test_load_model_refuses_unknown_architecture_and_misfit_weights(tmp_path, shipped, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_file(Tiny(4).state_dict(), str(weights), metadata={"model": ARCH, "config": '{"width": 6}'})
    unknown = tmp_path / "unknown.safetensors"
    save_file(Tiny(4).state_dict(), str(unknown), metadata={"model": "no-such-net", "config": "{}"})
    registry = tmp_path / "zoo" / "registry.json"
    zoo.add_model(weights, "misfit", "1.0.0", registry, embedded=True)
    zoo.add_model(unknown, "unknown", "1.0.0", registry, embedded=True)
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(registry))
    with pytest.raises(FileFormatError, match="do not fit architecture"):
        zoo.load_model("misfit")
    with pytest.raises(ConfigurationError, match=r"unknown architecture 'no-such-net'; known: .*fcunet"):
        zoo.load_model("unknown")


def test_register_architecture_refuses_silent_replacement():
    zoo.register_architecture(ARCH, Tiny)  # the same factory again is fine
    with pytest.raises(ConfigurationError, match="already registered"):
        zoo.register_architecture(ARCH, torch.nn.Identity)


# ---- publishing -----------------------------------------------------------------------------
def test_add_model_writes_a_checked_entry(tmp_path, shipped, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    export(weights, seed=3)
    registry = tmp_path / "zoo" / "registry.json"
    added = zoo.add_model(weights, "tiny", "1.1.0", registry, url="https://example.org/tiny.safetensors")
    zoo.add_model(weights, "tiny", "1.0.0", registry, url="https://example.org/old.safetensors")

    document = json.loads(registry.read_text())
    assert [m["version"] for m in document["models"]] == ["1.0.0", "1.1.0"]
    written = document["models"][1]
    assert written == added.to_json()
    assert written["sha256"] == sha256(weights) and written["size"] == weights.stat().st_size
    assert written["architecture"] == ARCH and written["config"] == {"width": 4}
    assert written["metrics"] == {"mse": 0.25}
    assert written["training"] == {"data": {"dataset": "toy", "n": 8}, "seed": 3}
    assert written["embedded"] is False

    with pytest.raises(ConfigurationError, match=r"already lists tiny@1\.1\.0"):
        zoo.add_model(weights, "tiny", "1.1.0", registry)
    zoo.add_model(weights, "tiny", "1.1.0", registry, url="https://mirror.org/t.safetensors", overwrite=True)
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(registry))
    assert zoo.resolve("tiny").url == "https://mirror.org/t.safetensors"

    (tmp_path / "notes.safetensors").write_text("not weights")
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        zoo.add_model(tmp_path / "notes.safetensors", "notes", "1.0.0", registry)
    with pytest.raises(ConfigurationError, match="semantic version"):
        zoo.add_model(weights, "tiny", "2", registry)


def test_add_model_embedded_never_overwrites_another_models_file(tmp_path):
    registry = tmp_path / "zoo" / "registry.json"
    first, second = tmp_path / "a" / "net.safetensors", tmp_path / "b" / "net.safetensors"
    first.parent.mkdir()
    second.parent.mkdir()
    export(first, seed=1)
    export(second, seed=2)
    zoo.add_model(first, "net", "1.0.0", registry, embedded=True)
    assert (registry.parent / "net.safetensors").read_bytes() == first.read_bytes()
    with pytest.raises(ConfigurationError, match=r"already holds the file of net@1\.0\.0"):
        zoo.add_model(second, "net", "1.1.0", registry, embedded=True)


# ---- command line ---------------------------------------------------------------------------
def test_cli_list_info_pull_verify(tmp_path, shipped, file_server, monkeypatch):
    export(file_server.root / "tiny.safetensors")
    model = entry("tiny", "1.0.0", file_server.root / "tiny.safetensors", url=file_server.url + "tiny.safetensors")
    monkeypatch.setenv("STEMFORGE_ZOO_REGISTRY", str(write_registry(tmp_path / "mine.json", model)))
    run: Callable[[list[str]], object] = functools.partial(CliRunner().invoke, cli)

    listed = run(["zoo", "list"])
    assert listed.exit_code == 0, listed.output
    assert "tiny" in listed.output and "1.0.0 *" in listed.output and "127.0.0.1" in listed.output

    info = run(["zoo", "info", "tiny"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert described["spec"] == "tiny@1.0.0" and described["path"] is None and "metadata" not in described

    pulled = run(["zoo", "pull", "tiny@latest"])
    assert pulled.exit_code == 0, pulled.output
    path = Path(pulled.output.strip())
    assert path.is_file() and path.read_bytes() == (file_server.root / "tiny.safetensors").read_bytes()

    described = json.loads(run(["zoo", "info", "tiny@1.0.0"]).output)
    assert described["path"] == str(path) and described["metadata"]["config"] == {"width": 4}

    verified = run(["zoo", "verify", "tiny"])
    assert verified.exit_code == 0 and verified.output.startswith("OK tiny@1.0.0 sha256:")
    path.write_bytes(b"tampered")
    failed = run(["zoo", "verify", "tiny"])
    assert isinstance(failed.exception, ChecksumError)
    unknown = run(["zoo", "info", "nothing"])
    assert isinstance(unknown.exception, ConfigurationError) and "no model named 'nothing'" in str(unknown.exception)


def test_listing_the_zoo_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from stemforge.core.cli import cli\n"
        "cli.main(['zoo', 'list'], standalone_mode=False)\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "STEMFORGE_ZOO_CACHE": str(tmp_path)}
    env.pop("STEMFORGE_ZOO_REGISTRY", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "False"
