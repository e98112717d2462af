"""The stemforge error family.

Every error says what is wrong and how to fix it, so that a user never has to read a
traceback to know what to do next. Each class also derives from the builtin exception a
Python programmer would expect (``FileNotFoundError``, ``ValueError``...), so generic
``except`` clauses keep working.
"""

from __future__ import annotations


class StemforgeError(Exception):
    """Base class: a problem with the input or the configuration, and its fix.

    Parameters
    ----------
    problem
        What is wrong, naming the offending file, value or option.
    fix
        What the user should do about it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


class MissingFileError(StemforgeError, FileNotFoundError):
    """A file or folder that should exist does not."""


class FileFormatError(StemforgeError, ValueError):
    """A file has an unknown extension, is truncated, or is not what its name says."""


class ShapeError(StemforgeError, ValueError):
    """An array has the wrong number of dimensions or a shape that does not fit."""


class InvalidDataError(StemforgeError, ValueError):
    """Data values are unusable (NaN, inf, empty)."""


class CalibrationError(StemforgeError, ValueError):
    """A calibration is impossible (negative pixel size, unknown unit, missing energy)."""


class ConfigurationError(StemforgeError, ValueError):
    """An option or configuration value is invalid."""


class ChecksumError(StemforgeError, ValueError):
    """A downloaded or stored file does not match its recorded checksum."""
