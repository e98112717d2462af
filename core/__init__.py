"""Shared types and contracts: DataCube, Calibration, units, errors and the CLI root.

Kept light on purpose: importing ``stemforge.core`` loads NumPy and nothing heavier.
"""

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import (
    CalibrationError,
    ChecksumError,
    ConfigurationError,
    FileFormatError,
    InvalidDataError,
    MissingFileError,
    ShapeError,
    StemforgeError,
)

__all__ = [
    "BraggPeaks",
    "Calibration",
    "CalibrationError",
    "ChecksumError",
    "ConfigurationError",
    "DataCube",
    "FileFormatError",
    "InvalidDataError",
    "MissingFileError",
    "ShapeError",
    "StemforgeError",
]
