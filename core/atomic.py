"""Atomic writes: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stemforge.core.errors import ConfigurationError


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    Works for files and folders (e.g. a Zarr store) alike.

    Parameters
    ----------
    path
        Final destination.
    overwrite
        If False and ``path`` exists, refuse before anything is written.

    On any exception the temporary output is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigurationError(f"{path} already exists", "choose another output name or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name  # keeps the suffix, which some writers dispatch on
    try:
        yield target
        if not target.exists():
            raise ConfigurationError(f"writer produced no output for {path}", "report this as a bug")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
