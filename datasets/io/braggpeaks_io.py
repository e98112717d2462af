"""Bragg peak tables on disk: CSV, stemforge HDF5 and py4DSTEM files.

The contract other tools rely on: a CSV has the header ``rx,ry,qx,qy,intensity`` and one
row per peak; an HDF5 file holds the same columns as 1-D datasets in the group
``braggpeaks``. Positions are raw detector pixels (see :class:`~stemforge.core.BraggPeaks`).

Formats
-------
``.csv``
    Header exactly ``rx,ry,qx,qy,intensity`` (no comment lines), integers for ``rx, ry``
    and every float written as its shortest exact repr, so a round trip is bit-exact. A CSV
    holds no shapes: pass them to :func:`read_braggpeaks` (see there for the defaults). A
    calibration goes to the sidecar ``FILE.csv.calibration.json``. A row cut short is caught
    (a complete file ends with a newline); a file cut at a row boundary cannot be told from
    a shorter table, so prefer HDF5 for archiving.
``.h5`` / ``.hdf5``
    Group ``braggpeaks`` with datasets ``rx, ry`` (int64) and ``qx, qy, intensity``
    (float64) and attributes ``scan_shape``, ``detector_shape`` (int64 pairs),
    ``stemforge_braggpeaks_version`` (1), ``q_units`` ('pixels') and, when given,
    ``calibration`` (the JSON of :meth:`Calibration.to_json`). Files of other tools with just
    the five datasets in ``braggpeaks`` are read too.
``.emd`` (or ``format="py4dstem"`` with ``.h5``/``.hdf5``)
    A py4DSTEM 0.14 BraggVectors in an EMD 1.0 file, so that ``py4DSTEM.read(path)`` gives a
    BraggVectors whose ``.raw[rx, ry]`` holds the same peaks; see
    :mod:`~stemforge.datasets.io.braggpeaks_py4dstem`.

Reading detects the HDF5 flavour from the content: stemforge's group, a py4DSTEM 0.14
BraggVectors, or a py4DSTEM 0.13 PointListArray (``FILE::GROUP`` picks one of several).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.braggpeaks import COLUMNS, BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.errors import (
    ConfigurationError,
    FileFormatError,
    MissingFileError,
    ShapeError,
    StemforgeError,
)
from stemforge.datasets.io.braggpeaks_py4dstem import (
    find_peak_lists,
    pick_peak_list,
    read_py4dstem_columns,
    write_py4dstem_peaks,
)
from stemforge.datasets.io.calibration_sidecar import (
    read_calibration_sidecar,
    remove_calibration_sidecar,
    write_calibration_sidecar,
)
from stemforge.datasets.io.hdf5 import open_h5

CSV_HEADER = ",".join(COLUMNS)
GROUP = "braggpeaks"
VERSION = 1
VERSION_ATTR = "stemforge_braggpeaks_version"
#: What :func:`write_braggpeaks` writes: format name → (extensions, description).
PEAK_FORMATS: dict[str, tuple[tuple[str, ...], str]] = {
    "csv": ((".csv",), f"CSV with the header {CSV_HEADER}"),
    "hdf5": ((".h5", ".hdf5"), f"HDF5, the columns as 1-D datasets in group '{GROUP}'"),
    "py4dstem": ((".emd", ".h5", ".hdf5"), "py4DSTEM 0.14 BraggVectors (EMD 1.0)"),
}
_HDF5 = (".h5", ".hdf5", ".emd")
RAW_NOTE = "raw detector pixels (qx along axis -2, qy along axis -1, first pixel 0)"


@dataclass(frozen=True)
class BraggPeaksFile:
    """What :func:`read_braggpeaks_file` found in a peak file.

    Attributes
    ----------
    peaks
        The table, positions exactly as stored.
    calibration
        The calibration stored with the peaks (HDF5 attribute, CSV sidecar, py4DSTEM
        calibration group), or None. For py4DSTEM 0.13 calibrated lists it is the identity
        calibration of their frame (1 Å⁻¹ per unit, origin 0).
    format
        'csv', 'hdf5', 'py4dstem' (0.14 BraggVectors) or 'py4dstem-0.13'.
    group
        HDF5 path of the table read ('' for CSV).
    calibrated
        True when the positions are py4DSTEM-calibrated values rather than raw pixels.
    note
        The frame and units of ``qx, qy``.
    """

    peaks: BraggPeaks
    calibration: Calibration | None
    format: str
    group: str
    calibrated: bool
    note: str


def _formats_help() -> str:
    return "; ".join(f"{'/'.join(ext)}: {desc}" for ext, desc in PEAK_FORMATS.values())


def _output_format(path: Path, format: str | None) -> str:
    suffix = path.suffix.lower()
    if format is None:
        by_suffix = {".csv": "csv", ".h5": "hdf5", ".hdf5": "hdf5", ".emd": "py4dstem"}
        if suffix in by_suffix:
            return by_suffix[suffix]
        raise FileFormatError(
            f"cannot write Bragg peaks to {path}: unknown output type {suffix or '(no extension)'!r}",
            f"use one of {_formats_help()}",
        )
    if format not in PEAK_FORMATS:
        raise ConfigurationError(
            f"unknown Bragg peak format {format!r}", f"use one of {sorted(PEAK_FORMATS)}"
        )
    if suffix not in PEAK_FORMATS[format][0]:
        raise FileFormatError(
            f"format {format!r} cannot be written to a {suffix or 'extension-less'} file ({path})",
            f"name the file with one of {', '.join(PEAK_FORMATS[format][0])}",
        )
    return format


def _check_origin(peaks: BraggPeaks, calibration: Calibration | None) -> None:
    if (
        calibration is not None
        and isinstance(calibration.qx0, np.ndarray)
        and calibration.qx0.shape != peaks.scan_shape
    ):
        raise ShapeError(
            f"the calibration origin has shape {calibration.qx0.shape} but the peaks' scan is "
            f"{peaks.scan_shape}",
            "pass the calibration of the datacube the peaks were found in",
        )


def _write_csv(peaks: BraggPeaks, tmp: Path) -> None:
    ints = zip(peaks.rx.tolist(), peaks.ry.tolist(), strict=True)
    floats = zip(peaks.qx.tolist(), peaks.qy.tolist(), peaks.intensity.tolist(), strict=True)
    with open(tmp, "w", encoding="utf-8", newline="\n") as out:
        out.write(CSV_HEADER + "\n")
        # repr of a Python float is the shortest string that reads back to the same bits
        out.writelines(
            f"{rx},{ry},{qx!r},{qy!r},{i!r}\n"
            for (rx, ry), (qx, qy, i) in zip(ints, floats, strict=True)
        )


def _write_hdf5(peaks: BraggPeaks, tmp: Path, calibration: Calibration | None) -> None:
    import h5py

    # v108: dense attribute storage, so a per-pattern origin in the calibration JSON fits
    with h5py.File(tmp, "w", libver="v108") as f:
        group = f.create_group(GROUP)
        for name, column in peaks.columns().items():
            group.create_dataset(name, data=column)
        group.attrs[VERSION_ATTR] = VERSION
        group.attrs["scan_shape"] = np.array(peaks.scan_shape, np.int64)
        group.attrs["detector_shape"] = np.array(peaks.detector_shape, np.int64)
        group.attrs["q_units"] = "pixels"
        if calibration is not None:
            group.attrs["calibration"] = calibration.to_json()


def write_braggpeaks(
    peaks: BraggPeaks,
    path: str | Path,
    *,
    overwrite: bool = False,
    calibration: Calibration | None = None,
    format: str | None = None,
) -> Path:
    """Write a Bragg peak table to ``.csv``, ``.h5``/``.hdf5`` or ``.emd`` (py4DSTEM).

    The file appears complete under its name or not at all (written under a temporary name,
    then renamed).

    Parameters
    ----------
    peaks
        The table (raw detector pixels).
    path
        Output file; its extension picks the format unless ``format`` is given.
    overwrite
        Replace an existing file; by default an existing file is an error.
    calibration
        Stored with the peaks: an attribute (HDF5), py4DSTEM's calibration group (``.emd``)
        or the sidecar ``FILE.calibration.json`` (CSV).
    format
        'csv', 'hdf5' or 'py4dstem' (e.g. a py4DSTEM file named ``.h5``).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileFormatError
        For an extension that does not fit the format.
    ConfigurationError
        If ``path`` exists and ``overwrite`` is False, or for an unknown ``format``.
    ShapeError
        If a per-pattern origin in ``calibration`` does not match the scan.
    """
    if not isinstance(peaks, BraggPeaks):
        raise ConfigurationError(
            f"write_braggpeaks takes a BraggPeaks, got {type(peaks).__name__}",
            "build one with BraggPeaks.from_columns or BraggPeaks.from_patterns",
        )
    path = Path(path)
    kind = _output_format(path, format)
    _check_origin(peaks, calibration)
    with atomic_output(path, overwrite=overwrite) as tmp:
        if kind == "csv":
            _write_csv(peaks, tmp)
        elif kind == "hdf5":
            _write_hdf5(peaks, tmp, calibration)
        else:
            write_py4dstem_peaks(peaks, tmp, calibration)
    if kind == "csv" and calibration is not None:
        write_calibration_sidecar(path, calibration)
    else:  # a stale sidecar of an older file of that name would be read back with this one
        remove_calibration_sidecar(path)
    return path


# ---- reading ---------------------------------------------------------------------------------
def _infer_shapes(
    cols: dict[str, np.ndarray],
    scan_shape: tuple[int, int] | None,
    detector_shape: tuple[int, int] | None,
    path: Path,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes for a table that stores none: the arguments, else the smallest that fit."""
    if len(cols["rx"]) == 0 and (scan_shape is None or detector_shape is None):
        raise ShapeError(
            f"{path} holds no peaks, so its scan and detector shapes cannot be inferred",
            "pass scan_shape and detector_shape",
        )

    def top(name: str) -> float:  # NaN and inf are reported by BraggPeaks, not here
        col = np.asarray(cols[name], dtype=np.float64)
        return float(np.max(col[np.isfinite(col)], initial=0.0))

    if scan_shape is None:
        scan_shape = (int(top("rx")) + 1, int(top("ry")) + 1)
    if detector_shape is None:
        detector_shape = (max(math.floor(top("qx")) + 1, 1), max(math.floor(top("qy")) + 1, 1))
    return scan_shape, detector_shape


