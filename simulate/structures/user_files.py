"""Structures from the user's own files: CIF, POSCAR/CONTCAR, and whatever else
``pymatgen.core.Structure.from_file`` reads.

A file's id is ``file:<stem>-<sha8>``, the first 8 hex digits of the SHA-256 of its bytes:
the same content gives the same id wherever it lives, edited content a new one. Reading a
file stores its structure in the cache (``files/``), which is how an id resolves later,
even after the file has moved.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from stemforge.core.errors import ConfigurationError, FileFormatError, MissingFileError
from stemforge.simulate.structures.http_cache import JsonCache
from stemforge.simulate.structures.record import StructureRecord, standardized_record

PREFIX = "file:"
_NAMESPACE = "files"


def user_files(
    paths: str | Path | Iterable[str | Path], *, cache_dir: str | Path | None = None
) -> Iterator[StructureRecord]:
    """Records of structure files, in the order given (glob patterns expand sorted).

    Parameters
    ----------
    paths
        File paths or glob patterns (``"structures/*.cif"``).
    cache_dir
        Structure cache folder (see :func:`~.http_cache.cache_root`).

    Raises
    ------
    MissingFileError
        A path does not exist or a pattern matches nothing (raised at the call).
    FileFormatError
        A file is not a structure pymatgen can read (raised during iteration).
    """
    files = _expand([paths] if isinstance(paths, str | Path) else list(paths))
    return (read_structure_file(path, cache_dir=cache_dir) for path in files)


def read_structure_file(
    path: str | Path, *, cache_dir: str | Path | None = None
) -> StructureRecord:
    """The record of one structure file; caches it so that its id resolves later."""
    from pymatgen.core import Structure

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"structure file {path} does not exist", "check the path")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    structure_id = f"{PREFIX}{re.sub(r'[^A-Za-z0-9._-]', '_', path.stem)}-{sha256[:8]}"
    try:
        structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen's readers fail with many exception types
        raise FileFormatError(
            f"{path} is not a crystal structure file pymatgen can read ({type(exc).__name__}: {exc})",
            "use a CIF (.cif), a VASP POSCAR/CONTCAR (named POSCAR*, CONTCAR* or *.vasp) "
            "or another format pymatgen's Structure.from_file supports",
        ) from exc
    document = {
        "id": structure_id,
        "path": str(path.resolve()),
        "sha256": sha256,
        "structure": structure.as_dict(),
    }
    record = _record(document)  # refuses disordered structures before anything is cached
    cache = JsonCache(_NAMESPACE, cache_dir)
    cache.save(cache.entry_path(structure_id), document)
    return record


def resolve(structure_id: str, *, cache_dir: str | Path | None = None) -> StructureRecord:
    """The record of a ``file:`` id, from the structure cache."""
    cache = JsonCache(_NAMESPACE, cache_dir)
    path = cache.entry_path(structure_id)
    document = cache.load(path)
    if document is None:
        raise MissingFileError(
            f"structure {structure_id} is not in the structure cache ({path})",
            "read the original file once with the user_files source (or copy the cache folder "
            "from the machine that did), then resolve the id again",
        )
    return _record(document)


def _record(document: dict) -> StructureRecord:
    from pymatgen.core import Structure

    provenance = {
        "source": "user_files",
        "query": {"path": document["path"]},
        "sha256": document["sha256"],
    }
    return standardized_record(
        document["id"], Structure.from_dict(document["structure"]), provenance
    )


def _expand(paths: list[str | Path]) -> list[Path]:
    if not paths:
        raise ConfigurationError("no structure files given", "pass file paths or glob patterns")
    files: list[Path] = []
    for item in paths:
        if glob.has_magic(str(item)):
            matched = sorted(glob.glob(str(item)))
            if not matched:
                raise MissingFileError(f"no file matches {item}", "check the pattern")
            files.extend(Path(m) for m in matched)
        elif not Path(item).is_file():
            raise MissingFileError(f"structure file {item} does not exist", "check the path")
        else:
            files.append(Path(item))
    return files
