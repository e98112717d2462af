"""Bragg vector map: a 2D histogram of Bragg peak positions, origin-centred.

Summing every detected peak of a scan into one image shows the average reciprocal lattice
(or rings, for a polycrystal) far more sharply than the mean pattern. Peaks are deposited
bilinearly, so each one adds its intensity to the four nearest map pixels with weights that
keep both the total intensity and the intensity-weighted centroid exact: a map measures
subpixel positions without the half-pixel quantisation of a nearest-pixel histogram.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError


def _finite_column(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.broadcast_to(np.asarray(value, dtype=np.float64), shape)
    except ValueError:
        raise ShapeError(
            f"{name} has shape {np.shape(value)}, which does not match the {shape} peaks",
            f"give {name} one value per peak (or one scalar)",
        ) from None
    if not np.isfinite(arr).all():
        raise InvalidDataError(f"{name} contains NaN or inf", "drop those peaks before building the map")
    return arr.ravel()


def bragg_vector_map(
    qx: Any,
    qy: Any,
    intensity: Any,
    shape: tuple[int, int],
    qx0: Any = None,
    qy0: Any = None,
    sampling: int = 1,
) -> np.ndarray:
    """Deposit Bragg peaks bilinearly into a 2D map.

    Parameters
    ----------
    qx, qy
        Peak positions in detector pixels (axes -2 and -1), arrays of one shape (e.g. the
        columns of a ragged peak table of a whole scan).
    intensity
        Peak intensities (weights), same shape or a scalar.
    shape
        ``(Qx, Qy)`` of the detector; the map has ``(Qx·sampling, Qy·sampling)`` pixels.
    qx0, qy0
        Origin of the pattern each peak came from (arrays like ``qx``, or scalars). When
        given, every peak is moved by ``(Qx // 2 - qx0, Qy // 2 - qy0)`` so that all origins
        land on detector pixel ``(Qx // 2, Qy // 2)``, the map centre; descan then no longer
        smears the map. Both or neither.
    sampling
        Integer upsampling factor: map pixel ``(i, j)`` sits at detector coordinate
        ``(i / sampling, j / sampling)``, so positions measured on the map divide by
        ``sampling`` to return to detector pixels.

    Returns
    -------
    numpy.ndarray
        Float64 map. Its sum equals the summed intensity of the peaks whose four neighbours
        all fall on the map; the parts of peaks falling outside are dropped.
    """
    qx_arr = np.asarray(qx, dtype=np.float64)
    if np.shape(qy) != qx_arr.shape:
        raise ShapeError(
            f"qx and qy have shapes {qx_arr.shape} and {np.shape(qy)}", "give one qx and one qy per peak"
        )
    n_shape = qx_arr.shape
    x = _finite_column("qx", qx_arr, n_shape)
    y = _finite_column("qy", qy, n_shape)
    w = _finite_column("intensity", intensity, n_shape)
    if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
        raise ShapeError(f"shape must be two positive integers (Qx, Qy), got {shape!r}", "pass the detector shape")
    if isinstance(sampling, bool) or int(sampling) != sampling or sampling < 1:
        raise ConfigurationError(f"sampling must be an integer >= 1, got {sampling!r}", "use 1, 2 or 4")
    if (qx0 is None) != (qy0 is None):
        raise ConfigurationError("only one of qx0, qy0 is given", "give both origin coordinates, or neither")
    nx, ny = int(shape[0]), int(shape[1])
    if qx0 is not None:
        x = x + (nx // 2 - _finite_column("qx0", qx0, n_shape))
        y = y + (ny // 2 - _finite_column("qy0", qy0, n_shape))
    mx, my = nx * int(sampling), ny * int(sampling)
    x, y = x * sampling, y * sampling
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    out = np.zeros(mx * my)
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        i, j = x0 + dx, y0 + dy
        on_map = (i >= 0) & (i < mx) & (j >= 0) & (j < my)
        out += np.bincount(i[on_map] * my + j[on_map], weights=(w * weight)[on_map], minlength=mx * my)
    return out.reshape(mx, my)
