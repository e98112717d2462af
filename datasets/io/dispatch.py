"""``read_datacube`` / ``write_datacube`` / ``write_calibration``: pick the format from the path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import FileFormatError, MissingFileError, ShapeError
from stemforge.datasets.io.calibration_sidecar import (
    read_calibration_sidecar,
    remove_calibration_sidecar,
    sidecar_path,
    write_calibration_sidecar,
)
from stemforge.datasets.io.emd import is_emd1, read_emd, write_emd, write_emd_calibration
from stemforge.datasets.io.hdf5 import open_h5
from stemforge.datasets.io.lazy import rechunk_scan
from stemforge.datasets.io.memory import chunk_target
from stemforge.datasets.io.npy import read_npy, write_npy
from stemforge.datasets.io.prismatic import is_prismatic, read_prismatic
from stemforge.datasets.io.rsciio_formats import PLUGINS, read_arina, read_rsciio
from stemforge.datasets.io.zarr_store import read_zarr, write_zarr

#: What :func:`read_datacube` opens: extension or pattern → description (for help and errors).
SUPPORTED_FORMATS: dict[str, str] = {
    ".npy": "NumPy array, 4D (Rx, Ry, Qx, Qy) or a 3D stack (N, Qx, Qy)",
    ".zarr": "Zarr store: stemforge's own, abTEM to_zarr output, or any 3D/4D array",
    ".h5 / .hdf5 / .emd": "EMD 1.0 / py4DSTEM datacube (FILE::GROUP picks one), or Prismatic output",
    "*_master.h5": "Dectris Arina master file with its data files",
    ".mib": "Quantum Detectors Merlin (with its .hdr)",
    ".blo": "NanoMegas blockfile",
    ".dm3 / .dm4": "Gatan DigitalMicrograph",
    ".xml": "EMPAD header (with its .raw)",
}
#: What :func:`write_datacube` writes.
WRITABLE_FORMATS = {
    ".npy": "NumPy (calibration in a sidecar)",
    ".zarr": "Zarr group",
    ".h5 / .emd": "EMD 1.0 (py4DSTEM)",
}

_HDF5 = (".h5", ".hdf5", ".emd", ".hdf")
_ARCHIVES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z")


def _formats_list(formats: dict[str, str]) -> str:
    return ", ".join(formats)


def _hdf5_contents(f: Any) -> str:
    """Top-level groups of an HDF5 file and what they hold, for error messages."""
    items = []
    for name, obj in f.items():
        if hasattr(obj, "keys"):
            inner = (f"{k} ({obj[k].attrs.get('py4dstem_class', 'group')})" for k in obj)
            items.append(f"{name}/: {', '.join(inner) or 'empty'}")
        else:
            items.append(name)
    return "; ".join(items) or "nothing"


def _split(path: str | Path) -> tuple[Path, str | None]:
    """``file.h5::group/path`` → (file, 'group/path')."""
    text = str(path)
    if "::" in text:
        file, select = text.split("::", 1)
        return Path(file), select.strip("/") or None
    return Path(text), None


def _read_hdf5(
    path: Path, select: str | None, scan_shape: Any, lazy: Any, budget: Any
) -> tuple[Any, Calibration, dict]:
    with open_h5(path) as f:
        emd1, prismatic, arina = is_emd1(f), is_prismatic(f), "entry/data" in f
        arina_scan, contents = "STEM Metadata" in f, _hdf5_contents(f)
    if arina_scan:
        raise FileFormatError(
            f"{path} is the scan metadata of a Dectris Arina acquisition, without the frames",
            f"open the matching master file ({path.stem}_master.h5); it reads this file for the scan shape",
        )
    if emd1:
        return read_emd(path, select=select, lazy=lazy, memory_budget=budget)
    if prismatic:
        return read_prismatic(path, select=select, lazy=lazy, memory_budget=budget)
    if arina:
        return read_arina(path, scan_shape=scan_shape, lazy=lazy, memory_budget=budget)
    raise FileFormatError(
        f"{path} holds no datacube stemforge knows (not EMD 1.0/py4DSTEM ≥ 0.14, Prismatic or a "
        f"Dectris Arina master); it contains {contents}",
        "give a file with a 4D datacube, e.g. re-saved with py4DSTEM ≥ 0.14 or as .npy/.zarr",
    )


def _read_raw(
    path: Path, select: str | None, scan_shape: Any, lazy: Any, budget: Any
) -> tuple[Any, Calibration, dict]:
    """Dispatch on the file name to the reader; returns (3D or 4D data, calibration, metadata)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_npy(path, lazy=lazy, memory_budget=budget)
    if suffix == ".zarr" or (
        path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zgroup", ".zarray"))
    ):
        return read_zarr(path, select=select, lazy=lazy, memory_budget=budget)
    if path.name.lower().endswith("_master.h5"):
        return read_arina(path, scan_shape=scan_shape, lazy=lazy, memory_budget=budget)
    if suffix in _HDF5:
        return _read_hdf5(path, select, scan_shape, lazy, budget)
    if suffix in PLUGINS:
        return read_rsciio(path, scan_shape=scan_shape, lazy=lazy, memory_budget=budget)
    if suffix in _ARCHIVES:
        raise FileFormatError(
            f"{path} is an archive, not a datacube",
            "extract it first (e.g. `unzip` or `tar xf`) and open the data file inside",
        )
    raise FileFormatError(
        f"{path}: unknown file type {suffix or '(no extension)'!r}",
        f"use one of the supported formats: {_formats_list(SUPPORTED_FORMATS)}",
    )


