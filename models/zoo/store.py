"""Model files on this machine: download (pooch, hash checked), verify, load, publish.

A downloaded model lives at ``<cache>/<name>/<version>/<file>`` (see
:func:`~stemforge.models.zoo.cache.cache_dir`); an embedded one stays where its registry
keeps it. Every file is hashed against its registry entry before it is used, and weights are
read with safetensors only, never with pickle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import (
    ChecksumError,
    ConfigurationError,
    FileFormatError,
    MissingFileError,
)
from stemforge.models.zoo.architectures import get_architecture
from stemforge.models.zoo.cache import cache_dir, file_sha256
from stemforge.models.zoo.registry import (
    ModelEntry,
    ModelUnavailableError,
    is_shipped,
    parse_entries,
    parse_entry,
    parse_registry_json,
    parse_spec,
    resolve,
    version_key,
)

if TYPE_CHECKING:
    import torch

#: Safetensors metadata keys gathered into an entry's ``training`` when none is given.
TRAINING_KEYS = ("data", "seed", "command")


def _entry(spec: str | ModelEntry) -> ModelEntry:
    return spec if isinstance(spec, ModelEntry) else resolve(spec)


def cached_path(spec: str | ModelEntry) -> Path:
    """Where a downloaded model's file lives in the cache (whether or not it is there yet)."""
    entry = _entry(spec)
    return cache_dir() / entry.name / entry.version / entry.file


def _embedded_file(entry: ModelEntry) -> Path:
    assert entry.root is not None  # parse_entry gives every embedded entry its registry folder
    resource = entry.root.joinpath(entry.file)
    if not resource.is_file():
        raise MissingFileError(
            f"embedded model {entry.spec} should be at {resource} (listed by {entry.origin}), but it is missing",
            "reinstall stemforge"
            if is_shipped(entry)
            else "put the file back next to its registry, or publish it again with add_model",
        )
    if isinstance(resource, Path):
        return resource
    # the package sits in a zip: give callers a real file, copied once into the cache
    target = cached_path(entry)
    if not target.is_file():
        with atomic_output(target) as tmp:
            tmp.write_bytes(resource.read_bytes())
    return target


def _check(entry: ModelEntry, path: Path) -> None:
    actual = file_sha256(path)
    if actual == entry.sha256:
        return
    if entry.embedded:
        fix = (
            "reinstall stemforge"
            if is_shipped(entry)
            else "restore the original file, or publish the new one with add_model under a new version"
        )
    elif entry.url:
        fix = f"delete it, or run `stemforge zoo pull {entry.spec} --force` to download it again"
    else:
        fix = "delete it and copy the original file there"
    raise ChecksumError(
        f"the file {path} of model {entry.spec} has sha256 {actual}, but its registry "
        f"({entry.origin}) expects {entry.sha256}: it was modified or corrupted",
        fix,
    )


def pull(spec: str | ModelEntry, *, force: bool = False, progress: bool | None = None) -> Path:
    """Make a model's file available locally and return its verified path.

    Embedded models resolve to the file next to their registry (inside the package for the
    shipped ones). Others come from the cache, or are downloaded into it with
    ``pooch.retrieve`` and their sha256 checked; once cached, no network is needed.

    Parameters
    ----------
    spec
        ``name``, ``name@version``, ``name@latest`` or a resolved entry.
    force
        Let pooch replace a modified cached copy by a fresh download (the old file stays
        until the new one has passed the hash check; a good copy is kept as is). No effect
        on embedded models.
    progress
        Show a download bar; default as for every stemforge bar (on a terminal, or per
        ``STEMFORGE_PROGRESS``).

    Raises
    ------
    ChecksumError
        The downloaded or cached file does not match the registry's sha256 (a bad download
        is deleted; nothing is left under the cache name).
    ModelUnavailableError
        The file is not cached and cannot be downloaded (offline, server error).
    MissingFileError
        The model has no URL and is not cached, or an embedded file is missing.
    """
    entry = _entry(spec)
    if entry.embedded:
        path = _embedded_file(entry)
        _check(entry, path)
        return path
    target = cached_path(entry)
    if target.is_file() and (not force or entry.url is None):
        _check(entry, target)  # pooch would silently re-download a modified file
        return target
    if entry.url is None:
        raise MissingFileError(
            f"model {entry.spec} has no download URL in its registry ({entry.origin}) and is not in the cache at {target}",
            f"copy the file there (sha256 {entry.sha256}), or add a url to its registry entry",
        )
    _download(entry, target, progress)
    return target


