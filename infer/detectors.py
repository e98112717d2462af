"""Virtual detectors: geometry, parsing of detector specs, and mask rendering.

A detector is defined relative to the origin (the unscattered beam), in detector pixels,
so the same detector can sit at one fixed origin or follow a per-pattern origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.errors import ConfigurationError, FileFormatError, MissingFileError, ShapeError

#: Units in which detector radii may be given on the command line.
RADIUS_UNITS = ("px", "mrad", "A^-1")


@dataclass(frozen=True)
class Detector:
    """A virtual detector.

    Parameters
    ----------
    name
        Label used in output file names ('bf', 'adf', 'annulus_10-40px', ...).
    r_inner, r_outer
        Radii in detector pixels of the annulus ``r_inner <= |q - c| < r_outer`` (a disk
        has ``r_inner = 0``); ``c`` is the origin plus ``offset``.
    offset
        Centre of the detector relative to the origin, pixels (qx, qy).
    mask
        An explicit ``(Qx, Qy)`` weight mask instead of a geometric shape; it is defined
        for the origin ``mask_origin`` and moved by whole pixels when the origin moves.
    mask_origin
        Origin (qx, qy) for which ``mask`` was drawn.
    """

    name: str
    r_inner: float = 0.0
    r_outer: float = math.inf
    offset: tuple[float, float] = (0.0, 0.0)
    mask: np.ndarray | None = None
    mask_origin: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.mask is None and not (0 <= self.r_inner < self.r_outer):
            raise ConfigurationError(
                f"detector {self.name!r}: radii {self.r_inner}, {self.r_outer} do not make an annulus",
                "give 0 <= inner radius < outer radius",
            )

    def render(self, shape: tuple[int, int], origins: np.ndarray) -> np.ndarray:
        """Masks for ``n`` origins: ``(n, Qx, Qy)`` float32.

        A pixel belongs to a geometric detector when its centre lies inside it; pixel
        ``(i, j)`` has its centre at ``(i, j)``.
        """
        origins = np.atleast_2d(np.asarray(origins, float))
        if self.mask is not None:
            return np.stack([self._shifted_mask(shape, o) for o in origins])
        qx = np.arange(shape[0], dtype=np.float32)
        qy = np.arange(shape[1], dtype=np.float32)
        cx = (origins[:, 0] + self.offset[0]).astype(np.float32)
        cy = (origins[:, 1] + self.offset[1]).astype(np.float32)
        r2 = (qx[None, :, None] - cx[:, None, None]) ** 2 + (qy[None, None, :] - cy[:, None, None]) ** 2
        return ((r2 >= self.r_inner**2) & (r2 < self.r_outer**2)).astype(np.float32)

    def _shifted_mask(self, shape: tuple[int, int], origin: np.ndarray) -> np.ndarray:
        if self.mask.shape != shape:
            raise ShapeError(
                f"mask {self.name!r} has shape {self.mask.shape}, the patterns are {shape}",
                "draw the mask on the detector grid of this datacube",
            )
        ref = self.mask_origin if self.mask_origin is not None else origin
        sx, sy = (int(round(o - r)) for o, r in zip(origin, ref, strict=True))
        out = np.zeros(shape, np.float32)
        src = self.mask[max(0, -sx) : shape[0] - max(0, sx), max(0, -sy) : shape[1] - max(0, sy)]
        out[max(0, sx) : max(0, sx) + src.shape[0], max(0, sy) : max(0, sy) + src.shape[1]] = src
        return out


def pixels_per_unit(units: str, calibration: Calibration) -> float:
    """Detector pixels per one ``units`` ('px', 'mrad' or 'A^-1')."""
    if units == "px":
        return 1.0
    if calibration.q_units == "pixels":
        raise ConfigurationError(
            f"detector radii are in {units} but the datacube's Q pixel size is not calibrated",
            "give radii in px, or calibrate Q (stemforge calibrate --known-spacing ...)",
        )
    if units == "mrad":
        return 1.0 / calibration.q_pixel_size_mrad
    if units == "A^-1":
        return 1.0 / calibration.q_pixel_size_inv_angstrom
    raise ConfigurationError(f"unknown radius unit {units!r}", f"use one of {RADIUS_UNITS}")


def _numbers(spec: str, args: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        values = []
    if len(values) != count or not all(map(math.isfinite, values)):
        raise ConfigurationError(
            f"detector spec {spec!r} needs {count} comma-separated numbers",
            "e.g. annulus:20,60 or circle:12.5,0,4 or bf:8",
        )
    return values


def parse_detector(
    spec: str,
    *,
    units: str = "px",
    calibration: Calibration | None = None,
    bf_radius: float | None = None,
    max_radius: float | None = None,
) -> Detector:
    """Turn a command-line detector spec into a :class:`Detector` (radii in pixels).

    Parameters
    ----------
    spec
        ``bf`` or ``bf:R`` (disk on the origin), ``adf`` or ``adf:R0,R1``, ``annulus:R0,R1``,
        ``circle:QX,QY,R`` (a disk centred QX, QY from the origin) or a path to a ``.npy``
        mask of the detector's shape.
    units
        Units of the numbers in ``spec``: 'px', 'mrad' or 'A^-1'.
    calibration
        Needed to convert mrad or Å⁻¹ to pixels.
    bf_radius
        Radius (pixels) of the bright-field disk, used by bare ``bf`` and ``adf``.
    max_radius
        Largest radius (pixels) on the detector, the default outer edge of ``adf``.
    """
    spec = spec.strip()
    if spec.endswith(".npy"):
        path = Path(spec)
        if not path.is_file():
            raise MissingFileError(f"mask file {path} does not exist", "check the path to the .npy mask")
        try:
            mask = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise FileFormatError(f"cannot read mask {path}: {exc}", "save the mask with numpy.save") from exc
        if mask.ndim != 2 or not np.all(np.isfinite(mask)):
            raise ShapeError(f"mask {path} must be a finite 2D array, got shape {mask.shape}", "save a (Qx, Qy) mask")
        return Detector(name=path.stem, mask=mask.astype(np.float32))

    kind, _, args = spec.partition(":")
    kind = kind.lower()
    scale = pixels_per_unit(units, calibration or Calibration()) if args else 1.0
    tag = f"{args.replace(',', '-')}{units.replace('^-1', '-1')}" if args else ""
    if kind == "bf":
        radius = _numbers(spec, args, 1)[0] * scale if args else bf_radius
        if radius is None:
            raise ConfigurationError("bf needs the bright-field disk radius", "give it as bf:R")
        return Detector(name="bf", r_outer=radius)
    if kind == "adf":
        if args:
            r0, r1 = (v * scale for v in _numbers(spec, args, 2))
        elif bf_radius is None or max_radius is None:
            raise ConfigurationError("adf needs its radii", "give them as adf:R0,R1")
        else:
            r0, r1 = 2.0 * bf_radius, max_radius
        return Detector(name="adf", r_inner=r0, r_outer=r1)
    if kind == "annulus":
        r0, r1 = (v * scale for v in _numbers(spec, args, 2))
        return Detector(name=f"annulus_{tag}", r_inner=r0, r_outer=r1)
    if kind == "circle":
        qx, qy, r = (v * scale for v in _numbers(spec, args, 3))
        return Detector(name=f"circle_{tag}", r_outer=r, offset=(qx, qy))
    raise ConfigurationError(
        f"unknown detector {spec!r}",
        "use bf, bf:R, adf, adf:R0,R1, annulus:R0,R1, circle:QX,QY,R or MASK.npy",
    )

