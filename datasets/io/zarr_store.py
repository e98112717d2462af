"""Zarr datacubes: stemforge's own stores, abTEM ``to_zarr`` output, or any 3D/4D array.

stemforge writes a group with the array ``datacube`` (chunked over scan positions), the
scalar calibration and the metadata as group attributes, and per-pattern origins as the
arrays ``qx0`` and ``qy0``. Works with zarr 2 and 3 (both store formats are read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import FileFormatError, ShapeError
from stemforge.datasets.io.abtem_zarr import abtem_metadata, parse_abtem
from stemforge.datasets.io.jsonable import to_jsonable
from stemforge.datasets.io.lazy import as_dask, file_token, rechunk_scan
from stemforge.datasets.io.memory import chunk_target, copy_scan_rows, scan_chunks, want_lazy

#: Group attribute that marks a stemforge store, with its layout version.
STEMFORGE_ATTR = "stemforge"
DATA_NAME = "datacube"


def _arrays(group: Any) -> list[tuple[str, Any]]:
    """The group's arrays, datacube candidates (3 or more dimensions) first, each part by
    name (``array0`` before ``array1``)."""
    arrays = sorted(group.arrays(), key=lambda item: item[0])
    return [a for a in arrays if a[1].ndim >= 3] + [a for a in arrays if a[1].ndim < 3]


def _select(node: Any, select: str | None, path: Path) -> tuple[str, Any, dict]:
    """The array to read, its name and the attributes that describe it."""
    import zarr

    if isinstance(node, zarr.Array):
        return "", node, dict(node.attrs)
    attrs = dict(node.attrs)
    if select:
        try:
            return select, node[select], attrs
        except KeyError:
            raise FileFormatError(
                f"{path} has no array {select!r}", f"choose one of {[n for n, _ in _arrays(node)]}"
            ) from None
    if STEMFORGE_ATTR in attrs:
        return DATA_NAME, node[DATA_NAME], attrs
    arrays = _arrays(node)
    if not arrays:
        raise FileFormatError(
            f"{path} is a zarr group without arrays", "point to a zarr store holding a datacube"
        )
    name, arr = arrays[0]
    return name, arr, attrs


def _stemforge_calibration(group: Any, attrs: dict) -> Calibration:
    """The calibration of a stemforge store: scalar fields in attributes, origins as arrays."""
    fields = dict(attrs.get("calibration", {}))
    if "qx0" in group and "qy0" in group:
        fields["qx0"], fields["qy0"] = np.asarray(group["qx0"][...]), np.asarray(group["qy0"][...])
    return Calibration.from_dict(fields)


def read_zarr(
    path: Path, *, select: str | None, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read a datacube from a zarr store.

    Parameters
    ----------
    path
        The store (a folder).
    select
        Name of the array inside a group; default: stemforge's ``datacube``, else the first
        3D/4D array by name.

    Returns
    -------
    data, calibration, metadata
    """
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises many types for a folder that is not a store
        raise FileFormatError(
            f"{path} is not a readable zarr store ({err})",
            "check the path; a .zarr must be a zarr array or group",
        ) from None
    name, arr, attrs = _select(node, select, path)
    where = f"{path}::{name}" if name else str(path)
    index: tuple = (slice(None),) * arr.ndim
    metadata: dict[str, Any] = {"format": "zarr", "zarr_array": name or None}
    if isinstance(node, zarr.Group):
        metadata["zarr_arrays"] = [n for n, a in _arrays(node) if a.ndim >= 3]
    abtem = abtem_metadata(attrs, name)
    if STEMFORGE_ATTR in attrs and name == DATA_NAME:
        calibration = _stemforge_calibration(node, attrs)
        metadata = {**attrs.get("metadata", {}), **metadata}
    elif abtem is not None:
        index, calibration, extra = parse_abtem(abtem, tuple(arr.shape), where)
        metadata.update(extra, format="zarr (abTEM)")
    else:
        calibration = Calibration()
        metadata["zarr_attrs"] = to_jsonable(attrs)
    shape = tuple(s for s, i in zip(arr.shape, index, strict=True) if isinstance(i, slice))
    if len(shape) not in (3, 4):
        raise ShapeError(
            f"{where} has shape {shape}",
            "a datacube is 4D (Rx, Ry, Qx, Qy) or a 3D stack (N, Qx, Qy)",
        )
    if want_lazy(int(np.prod(shape)) * arr.dtype.itemsize, lazy, memory_budget):
        chunk_bytes = chunk_target(memory_budget)
        data = rechunk_scan(as_dask(arr, file_token(path, name), chunk_bytes)[index], chunk_bytes)
    else:
        data = np.asarray(arr[index])
    return data, calibration, metadata


def write_zarr(cube: DataCube, tmp: Path) -> None:
    """Write ``cube`` as a stemforge zarr group at ``tmp`` (zarr's default store format)."""
    import zarr

    group = zarr.open_group(str(tmp), mode="w")
    fields = cube.calibration.to_dict()
    per_pattern = isinstance(cube.calibration.qx0, np.ndarray)
    if per_pattern:
        del fields["qx0"], fields["qy0"]
    group.attrs.update(
        {
            STEMFORGE_ATTR: {"kind": "datacube", "version": 1},
            "calibration": fields,
            "metadata": to_jsonable(cube.metadata),
        }
    )
    create = getattr(group, "create_array", None) or group.create_dataset  # zarr 3 / zarr 2
    chunks = scan_chunks(cube.shape, cube.dtype.itemsize)
    out = create(DATA_NAME, shape=cube.shape, chunks=chunks, dtype=cube.dtype)
    copy_scan_rows(cube, out, chunks[0], f"writing {tmp.name}")
    if per_pattern:
        for key in ("qx0", "qy0"):
            origin = np.asarray(getattr(cube.calibration, key), dtype=np.float64)
            create(key, shape=origin.shape, chunks=origin.shape, dtype=origin.dtype)[...] = origin
