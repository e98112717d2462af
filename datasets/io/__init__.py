"""Datacube readers and writers.

``read_datacube`` opens every format in :data:`SUPPORTED_FORMATS` as a
:class:`~stemforge.core.DataCube` ``(Rx, Ry, Qx, Qy)`` with its calibration (lazily, as a
Dask array chunked over scan positions, when the data exceeds the memory budget);
``write_datacube`` writes ``.npy``, ``.zarr`` and EMD 1.0 ``.h5`` that py4DSTEM opens;
``write_calibration`` stores a calibration inside an EMD file or in a
``FILE.calibration.json`` sidecar, which ``read_datacube`` applies.
"""

from stemforge.datasets.io.braggpeaks_io import (
    PEAK_FORMATS,
    BraggPeaksFile,
    read_braggpeaks,
    read_braggpeaks_file,
    write_braggpeaks,
)
from stemforge.datasets.io.calibration_sidecar import read_calibration_sidecar
from stemforge.datasets.io.dispatch import (
    SUPPORTED_FORMATS,
    read_datacube,
    write_calibration,
    write_datacube,
)
from stemforge.datasets.io.memory import default_memory_budget

__all__ = [
    "PEAK_FORMATS",
    "BraggPeaksFile",
    "SUPPORTED_FORMATS",
    "default_memory_budget",
    "read_braggpeaks",
    "read_braggpeaks_file",
    "read_calibration_sidecar",
    "read_datacube",
    "write_braggpeaks",
    "write_calibration",
    "write_datacube",
]
