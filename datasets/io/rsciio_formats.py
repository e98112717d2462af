"""Detector formats read through RosettaSciIO: Merlin ``.mib``, ``.blo``, ``.dm3/.dm4``,
EMPAD ``.xml`` + ``.raw`` and Dectris Arina ``_master.h5``.

Axis conventions (checked on the real test files): a RosettaSciIO signal dict lists its
axes in array order (``index_in_array`` 0, 1, ...), navigation axes first, and the array
is C-ordered with the slow scan direction first, so array axes ``(0, 1, 2, 3)`` already are
``(Rx, Ry, Qx, Qy)`` as py4DSTEM names them (RosettaSciIO calls them y, x, dy, dx: HyperSpy
lists axes in reverse, x first). ``navigation_shape`` arguments differ between plugins:
the Merlin reader takes HyperSpy order ``(x, y)`` = ``(Ry, Rx)``, the Arina reader array
order ``(Rx, Ry)``. The Merlin reader flips every frame along detector rows (axis -2)
relative to the raw file, to show frames as Merlin's software does; stemforge keeps
RosettaSciIO's orientation.
"""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import is_lazy
from stemforge.core.errors import (
    ConfigurationError,
    FileFormatError,
    MissingFileError,
    ShapeError,
    StemforgeError,
)
from stemforge.core.units import length_to_angstrom, reciprocal_to_calibration
from stemforge.datasets.io.hdf5 import open_h5
from stemforge.datasets.io.lazy import H5Source, as_dask, file_token, rechunk_scan
from stemforge.datasets.io.memory import chunk_target, want_lazy

#: Extension → (RosettaSciIO plugin, format name).
PLUGINS = {
    ".mib": ("quantumdetector", "Quantum Detectors Merlin .mib"),
    ".blo": ("blockfile", "NanoMegas blockfile"),
    ".dm3": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".dm4": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".xml": ("empad", "EMPAD"),
}
ARINA = "Dectris Arina"


def _plugin(name: str) -> Any:
    """Import a RosettaSciIO plugin; some need optional packages (blockfile: scikit-image,
    arina: hdf5plugin)."""
    try:
        return importlib.import_module(f"rsciio.{name}")
    except ImportError as err:
        raise ConfigurationError(
            f"reading this format needs a package that is not installed ({err})",
            f"pip install 'rosettasciio[{name}]'",
        ) from None


def _call(reader: Any, path: Path, label: str, **kwargs: Any) -> Any:
    """Run a RosettaSciIO reader, turning its errors into stemforge errors."""
    try:
        return reader(str(path), **kwargs)
    except StemforgeError:
        raise
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{path}: a file it refers to is missing ({err})",
            "keep the files of an acquisition together (.xml with its .raw, _master.h5 with its data files)",
        ) from None
    except Exception as err:  # readers raise anything from ValueError to struct.error on bad files
        raise FileFormatError(
            f"{path} could not be read as {label} ({type(err).__name__}: {err})",
            "check that the file is complete and really of this format",
        ) from None


