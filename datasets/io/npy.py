"""NumPy ``.npy`` datacubes: 3D stacks ``(N, Qx, Qy)`` and 4D cubes ``(Rx, Ry, Qx, Qy)``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import FileFormatError, ShapeError
from stemforge.datasets.io.lazy import NpySource, as_dask, file_token
from stemforge.datasets.io.memory import chunk_target, copy_scan_rows, want_lazy

FORMAT = "NumPy .npy"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, Fortran order and data offset of a ``.npy`` file, after checking that
    the file holds all its data.

    Raises
    ------
    FileFormatError
        If the header cannot be parsed, the array holds Python objects, or the file is
        shorter than its header promises (a truncated copy or an interrupted write).
    """
    fix = "copy or save the file again; a .npy must be complete to be read"
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError) as err:
            raise FileFormatError(
                f"{path} is not a readable .npy file, it is corrupt or truncated ({err})", fix
            ) from None
        offset = f.tell()
    if dtype.hasobject:
        raise FileFormatError(
            f"{path} holds Python objects, not numbers",
            "save the datacube as a numeric array (np.save(path, array))",
        )
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise FileFormatError(
            f"{path} is truncated: it has {actual} bytes but its header promises {expected} "
            f"for a {dtype} array of shape {shape}",
            fix,
        )
    return tuple(int(s) for s in shape), dtype, bool(fortran_order), offset


def read_npy(
    path: Path, *, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read a ``.npy`` file: memory-mapped through Dask when lazy, loaded otherwise.

    Returns
    -------
    data, calibration, metadata
        The 3D or 4D array, an uncalibrated :class:`Calibration` (``.npy`` holds none; a
        sidecar may) and the metadata.
    """
    shape, dtype, fortran_order, offset = read_npy_header(path)
    if len(shape) not in (3, 4):
        raise ShapeError(
            f"{path} holds a {len(shape)}D array of shape {shape}",
            "save a 4D datacube (Rx, Ry, Qx, Qy) or a 3D stack of patterns (N, Qx, Qy)",
        )
    if want_lazy(math.prod(shape) * dtype.itemsize, lazy, memory_budget):
        data = as_dask(
            NpySource(path, shape, dtype, None if fortran_order else offset),
            file_token(path),
            chunk_target(memory_budget),
        )
    else:
        data = np.load(path, allow_pickle=False)
    return data, Calibration(), {"format": FORMAT}


def write_npy(cube: DataCube, tmp: Path) -> None:
    """Write the data of ``cube`` to ``tmp`` as a 4D ``.npy``, streaming scan rows."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=cube.dtype, shape=cube.shape)
    try:
        copy_scan_rows(cube, out, cube.rows_per_block(), f"writing {tmp.name}")
        out.flush()
    finally:
        del out
