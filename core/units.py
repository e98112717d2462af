"""Unit conversions: the only place in stemforge that converts between units.

Conventions: real space in Å, reciprocal space in Å⁻¹ (spatial frequency q = 1/d, no 2π),
energies in eV, angles in mrad at the microscope interface. Scattering angle and spatial
frequency are related in the small-angle form θ = λ·q used by abTEM and py4DSTEM.
"""

from __future__ import annotations

import math

import numpy as np

from stemforge.core.errors import CalibrationError

# CODATA 2018
_H = 6.62607015e-34  # Planck constant, J s
_M0 = 9.1093837015e-31  # electron rest mass, kg
_E = 1.602176634e-19  # elementary charge, C
_C = 299792458.0  # speed of light, m/s

#: Canonical unit strings, and the spellings readers meet in files.
R_UNITS = {"A": "A", "Å": "A", "angstrom": "A", "nm": "nm", "pixels": "pixels", "pixel": "pixels", "px": "pixels"}
Q_UNITS = {
    "A^-1": "A^-1",
    "Å^-1": "A^-1",
    "Å⁻¹": "A^-1",
    "1/A": "A^-1",
    "A-1": "A^-1",
    "nm^-1": "nm^-1",
    "1/nm": "nm^-1",
    "mrad": "mrad",
    "pixels": "pixels",
    "pixel": "pixels",
    "px": "pixels",
}


def electron_wavelength(energy: float) -> float:
    """Relativistic electron wavelength.

    Parameters
    ----------
    energy
        Accelerating voltage times e, in eV (e.g. 300e3).

    Returns
    -------
    float
        Wavelength in Å (0.01969 Å at 300 keV).
    """
    if not (energy > 0 and math.isfinite(energy)):
        raise CalibrationError(
            f"electron energy must be a positive number of eV, got {energy!r}",
            "give the beam energy in eV, e.g. 300e3 for 300 kV",
        )
    e_joule = energy * _E
    momentum = math.sqrt(2 * _M0 * e_joule * (1 + e_joule / (2 * _M0 * _C**2)))
    return _H / momentum * 1e10


def mrad_to_inv_angstrom(angle_mrad: float | np.ndarray, energy: float) -> float | np.ndarray:
    """Scattering angle in mrad → spatial frequency in Å⁻¹ (q = θ/λ)."""
    return np.multiply(angle_mrad, 1e-3 / electron_wavelength(energy))


def inv_angstrom_to_mrad(q: float | np.ndarray, energy: float) -> float | np.ndarray:
    """Spatial frequency in Å⁻¹ → scattering angle in mrad (θ = λ·q)."""
    return np.multiply(q, electron_wavelength(energy) * 1e3)


def normalize_r_units(units: str) -> str:
    """Canonical real-space unit string ('A', 'nm' or 'pixels')."""
    try:
        return R_UNITS[units.strip()]
    except KeyError:
        raise CalibrationError(
            f"unknown real-space unit {units!r}", f"use one of {sorted(set(R_UNITS.values()))}"
        ) from None


def normalize_q_units(units: str) -> str:
    """Canonical reciprocal-space unit string ('A^-1', 'nm^-1', 'mrad' or 'pixels')."""
    try:
        return Q_UNITS[units.strip()]
    except KeyError:
        raise CalibrationError(
            f"unknown reciprocal-space unit {units!r}", f"use one of {sorted(set(Q_UNITS.values()))}"
        ) from None


def r_to_angstrom(value: float, units: str) -> float:
    """A real-space length in 'A' or 'nm' → Å."""
    units = normalize_r_units(units)
    if units == "pixels":
        raise CalibrationError("real-space size is in pixels, not a length", "calibrate R first")
    return value * 10.0 if units == "nm" else value


def q_to_inv_angstrom(value: float, units: str, energy: float | None = None) -> float:
    """A reciprocal-space size in 'A^-1', 'nm^-1' or 'mrad' → Å⁻¹ ('mrad' needs the energy)."""
    units = normalize_q_units(units)
    if units == "A^-1":
        return value
    if units == "nm^-1":
        return value / 10.0
    if units == "mrad":
        if energy is None:
            raise CalibrationError(
                "converting mrad to Å⁻¹ needs the beam energy, which is not set",
                "set the energy (eV) in the calibration, e.g. --energy 300e3",
            )
        return float(mrad_to_inv_angstrom(value, energy))
    raise CalibrationError("reciprocal-space size is in pixels, not a frequency", "calibrate Q first")


# ---- unit spellings found in files ---------------------------------------------------------
# Files write units in many spellings ('nm', '1 / nm', 'Å', 'µm', '[n_m^-1]'...); these map a
# spelling onto the units above, with factors for the few that stemforge never uses itself.

#: Length spellings core does not know → (unit core knows, factor to it).
_EXTRA_LENGTHS = {"um": ("nm", 1e3), "pm": ("A", 1e-2), "m": ("nm", 1e9)}
#: Same for reciprocal lengths and angles.
_EXTRA_RECIPROCAL = {
    "um^-1": ("nm^-1", 1e-3),
    "pm^-1": ("A^-1", 1e2),
    "m^-1": ("nm^-1", 1e-9),
    "rad": ("mrad", 1e3),
}
_PIXELS = ("", "1", "px", "pixel", "pixels", "<undefined>", "undefined", "none")


def _spelling(unit: object) -> str:
    text = "" if unit is None else str(unit)
    text = text.strip().strip("[]").replace(" ", "").replace("_", "")
    text = text.replace("\u03bc", "u").replace("\u00b5", "u")  # Greek mu and micro sign
    if text.startswith("1/"):
        text = f"{text[2:]}^-1"
    elif text.endswith("-1") and "^" not in text:
        text = f"{text[:-2]}^-1"
    return text.replace("Å", "A").replace("angstrom", "A")


def length_to_angstrom(scale: float, unit: object) -> tuple[float, str]:
    """A real-space step in any length unit → ``(step in Å, 'A')``.

    Unknown or dimensionless units give ``(1.0, 'pixels')``: the axis is uncalibrated.
    """
    text = _spelling(unit)
    if text.lower() in _PIXELS:
        return 1.0, "pixels"
    if text in _EXTRA_LENGTHS:
        text, factor = _EXTRA_LENGTHS[text]
        scale = scale * factor
    if text not in ("A", "nm"):
        return 1.0, "pixels"
    return float(r_to_angstrom(float(scale), text)), "A"


def reciprocal_to_calibration(scale: float, unit: object) -> tuple[float, str]:
    """A detector step in a reciprocal length or angle → ``(step, 'A^-1' or 'mrad')``.

    Unknown units (including lengths on a viewing screen, as blockfiles store) give
    ``(1.0, 'pixels')``.
    """
    text = _spelling(unit)
    if text in _EXTRA_RECIPROCAL:
        text, factor = _EXTRA_RECIPROCAL[text]
        scale = scale * factor
    if text == "mrad":
        return float(scale), "mrad"
    if text not in ("A^-1", "nm^-1"):
        return 1.0, "pixels"
    return float(q_to_inv_angstrom(float(scale), text)), "A^-1"
