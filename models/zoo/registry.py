"""The zoo index: which models exist, under which ``name@version``, and where their files are.

A registry is a JSON document ``{"models": [entry, ...]}``. An entry holds ``name``,
``version`` (semantic versioning), ``file`` (a bare file name), ``sha256``, ``size``,
``architecture``, ``config`` (constructor keyword arguments), ``metrics``, ``training``
(data config, seed, command), ``embedded`` and an optional ``url``.

Two registries are merged: the one shipped inside the package, whose embedded models sit
next to it so that inference works offline, and an optional user registry named by
``$STEMFORGE_ZOO_REGISTRY`` (a local path or an http(s) URL). An embedded entry's file lives
in the folder of the registry that lists it; in a registry served over HTTP an entry without
``url`` is downloaded from next to the registry. A user entry replaces a shipped one with the
same ``name@version`` (e.g. to name a mirror).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import (
    ConfigurationError,
    FileFormatError,
    MissingFileError,
    StemforgeError,
)
from stemforge.models.zoo.cache import cache_dir

#: Environment variable naming a user registry (local path or http(s) URL).
REGISTRY_ENV = "STEMFORGE_ZOO_REGISTRY"
#: Package holding the shipped registry and its embedded model files.
SHIPPED_PACKAGE = "stemforge.models.zoo"
REGISTRY_FILE = "registry.json"
#: Seconds to wait for a registry served over HTTP.
FETCH_TIMEOUT = 30

EMPTY_ZOO_MESSAGE = (
    "no models in the zoo yet; train one with `stemforge train ...` and publish it with "
    "`stemforge.models.zoo.add_model`, or point STEMFORGE_ZOO_REGISTRY at a registry that "
    "lists models"
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IDENT = r"[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*"
_SEMVER = re.compile(
    rf"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-({_IDENT}))?(?:\+({_IDENT}))?$"
)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_URL_SCHEMES = ("http", "https", "ftp", "sftp", "doi")  # what pooch can download


class ModelUnavailableError(StemforgeError, ConnectionError):
    """A model file or a registry cannot be downloaded and no cached copy exists."""


@dataclass(frozen=True)
class ModelEntry:
    """One ``name@version`` of the zoo, as its registry describes it.

    Attributes
    ----------
    name, version
        The model's name and its semantic version.
    file
        File name of the safetensors weights (no folders).
    sha256, size
        Hex SHA-256 and byte size of that file.
    architecture, config
        Architecture name (see :mod:`stemforge.models.zoo.architectures`) and its
        constructor keyword arguments.
    metrics, training
        Evaluation figures; data config, seed and command of the training run.
    embedded
        The file ships in the folder of the registry (inside the package for the shipped one).
    url
        Where to download the file (absolute), or None.
    origin
        The registry (path or URL) that lists this entry, for messages.
    root
        Folder of embedded files (the registry's folder); None for remote registries.
    """

    name: str
    version: str
    file: str
    sha256: str
    size: int
    architecture: str
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False
    url: str | None = None
    origin: str = ""
    root: Traversable | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        """The entry as a registry stores it (``url`` only when there is one)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
        }
        if self.url is not None:
            entry["url"] = self.url
        entry.update(
            architecture=self.architecture,
            config=self.config,
            metrics=self.metrics,
            training=self.training,
            embedded=self.embedded,
        )
        return entry


