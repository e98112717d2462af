"""Calibration sidecars: ``FILE.calibration.json`` next to data that cannot hold one."""

from __future__ import annotations

from pathlib import Path

from stemforge.core.atomic import atomic_output
from stemforge.core.calibration import Calibration
from stemforge.core.errors import FileFormatError

SIDECAR_SUFFIX = ".calibration.json"


def sidecar_path(data_path: str | Path) -> Path:
    """Where the sidecar of ``data_path`` lives: ``f"{data_path}.calibration.json"``."""
    return Path(f"{data_path}{SIDECAR_SUFFIX}")


def read_calibration_sidecar(data_path: str | Path) -> Calibration | None:
    """The calibration stored next to ``data_path``, or None when there is no sidecar.

    Raises
    ------
    FileFormatError
        If the sidecar exists but is not a valid calibration.
    """
    path = sidecar_path(data_path)
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, AttributeError) as err:  # bad JSON, bad fields, bad values
        raise FileFormatError(
            f"calibration sidecar {path} is not a valid calibration ({err})",
            f"fix or delete {path.name}, then calibrate again (stemforge calibrate)",
        ) from None


def write_calibration_sidecar(data_path: str | Path, calibration: Calibration) -> Path:
    """Write (or replace) the sidecar of ``data_path`` atomically and return its path."""
    path = sidecar_path(data_path)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(calibration.to_json(), encoding="utf-8")
    return path


def remove_calibration_sidecar(data_path: str | Path) -> None:
    """Delete the sidecar of ``data_path`` if there is one (it would shadow newer data)."""
    sidecar_path(data_path).unlink(missing_ok=True)
