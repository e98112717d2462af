"""Calibration from the metadata abTEM writes with ``Measurement.to_zarr``.

abTEM (1.0) stores each measurement as an array ``array{i}`` and its metadata as the group
attribute ``metadata{i}``: ``axes`` (``axis_0``... with ``type``, ``sampling``, ``offset``,
``units``), ``energy`` in eV and ``semiangle_cutoff`` in mrad. Parsing that JSON here
spares importing abTEM (~340 MB) just to read a file.
"""

from __future__ import annotations

import math
from typing import Any

from stemforge.core.calibration import Calibration
from stemforge.core.errors import FileFormatError, ShapeError
from stemforge.core.units import length_to_angstrom, reciprocal_to_calibration


def abtem_metadata(attrs: dict[str, Any], array_name: str) -> dict[str, Any] | None:
    """The abTEM metadata of ``array_name`` (``array3`` → ``metadata3``), or None if not abTEM."""
    meta = (
        attrs.get(array_name.replace("array", "metadata", 1))
        if array_name.startswith("array")
        else None
    )
    if isinstance(meta, dict) and isinstance(meta.get("axes"), dict):
        return meta
    return None


def _positive(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        else None
    )


def parse_abtem(
    meta: dict[str, Any], shape: tuple[int, ...], where: str
) -> tuple[tuple, Calibration, dict]:
    """Interpret an abTEM measurement as a datacube.

    Parameters
    ----------
    meta
        The ``metadata{i}`` attribute.
    shape
        Shape of the array.
    where
        File and array name, for error messages.

    Returns
    -------
    index, calibration, metadata
        ``index`` selects the datacube: the first entry of every axis that is neither a
        scan axis nor a detector axis (frozen phonons, thickness, ...), recorded in
        ``metadata["abtem_selected"]``.
    """
    axes = [meta["axes"].get(f"axis_{i}", {}) for i in range(len(shape))]
    kind = meta.get("type", "measurement")
    if len(shape) < 3 or any(a.get("type") != "ReciprocalSpaceAxis" for a in axes[-2:]):
        raise FileFormatError(
            f"{where} is an abTEM {kind} without diffraction-space axes, not diffraction patterns",
            "save abTEM DiffractionPatterns (e.g. from a PixelatedDetector) with to_zarr",
        )
    scan = [i for i, a in enumerate(axes[:-2]) if a.get("type") == "ScanAxis"]
    if len(scan) > 2:
        raise ShapeError(
            f"{where} has {len(scan)} scan axes", "stemforge reads scans with one or two scan axes"
        )
    others = [i for i in range(len(shape) - 2) if i not in scan]
    index = tuple(0 if i in others else slice(None) for i in range(len(shape)))
    selected = {f"axis_{i} ({axes[i].get('label', axes[i].get('type', '?'))})": 0 for i in others}

    r_size, r_units = 1.0, "pixels"
    if scan:
        r_size, r_units = length_to_angstrom(
            axes[scan[0]].get("sampling", 1.0), axes[scan[0]].get("units")
        )
    kx, ky = axes[-2], axes[-1]
    q_size, q_units = reciprocal_to_calibration(kx.get("sampling", 1.0), kx.get("units"))
    origin = {}
    if q_units != "pixels" and all(isinstance(a.get("offset"), (int, float)) for a in (kx, ky)):
        # the zero frequency sits where the axis coordinate (offset + i * sampling) is 0
        origin = {"qx0": -kx["offset"] / kx["sampling"], "qy0": -ky["offset"] / ky["sampling"]}
    calibration = Calibration(
        r_pixel_size=r_size,
        r_units=r_units,
        q_pixel_size=q_size,
        q_units=q_units,
        energy=_positive(meta.get("energy")),
        convergence_semiangle=_positive(meta.get("semiangle_cutoff")),
        **origin,
    )
    metadata = {
        "abtem_type": kind,
        "abtem_origin": meta.get("data_origin"),
        "abtem_sampling": [a.get("sampling") for a in axes],
        "abtem_selected": selected,
    }
    return index, calibration, metadata