def _download(entry: ModelEntry, target: Path, progress: bool | None) -> None:
    import pooch
    import requests

    from stemforge.core.progress import progress_enabled

    show = progress_enabled() if progress is None else progress
    bar = _DownloadBar(f"downloading {entry.spec}") if show else False
    try:
        pooch.retrieve(
            entry.url,
            known_hash=f"sha256:{entry.sha256}",
            fname=target.name,
            path=target.parent,
            progressbar=bar,
        )
    except ValueError as exc:
        # pooch checks the hash on a temporary file and deletes it on mismatch
        got = re.search(r"but got ([0-9a-fA-F]+)", str(exc))
        if got is None:
            raise
        raise ChecksumError(
            f"the file downloaded for model {entry.spec} from {entry.url} has sha256 {got.group(1)}, "
            f"but its registry ({entry.origin}) expects {entry.sha256}; it was deleted",
            "the server holds another file than the one published, or the registry entry is wrong: "
            "report it to the model's maintainer (or fix the sha256 in your own registry)",
        ) from exc
    except requests.HTTPError as exc:
        raise ModelUnavailableError(
            f"downloading model {entry.spec} failed: {exc}",
            f"check the url in {entry.origin}, or copy the file to {target} (sha256 {entry.sha256})",
        ) from exc
    except requests.RequestException as exc:
        raise ModelUnavailableError(
            f"cannot download model {entry.spec} from {entry.url} ({type(exc).__name__}) "
            f"and it is not in the cache at {target}",
            f"connect to the network and run `stemforge zoo pull {entry.spec}` once (later runs "
            f"work offline), or copy the file there (sha256 {entry.sha256})",
        ) from exc
    finally:
        if bar:
            bar.close()


class _DownloadBar:
    """The object pooch's downloaders drive (``total``, ``update``, ``reset``, ``close``), drawn by rich."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        self._progress = Progress(*columns, console=Console(stderr=True))
        self._task = self._progress.add_task(description, total=None)
        self._total: int | None = None
        self._open = True
        self._progress.start()

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value or None  # servers that send no length give 0
        self._progress.update(self._task, total=self._total)

    def update(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def reset(self) -> None:
        self._progress.reset(self._task, total=self._total)

    def close(self) -> None:
        if self._open:  # pooch closes on success, pull's finally on every path
            self._open = False
            self._progress.stop()


def verify(spec: str | ModelEntry) -> Path:
    """Re-hash a model's local file (cached or embedded) against its registry; return its path.

    Raises
    ------
    ChecksumError
        The file was modified or corrupted.
    MissingFileError
        The model is not in the cache (pull it first) or its embedded file is missing.
    """
    entry = _entry(spec)
    path = _embedded_file(entry) if entry.embedded else cached_path(entry)
    if not path.is_file():
        raise MissingFileError(
            f"model {entry.spec} is not in the cache ({path})",
            f"run `stemforge zoo pull {entry.spec}` first",
        )
    _check(entry, path)
    return path


def local_path(spec: str | ModelEntry) -> Path | None:
    """The model's file if it is on this machine (embedded or cached), unverified; else None."""
    entry = _entry(spec)
    if entry.embedded and entry.root is not None:
        resource = entry.root.joinpath(entry.file)
        return resource if isinstance(resource, Path) and resource.is_file() else None
    path = cached_path(entry)
    return path if path.is_file() else None