# ---- versions and specs ---------------------------------------------------------------------
def version_key(version: str) -> tuple[Any, ...]:
    """Sort key giving semantic-versioning precedence (build metadata ignored).

    Raises
    ------
    ConfigurationError
        ``version`` is not ``MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]``.
    """
    match = _SEMVER.match(version)
    if match is None:
        raise ConfigurationError(
            f"{version!r} is not a semantic version", "write MAJOR.MINOR.PATCH, e.g. 1.0.0 or 1.1.0-rc.1"
        )
    major, minor, patch, pre, _build = match.groups()
    if pre is None:
        pre_key: tuple[Any, ...] = (1,)  # a release sorts after all its pre-releases
    else:  # numeric identifiers sort numerically and before alphanumeric ones
        pre_key = (0, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
    return int(major), int(minor), int(patch), pre_key


def is_prerelease(version: str) -> bool:
    """Whether ``version`` carries a pre-release tag (``1.0.0-rc.1``)."""
    return version_key(version)[3][0] == 0


def latest_version(versions: Iterable[str]) -> str:
    """The highest release; the highest pre-release only when there is no release (as pip does)."""
    versions = list(versions)
    releases = [v for v in versions if not is_prerelease(v)]
    return max(releases or versions, key=version_key)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``name``, ``name@version`` or ``name@latest`` into ``(name, version or None)``."""
    name, sep, version = spec.strip().partition("@")
    if not _NAME.match(name) or (sep and not version):
        raise ConfigurationError(
            f"{spec!r} is not a model spec", "write NAME, NAME@VERSION (e.g. fcunet@1.0.0) or NAME@latest"
        )
    if version and version != "latest" and not _SEMVER.match(version):
        raise ConfigurationError(
            f"version {version!r} in {spec!r} is not a semantic version",
            f"write {name}@MAJOR.MINOR.PATCH (e.g. {name}@1.0.0) or {name}@latest",
        )
    return name, None if version in ("", "latest") else version


# ---- the merged index -----------------------------------------------------------------------
class Registry:
    """The models of one or more registries, keyed by ``(name, version)``; later entries win."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        for entry in entries:
            self._entries[(entry.name, entry.version)] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries())

    def entries(self) -> list[ModelEntry]:
        """All entries, by name and then by version precedence."""
        return sorted(self._entries.values(), key=lambda e: (e.name, version_key(e.version)))

    def names(self) -> list[str]:
        """Model names, sorted."""
        return sorted({name for name, _ in self._entries})

    def versions(self, name: str) -> list[str]:
        """Versions of ``name`` from lowest to highest (empty if unknown)."""
        return sorted((v for n, v in self._entries if n == name), key=version_key)

    def resolve(self, spec: str) -> ModelEntry:
        """The entry of ``name``, ``name@version`` or ``name@latest`` (plain name means latest).

        Raises
        ------
        ConfigurationError
            Malformed spec, empty zoo, unknown name (listing what exists) or unknown version
            (listing the versions there are).
        """
        name, version = parse_spec(spec)
        if not self._entries:
            raise ConfigurationError(f"cannot find {spec!r}: {EMPTY_ZOO_MESSAGE}")
        versions = self.versions(name)
        if not versions:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"no model named {name!r} in the zoo{hint}; it holds {self.summary()}",
                "use one of those names (`stemforge zoo list`), or add the registry that lists "
                f"it with {REGISTRY_ENV}",
            )
        if version is None:
            version = latest_version(versions)
        elif version not in versions:
            raise ConfigurationError(
                f"model {name!r} has no version {version}; available: {', '.join(versions)}",
                f"use one of them, or {name}@latest",
            )
        return self._entries[(name, version)]

    def summary(self) -> str:
        """``name (v1, v2), other (v1)``, for messages."""
        return ", ".join(f"{n} ({', '.join(self.versions(n))})" for n in self.names())


def shipped_root() -> Traversable:
    """Folder of the shipped registry and its embedded model files (inside the package)."""
    return resources.files(SHIPPED_PACKAGE)


def is_shipped(entry: ModelEntry) -> bool:
    """Whether ``entry`` comes from the registry shipped inside the package."""
    return entry.origin == str(shipped_root().joinpath(REGISTRY_FILE))


def load_registry() -> Registry:
    """The shipped registry merged with the one ``$STEMFORGE_ZOO_REGISTRY`` names, if any.

    Read afresh on every call, so that edits and environment changes show at once.
    """
    root = shipped_root()
    registry_file = root.joinpath(REGISTRY_FILE)
    origin = str(registry_file)
    entries = parse_entries(parse_registry_json(registry_file.read_text(), origin), origin=origin, root=root)
    location = os.environ.get(REGISTRY_ENV, "").strip()
    if location:
        entries += _user_entries(location)
    return Registry(entries)


def resolve(spec: str) -> ModelEntry:
    """Resolve ``spec`` against :func:`load_registry` (see :meth:`Registry.resolve`)."""
    return load_registry().resolve(spec)


def list_models() -> list[ModelEntry]:
    """Every model of the merged registry, by name and version."""
    return load_registry().entries()


# ---- reading registry documents -------------------------------------------------------------
def _user_entries(location: str) -> list[ModelEntry]:
    if urlsplit(location).scheme in ("http", "https"):
        return parse_entries(_fetch(location), origin=location, root=None, base_url=location)
    path = Path(location).expanduser().absolute()
    if not path.is_file():
        raise MissingFileError(
            f"{REGISTRY_ENV} names the registry {path}, which does not exist",
            f"fix the path (or give an http(s) URL), or unset {REGISTRY_ENV} to use only the shipped models",
        )
    return parse_entries(parse_registry_json(path.read_text(), str(path)), origin=str(path), root=path.parent)


