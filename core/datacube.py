"""The DataCube: a 4D-STEM array ``(Rx, Ry, Qx, Qy)`` with its calibration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.errors import InvalidDataError, ShapeError


def is_lazy(array: Any) -> bool:
    """True for Dask-backed arrays (checked without importing dask)."""
    return type(array).__module__.startswith("dask")


def require_finite(block: np.ndarray, rx_offset: int = 0, name: str = "datacube") -> None:
    """Raise :class:`InvalidDataError` naming the first scan position with NaN or inf.

    ``block`` is a slab ``(rx, Ry, Qx, Qy)`` of a datacube starting at scan row ``rx_offset``.
    Integer data cannot hold NaN and is not scanned.
    """
    if block.dtype.kind not in "fc":
        return
    good = np.isfinite(block).all(axis=(-2, -1))
    if not good.all():
        rx, ry = np.argwhere(~good)[0]
        raise InvalidDataError(
            f"{name}: {int((~good).sum())} pattern(s) in scan rows {rx_offset}.."
            f"{rx_offset + block.shape[0] - 1} contain NaN or inf, first at (rx={rx + rx_offset}, ry={ry})",
            "replace or mask the bad frames (e.g. numpy.nan_to_num) before the analysis",
        )


def load_block(data: Any, rows: slice, check_name: str | None = None) -> np.ndarray:
    """Scan rows ``rows`` of a datacube array (NumPy, memory map or Dask) as a NumPy array.

    A Dask block is read chunk by chunk into one preallocated array on the calling
    thread, so reading never holds more than the block and one chunk (computing the slice
    would hold its chunks and their concatenation, twice the block), and a cluster worker
    calling this stays on its own thread. With ``check_name`` a block holding NaN or inf
    raises :class:`InvalidDataError` naming the scan position and ``check_name``.
    """
    block = data[rows]
    if is_lazy(block):
        import dask.array as da

        out = np.empty(block.shape, block.dtype)
        da.store(block, out, lock=False, scheduler="synchronous")
        block = out
    block = np.asarray(block)
    if check_name is not None:
        require_finite(block, rows.start or 0, check_name)
    return block


@dataclass
class DataCube:
    """A 4D-STEM datacube.

    Parameters
    ----------
    data
        Array of shape ``(Rx, Ry, Qx, Qy)``: scan x, scan y, detector x, detector y. A NumPy
        array (possibly a memory map) or a Dask array for data larger than memory.
    calibration
        Pixel sizes, energy, origin...; uncalibrated by default.
    name
        A label, usually the file stem.
    source
        The file the data came from, if any.
    metadata
        Free-form metadata read from the file (microscope settings, original tags).
    """

    data: Any
    calibration: Calibration = field(default_factory=Calibration)
    name: str = "datacube"
    source: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not hasattr(self.data, "shape") or not hasattr(self.data, "dtype"):
            self.data = np.asarray(self.data)
        if self.data.ndim != 4:
            raise ShapeError(
                f"a DataCube needs a 4D array (Rx, Ry, Qx, Qy), got shape {tuple(self.data.shape)}",
                "reshape the data, or use DataCube.from_stack for a (N, Qx, Qy) stack of patterns",
            )
        if min(self.data.shape) < 1:
            raise ShapeError(f"datacube shape {tuple(self.data.shape)} has an empty axis", "check the file")
        qx0 = self.calibration.qx0
        if isinstance(qx0, np.ndarray) and qx0.shape != self.scan_shape:
            raise ShapeError(
                f"calibration origin has shape {qx0.shape} but the scan is {self.scan_shape}",
                "recalibrate the origin on this datacube",
            )

    @classmethod
    def from_stack(
        cls, stack: Any, scan_shape: tuple[int, int] | None = None, **kwargs: Any
    ) -> DataCube:
        """Build a datacube from a ``(N, Qx, Qy)`` stack of patterns.

        Parameters
        ----------
        stack
            The patterns, in scan order (ry fastest, as a C-ordered reshape gives).
        scan_shape
            ``(Rx, Ry)`` with ``Rx * Ry == N``; default ``(N, 1)``.
        """
        if stack.ndim != 3:
            raise ShapeError(
                f"a pattern stack must be 3D (N, Qx, Qy), got shape {tuple(stack.shape)}",
                "pass a 3D stack, or build DataCube(data) directly from a 4D array",
            )
        n = stack.shape[0]
        scan_shape = tuple(scan_shape) if scan_shape is not None else (n, 1)
        if len(scan_shape) != 2 or scan_shape[0] * scan_shape[1] != n or min(scan_shape) < 1:
            raise ShapeError(
                f"scan shape {scan_shape} does not hold {n} patterns",
                f"give --scan-shape RX,RY with RX*RY = {n}",
            )
        return cls(stack.reshape(*scan_shape, *stack.shape[1:]), **kwargs)

    # ---- shape ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def scan_shape(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    @property
    def detector_shape(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def is_lazy(self) -> bool:
        return is_lazy(self.data)

    def compute(self) -> DataCube:
        """An in-memory copy (a no-op for NumPy-backed cubes)."""
        if not self.is_lazy:
            return self
        return DataCube(np.asarray(self.data.compute()), self.calibration, self.name, self.source, self.metadata)

    def with_calibration(self, calibration: Calibration) -> DataCube:
        """The same data with another calibration (validated against the scan shape)."""
        return DataCube(self.data, calibration, self.name, self.source, self.metadata)

    # ---- chunked access -------------------------------------------------------------
    def rows_per_block(self, max_bytes: int = 64 * 2**20) -> int:
        """How many scan rows (along Rx) fit in ``max_bytes`` as float32."""
        row_bytes = self.shape[1] * self.shape[2] * self.shape[3] * 4
        return max(1, min(self.shape[0], max_bytes // max(row_bytes, 1)))

    def block_slices(self, max_bytes: int = 64 * 2**20) -> list[slice]:
        """Consecutive slices of scan rows (along Rx), each about ``max_bytes`` as float32."""
        step = self.rows_per_block(max_bytes)
        starts = range(0, self.shape[0], step)
        return [slice(start, min(start + step, self.shape[0])) for start in starts]

    def iter_blocks(
        self, max_bytes: int = 64 * 2**20, check_finite: bool = True
    ) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(rx_slice, block)`` over scan rows, each block in memory.

        Memory stays bounded for memory-mapped and Dask-backed data alike, since only one
        block is materialised at a time. With ``check_finite`` a block holding NaN or inf
        raises :class:`InvalidDataError` naming the scan position.
        """
        for sl in self.block_slices(max_bytes):
            yield sl, load_block(self.data, sl, self.name if check_finite else None)

    def __repr__(self) -> str:
        kind = "lazy" if self.is_lazy else "in memory"
        return f"DataCube(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, {kind})"
