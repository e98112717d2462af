"""Where the zoo keeps downloaded files, and the one hash function it trusts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Environment variable naming the zoo cache folder.
CACHE_ENV = "STEMFORGE_ZOO_CACHE"

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The zoo cache folder.

    ``$STEMFORGE_ZOO_CACHE`` if set, else ``$STEMFORGE_CACHE/zoo`` (the cache root the rest of
    stemforge uses), else ``zoo`` under the platform user cache (``pooch.os_cache("stemforge")``,
    e.g. ``~/.cache/stemforge/zoo`` on Linux). Read on every call so that a change of the
    environment takes effect at once.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    base = os.environ.get("STEMFORGE_CACHE")
    if base:
        return Path(base).expanduser().absolute() / "zoo"
    import pooch

    return Path(pooch.os_cache("stemforge")) / "zoo"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
