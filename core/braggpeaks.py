"""Bragg peaks of a scan: one ragged table with (rx, ry) columns.

Every disk detector (correlation, FCU-Net) returns this type and every consumer (Bragg
vector map, lattice fit, strain, identification, file writers) takes it. Positions stay raw
detector pixels along axes -2 (qx) and -1 (qy), first pixel = 0, not origin-centred; the
calibrated (centred, undistorted, Å⁻¹) view is computed by the analyses from a
``Calibration``.

Rows are kept sorted by scan position (row-major: rx, then ry) with the detection order
preserved inside a position, so the peaks of position ``(rx, ry)`` are one contiguous slice
found through an offsets array, as in a CSR matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemforge.core.errors import InvalidDataError, ShapeError

COLUMNS: tuple[str, ...] = ("rx", "ry", "qx", "qy", "intensity")


def _shape2(name: str, value: Sequence[int]) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ShapeError(
            f"{name} must be two integers, got {value!r}", f"pass {name} as (n0, n1)"
        ) from None
    if a < 1 or b < 1 or (a, b) != tuple(value):
        raise ShapeError(
            f"{name} must be two positive integers, got {value!r}", f"pass {name} as (n0, n1)"
        )
    return a, b


@dataclass(frozen=True, eq=False)
class BraggPeaks:
    """Detected Bragg peaks of every pattern of a scan.

    Build with :meth:`from_columns` or :meth:`from_patterns`, which validate and sort.

    Attributes
    ----------
    rx, ry
        Scan position of each peak (int64).
    qx, qy
        Peak position in detector pixels along axes -2 and -1 (float64, raw).
    intensity
        Peak intensity (float64; correlation height or integrated intensity, per detector).
    scan_shape
        ``(Rx, Ry)``; a stack of N single patterns is ``(N, 1)``.
    detector_shape
        ``(Qx, Qy)`` of the patterns the peaks came from.
    """

    rx: np.ndarray
    ry: np.ndarray
    qx: np.ndarray
    qy: np.ndarray
    intensity: np.ndarray
    scan_shape: tuple[int, int]
    detector_shape: tuple[int, int]

    @classmethod
    def from_columns(
        cls,
        rx: Any,
        ry: Any,
        qx: Any,
        qy: Any,
        intensity: Any,
        scan_shape: Sequence[int],
        detector_shape: Sequence[int],
    ) -> BraggPeaks:
        """Validate the five columns and sort them by scan position (stable).

        Raises
        ------
        ShapeError
            Columns of different lengths or not 1-D, or positions outside the scan.
        InvalidDataError
            NaN or inf positions or intensities.
        """
        scan = _shape2("scan_shape", scan_shape)
        detector = _shape2("detector_shape", detector_shape)
        cols = {
            "rx": np.asarray(rx),
            "ry": np.asarray(ry),
            "qx": np.asarray(qx, dtype=np.float64),
            "qy": np.asarray(qy, dtype=np.float64),
            "intensity": np.asarray(intensity, dtype=np.float64),
        }
        n = cols["rx"].shape
        for col in cols.values():
            if col.ndim != 1 or col.shape != n:
                lengths = ", ".join(f"{k} {v.shape}" for k, v in cols.items())
                raise ShapeError(
                    f"peak columns must be 1-D of one length, got {lengths}",
                    "give one value per peak in each column",
                )
        for name in ("rx", "ry"):
            col = cols[name]
            if col.size and not np.array_equal(col, np.round(col)):
                raise InvalidDataError(
                    f"{name} holds non-integer scan positions", f"give {name} as integers"
                )
            cols[name] = col.astype(np.int64)
        for name in ("qx", "qy", "intensity"):
            if not np.isfinite(cols[name]).all():
                raise InvalidDataError(
                    f"{name} contains NaN or inf", "drop those peaks before building the table"
                )
        if cols["rx"].size and (
            cols["rx"].min() < 0
            or cols["ry"].min() < 0
            or cols["rx"].max() >= scan[0]
            or cols["ry"].max() >= scan[1]
        ):
            raise ShapeError(
                f"peak scan positions fall outside the scan of shape {scan}",
                "check scan_shape (a stack of N patterns is (N, 1))",
            )
        order = np.argsort(cols["rx"] * scan[1] + cols["ry"], kind="stable")
        return cls(
            **{k: np.ascontiguousarray(v[order]) for k, v in cols.items()},
            scan_shape=scan,
            detector_shape=detector,
        )

    @classmethod
    def from_patterns(
        cls,
        tables: Iterable[Any],
        scan_shape: Sequence[int],
        detector_shape: Sequence[int],
    ) -> BraggPeaks:
        """Assemble per-pattern tables given in row-major scan order.

        Parameters
        ----------
        tables
            One ``(n_i, 3)`` array of ``qx, qy, intensity`` per scan position, ``Rx·Ry`` of
            them, position ``(rx, ry)`` at index ``rx·Ry + ry``.
        """
        scan = _shape2("scan_shape", scan_shape)
        arrays = [np.asarray(t, dtype=np.float64).reshape(-1, 3) for t in tables]
        if len(arrays) != scan[0] * scan[1]:
            raise ShapeError(
                f"got {len(arrays)} peak tables for a scan of shape {scan}",
                "give one table per scan position",
            )
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        flat = np.repeat(np.arange(len(arrays)), counts)
        stacked = np.concatenate(arrays) if arrays else np.zeros((0, 3))
        return cls.from_columns(
            flat // scan[1],
            flat % scan[1],
            stacked[:, 0],
            stacked[:, 1],
            stacked[:, 2],
            scan,
            detector_shape,
        )

    @classmethod
    def empty(cls, scan_shape: Sequence[int], detector_shape: Sequence[int]) -> BraggPeaks:
        """A table with no peaks."""
        return cls.from_columns([], [], [], [], [], scan_shape, detector_shape)

    def __len__(self) -> int:
        return int(self.rx.size)

    def __repr__(self) -> str:
        return (
            f"BraggPeaks({len(self)} peaks, scan {self.scan_shape}, detector {self.detector_shape})"
        )

    @property
    def offsets(self) -> np.ndarray:
        """``(Rx·Ry + 1,)`` start index of each position's rows (row-major), CSR style."""
        flat = self.rx * self.scan_shape[1] + self.ry
        return np.searchsorted(flat, np.arange(self.scan_shape[0] * self.scan_shape[1] + 1))

    def counts(self) -> np.ndarray:
        """``(Rx, Ry)`` number of peaks at each position."""
        flat = self.rx * self.scan_shape[1] + self.ry
        return np.bincount(flat, minlength=self.scan_shape[0] * self.scan_shape[1]).reshape(
            self.scan_shape
        )

    def at(self, rx: int, ry: int) -> np.ndarray:
        """``(n, 3)`` array of ``qx, qy, intensity`` of the peaks at one position."""
        if not (0 <= rx < self.scan_shape[0] and 0 <= ry < self.scan_shape[1]):
            raise ShapeError(
                f"position ({rx}, {ry}) is outside the scan {self.scan_shape}",
                "pick a position inside the scan",
            )
        flat = self.rx * self.scan_shape[1] + self.ry
        key = rx * self.scan_shape[1] + ry
        lo, hi = np.searchsorted(flat, [key, key + 1])
        return np.stack([self.qx[lo:hi], self.qy[lo:hi], self.intensity[lo:hi]], axis=1)

    def columns(self) -> dict[str, np.ndarray]:
        """The five columns by name, in :data:`COLUMNS` order."""
        return {name: getattr(self, name) for name in COLUMNS}

    def select(self, keep: Any) -> BraggPeaks:
        """The rows where the boolean ``keep`` (one value per peak) is True."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != self.rx.shape:
            raise ShapeError(
                f"keep has shape {keep.shape}, expected {self.rx.shape}", "give one flag per peak"
            )
        cols = {k: v[keep] for k, v in self.columns().items()}
        return BraggPeaks(**cols, scan_shape=self.scan_shape, detector_shape=self.detector_shape)

    def centered(self, qx0: Any, qy0: Any) -> tuple[np.ndarray, np.ndarray]:
        """Peak positions relative to the origin of their own pattern, in pixels.

        Parameters
        ----------
        qx0, qy0
            Origin as scalars or ``(Rx, Ry)`` arrays (e.g. ``Calibration.origin_array``).
        """
        x0 = np.broadcast_to(np.asarray(qx0, dtype=np.float64), self.scan_shape)
        y0 = np.broadcast_to(np.asarray(qy0, dtype=np.float64), self.scan_shape)
        return self.qx - x0[self.rx, self.ry], self.qy - y0[self.rx, self.ry]

    @staticmethod
    def concatenate(parts: Sequence[BraggPeaks]) -> BraggPeaks:
        """Join tables of one scan (e.g. from chunks of scan positions)."""
        if not parts:
            raise ShapeError("no peak tables to join", "pass at least one BraggPeaks")
        first = parts[0]
        for p in parts[1:]:
            if p.scan_shape != first.scan_shape or p.detector_shape != first.detector_shape:
                raise ShapeError(
                    f"cannot join peaks of scan {p.scan_shape}/detector {p.detector_shape} with "
                    f"{first.scan_shape}/{first.detector_shape}",
                    "join tables of the same datacube only",
                )
        cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in COLUMNS}
        return BraggPeaks.from_columns(
            **cols, scan_shape=first.scan_shape, detector_shape=first.detector_shape
        )
