"""EMD 1.0 files as py4DSTEM (0.14+, through ``emdfile``) reads and writes them.

Layout: root attributes ``emd_group_type='file'``, ``version_major=1``; a root group
(``emd_group_type='root'``) holding an array group (``emd_group_type='array'``,
``python_class='DataCube'``) with ``data`` and ``dim0..dim3`` (``name``/``units``
attributes), and the calibration in ``<root>/metadatabundle/calibration`` (see
:mod:`~stemforge.datasets.io.py4dstem_calibration`). stemforge writes exactly what
``py4DSTEM.save`` writes for a DataCube, plus its free-form metadata as a JSON string in
``<array>/stemforge_metadata``, which py4DSTEM ignores.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import CalibrationError, FileFormatError, ShapeError
from stemforge.core.units import length_to_angstrom, reciprocal_to_calibration
from stemforge.datasets.io.hdf5 import attr_str, open_h5
from stemforge.datasets.io.jsonable import to_jsonable
from stemforge.datasets.io.lazy import H5Source, as_dask, file_token
from stemforge.datasets.io.memory import chunk_target, copy_scan_rows, want_lazy
from stemforge.datasets.io.py4dstem_calibration import (
    MANAGED_KEYS,
    calibration_from_py4dstem,
    calibration_to_py4dstem,
    read_metadata_group,
    write_metadata_group,
    write_metadata_items,
)

FORMAT = "EMD 1.0 (py4DSTEM)"
ROOT = "datacube_root"


def new_emd_root(f: Any, name: str) -> Any:
    """Mark the open, empty HDF5 file ``f`` as an EMD 1.0 file and create its root ``name``."""
    f.attrs.update(
        emd_group_type="file",
        version_major=1,
        version_minor=0,
        UUID=str(uuid.uuid4()),
        authoring_program="stemforge",
        authoring_user="",
    )
    root = f.create_group(name)
    root.attrs.update(emd_group_type="root", python_class="Root")
    return root
ARRAY = "datacube"
METADATA_DATASET = "stemforge_metadata"


def is_emd1(f: Any) -> bool:
    """Whether an open h5py File is an EMD 1.x file."""
    return attr_str(f, "emd_group_type") == "file" and attr_str(f, "version_major") == "1"


def find_datacubes(f: Any) -> list[str]:
    """Paths of the 4D array groups under the file's EMD roots, in file order."""
    import h5py

    roots = {
        key
        for key, item in f.items()
        if isinstance(item, h5py.Group) and attr_str(item, "emd_group_type") == "root"
    }
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if (
            name.split("/")[0] in roots
            and isinstance(obj, h5py.Group)
            and attr_str(obj, "emd_group_type") == "array"
            and isinstance(obj.get("data"), h5py.Dataset)
            and obj["data"].ndim == 4
        ):
            found.append(name)

    f.visititems(visit)
    return found


def _resolve(f: Any, select: str | None, path: Path) -> str:
    """The array group to read: the first datacube, or the one ``select`` points to."""
    import h5py

    cubes = find_datacubes(f)
    if select is None:
        if not cubes:
            raise FileFormatError(
                f"{path} is an EMD file without a 4D datacube",
                "point to a file that holds a datacube",
            )
        return cubes[0]
    obj = f.get(select)
    if obj is None:
        raise FileFormatError(
            f"{path} has no group {select!r}", f"choose one of {cubes} (FILE::GROUP)"
        )
    if isinstance(obj, h5py.Dataset):
        obj = obj.parent
    if isinstance(obj.get("data"), h5py.Dataset):
        return obj.name.strip("/")
    inside = [c for c in cubes if c.startswith(obj.name.strip("/") + "/")]
    if not inside:
        raise FileFormatError(f"{path}::{select} holds no datacube", f"choose one of {cubes}")
    return inside[0]


def _calibration_group(f: Any, array_path: str) -> Any:
    """py4DSTEM keeps the calibration in the root's metadata bundle; emdfile arrays may
    carry their own."""
    root = array_path.split("/")[0]
    for where in (f"{root}/metadatabundle/calibration", f"{array_path}/metadatabundle/calibration"):
        if where in f:
            return f[where]
    return None


def _calibration_from_dims(group: Any) -> Calibration:
    """Pixel sizes from the dimension vectors, for EMD arrays without a calibration group."""

    def step(n: int) -> tuple[float, str]:
        dim = group.get(f"dim{n}")
        if dim is None or dim.shape[0] < 2:
            return 1.0, ""
        return float(dim[1] - dim[0]), attr_str(dim, "units")

    r_size, r_units = length_to_angstrom(*step(0))
    q_size, q_units = reciprocal_to_calibration(*step(2))
    return Calibration(r_pixel_size=r_size, r_units=r_units, q_pixel_size=q_size, q_units=q_units)


