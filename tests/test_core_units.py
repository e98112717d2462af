"""Unit conversions against tabulated relativistic electron wavelengths."""

import numpy as np
import pytest

from stemforge.core import units
from stemforge.core.errors import CalibrationError


@pytest.mark.parametrize(
    ("energy", "wavelength"),
    # Tabulated relativistic wavelengths (Williams & Carter, Table 1.2), in Å.
    [(100e3, 0.03701), (200e3, 0.02508), (300e3, 0.01969), (80e3, 0.04176)],
)
def test_wavelength_matches_tables(energy, wavelength):
    assert units.electron_wavelength(energy) == pytest.approx(wavelength, abs=5e-6)


def test_mrad_and_inverse_angstrom_are_inverse():
    q = np.array([0.1, 0.5, 1.0])
    theta = units.inv_angstrom_to_mrad(q, 300e3)
    # At 300 keV, 1 Å⁻¹ is λ·1e3 = 19.69 mrad.
    assert theta[2] == pytest.approx(19.687, abs=1e-3)
    np.testing.assert_allclose(units.mrad_to_inv_angstrom(theta, 300e3), q, rtol=1e-12)


@pytest.mark.parametrize("energy", [0, -5, float("nan"), float("inf")])
def test_bad_energy_is_a_clear_error(energy):
    with pytest.raises(CalibrationError, match="energy"):
        units.electron_wavelength(energy)


def test_q_conversions():
    assert units.q_to_inv_angstrom(1.0, "nm^-1") == pytest.approx(0.1)
    assert units.q_to_inv_angstrom(2.0, "mrad", 300e3) == pytest.approx(2e-3 / 0.019687, rel=1e-4)
    with pytest.raises(CalibrationError, match="energy"):
        units.q_to_inv_angstrom(2.0, "mrad")
    with pytest.raises(CalibrationError, match="unknown"):
        units.normalize_q_units("furlongs")
    assert units.r_to_angstrom(1.5, "nm") == pytest.approx(15.0)