def _to_cube(
    data: Any, scan_shape: tuple[int, int] | None, chunk_bytes: int, **kwargs: Any
) -> DataCube:
    """A DataCube from 3D or 4D data, reshaping the scan when ``scan_shape`` asks to."""
    if data.ndim == 4 and (scan_shape is None or tuple(scan_shape) == tuple(data.shape[:2])):
        return DataCube(data, **kwargs)
    if data.ndim == 4:
        data = data.reshape(-1, *data.shape[2:])
    cube = DataCube.from_stack(data, scan_shape, **kwargs)
    if cube.is_lazy:  # a reshape can merge chunks across scan rows
        cube.data = rechunk_scan(cube.data, chunk_bytes)
    return cube


def read_datacube(
    path: str | Path,
    *,
    scan_shape: tuple[int, int] | None = None,
    lazy: bool | None = None,
    memory_budget: int | None = None,
) -> DataCube:
    """Open a 4D-STEM datacube from any supported file.

    Parameters
    ----------
    path
        The file (see :data:`SUPPORTED_FORMATS`). For HDF5 and zarr, ``FILE::GROUP``
        selects one of several datacubes; by default the first is read and
        ``metadata`` says which.
    scan_shape
        ``(Rx, Ry)`` for data stored as a stack of frames (``.mib``, 3D ``.npy``...), or to
        reshape the scan; ``Rx * Ry`` must equal the number of frames. Default: the file's
        scan shape, or ``(N, 1)`` for a stack.
    lazy
        True: a Dask array chunked over scan positions (the file is not loaded); False:
        in memory; None: lazy iff the data is larger than ``memory_budget``.
    memory_budget
        Bytes; default :func:`default_memory_budget`.

    Returns
    -------
    DataCube
        ``(Rx, Ry, Qx, Qy)`` with the calibration from ``FILE.calibration.json`` when that
        sidecar exists, else from the file's metadata (Å, Å⁻¹ or mrad, eV); ``name`` is the
        file stem, ``source`` the path and ``metadata`` holds the file's own metadata.

    Raises
    ------
    MissingFileError, FileFormatError, ShapeError, CalibrationError
        For a missing, unknown, truncated or corrupt file, a scan shape that does not
        hold the frames, or an invalid stored calibration.
    """
    file, select = _split(path)
    if not file.exists():
        raise MissingFileError(
            f"{file} does not exist",
            f"check the path; stemforge reads {', '.join(SUPPORTED_FORMATS)}",
        )
    if scan_shape is not None and (len(tuple(scan_shape)) != 2 or min(scan_shape) < 1):
        raise ShapeError(
            f"scan shape {scan_shape} is not two positive integers", "give --scan-shape RX,RY"
        )
    data, calibration, metadata = _read_raw(file, select, scan_shape, lazy, memory_budget)
    sidecar = read_calibration_sidecar(file)
    metadata["calibration_source"] = str(sidecar_path(file)) if sidecar else "file"
    kwargs = {
        "calibration": sidecar or calibration,
        "name": file.stem,
        "source": file,
        "metadata": metadata,
    }
    try:
        return _to_cube(data, scan_shape, chunk_target(memory_budget), **kwargs)
    except ShapeError as err:
        if sidecar is None or not isinstance(sidecar.qx0, np.ndarray):
            raise
        raise ShapeError(
            f"{err.problem} (origin from {sidecar_path(file)})",
            f"delete {sidecar_path(file).name} or calibrate again",
        ) from None


def write_datacube(cube: DataCube, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``cube`` to ``.npy``, ``.zarr`` or ``.h5``/``.emd`` (EMD 1.0, py4DSTEM layout).

    The data is streamed in scan rows, so lazy cubes larger than memory can be written.
    The file appears complete under its name or not at all (written under a temporary name,
    then renamed). ``.npy`` holds no calibration: it goes to ``FILE.calibration.json``
    (written only when the cube is calibrated); the other formats store it inside, and a
    stale sidecar of an older file of that name is removed.

    Raises
    ------
    FileFormatError
        For an extension stemforge does not write.
    ConfigurationError
        If ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".npy": write_npy, ".zarr": write_zarr, **dict.fromkeys(_HDF5, write_emd)}
    writer = writers.get(suffix)
    if writer is None:
        raise FileFormatError(
            f"cannot write {path}: unknown output type {suffix or '(no extension)'!r}",
            f"use one of {_formats_list(WRITABLE_FORMATS)}",
        )
    with atomic_output(path, overwrite=overwrite) as tmp:
        writer(cube, tmp)
    calibrated = cube.calibration != Calibration() or cube.calibration.has_origin
    if suffix == ".npy" and calibrated:
        write_calibration_sidecar(path, cube.calibration)
    else:
        remove_calibration_sidecar(path)
    return path


def write_calibration(data_path: str | Path, calibration: Calibration) -> Path:
    """Store ``calibration`` for a data file, where :func:`read_datacube` will find it.

    EMD 1.0 / py4DSTEM files (written by stemforge or py4DSTEM) get it in their calibration
    group (edited on a copy that then replaces the file, so a crash leaves the old file);
    any sidecar they had is removed so that it cannot shadow the new calibration. Every
    other format gets the sidecar ``FILE.calibration.json``, written atomically.

    Returns
    -------
    Path
        The file that now holds the calibration.
    """
    file, select = _split(data_path)
    if not file.exists():
        raise MissingFileError(f"{file} does not exist", "calibrate an existing data file")
    if file.suffix.lower() in _HDF5 and file.is_file():
        with open_h5(file) as f:
            emd1 = is_emd1(f)
        if emd1:
            write_emd_calibration(file, select, calibration)
            remove_calibration_sidecar(file)
            return file
    return write_calibration_sidecar(file, calibration)
