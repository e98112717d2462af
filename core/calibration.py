"""Calibration of a datacube: pixel sizes, beam energy, origin, ellipse, QR rotation.

Raw detector coordinates stay raw: the calibration describes how to turn them into
physical ones, and calibrated views are computed from it, never stored in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemforge.core import units
from stemforge.core.errors import CalibrationError


def _positive(name: str, value: float | None, fix: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise CalibrationError(f"{name} must be a positive finite number, got {value!r}", fix)


@dataclass(frozen=True)
class Calibration:
    """How detector and scan pixels map to physical coordinates.

    Parameters
    ----------
    r_pixel_size
        Scan step, in ``r_units``.
    r_units
        'A', 'nm' or 'pixels' (uncalibrated).
    q_pixel_size
        Detector pixel size, in ``q_units``.
    q_units
        'A^-1', 'nm^-1', 'mrad' or 'pixels' (uncalibrated).
    energy
        Beam energy in eV, or None when unknown.
    convergence_semiangle
        Probe convergence semiangle in mrad, or None.
    qx0, qy0
        Origin (position of the unscattered beam) in detector pixels along axes -2 and -1:
        a scalar for the whole scan or an ``(Rx, Ry)`` array, one per pattern.
    ellipse
        ``(a, b, theta)``: semi-axes (any common scale; only a/b matters) and the angle of the
        ``a`` axis from the qx axis in rad, of the elliptical distortion of a circle; None
        when the detector is undistorted.
    qr_rotation
        Rotation of the detector axes relative to the scan axes, rad, counter-clockwise.
    qr_flip
        Whether the detector is mirrored relative to the scan (qx ↔ qy transposed).
    """

    r_pixel_size: float = 1.0
    r_units: str = "pixels"
    q_pixel_size: float = 1.0
    q_units: str = "pixels"
    energy: float | None = None
    convergence_semiangle: float | None = None
    qx0: float | np.ndarray | None = field(default=None, compare=False)
    qy0: float | np.ndarray | None = field(default=None, compare=False)
    ellipse: tuple[float, float, float] | None = None
    qr_rotation: float = 0.0
    qr_flip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "r_units", units.normalize_r_units(self.r_units))
        object.__setattr__(self, "q_units", units.normalize_q_units(self.q_units))
        _positive("r_pixel_size", self.r_pixel_size, "give the scan step as a positive length")
        _positive("q_pixel_size", self.q_pixel_size, "give the detector pixel size as a positive number")
        _positive("energy", self.energy, "give the beam energy in eV, e.g. 300e3")
        _positive(
            "convergence_semiangle", self.convergence_semiangle, "give the semiangle in mrad"
        )
        if (self.qx0 is None) != (self.qy0 is None):
            raise CalibrationError("only one of qx0, qy0 is set", "set both origin coordinates or neither")
        if self.qx0 is not None:
            qx0, qy0 = np.asarray(self.qx0, float), np.asarray(self.qy0, float)
            if qx0.shape != qy0.shape or qx0.ndim not in (0, 2):
                raise CalibrationError(
                    f"origin arrays have shapes {qx0.shape} and {qy0.shape}",
                    "give qx0 and qy0 as scalars or both with the scan shape (Rx, Ry)",
                )
            if not (np.all(np.isfinite(qx0)) and np.all(np.isfinite(qy0))):
                raise CalibrationError("origin contains NaN or inf", "refit the origin, or fill gaps with fit_origin_drift")
            object.__setattr__(self, "qx0", float(qx0) if qx0.ndim == 0 else qx0)
            object.__setattr__(self, "qy0", float(qy0) if qy0.ndim == 0 else qy0)
        if self.ellipse is not None:
            a, b, theta = (float(v) for v in self.ellipse)
            _positive("ellipse a", a, "fit the ellipse again; semi-axes are positive")
            _positive("ellipse b", b, "fit the ellipse again; semi-axes are positive")
            object.__setattr__(self, "ellipse", (a, b, theta))
        if not math.isfinite(self.qr_rotation):
            raise CalibrationError("qr_rotation is not finite", "give the rotation in rad")

    # ---- derived views ------------------------------------------------------------------
    @property
    def q_pixel_size_inv_angstrom(self) -> float:
        """Detector pixel size in Å⁻¹ (converts nm⁻¹ and, with the energy, mrad)."""
        return units.q_to_inv_angstrom(self.q_pixel_size, self.q_units, self.energy)

    @property
    def q_pixel_size_mrad(self) -> float:
        """Detector pixel size in mrad (needs the energy unless already in mrad)."""
        if self.q_units == "mrad":
            return self.q_pixel_size
        if self.energy is None:
            raise CalibrationError(
                "converting Å⁻¹ to mrad needs the beam energy, which is not set",
                "set the energy (eV) in the calibration, e.g. --energy 300e3",
            )
        return float(units.inv_angstrom_to_mrad(self.q_pixel_size_inv_angstrom, self.energy))

    @property
    def r_pixel_size_angstrom(self) -> float:
        """Scan step in Å."""
        return units.r_to_angstrom(self.r_pixel_size, self.r_units)

    @property
    def has_origin(self) -> bool:
        return self.qx0 is not None

    def origin_array(self, scan_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Origin of every pattern as two ``(Rx, Ry)`` arrays (broadcast from a scalar)."""
        if self.qx0 is None:
            raise CalibrationError("the origin is not calibrated", "run `stemforge calibrate FILE` first")
        qx0 = np.broadcast_to(np.asarray(self.qx0, float), scan_shape)
        qy0 = np.broadcast_to(np.asarray(self.qy0, float), scan_shape)
        return qx0, qy0

    def mean_origin(self) -> tuple[float, float]:
        """Scan-averaged origin (qx0, qy0) in pixels."""
        if self.qx0 is None:
            raise CalibrationError("the origin is not calibrated", "run `stemforge calibrate FILE` first")
        return float(np.mean(self.qx0)), float(np.mean(self.qy0))

    def replace(self, **changes: Any) -> Calibration:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (origin arrays become nested lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CalibrationError(
                f"unknown calibration fields {sorted(unknown)}", f"use only {sorted(names)}"
            )
        kw = dict(d)
        for key in ("qx0", "qy0"):
            if isinstance(kw.get(key), list):
                kw[key] = np.asarray(kw[key], float)
        if kw.get("ellipse") is not None:
            kw["ellipse"] = tuple(kw["ellipse"])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        return cls.from_dict(json.loads(text))

    def summary(self) -> dict[str, str]:
        """Human-readable key → value lines for ``stemforge info`` and reports."""
        s = {
            "R pixel size": f"{self.r_pixel_size:.6g} {self.r_units}",
            "Q pixel size": f"{self.q_pixel_size:.6g} {self.q_units}",
            "energy": f"{self.energy / 1e3:.6g} keV" if self.energy else "unknown",
        }
        if self.energy and self.q_units != "pixels":
            s["Q pixel size (Å⁻¹ / mrad)"] = (
                f"{self.q_pixel_size_inv_angstrom:.6g} Å⁻¹ / {self.q_pixel_size_mrad:.6g} mrad"
            )
        if self.convergence_semiangle:
            s["convergence semiangle"] = f"{self.convergence_semiangle:.6g} mrad"
        if self.qx0 is not None:
            qx0, qy0 = np.asarray(self.qx0), np.asarray(self.qy0)
            s["origin (qx0, qy0)"] = f"({qx0.mean():.3f}, {qy0.mean():.3f}) px" + (
                f", spread ±({qx0.std():.3f}, {qy0.std():.3f}) px" if qx0.ndim else ""
            )
        else:
            s["origin (qx0, qy0)"] = "not calibrated"
        if self.ellipse is not None:
            a, b, theta = self.ellipse
            s["ellipse"] = f"a/b = {a / b:.5f}, θ = {math.degrees(theta):.2f}°"
        s["QR rotation / flip"] = f"{math.degrees(self.qr_rotation):.3f}° / {self.qr_flip}"
        return s
