"""On-disk cache of structures fetched from web APIs (and of user files), so reruns are offline.

Layout under the cache root (``cache_dir`` argument, else ``$STEMFORGE_CACHE/structures``,
else ``~/.cache/stemforge/structures``)::

    <namespace>/<entry id>.json             one document per structure id
    <namespace>/queries/<query hash>.json   the ids a query returned, in order

Every file is plain JSON (structures as pymatgen ``Structure.as_dict``) written atomically,
and never holds credentials: callers pass only documents and public query parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import FileFormatError, StemforgeError


class SourceUnavailableError(StemforgeError, ConnectionError):
    """A web API cannot be reached and the cache does not hold the answer."""


#: The fix attached to every :class:`SourceUnavailableError`.
OFFLINE_FIX = (
    "you seem to be offline: connect and run once to fill the cache (later runs need no "
    "network), copy a filled cache folder here (see STEMFORGE_CACHE), or use an offline "
    "source (aflow_prototypes, random_crystals, user_files)"
)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The structure cache folder: ``cache_dir``, else ``$STEMFORGE_CACHE/structures``, else ``~/.cache/stemforge/structures``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("STEMFORGE_CACHE")
    return (
        Path(base).expanduser() if base else Path.home() / ".cache" / "stemforge"
    ) / "structures"


def query_key(query: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable query (key order does not matter)."""
    text = json.dumps(query, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def safe_name(entry_id: str) -> str:
    """A file name for an id (AFLOW ids hold ':', which some file systems refuse)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", entry_id)


class JsonCache:
    """JSON documents of one source under ``<root>/<namespace>``.

    Parameters
    ----------
    namespace
        Sub-folder of the cache root, one per source.
    cache_dir
        See :func:`cache_root`.
    """

    def __init__(self, namespace: str, cache_dir: str | Path | None = None) -> None:
        self.folder = cache_root(cache_dir) / namespace

    def entry_path(self, entry_id: str) -> Path:
        """Where the document of ``entry_id`` lives."""
        return self.folder / f"{safe_name(entry_id)}.json"

    def query_path(self, query: dict[str, Any]) -> Path:
        """Where the answer to ``query`` lives."""
        return self.folder / "queries" / f"{query_key(query)}.json"

    def load(self, path: Path) -> Any | None:
        """The document at ``path``, or None if it is not cached."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(
                f"cache file {path} is not valid JSON ({exc})",
                "delete it; the next online run fetches it again",
            ) from exc

    def save(self, path: Path, document: Any) -> None:
        """Write ``document`` to ``path`` atomically."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(document, sort_keys=True, indent=1))