def _check_stored(
    name: str, given: tuple[int, int] | None, stored: tuple[int, int], path: Path
) -> None:
    if given is not None and tuple(given) != tuple(stored):
        raise ShapeError(
            f"{path} stores {name} {tuple(stored)} but {tuple(given)} was asked for",
            f"leave {name} out to use the file's own",
        )


def _build(cols: dict[str, Any], scan: Any, detector: Any, path: Path) -> BraggPeaks:
    try:
        return BraggPeaks.from_columns(**cols, scan_shape=scan, detector_shape=detector)
    except StemforgeError as err:  # name the file in the message
        raise type(err)(f"{path}: {err.problem}", err.fix) from None


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    header = lines[0].strip() if lines else ""
    if header != CSV_HEADER:
        found = [c.strip() for c in header.split(",")] if header else []
        missing = [c for c in COLUMNS if c not in found]
        raise FileFormatError(
            f"{path} is not a Bragg peak CSV: its header is {header!r}"
            + (f" (missing columns: {', '.join(missing)})" if missing else ""),
            f"give a CSV whose first line is exactly {CSV_HEADER}",
        )
    if len(lines) > 1 and not text.endswith("\n"):
        raise FileFormatError(
            f"{path} does not end with a newline: its last row {lines[-1]!r} may be cut off",
            "write the file again (a complete peak CSV ends with a newline)",
        )
    rows = [line for line in lines[1:] if line.strip()]
    if not rows:
        return {name: np.zeros(0) for name in COLUMNS}
    try:
        table = np.loadtxt(rows, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise FileFormatError(
            f"{path} has a malformed row ({err})",
            f"every row needs {len(COLUMNS)} numbers: {CSV_HEADER}",
        ) from None
    if table.shape[1] != len(COLUMNS):
        raise FileFormatError(
            f"{path} has rows of {table.shape[1]} values, expected {len(COLUMNS)}",
            f"every row needs {len(COLUMNS)} numbers: {CSV_HEADER}",
        )
    return dict(zip(COLUMNS, table.T, strict=True))


def _read_stemforge_h5(
    group: Any, scan_shape: Any, detector_shape: Any, path: Path
) -> tuple[BraggPeaks, Calibration | None]:
    version = int(group.attrs.get(VERSION_ATTR, VERSION))
    if version > VERSION:
        raise FileFormatError(
            f"{path} holds Bragg peaks of format version {version}; this stemforge reads {VERSION}",
            "update stemforge",
        )
    missing = [name for name in COLUMNS if name not in group]
    if missing:
        raise FileFormatError(
            f"{path}::{GROUP} lacks the columns {', '.join(missing)}",
            f"store all of {', '.join(COLUMNS)} as 1-D datasets in group '{GROUP}'",
        )
    cols = {name: group[name][()] for name in COLUMNS}
    scan, det = (
        tuple(int(v) for v in group.attrs[k]) if k in group.attrs else None
        for k in ("scan_shape", "detector_shape")
    )
    if scan is not None:
        _check_stored("scan_shape", scan_shape, scan, path)
    if det is not None:
        _check_stored("detector_shape", detector_shape, det, path)
    scan, det = _infer_shapes(cols, scan or scan_shape, det or detector_shape, path)
    calibration = None
    if "calibration" in group.attrs:
        try:
            calibration = Calibration.from_json(group.attrs["calibration"])
        except (ValueError, TypeError) as err:
            raise FileFormatError(
                f"{path}: the calibration stored with the peaks is invalid ({err})",
                "write the file again with a valid calibration",
            ) from None
    return _build(cols, scan, det, path), calibration


def _hdf5_summary(f: Any) -> str:
    return ", ".join(f"{k}/" if hasattr(v, "keys") else k for k, v in f.items()) or "nothing"


def _read_hdf5(
    path: Path, select: str | None, scan_shape: Any, detector_shape: Any
) -> BraggPeaksFile:
    with open_h5(path) as f:
        ours = GROUP in f and hasattr(f[GROUP], "keys")
        if ours and select in (None, GROUP):
            peaks, cal = _read_stemforge_h5(f[GROUP], scan_shape, detector_shape, path)
            return BraggPeaksFile(peaks, cal, "hdf5", GROUP, False, RAW_NOTE)
        lists = find_peak_lists(f)
        if not (ours or lists):
            raise FileFormatError(
                f"{path} holds no Bragg peaks stemforge knows (no '{GROUP}' group, py4DSTEM "
                f"BraggVectors or py4DSTEM 0.13 PointListArray); it contains {_hdf5_summary(f)}",
                f"give a peak file ({_formats_help()})",
            )
        found = pick_peak_list(lists, select)
        if found is None:
            names = [GROUP] * ours + [p.path for p in lists]
            raise FileFormatError(
                f"{path} has no peak table {select!r}", f"choose one of {names} (FILE::GROUP)"
            )
        cols, scan, cal = read_py4dstem_columns(f, found, path)
    _check_stored("scan_shape", scan_shape, scan, path)
    if found.detector_shape is not None:
        _check_stored("detector_shape", detector_shape, found.detector_shape, path)
    _, det = _infer_shapes(cols, scan, found.detector_shape or detector_shape, path)
    peaks = _build(cols, scan, det, path)
    if found.version == "0.14":
        return BraggPeaksFile(peaks, cal, "py4dstem", found.path, False, RAW_NOTE)
    frame = (
        "calibrated: origin-centred, in the calibrated Q units (Å⁻¹ by py4DSTEM's default)"
        if found.calibrated
        else "raw detector pixels"
    )
    note = f"{frame}, as py4DSTEM 0.13 stored them in {found.path}; no detector shape recorded"
    return BraggPeaksFile(peaks, cal, "py4dstem-0.13", found.path, found.calibrated, note)


def _split(path: str | Path) -> tuple[Path, str | None]:
    """``file.h5::group/path`` → (file, 'group/path')."""
    file, _, select = str(path).partition("::")
    return Path(file), select.strip("/") or None


def read_braggpeaks_file(
    path: str | Path,
    *,
    scan_shape: tuple[int, int] | None = None,
    detector_shape: tuple[int, int] | None = None,
) -> BraggPeaksFile:
    """Read a Bragg peak file with its calibration, format and the frame of its positions.

    Parameters
    ----------
    path
        ``.csv``, ``.h5``/``.hdf5``/``.emd`` (stemforge, py4DSTEM 0.14 BraggVectors or
        py4DSTEM 0.13 PointListArray); ``FILE::GROUP`` picks one py4DSTEM peak list.
    scan_shape, detector_shape
        For files that do not store them (CSV, a bare ``braggpeaks`` group, py4DSTEM 0.13
        detector shape). Defaults: the scan shape is ``max + 1`` of ``rx`` and ``ry`` (scan
        positions after the last peak are then lost), the detector shape
        ``floor(max) + 1`` of ``qx`` and ``qy`` (the smallest detector holding every peak,
        at least 1). For files that store them, an argument that disagrees is an error.

    Raises
    ------
    MissingFileError, FileFormatError, ShapeError, InvalidDataError
        For a missing file, an unknown extension, a file that holds no peaks, missing
        columns, a truncated file, shapes that do not fit, or NaN/inf values.
    """
    file, select = _split(path)
    if not file.exists():
        raise MissingFileError(f"{file} does not exist", "check the path to the peak file")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        cols = _read_csv(file)
        scan, det = _infer_shapes(cols, scan_shape, detector_shape, file)
        peaks = _build(cols, scan, det, file)
        return BraggPeaksFile(peaks, read_calibration_sidecar(file), "csv", "", False, RAW_NOTE)
    if suffix in _HDF5:
        return _read_hdf5(file, select, scan_shape, detector_shape)
    raise FileFormatError(
        f"{file}: unknown Bragg peak file type {suffix or '(no extension)'!r}",
        f"use one of {_formats_help()}",
    )


def read_braggpeaks(
    path: str | Path,
    scan_shape: tuple[int, int] | None = None,
    detector_shape: tuple[int, int] | None = None,
) -> BraggPeaks:
    """Read a Bragg peak table (positions as stored); see :func:`read_braggpeaks_file`.

    Use :func:`read_braggpeaks_file` for the calibration stored with the peaks and the frame
    of the positions (py4DSTEM 0.13 files may hold calibrated ones).
    """
    return read_braggpeaks_file(path, scan_shape=scan_shape, detector_shape=detector_shape).peaks
