"""Kinematic electron diffraction with excitation errors: Bragg spot lists for any orientation.

The fast companion of the multislice: no grid, no propagation, just the reciprocal lattice,
the structure factors and the Ewald sphere. It makes the millions of peak lists that crystal
identification trains on and the orientation libraries that pattern matching searches, and
it shares the scattering factors of the multislice (abTEM's parametrisation), so spot
intensities rank as in the simulated patterns.

Physics
-------
For a crystal of conventional cell volume Ω, the Fourier coefficient of its potential at the
reciprocal-lattice vector g(hkl) is

    V_g = (1/Ω) Σ_j f_j(|g|) exp(-2πi (h x_j + k y_j + l z_j)),

with ``f`` the electron scattering factor (V·Å³) and (x, y, z) fractional coordinates. The
beam travels along +z of the lab frame with wavevector k₀ = 1/λ (q = 1/d convention, Å⁻¹).
The excitation error of g, positive inside the Ewald sphere, is

    s_g = (k₀² − |k₀ ẑ + g|²) / (2 k₀) = −g_z − |g|² / (2 k₀).

A slab of thickness t gives the rocking curve |V_g|² t² sinc²(t s_g); a probe of convergence
semiangle α spreads the incident direction, so the intensity integrated over a disk samples
excitation errors within ±|g|α of s_g. Both are folded into one Gaussian shape factor

    I_g = |V_g|² exp(−s_g² / (2 σ_s²)),   σ_s² = (0.44 / t)² + (|g| α / 2)²

(0.44/t is the half width of sinc² at half maximum, ~0.886/t full width). The spot sits
where the diffracted beam crosses the detector, (g_x, g_y) of the lab-frame g: for the
small angles of high-energy electrons this is exact to O(λ|g|)². Intensities are relative;
absolute dynamical intensities need the multislice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError
from stemforge.core.units import electron_wavelength
from stemforge.simulate.labels import potential_coefficients
from stemforge.simulate.virtual_crystal import site_arrays, species_weights

#: Default relative cut: spots weaker than this fraction of the strongest are dropped.
MIN_RELATIVE_INTENSITY = 1e-4


@dataclass(frozen=True)
class ReciprocalLattice:
    """The reflections of one crystal within a sphere, with their structure factors.

    Computed once per structure; every orientation then only rotates ``g``.

    Attributes
    ----------
    hkl
        ``(M, 3)`` integer indices in the structure's cell (000 excluded).
    g
        ``(M, 3)`` reciprocal vectors (Å⁻¹) in the structure's Cartesian frame.
    amplitude
        ``(M,)`` |V_g| (volts).
    lattice
        ``(3, 3)`` real-space lattice vectors (rows, Å).
    """

    hkl: np.ndarray
    g: np.ndarray
    amplitude: np.ndarray
    lattice: np.ndarray


def reciprocal_lattice(
    structure, q_max: float, parametrization: str | Any = "lobato"
) -> ReciprocalLattice:
    """All non-extinct reflections of ``structure`` with ``0 < |g| ≤ q_max``.

    Parameters
    ----------
    structure
        pymatgen ``Structure`` (its cell defines hkl; pass the conventional standard cell to
        index in the usual setting).
    q_max
        Radius of the reciprocal-space sphere (Å⁻¹).
    parametrization
        abTEM parametrisation name or object for the scattering factors.
    """
    if not q_max > 0:
        raise ConfigurationError(f"q_max must be positive, got {q_max}", "use e.g. 2.0 (Å⁻¹)")
    if isinstance(parametrization, str):
        from abtem.parametrizations import validate_parametrization

        parametrization = validate_parametrization(parametrization)
    lattice = np.asarray(structure.lattice.matrix, float)
    reciprocal = np.linalg.inv(lattice).T
    # |h| ≤ q_max |a_i| bounds every index of a vector inside the sphere.
    reach = [math.ceil(q_max * np.linalg.norm(lattice[i])) for i in range(3)]
    axes = [np.arange(-r, r + 1) for r in reach]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    g = hkl @ reciprocal
    length = np.linalg.norm(g, axis=1)
    inside = (length <= q_max) & (length > 0)
    hkl, g, length = hkl[inside], g[inside], length[inside]

    phase = np.asarray(structure.frac_coords, float) @ hkl.T
    vg = potential_coefficients(
        species_weights(*site_arrays(structure)),
        phase,
        length**2,
        parametrization,
        abs(np.linalg.det(lattice)),
    )
    amplitude = np.abs(vg)
    allowed = amplitude > 1e-6 * max(amplitude.max(initial=0.0), 1e-30)
    return ReciprocalLattice(hkl[allowed], g[allowed], amplitude[allowed], lattice)


def excitation_errors(g_lab: np.ndarray, energy: float) -> np.ndarray:
    """Excitation errors s_g (Å⁻¹) of lab-frame reciprocal vectors for a beam along +z."""
    k0 = 1.0 / electron_wavelength(energy)
    return -g_lab[..., 2] - np.sum(g_lab**2, axis=-1) / (2 * k0)


def spot_intensities(
    crystal: ReciprocalLattice,
    g_lab: np.ndarray,
    energy: float,
    thickness: float,
    semiangle: float = 0.0,
    width: np.ndarray | None = None,
) -> np.ndarray:
    """Kinematic intensities of ``crystal``'s reflections rotated to ``g_lab`` ``(..., M, 3)``.

    ``|V_g|²`` times a Gaussian shape factor of the excitation error of width ``width``
    (default :func:`shape_factor_width`; it does not change with the rotation, so loops over
    orientations pass it once computed).
    """
    s = excitation_errors(g_lab, energy)
    if width is None:
        width = shape_factor_width(np.linalg.norm(g_lab, axis=-1), thickness, semiangle)
    return crystal.amplitude**2 * np.exp(-(s**2) / (2 * width**2))


def shape_factor_width(length: np.ndarray, thickness: float, semiangle: float) -> np.ndarray:
    """Width σ_s (Å⁻¹) of the excitation-error shape factor for reflections of ``|g|``.

    ``σ_s² = (0.44/t)² + (|g| α/2)²``: the thickness fringe's central width and the spread
    of incidence directions in a convergent probe of semiangle α (mrad).
    """
    if not thickness > 0:
        raise ConfigurationError(f"thickness must be positive, got {thickness} Å")
    return np.sqrt((0.44 / thickness) ** 2 + (np.asarray(length) * semiangle * 1e-3 / 2) ** 2)


def kinematic_spots(
    crystal: ReciprocalLattice,
    rotation: np.ndarray,
    *,
    energy: float,
    thickness: float,
    semiangle: float = 0.0,
    q_max: float | None = None,
    min_relative_intensity: float = MIN_RELATIVE_INTENSITY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Bragg spots of one orientation.

    Parameters
    ----------
    crystal
        From :func:`reciprocal_lattice`.
    rotation
        ``(3, 3)`` rotation from the crystal's Cartesian frame to the lab frame
        (``g_lab = rotation @ g``), e.g. from
        :func:`stemforge.simulate.orientation.zone_axis_rotation`.
    energy
        Electron energy (eV).
    thickness
        Specimen thickness (Å).
    semiangle
        Probe convergence semiangle (mrad); 0 for a parallel beam.
    q_max
        Keep spots with in-plane |q| ≤ q_max (Å⁻¹); default all.
    min_relative_intensity
        Drop spots weaker than this fraction of the strongest.

    Returns
    -------
    q, intensity, hkl
        ``(N, 2)`` spot positions (Å⁻¹, lab frame), ``(N,)`` intensities (V², relative
        scale) and ``(N, 3)`` indices, strongest first; the direct beam is not included.
    """
    g_lab = crystal.g @ np.asarray(rotation, float).T
    intensity = spot_intensities(crystal, g_lab, energy, thickness, semiangle)
    keep = np.ones(len(intensity), bool)
    if q_max is not None:
        keep &= np.hypot(g_lab[:, 0], g_lab[:, 1]) <= q_max
    if keep.any():
        keep &= intensity >= min_relative_intensity * intensity[keep].max()
    order = np.flatnonzero(keep)[np.argsort(-intensity[keep], kind="stable")]
    return g_lab[order, :2], intensity[order], crystal.hkl[order]


def tilt_rotation(tilt_x: float, tilt_y: float) -> np.ndarray:
    """Rotation of a crystal mistilted by small angles (mrad) about the lab x and y axes."""
    ax, ay = tilt_x * 1e-3, tilt_y * 1e-3
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return ry @ rx


def in_plane_rotation(angle: float | np.ndarray) -> np.ndarray:
    """Rotation ``(..., 3, 3)`` by ``angle`` (radians, counter-clockwise, any shape) about the
    beam (lab z)."""
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack(
        [np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)],
        axis=-2,
    )
