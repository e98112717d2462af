"""stemforge :class:`Calibration` ↔ py4DSTEM calibration parameters in EMD 1.0 files.

py4DSTEM (0.14, through the ``emdfile`` package) stores a calibration as an HDF5 group with
``emd_group_type='metadata'`` and ``python_class='Calibration'``, one dataset per parameter
with an attribute ``type`` ('number', 'string', 'bool', 'array', ...). The parameter names
are py4DSTEM's: ``R_pixel_size``/``R_pixel_units``, ``Q_pixel_size``/``Q_pixel_units``
('A^-1', 'mrad' or 'pixels'), ``qx0``/``qy0`` (origin, scalar or per pattern) with
``qx0_mean``/``qx0_shift``..., ellipse ``a``/``b``/``theta`` (rad), ``QR_rotation`` (rad)
with ``QR_rotation_degrees``, ``QR_flip`` and ``convergence_semiangle_mrad``. py4DSTEM has
no beam energy in its calibration; stemforge adds ``accelerating_voltage`` (V), which
py4DSTEM keeps as an ordinary parameter.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stemforge.core import units
from stemforge.core.calibration import Calibration
from stemforge.core.units import length_to_angstrom, reciprocal_to_calibration

#: Every parameter :func:`calibration_to_py4dstem` may write: rewriting a calibration
#: removes all of them first, so none survives from the previous one.
MANAGED_KEYS = (
    "R_pixel_size",
    "R_pixel_units",
    "Q_pixel_size",
    "Q_pixel_units",
    "QR_flip",
    "QR_rotation",
    "QR_rotation_degrees",
    "qx0",
    "qy0",
    "qx0_mean",
    "qy0_mean",
    "qx0_shift",
    "qy0_shift",
    "a",
    "b",
    "theta",
    "convergence_semiangle_mrad",
    "accelerating_voltage",
)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = np.asarray(value, dtype=float)
    return float(value.mean()) if value.size else None  # a per-pattern value → its scan mean


def calibration_from_py4dstem(params: dict[str, Any]) -> Calibration:
    """Build a :class:`Calibration` from py4DSTEM parameters (missing ones stay default).

    Lengths become Å and reciprocal lengths Å⁻¹ (mrad stays mrad). Per-pattern ellipse
    parameters are averaged over the scan, since a stemforge ellipse is one per datacube.
    """
    r_size, r_units = length_to_angstrom(
        params.get("R_pixel_size", 1.0), params.get("R_pixel_units")
    )
    q_size, q_units = reciprocal_to_calibration(
        params.get("Q_pixel_size", 1.0), params.get("Q_pixel_units")
    )
    origin: dict[str, Any] = {}
    for axis in ("qx0", "qy0"):
        value = params.get(axis)
        if value is None:
            value = params.get(f"{axis}_mean")
        if value is not None:
            value = np.asarray(value, dtype=float)
            origin[axis] = value if value.ndim == 2 else float(value.mean())
    ellipse = tuple(_number(params.get(k)) for k in ("a", "b", "theta"))
    if "QR_rotation" in params:
        rotation = _number(params["QR_rotation"]) or 0.0
    else:
        rotation = math.radians(_number(params.get("QR_rotation_degrees")) or 0.0)
    return Calibration(
        r_pixel_size=r_size,
        r_units=r_units,
        q_pixel_size=q_size,
        q_units=q_units,
        energy=_number(params.get("accelerating_voltage")),
        convergence_semiangle=_number(params.get("convergence_semiangle_mrad")),
        ellipse=None if None in ellipse else ellipse,
        qr_rotation=rotation,
        qr_flip=bool(params.get("QR_flip", False)),
        **origin,
    )


def calibration_to_py4dstem(cal: Calibration) -> dict[str, Any]:
    """py4DSTEM parameters for ``cal`` (Q in nm⁻¹ is written as Å⁻¹, which py4DSTEM requires)."""
    q_size, q_units = cal.q_pixel_size, cal.q_units
    if q_units == "nm^-1":
        q_size, q_units = units.q_to_inv_angstrom(q_size, q_units), "A^-1"
    params: dict[str, Any] = {
        "R_pixel_size": float(cal.r_pixel_size),
        "R_pixel_units": cal.r_units,
        "Q_pixel_size": float(q_size),
        "Q_pixel_units": q_units,
        "QR_flip": bool(cal.qr_flip),
        "QR_rotation": float(cal.qr_rotation),
        "QR_rotation_degrees": math.degrees(cal.qr_rotation),
    }
    if cal.qx0 is not None:
        for axis in ("qx0", "qy0"):
            value = getattr(cal, axis)
            mean = float(np.mean(value))
            params[axis] = (
                np.asarray(value, dtype=np.float64)
                if isinstance(value, np.ndarray)
                else float(value)
            )
            params[f"{axis}_mean"] = mean
            if isinstance(value, np.ndarray):
                params[f"{axis}_shift"] = np.asarray(value, dtype=np.float64) - mean
    if cal.ellipse is not None:
        params.update(zip(("a", "b", "theta"), (float(v) for v in cal.ellipse), strict=True))
    if cal.convergence_semiangle is not None:
        params["convergence_semiangle_mrad"] = float(cal.convergence_semiangle)
    if cal.energy is not None:
        params["accelerating_voltage"] = float(cal.energy)
    return params


# ---- the emdfile metadata group -------------------------------------------------------------
def read_metadata_group(group: Any) -> dict[str, Any]:
    """Read an emdfile metadata group (an h5py Group) into a dict.

    Handles the item types py4DSTEM calibrations use: numbers, strings, bools, arrays,
    None, tuples/lists of numbers, lists of strings or arrays, and nested dicts.
    """
    import h5py

    out: dict[str, Any] = {}
    for key, item in group.items():
        kind = item.attrs.get("type", b"")
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if isinstance(item, h5py.Group):
            if kind == "dict":
                out[key] = read_metadata_group(item)
            else:  # list_of_strings, tuple_of_arrays...: items named "0", "1", ...
                values = [item[str(i)][()] for i in range(int(item.attrs.get("length", len(item))))]
                out[key] = [v.decode() if isinstance(v, bytes) else v for v in values]
            continue
        value = item[()]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if kind == "None" or (isinstance(value, str) and value == "_None"):
            value = None
        elif kind in ("tuple", "list"):
            value = list(np.atleast_1d(value))
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def write_metadata_group(parent: Any, name: str, params: dict[str, Any], python_class: str) -> Any:
    """Write ``params`` as an emdfile metadata group ``parent/name``; return the group."""
    group = parent.create_group(name)
    group.attrs["emd_group_type"] = "metadata"
    group.attrs["python_class"] = python_class
    write_metadata_items(group, params)
    return group


def write_metadata_items(group: Any, params: dict[str, Any]) -> None:
    """Add ``params`` to an emdfile metadata group, typed as emdfile types them."""
    for key, value in params.items():
        if isinstance(value, str):
            dset, kind = group.create_dataset(key, data=value.encode("utf-8")), "string"
        elif isinstance(value, bool):
            dset, kind = group.create_dataset(key, data=value, dtype=bool), "bool"
        elif isinstance(value, np.ndarray):
            dset, kind = group.create_dataset(key, data=value), "array"
        elif isinstance(value, list):  # lists of strings: a group of items "0", "1", ...
            sub = group.create_group(key)
            sub.attrs["type"], sub.attrs["length"] = "list_of_strings", len(value)
            for i, item in enumerate(value):
                sub.create_dataset(str(i), data=str(item).encode("utf-8"))
            continue
        else:
            dset, kind = group.create_dataset(key, data=float(value)), "number"
        dset.attrs["type"] = kind