# ---- reading weights ------------------------------------------------------------------------
def parse_metadata(raw: dict[str, str]) -> dict[str, Any]:
    """Decode safetensors metadata: JSON values are parsed, plain strings (``model``) kept."""
    parsed: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a model file: a safetensors header (no tensors, no torch), or
    the settings of a crystal-identification ``.skops`` file (loaded with its type check)."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix == ".skops":
        from stemforge.models.crystal_id import CrystalIdentifier

        model = CrystalIdentifier.load(path)
        settings = model.settings()
        metadata = settings.pop("metadata")
        return {
            **{key: metadata[key] for key in ("metrics", "data", "seed") if key in metadata},
            "model": model.architecture,
            "config": {key: settings[key] for key in ("features", "estimator", "params")},
        }

    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = handle.metadata() or {}
    except SafetensorError as exc:
        raise FileFormatError(
            f"{path} is not a safetensors file ({exc})",
            "export the weights with safetensors (stemforge.train's export_model); pickled "
            "checkpoints are not accepted",
        ) from exc
    return parse_metadata(raw)


def load_weights(
    spec: str | ModelEntry, *, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pull (or find) a model, verify it, and read its tensors and metadata with safetensors.

    Parameters
    ----------
    spec
        ``name``, ``name@version``, ``name@latest`` or a resolved entry.
    device
        Torch device the tensors are loaded onto.

    Returns
    -------
    state_dict, metadata
        Tensors by name; the decoded metadata (``model``, ``config``, ``normalization``...).
    """
    from safetensors.torch import load_file

    path = pull(spec)
    metadata = read_metadata(path)
    return load_file(str(path), device=device), metadata


def build_model(
    state: dict[str, torch.Tensor], metadata: dict[str, Any], label: str, device: str = "cpu"
) -> torch.nn.Module:
    """The architecture ``metadata`` names, built from its ``config``, with ``state`` loaded.

    The decoded metadata is kept as the module's ``zoo_metadata`` attribute (inference needs
    e.g. its ``normalization``). ``label`` names the model in errors.

    Raises
    ------
    FileFormatError
        The metadata records no architecture, or the tensors do not fit the architecture.
    ConfigurationError
        Unknown architecture.
    """
    architecture = metadata.get("model")
    config = metadata.get("config", {})
    if not isinstance(architecture, str) or not isinstance(config, dict):
        raise FileFormatError(
            f"the weights of {label} record no architecture ('model') or no config object",
            "export the model with stemforge.train's export_model, which writes both",
        )
    module = get_architecture(architecture)(**config)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(
            f"the weights of {label} do not fit architecture {architecture!r} with config {config} ({exc})",
            "the file and its config disagree: export the model again",
        ) from exc
    module.to(device).eval()
    module.zoo_metadata = metadata
    return module


def load_model(spec: str | ModelEntry, *, device: str = "cpu") -> torch.nn.Module:
    """Build a zoo model from its metadata and load its weights strictly, in eval mode.

    The architecture is the metadata's ``model`` (see
    :func:`~stemforge.models.zoo.architectures.register_architecture`), built with the
    metadata's ``config`` as keyword arguments (:func:`build_model`).
    """
    entry = _entry(spec)
    state, metadata = load_weights(entry, device=device)
    return build_model(state, metadata, entry.spec, device)


def load_model_file(path: str | Path, *, device: str = "cpu") -> torch.nn.Module:
    """A model from a local ``.safetensors`` file (e.g. a training run's export), unregistered.

    No hash to check against: use the zoo (``add_model``) to share a model.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"{path} does not exist", "give the model.safetensors a training run exported"
        )
    metadata = read_metadata(path)
    return build_model(load_file(str(path), device=device), metadata, str(path), device)