def _get(tree: Any, keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _mapped_metadata(signal: dict) -> dict:
    """The signal's metadata with RosettaSciIO's ``mapping`` applied (HyperSpy does that
    step when it loads a file; beam energy and camera length arrive this way)."""
    metadata = copy.deepcopy(signal.get("metadata") or {})
    for source, (target, convert) in (signal.get("mapping") or {}).items():
        value = _get(signal.get("original_metadata"), source.split("."))
        if value is None:
            continue
        try:
            value = convert(value) if convert else value
        except Exception:  # a malformed tag only loses that tag
            continue
        *parents, leaf = target.split(".")
        node = metadata
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return metadata


def _positive(value: Any, scale: float = 1.0) -> float | None:
    try:
        value = float(value) * scale
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _calibration_from_signal(signal: dict, metadata: dict) -> Calibration:
    """Pixel sizes from the axes (first navigation axis, first signal axis), beam energy
    (keV → eV) and convergence angle (mrad) from the HyperSpy metadata."""
    axes = signal["axes"]
    nav, sig = axes[:-2], axes[-2:]
    r_size, r_units = (
        length_to_angstrom(nav[0].get("scale", 1.0), nav[0].get("units"))
        if nav
        else (1.0, "pixels")
    )
    q_size, q_units = reciprocal_to_calibration(sig[0].get("scale", 1.0), sig[0].get("units"))
    tem = _get(metadata, ["Acquisition_instrument", "TEM"]) or {}
    return Calibration(
        r_pixel_size=r_size,
        r_units=r_units,
        q_pixel_size=q_size,
        q_units=q_units,
        energy=_positive(tem.get("beam_energy"), 1e3),
        convergence_semiangle=_positive(tem.get("convergence_angle")),
    )


def _native(data: Any) -> Any:
    """Native byte order (Merlin frames are big-endian); torch and others refuse swapped data."""
    return data if data.dtype.isnative else data.astype(data.dtype.newbyteorder("="))


def _load(data: Any, path: Path, lazy: bool | None, memory_budget: int | None) -> Any:
    """A scan-chunked Dask array, or the data in memory when it fits the budget.

    A lazy array reads its first and last pattern here, so that a missing or truncated
    data file fails when it is opened rather than in the middle of an analysis.
    """
    if not is_lazy(data):
        return np.asarray(data)
    try:
        if want_lazy(int(data.nbytes), lazy, memory_budget):
            nav = data.ndim - 2
            data[(0,) * nav].compute(), data[(-1,) * nav].compute()
            return rechunk_scan(data, chunk_target(memory_budget))
        return np.asarray(data.compute())
    except FileNotFoundError as err:
        raise MissingFileError(
            f"{path}: its data file is missing ({err})", "keep the data file next to the header"
        ) from None
    except (OSError, ValueError) as err:
        raise FileFormatError(
            f"{path} could not be read: it is truncated or corrupt ({err})", "copy the file again"
        ) from None


def read_rsciio(
    path: Path, *, scan_shape: tuple[int, int] | None, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read a ``.mib``, ``.blo``, ``.dm3``/``.dm4`` or EMPAD ``.xml`` file.

    Returns
    -------
    data, calibration, metadata
        ``data`` is 4D when the file knows its scan, else a 3D stack. With ``scan_shape``
        a Merlin file is read as a plain stack of all its frames (RosettaSciIO would
        silently drop the frames that do not fill a scan line) for the caller to reshape.
    """
    plugin, label = PLUGINS[path.suffix.lower()]
    module = _plugin(plugin)
    kwargs: dict[str, Any] = {"lazy": True}
    if plugin == "quantumdetector" and scan_shape is not None:
        n_frames = _call(module.load_mib_data, path, label, lazy=True).shape[0]
        kwargs["navigation_shape"] = (int(n_frames),)
    signals = _call(module.file_reader, path, label, **kwargs)
    found = [i for i, s in enumerate(signals) if np.ndim(s["data"]) >= 3]
    if not found:
        raise ShapeError(
            f"{path} holds no 3D or 4D data (only images or spectra)",
            "point to a 4D-STEM acquisition",
        )
    signal = _navigation_first(signals[found[0]], path)
    metadata = _mapped_metadata(signal)
    calibration = _calibration_from_signal(signal, metadata)
    info = {
        "format": f"{label} (RosettaSciIO)",
        "rsciio_signal": found[0],
        "axes": [
            {k: a.get(k) for k in ("name", "scale", "offset", "units", "navigate")}
            for a in signal["axes"]
        ],
        "rsciio_metadata": metadata,
        "original_metadata": signal.get("original_metadata") or {},
    }
    return _load(_native(signal["data"]), path, lazy, memory_budget), calibration, info


def _navigation_first(signal: dict, path: Path) -> dict:
    """The signal with its navigation axes moved before its two signal axes.

    RosettaSciIO readers give navigation axes first, but the axes carry ``navigate``
    flags, so a file that stores the detector axes first is put right rather than misread.
    """
    data, axes = signal["data"], signal["axes"]
    flags = [axis.get("navigate") for axis in axes]
    if data.ndim > 4 or (None not in flags and flags.count(False) != 2):
        raise ShapeError(
            f"{path} holds data of shape {tuple(data.shape)} with navigation flags {flags}",
            "stemforge reads 4D datacubes and 3D stacks of 2D patterns",
        )
    if None in flags:  # no flags (the Arina plugin): array order is (scan..., detector)
        return signal
    order = [i for i, nav in enumerate(flags) if nav] + [
        i for i, nav in enumerate(flags) if not nav
    ]
    if order == list(range(data.ndim)):
        return signal
    return {**signal, "data": data.transpose(order), "axes": [axes[i] for i in order]}


# ---- Dectris Arina ------------------------------------------------------------------------
def _arina_scan_metadata(path: Path) -> dict[str, Any]:
    """Scan shape, scan step and beam energy from the acquisition's ``NAME.h5`` metadata
    file next to ``NAME_master.h5`` (written by the scan software; optional)."""
    meta_path = Path(str(path).replace("_master.h5", ".h5"))
    if meta_path == path or not meta_path.is_file():
        return {}
    with open_h5(meta_path) as f:
        if "STEM Metadata" not in f:
            return {}
        attrs = {
            k: np.ravel(v)[0] if np.size(v) else None for k, v in f["STEM Metadata"].attrs.items()
        }
    out: dict[str, Any] = {"stem_metadata": attrs}
    if attrs.get("NumPixelsX") and attrs.get("NumPixelsY"):
        # frames come in raster order, x fastest: rows of the scan (y) are the slow axis Rx
        out["scan_shape"] = (int(attrs["NumPixelsY"]), int(attrs["NumPixelsX"]))
    if attrs.get("Pixel Size") is not None:
        out["r_pixel"] = length_to_angstrom(float(attrs["Pixel Size"]), "nm")
    out["energy"] = _positive(attrs.get("High Tension"))  # V → eV, numerically equal
    return out


def read_arina(
    path: Path, *, scan_shape: tuple[int, int] | None, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read a Dectris Arina ``_master.h5`` with its data files.

    The scan shape is ``scan_shape``, else the one in the metadata file, else square when
    the frame count is a square, else ``(N, 1)``. In memory the frames are read by
    RosettaSciIO, keeping their dtype (its default casts uint32 to uint16); lazily they are
    read straight from the HDF5 data sets, which RosettaSciIO's Arina reader cannot do.
    """
    module = _plugin("arina")  # also registers the hdf5plugin filters the data files need
    with open_h5(path) as f:
        group = f.get("entry/data")
        if group is None:
            raise FileFormatError(
                f"{path} is not a Dectris Arina master file (no entry/data)",
                "open the *_master.h5 file",
            )
        try:
            # link paths in the master, not the targets' names inside the data files
            parts = [
                (f"entry/data/{k}", tuple(group[k].shape), group[k].dtype) for k in sorted(group)
            ]
        except KeyError as err:  # an external link whose data file is missing
            raise MissingFileError(
                f"{path}: a data file is missing ({err})",
                "keep the *_data_*.h5 files next to the master file",
            ) from None
    if not parts:
        raise FileFormatError(
            f"{path} lists no data sets under entry/data", "open a complete acquisition"
        )
    n_frames = sum(shape[0] for _, shape, _ in parts)
    detector, dtype = parts[0][1][1:], parts[0][2]
    scan = _arina_scan_metadata(path)
    side = math.isqrt(n_frames)
    if scan_shape is None:
        scan_shape = scan.get("scan_shape") or (
            (side, side) if side * side == n_frames else (n_frames, 1)
        )
    if math.prod(scan_shape) != n_frames:
        raise ShapeError(
            f"scan shape {tuple(scan_shape)} does not hold the {n_frames} frames of {path}",
            f"give --scan-shape RX,RY with RX*RY = {n_frames}",
        )
    if want_lazy(n_frames * math.prod(detector) * dtype.itemsize, lazy, memory_budget):
        import dask.array as da

        chunk_bytes = chunk_target(memory_budget)
        stacks = [
            as_dask(
                H5Source(path, name, shape, dtype, filters=True),
                file_token(path, name),
                chunk_bytes,
            )
            for name, shape, _ in parts
        ]
        data = rechunk_scan(da.concatenate(stacks).reshape(*scan_shape, *detector), chunk_bytes)
    else:
        data = _call(
            module.file_reader, path, ARINA, navigation_shape=tuple(scan_shape), dtype=dtype
        )[0]["data"]
    r_size, r_units = scan.get("r_pixel", (1.0, "pixels"))
    calibration = Calibration(r_pixel_size=r_size, r_units=r_units, energy=scan.get("energy"))
    return (
        data,
        calibration,
        {"format": f"{ARINA} (RosettaSciIO)", "arina_metadata": scan.get("stem_metadata", {})},
    )