def read_emd(
    path: Path, *, select: str | None, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read a datacube from an EMD 1.0 / py4DSTEM file.

    Parameters
    ----------
    path
        The file.
    select
        Group path of the datacube (or of a group holding it); default: the first 4D array.

    Returns
    -------
    data, calibration, metadata
        ``metadata["emd_path"]`` says which array was read, ``metadata["datacubes_in_file"]``
        lists all of them.
    """
    with open_h5(path) as f:
        array_path = _resolve(f, select, path)
        group = f[array_path]
        dset = group["data"]
        cal_group = _calibration_group(f, array_path)
        params = read_metadata_group(cal_group) if cal_group is not None else {}
        calibration, problem = _calibration_from_dims(group), None
        try:
            if cal_group is not None:
                calibration = calibration_from_py4dstem(params)
        except CalibrationError as err:
            # keep the file readable (a sidecar may fix it); the pixel sizes of the dims stand
            problem = f"{path}: the calibration stored in the file is invalid and was ignored: {err.problem}"
            warnings.warn(problem, stacklevel=3)
        stored = json.loads(group[METADATA_DATASET][()]) if METADATA_DATASET in group else {}
        metadata = {
            **stored,
            "format": FORMAT,
            "emd_path": array_path,
            "datacubes_in_file": find_datacubes(f),
            "authoring_program": attr_str(f, "authoring_program"),
            "calibration_problem": problem,
            "py4dstem_calibration": to_jsonable(
                {k: v for k, v in params.items() if not isinstance(v, np.ndarray)}
            ),
        }
        shape, dtype, name = tuple(dset.shape), dset.dtype, dset.name
        if len(shape) not in (3, 4):
            raise ShapeError(
                f"{path}::{array_path} is {len(shape)}D",
                "select a 4D datacube or a 3D stack of patterns",
            )
        if want_lazy(int(np.prod(shape)) * dtype.itemsize, lazy, memory_budget):
            source = H5Source(path, name, shape, dtype)
            data = as_dask(source, file_token(path, name), chunk_target(memory_budget))
        else:
            data = dset[()]
    return data, calibration, metadata


def _write_calibration_group(root: Any, array_name: str, calibration: Calibration) -> None:
    bundle = root.require_group("metadatabundle")
    bundle.attrs["emd_group_type"] = "metadatabundle"
    params = calibration_to_py4dstem(calibration)
    # py4DSTEM re-links the calibration to the arrays it calibrates through these two
    params.update(_root_treepath="", _target_paths=[f"/{array_name}"])
    write_metadata_group(bundle, "calibration", params, "Calibration")


def write_emd(cube: DataCube, tmp: Path) -> None:
    """Write ``cube`` at ``tmp`` in the layout ``py4DSTEM.save`` uses for a DataCube."""
    import h5py

    params = calibration_to_py4dstem(cube.calibration)
    with h5py.File(tmp, "w") as f:
        root = new_emd_root(f, ROOT)
        array = root.create_group(ARRAY)
        array.attrs.update(emd_group_type="array", python_class="DataCube")
        dset = array.create_dataset("data", shape=cube.shape, dtype=cube.dtype)
        dset.attrs["units"] = "pixel intensity"
        copy_scan_rows(cube, dset, cube.rows_per_block(), f"writing {tmp.name}")
        steps = [(params["R_pixel_size"], params["R_pixel_units"])] * 2 + [
            (params["Q_pixel_size"], params["Q_pixel_units"])
        ] * 2
        for n, (name, (step, unit)) in enumerate(zip(("Rx", "Ry", "Qx", "Qy"), steps, strict=True)):
            dim = array.create_dataset(
                f"dim{n}", data=np.array([0.0, step])
            )  # linear: first two values
            dim.attrs.update(name=name, units=unit)
        array.create_dataset(METADATA_DATASET, data=json.dumps(to_jsonable(cube.metadata)))
        _write_calibration_group(root, ARRAY, cube.calibration)


def write_emd_calibration(path: Path, select: str | None, calibration: Calibration) -> Path:
    """Replace the calibration inside an EMD 1.0 file, atomically (edit a copy, rename).

    py4DSTEM parameters stemforge does not manage (e.g. measured origins) are kept.

    Raises
    ------
    ShapeError
        If per-pattern origins do not match the scan shape of the datacube.
    """
    with open_h5(path) as f:
        array_path = _resolve(f, select, path)
        shape = f[array_path]["data"].shape
    if (
        isinstance(calibration.qx0, np.ndarray)
        and len(shape) == 4
        and calibration.qx0.shape != tuple(shape[:2])
    ):
        raise ShapeError(
            f"the calibration origin has shape {calibration.qx0.shape} but {path} has scan shape {tuple(shape[:2])}",
            "calibrate the origin on this datacube",
        )
    root_name, _, array_name = array_path.partition("/")
    with atomic_output(path, overwrite=True) as tmp:
        shutil.copy2(path, tmp)
        with open_h5(tmp, "r+") as f:
            group = _calibration_group(f, array_path)
            if group is None:
                _write_calibration_group(f[root_name], array_name, calibration)
            else:
                for key in MANAGED_KEYS:
                    if key in group:
                        del group[key]
                write_metadata_items(group, calibration_to_py4dstem(calibration))
    return path
