"""HDF5 helpers shared by the EMD, Prismatic and Arina readers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.errors import FileFormatError


@contextmanager
def open_h5(path: Path, mode: str = "r") -> Iterator[Any]:
    """Open an HDF5 file, turning HDF5's errors for bad files into :class:`FileFormatError`.

    HDF5 checks the end-of-file address recorded in the superblock, so a truncated file
    fails here rather than returning garbage later.
    """
    import h5py

    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise FileFormatError(
            f"{path} is not a readable HDF5 file: it is truncated or corrupt ({err})",
            "copy or write the file again; an interrupted transfer leaves HDF5 files unreadable",
        ) from None
    with f:
        yield f


def attr_str(obj: Any, key: str) -> str:
    """An HDF5 attribute as text ('' when absent); files store str, bytes or 1-element arrays."""
    value = obj.attrs.get(key, "")
    if isinstance(value, np.ndarray):
        value = value.ravel()[0] if value.size else ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