# ---- publishing -----------------------------------------------------------------------------
def add_model(
    file: str | Path,
    name: str,
    version: str,
    registry_path: str | Path,
    *,
    url: str | None = None,
    embedded: bool = False,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ModelEntry:
    """Add (publish) a model (safetensors weights, or a crystal-identification ``.skops``
    file) to a local registry file; for maintainers.

    Computes the file's sha256 and size, takes architecture and config from its metadata, and
    rewrites the registry atomically (creating it if needed). Upload the file to ``url``
    yourself; an embedded model is copied next to the registry instead.

    Parameters
    ----------
    file
        The ``.safetensors`` weights (metadata ``model`` and ``config`` required).
    name, version
        The zoo name and its semantic version (``1.0.0``).
    registry_path
        Registry JSON to update, e.g. ``models/zoo/registry.json`` for the shipped one.
    url
        Download URL of the file.
    embedded
        Ship the file with the registry: copied into the registry's folder.
    metrics
        Evaluation figures; default the metadata's ``metrics``.
    training
        Data config, seed and command; default the metadata's ``training`` or its
        ``data``/``seed``/``command`` values.
    overwrite
        Replace an existing ``name@version`` of the registry.

    Returns
    -------
    ModelEntry
        The entry as written.
    """
    file, registry_path = Path(file), Path(registry_path)
    if not file.is_file():
        raise MissingFileError(
            f"model file {file} does not exist", "give the path of an exported .safetensors file"
        )
    parse_spec(f"{name}@{version}")  # validates both, with a clear message
    metadata = read_metadata(file)
    architecture, config = metadata.get("model"), metadata.get("config")
    if not isinstance(architecture, str) or not isinstance(config, dict):
        raise FileFormatError(
            f"{file} records no architecture ('model') or no config object in its metadata",
            "export it with stemforge.train's export_model, which writes both",
        )
    if metrics is None:
        metrics = metadata.get("metrics") if isinstance(metadata.get("metrics"), dict) else {}
    if training is None:
        training = metadata.get("training")
        if not isinstance(training, dict):
            training = {key: metadata[key] for key in TRAINING_KEYS if key in metadata}

    origin = str(registry_path)
    document = (
        parse_registry_json(registry_path.read_text(), origin)
        if registry_path.exists()
        else {"models": []}
    )
    parse_entries(
        document, origin=origin, root=registry_path.parent
    )  # refuse to extend a broken one
    others = [m for m in document["models"] if (m["name"], m["version"]) != (name, version)]
    if len(others) < len(document["models"]) and not overwrite:
        raise ConfigurationError(
            f"{registry_path} already lists {name}@{version}",
            "publish a new version (a shared version must never change), or pass overwrite=True",
        )
    sha256 = file_sha256(file)
    entry = parse_entry(
        ModelEntry(
            name=name,
            version=version,
            file=file.name,
            sha256=sha256,
            size=file.stat().st_size,
            architecture=architecture,
            config=config,
            metrics=metrics,
            training=training,
            embedded=embedded,
            url=url,
        ).to_json(),
        origin=origin,
        root=registry_path.parent,
    )
    if embedded:
        _place_next_to(file, registry_path.parent / file.name, sha256, others)
    document["models"] = sorted(
        [*others, entry.to_json()], key=lambda m: (m["name"], version_key(m["version"]))
    )
    with atomic_output(registry_path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return entry


def _place_next_to(
    file: Path, destination: Path, sha256: str, others: list[dict[str, Any]]
) -> None:
    """Copy an embedded model next to its registry, never replacing another entry's file."""
    if destination.exists() and destination.samefile(file):
        return
    users = [
        f"{m['name']}@{m['version']}"
        for m in others
        if m.get("embedded") and m["file"] == destination.name
    ]
    if users and file_sha256(destination) != sha256:
        raise ConfigurationError(
            f"{destination} already holds the file of {', '.join(users)}",
            "give your file another name (e.g. NAME-VERSION.safetensors) and add it again",
        )
    with atomic_output(destination) as tmp:
        shutil.copyfile(file, tmp)