def _fetch(url: str) -> Any:
    """Fetch a registry over HTTP; keep its last good copy so that later runs work offline."""
    import requests

    copy = cache_dir() / "registries" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
    try:
        response = requests.get(url, timeout=FETCH_TIMEOUT)
        response.raise_for_status()
    except requests.RequestException as exc:
        if copy.is_file():
            warnings.warn(
                f"could not fetch the zoo registry {url} ({exc}); using the copy cached at {copy}",
                stacklevel=4,
            )
            return parse_registry_json(copy.read_text(), str(copy))
        raise ModelUnavailableError(
            f"cannot fetch the zoo registry {url} ({exc}) and no copy of it is cached",
            "connect to the network and run `stemforge zoo list` once (later runs work offline), "
            f"or point {REGISTRY_ENV} at a local registry file",
        ) from exc
    document = parse_registry_json(response.text, url)
    with atomic_output(copy) as tmp:
        tmp.write_text(response.text)
    return document


def parse_registry_json(text: str, origin: str) -> dict[str, Any]:
    """Parse registry text into ``{"models": [...]}``; ``origin`` names it in errors."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"zoo registry {origin} is not valid JSON ({exc})", 'fix the file; an empty registry is {"models": []}'
        ) from exc
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise FileFormatError(
            f'zoo registry {origin} has no "models" list', 'write it as {"models": [entry, ...]}'
        )
    return document


def parse_entries(
    document: dict[str, Any], *, origin: str, root: Traversable | None, base_url: str | None = None
) -> list[ModelEntry]:
    """Validate every entry of a registry document (see :func:`parse_entry`)."""
    return [parse_entry(raw, origin=origin, root=root, base_url=base_url) for raw in document["models"]]


_MISSING = object()


def _field(raw: dict[str, Any], key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    value = raw.get(key, default)
    if value is _MISSING:
        raise FileFormatError(f"{where} lacks the field {key!r}", "add it, or re-create the entry with add_model")
    # bool is an int subclass: a size of True is an error, not 1
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FileFormatError(
            f"{where}: field {key!r} is {value!r}, not a {kind.__name__}", "fix the entry, or re-create it with add_model"
        )
    return value


def parse_entry(
    raw: Any, *, origin: str, root: Traversable | None, base_url: str | None = None
) -> ModelEntry:
    """Validate one registry entry and build its :class:`ModelEntry`.

    Parameters
    ----------
    raw
        The entry as read from JSON.
    origin
        The registry's path or URL, named in errors.
    root
        The registry's folder (where embedded files live); None for a served registry.
    base_url
        The URL of a served registry: entry URLs, or the file name when an entry has no
        URL, are resolved against it.

    Raises
    ------
    FileFormatError
        A field is missing, mistyped or invalid.
    """
    if not isinstance(raw, dict):
        raise FileFormatError(f"zoo registry {origin} holds a non-object entry {raw!r}", "make each entry a JSON object")
    where = f"zoo registry {origin}, entry {raw.get('name', '?')}@{raw.get('version', '?')}"
    name = _field(raw, "name", str, where)
    version = _field(raw, "version", str, where)
    file = _field(raw, "file", str, where)
    sha256 = _field(raw, "sha256", str, where)
    size = _field(raw, "size", int, where)
    url = None if raw.get("url") is None else _field(raw, "url", str, where)
    embedded = _field(raw, "embedded", bool, where, False)
    problem = None
    if not _NAME.match(name):
        problem = f"name {name!r} is not letters, digits, '.', '_' or '-'"
    elif not _SEMVER.match(version):
        problem = f"version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)"
    elif file in ("", ".", "..") or Path(file).name != file or "\\" in file:
        problem = f"file {file!r} is not a bare file name"  # it is joined to cache and package folders
    elif not _SHA256.match(sha256):
        problem = f"sha256 {sha256!r} is not 64 hex digits"
    elif size < 0:
        problem = f"size {size} is negative"
    elif embedded and root is None:
        problem = "an embedded model cannot be listed by a registry served over HTTP"
    if problem is None and base_url is not None and not embedded:
        url = urljoin(base_url, url or file)  # files may sit next to a served registry
    if problem is None and url is not None and urlsplit(url).scheme not in _URL_SCHEMES:
        problem = f"url {url!r} is not an absolute {'/'.join(_URL_SCHEMES)} URL"
    if problem is not None:
        raise FileFormatError(f"{where}: {problem}", "fix the entry, or re-create it with add_model")
    return ModelEntry(
        name=name,
        version=version,
        file=file,
        sha256=sha256.lower(),
        size=size,
        architecture=_field(raw, "architecture", str, where),
        config=_field(raw, "config", dict, where),
        metrics=_field(raw, "metrics", dict, where, {}),
        training=_field(raw, "training", dict, where, {}),
        embedded=embedded,
        url=url,
        origin=origin,
        root=root if embedded else None,
    )
