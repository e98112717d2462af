"""Bragg peaks in py4DSTEM's HDF5 layouts: 0.14 BraggVectors (EMD 1.0) and 0.13 PointListArrays.

py4DSTEM 0.14 (through ``emdfile``) saves a ``BraggVectors`` named ``braggvectors`` as::

    /                                  emd_group_type='file', version_major=1, version_minor=0
    braggvectors_root/                 emd_group_type='root', python_class='Root'
      braggvectors/                    emd_group_type='custom', python_class='BraggVectors'
        _v_uncal/                      emd_group_type='custom_pointlistarray',
                                       python_class='PointListArray'
          data                         (Rx, Ry) variable-length compound
                                       {qx: f8, qy: f8, intensity: f8}, raw detector pixels
        metadatabundle/                emd_group_type='metadatabundle'
          _braggvectors_shape/         emd_group_type='metadata', python_class='Metadata'
            Rshape, Qshape             int64 (2,), attribute type='tuple'
      metadatabundle/calibration/      the root's Calibration, ``_target_paths=['/braggvectors']``

The calibration group is the one py4DSTEM writes for a DataCube (see
:mod:`~stemforge.datasets.io.py4dstem_calibration`). A BraggVectors found by
``find_Bragg_disks`` on a saved DataCube sits deeper (``datacube_root/datacube/braggvectors``);
any group with ``python_class='BraggVectors'`` under an EMD root is found.

py4DSTEM 0.13 files have a root group (``4DSTEM``) with ``emd_group_type='root'`` and string
attributes ``version_major='0'``, ``version_minor='13'``; a PointListArray is a group with
``emd_group_type=3``, ``py4dstem_class='PointListArray'`` and the same kind of ``data``
dataset. A 0.13 BraggVectors (``emd_group_type=4``) holds ``_v_uncal`` (raw) and may hold
``_v_cal`` (calibrated) PointListArrays. 0.13 files record neither the detector shape nor
(for a bare PointListArray) whether the positions were calibrated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.errors import CalibrationError, FileFormatError
from stemforge.datasets.io.emd import is_emd1, new_emd_root
from stemforge.datasets.io.hdf5 import attr_str
from stemforge.datasets.io.py4dstem_calibration import (
    calibration_from_py4dstem,
    calibration_to_py4dstem,
    read_metadata_group,
    write_metadata_group,
)

ROOT = "braggvectors_root"
NODE = "braggvectors"
#: The fields of a py4DSTEM Bragg vector, in order.
VECTOR_DTYPE = np.dtype([("qx", "<f8"), ("qy", "<f8"), ("intensity", "<f8")])
#: What a 0.13 calibrated peak list is in: origin-centred Å⁻¹; this calibration leaves it so.
IDENTITY_CALIBRATION = Calibration(q_pixel_size=1.0, q_units="A^-1", qx0=0.0, qy0=0.0)


@dataclass(frozen=True)
class PeakList:
    """One py4DSTEM peak list found in a file, before it becomes a :class:`BraggPeaks`."""

    path: str  # the PointListArray group
    version: str  # '0.14' or '0.13'
    scan_shape: tuple[int, int] | None
    detector_shape: tuple[int, int] | None
    calibrated: bool  # positions calibrated by py4DSTEM rather than raw detector pixels


def is_py4dstem13(f: Any) -> bool:
    """Whether an open h5py File has a py4DSTEM 0.13 root group."""
    return any(
        attr_str(g, "emd_group_type") == "root"
        and (attr_str(g, "version_major"), attr_str(g, "version_minor")) == ("0", "13")
        for g in f.values()
    )


def _shape_tuple(group: Any, key: str) -> tuple[int, int] | None:
    value = group.get(key)
    return None if value is None else tuple(int(v) for v in np.ravel(value[()]))


def _is_vector_table(obj: Any) -> bool:
    """A PointListArray ``data`` of variable-length records with qx, qy and intensity."""
    import h5py

    data = obj.get("data")
    if not isinstance(data, h5py.Dataset) or data.ndim != 2:
        return False
    inner = h5py.check_vlen_dtype(data.dtype)
    return inner is not None and all(k in (inner.names or ()) for k in VECTOR_DTYPE.names)


def find_peak_lists(f: Any) -> list[PeakList]:
    """Every py4DSTEM peak list in an open file (0.14 BraggVectors or 0.13 PointListArrays)."""
    import h5py

    found: list[PeakList] = []
    if is_emd1(f):

        def visit(name: str, obj: Any) -> None:
            if not (
                isinstance(obj, h5py.Group) and attr_str(obj, "python_class") == "BraggVectors"
            ):
                return
            if "_v_uncal" in obj and _is_vector_table(obj["_v_uncal"]):
                shapes = obj.get("metadatabundle/_braggvectors_shape", {})
                found.append(
                    PeakList(
                        f"{name}/_v_uncal",
                        "0.14",
                        _shape_tuple(shapes, "Rshape"),
                        _shape_tuple(shapes, "Qshape"),
                        calibrated=False,
                    )
                )

        f.visititems(visit)
    elif is_py4dstem13(f):

        def visit13(name: str, obj: Any) -> None:
            if (
                isinstance(obj, h5py.Group)
                and attr_str(obj, "py4dstem_class") == "PointListArray"
                and _is_vector_table(obj)
            ):
                # the file records no frame: a name with 'cal' but not 'uncal' (py4DSTEM's
                # _v_cal, users' braggpeaks_cal...) is taken as calibrated
                calibrated = "cal" in name.rsplit("/", 1)[-1].replace("uncal", "")
                found.append(PeakList(name, "0.13", None, None, calibrated))

        f.visititems(visit13)
    return found


def pick_peak_list(lists: list[PeakList], select: str | None) -> PeakList | None:
    """The list to read: the first raw one (else the first), or the one ``select`` names
    (its PointListArray or BraggVectors group path); None when ``select`` names none.
    """
    if select is None:
        raw = [p for p in lists if not p.calibrated]
        return (raw or lists)[0] if lists else None
    return next((p for p in lists if select in (p.path, p.path.removesuffix("/_v_uncal"))), None)


def read_py4dstem_columns(
    f: Any, found: PeakList, path: Path
) -> tuple[dict[str, np.ndarray], tuple[int, int], Calibration | None]:
    """Read one peak list as the five columns (positions as stored), its scan shape and the
    calibration py4DSTEM keeps with it (0.13 calibrated lists: :data:`IDENTITY_CALIBRATION`).
    """
    data = f[found.path]["data"]
    scan = tuple(int(n) for n in data.shape)
    if found.scan_shape is not None and scan != found.scan_shape:
        raise FileFormatError(
            f"{path}::{found.path} holds a {scan} scan but its metadata says {found.scan_shape}",
            "write the file again with py4DSTEM or stemforge",
        )
    tables = data[()]
    counts = np.fromiter((len(t) for t in tables.flat), dtype=np.int64, count=tables.size)
    names = list(VECTOR_DTYPE.names)
    rows = (
        np.concatenate([np.asarray(t)[names] for t in tables.flat])
        if counts.sum()
        else np.zeros(0, VECTOR_DTYPE)
    )
    flat = np.repeat(np.arange(tables.size), counts)
    cols = {"rx": flat // scan[1], "ry": flat % scan[1], **{q: rows[q] for q in names}}
    if found.version == "0.13":
        return cols, scan, IDENTITY_CALIBRATION if found.calibrated else None
    cal_group = f.get(f"{found.path.split('/')[0]}/metadatabundle/calibration")
    if cal_group is None:
        return cols, scan, None
    try:
        return cols, scan, calibration_from_py4dstem(read_metadata_group(cal_group))
    except CalibrationError as err:  # the peaks stay usable without it
        warnings.warn(
            f"{path}: the calibration stored with the peaks is invalid and was ignored: {err.problem}",
            stacklevel=4,
        )
        return cols, scan, None


def write_py4dstem_peaks(peaks: BraggPeaks, tmp: Path, calibration: Calibration | None) -> None:
    """Write ``peaks`` at ``tmp`` as ``py4DSTEM.save`` writes a BraggVectors (EMD 1.0).

    Without a calibration the default one py4DSTEM attaches (pixels) is written; a
    per-pattern origin must have the scan shape (checked by the caller).
    """
    import h5py

    rows = np.empty(len(peaks), VECTOR_DTYPE)
    for name in VECTOR_DTYPE.names:
        rows[name] = getattr(peaks, name)
    offsets = peaks.offsets
    tables = np.empty(peaks.scan_shape, dtype=object)
    for k in range(tables.size):
        tables.flat[k] = rows[offsets[k] : offsets[k + 1]]
    with h5py.File(tmp, "w") as f:
        root = new_emd_root(f, ROOT)
        node = root.create_group(NODE)
        node.attrs.update(emd_group_type="custom", python_class="BraggVectors")
        vectors = node.create_group("_v_uncal")
        vectors.attrs.update(emd_group_type="custom_pointlistarray", python_class="PointListArray")
        dset = vectors.create_dataset("data", peaks.scan_shape, dtype=h5py.vlen_dtype(VECTOR_DTYPE))
        dset[...] = tables
        bundle = node.create_group("metadatabundle")
        bundle.attrs["emd_group_type"] = "metadatabundle"
        shapes = write_metadata_group(bundle, "_braggvectors_shape", {}, "Metadata")
        for key, shape in (("Rshape", peaks.scan_shape), ("Qshape", peaks.detector_shape)):
            shapes.create_dataset(key, data=np.array(shape, np.int64)).attrs["type"] = "tuple"
        root_bundle = root.create_group("metadatabundle")
        root_bundle.attrs["emd_group_type"] = "metadatabundle"
        params = calibration_to_py4dstem(calibration or Calibration())
        # py4DSTEM re-links the calibration to the nodes it calibrates through these two
        params.update(_root_treepath="", _target_paths=[f"/{NODE}"])
        write_metadata_group(root_bundle, "calibration", params, "Calibration")
