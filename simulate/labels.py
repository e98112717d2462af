"""Exact labels of a simulated pattern, in the output detector's calibration.

Everything is computed from the atoms that were simulated (the oriented, orthogonalised and
possibly strained cell), so labels and pattern agree by construction.

Kinematic structure factors
---------------------------
The target of FCU-Net is an image of |V_g|, the Fourier coefficients of the crystal potential
in the zero-order Laue zone (ZOLZ). Here they are the analytic sum over the atoms of the cell,

    V_g = (1/Ω) Σ_j f_j(|g|) exp(-2πi g·r_j) · exp(-2π² σ_j² |g|²),

with ``f`` the projected scattering factor of the same parametrisation the multislice uses
(for g ⊥ z it equals the 3D form factor), Ω the cell volume and the Debye–Waller factor only
with frozen phonons of rms displacement σ. This is the q_z = 0 term of the FCU-Net recipe
(3D FFT of the slices weighted by exp(-q_z²/2σ_z²), σ_z = 1/20 Å⁻¹); it is exact (no grid),
cheap, puts the peaks exactly where the simulated Bragg disks are, and leaves out the
higher-order Laue zones, whose projections would add spots the pattern does not have at those
positions. |V_g| is in volts and independent of the cell chosen (Si: V_000 ≈ 14 V).

Rendering: each peak is a Gaussian of height |V_g| and σ = ``TARGET_SIGMA`` px at its exact
sub-pixel position; the sampled Gaussian's centroid is unbiased to < 1e-3 px at σ = 0.75.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ase import Atoms

from stemforge.simulate.multislice import DetectorGrid
from stemforge.simulate.orientation import quiet_spglib
from stemforge.simulate.sample import PEAK_DTYPE
from stemforge.simulate.structures.record import crystal_system_of
from stemforge.simulate.virtual_crystal import atoms_species, site_types

#: Width (pixels) of the Gaussian peaks of the target image.
TARGET_SIGMA = 0.75
#: Reflections weaker than this fraction of |V_000| are extinct (numerically zero).
EXTINCTION = 1e-6


def crystal_metadata(structure, symprec: float = 1e-3) -> dict[str, Any]:
    """Formula, space group (spglib), crystal system and conventional lattice of a structure."""
    import spglib

    cell = (structure.lattice.matrix, structure.frac_coords, site_types(structure))
    with quiet_spglib():
        dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
    number = int(dataset.number)
    lattice = structure.lattice
    return {
        "formula": structure.composition.reduced_formula,
        "space_group": number,
        "crystal_system": crystal_system_of(number),
        "lattice": tuple(float(v) for v in (*lattice.abc, *lattice.angles)),
    }


#: Free lattice parameters of each crystal system, as indices into (a, b, c, α, β, γ).
FREE_LATTICE_PARAMETERS = {
    "cubic": (0,),
    "tetragonal": (0, 2),
    "trigonal": (0, 2),
    "hexagonal": (0, 2),
    "orthorhombic": (0, 1, 2),
    "monoclinic": (0, 1, 2, 4),
    "triclinic": (0, 1, 2, 3, 4, 5),
}


def lattice_parameters(lattice, crystal_system: str) -> np.ndarray:
    """(a, b, c, α, β, γ) of a conventional standard cell in the convention of its system.

    Conventions fix what a regression predicts: cubic a = b = c; tetragonal, trigonal and
    hexagonal a = b with c unique (hexagonal axes for rhombohedral lattices, as spglib's
    standard cell has them); orthorhombic a ≤ b ≤ c; monoclinic unique axis b with β ≥ 90°;
    triclinic the Niggli-reduced cell. Lengths in Å, angles in degrees. ``lattice`` is a
    pymatgen ``Lattice`` (``structure.lattice``).
    """
    if crystal_system == "triclinic":
        lattice = lattice.get_niggli_reduced_lattice()
    a, b, c = lattice.abc
    alpha, beta, gamma = lattice.angles
    if crystal_system == "cubic":
        a = b = c = (a + b + c) / 3
    elif crystal_system in ("tetragonal", "trigonal", "hexagonal"):
        a = b = (a + b) / 2
    elif crystal_system == "orthorhombic":
        a, b, c = sorted((a, b, c))
    elif crystal_system == "monoclinic":
        beta = max(beta, 180.0 - beta)
    elif crystal_system != "triclinic":
        raise ValueError(f"unknown crystal system {crystal_system!r}")
    return np.array([a, b, c, alpha, beta, gamma], float)


# ---- kernels --------------------------------------------------------------------------------


def zolz_reflections(
    cell: np.ndarray, supercell: np.ndarray, q_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Conventional reflections of the zero-order Laue zone of a beam-aligned cell.

    Parameters
    ----------
    cell
        ``(3, 3)`` simulated cell (rows), third vector along z.
    supercell
        Integer ``N``: ``cell`` rows are ``N`` times the (deformed) conventional vectors.
    q_max
        Largest |g| wanted (Å⁻¹).

    Returns
    -------
    hkl, g
        ``(M, 3)`` integer indices in the conventional cell and ``(M, 2)`` lab-frame
        reciprocal vectors (Å⁻¹), |g| ≤ q_max, the origin included.
    """
    reciprocal = np.linalg.inv(cell).T
    reach = [math.ceil(q_max * np.linalg.norm(cell[i])) + 1 for i in range(2)]
    m1, m2 = np.meshgrid(
        np.arange(-reach[0], reach[0] + 1), np.arange(-reach[1], reach[1] + 1), indexing="ij"
    )
    m = np.stack([m1.ravel(), m2.ravel(), np.zeros(m1.size, int)], axis=1)
    # cell = N · conventional, so the supercell index of g is m = N h.
    h = np.linalg.solve(supercell.astype(float), m.T.astype(float)).T
    integer = np.all(np.abs(h - np.rint(h)) < 1e-6, axis=1)
    g = (m @ reciprocal)[:, :2]
    keep = integer & (np.hypot(g[:, 0], g[:, 1]) <= q_max)
    return np.rint(h[keep]).astype(int), g[keep]


def potential_coefficients(
    species: list[tuple[int, np.ndarray]],
    phase: np.ndarray,
    g2: np.ndarray,
    parametrization: Any,
    volume: float,
    sigma: dict[int, float] | None = None,
) -> np.ndarray:
    """``V_g = (1/Ω) Σ_j f_j(|g|) exp(-2πi phase_j(g))``, volts, complex.

    Parameters
    ----------
    species
        ``(Z, (N,) weight per atom)`` of every species
        (:func:`~stemforge.simulate.virtual_crystal.species_weights`: 1 on ordered sites,
        occupancies on mixed ones).
    phase
        ``(N, M)`` ``g·r_j`` of every atom and reflection (Cartesian or ``hkl·x`` fractional).
    g2
        ``(M,)`` |g|² (Å⁻²).
    parametrization
        abTEM parametrisation object (the projected factor at in-plane g equals the 3D form
        factor at |g|).
    volume
        Cell volume Ω (Å³).
    sigma
        rms displacement (Å) per atomic number for the Debye–Waller factor; None: static.
    """
    out = np.zeros(len(g2), complex)
    for number, weight in species:
        mask = weight > 0
        form = np.asarray(
            parametrization.projected_scattering_factor(number)(g2.astype(np.float32)), float
        )
        if sigma is not None:
            form = form * np.exp(-2 * np.pi**2 * sigma.get(number, 0.0) ** 2 * g2)
        out += form * (weight[mask, None] * np.exp(-2j * np.pi * phase[mask])).sum(axis=0)
    return out / volume


def structure_factors(
    atoms: Atoms,
    g: np.ndarray,
    parametrization: Any,
    phonon_sigma: float | dict[str, float] | None = None,
) -> np.ndarray:
    """``V_g`` (volts, complex) of a beam-aligned cell at in-plane reciprocal vectors ``g`` (M, 2)."""
    from ase.data import chemical_symbols

    species = atoms_species(atoms)
    sigma = None
    if phonon_sigma is not None:
        sigma = {
            n: phonon_sigma.get(chemical_symbols[n], 0.0)
            if isinstance(phonon_sigma, dict)
            else phonon_sigma
            for n, _ in species
        }
    return potential_coefficients(
        species,
        atoms.positions[:, :2] @ g.T,
        np.sum(g**2, axis=1),
        parametrization,
        abs(np.linalg.det(np.asarray(atoms.cell))),
        sigma,
    )


def render_target(
    positions: np.ndarray, heights: np.ndarray, n: int, sigma: float = TARGET_SIGMA
) -> np.ndarray:
    """Sum of Gaussians of peak value ``heights`` at sub-pixel ``positions`` (M, 2) on an n×n grid."""
    image = np.zeros((n, n))
    radius = math.ceil(4 * sigma)
    offsets = np.arange(-radius, radius + 1)
    for (x, y), height in zip(positions, heights, strict=True):
        ix, iy = int(round(x)) + offsets, int(round(y)) + offsets
        gx = np.exp(-((ix - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((iy - y) ** 2) / (2 * sigma**2))
        okx, oky = (ix >= 0) & (ix < n), (iy >= 0) & (iy < n)
        image[np.ix_(ix[okx], iy[oky])] += height * np.outer(gx[okx], gy[oky])
    return image.astype(np.float32)


def disk_intensities(pattern: np.ndarray, positions: np.ndarray, radius: float) -> np.ndarray:
    """Intensity summed over pixels whose centres lie within ``radius`` px of each position."""
    n0, n1 = pattern.shape
    out = np.zeros(len(positions))
    r = math.ceil(radius) + 1
    for i, (x, y) in enumerate(positions):
        ix = np.arange(max(0, int(x) - r), min(n0, int(x) + r + 2))
        iy = np.arange(max(0, int(y) - r), min(n1, int(y) + r + 2))
        inside = (ix[:, None] - x) ** 2 + (iy[None, :] - y) ** 2 <= radius**2
        out[i] = pattern[np.ix_(ix, iy)][inside].sum()
    return out


def peak_table(
    hkl: np.ndarray, positions: np.ndarray, kinematic: np.ndarray, dynamical: np.ndarray
) -> np.ndarray:
    """A Bragg peak table of :data:`~stemforge.simulate.sample.PEAK_DTYPE`."""
    table = np.zeros(len(hkl), dtype=PEAK_DTYPE)
    table["h"], table["k"], table["l"] = hkl.T
    table["qx"], table["qy"] = positions.T
    table["intensity_kinematic"] = kinematic
    table["intensity_dynamical"] = dynamical
    return table


# ---- orchestration --------------------------------------------------------------------------


class KinematicLabels:
    """The reflections of a simulated cell on a detector, and the images made from them.

    Parameters
    ----------
    atoms
        The simulated cell (beam along z).
    supercell
        Its integer supercell matrix over the conventional cell.
    detector
        Output grid.
    parametrization
        abTEM parametrisation object (as the multislice used).
    phonon_sigma
        rms displacement (Å) for the Debye–Waller factor, None for a static lattice.
    """

    def __init__(
        self,
        atoms: Atoms,
        supercell: np.ndarray,
        detector: DetectorGrid,
        parametrization: Any,
        phonon_sigma: float | dict[str, float] | None = None,
    ):
        self.detector = detector
        hkl, g = zolz_reflections(np.asarray(atoms.cell), supercell, detector.q_reach)
        positions = detector.to_pixels(g)
        # Peaks whose Gaussian reaches the detector count for the target; the table keeps
        # those whose centres are on it.
        edge = 4 * TARGET_SIGMA
        near = np.all((positions > -0.5 - edge) & (positions < detector.n - 0.5 + edge), axis=1)
        hkl, g, positions = hkl[near], g[near], positions[near]
        vg = np.abs(structure_factors(atoms, g, parametrization, phonon_sigma))
        # 000 first, then by |g| and angle: a stable order for tables of any cell.
        allowed = np.flatnonzero(vg > EXTINCTION * vg.max())
        allowed = allowed[
            np.lexsort(
                (np.arctan2(g[allowed, 1], g[allowed, 0]), np.round(np.hypot(*g[allowed].T), 9))
            )
        ]
        self.hkl, self.g = hkl[allowed], g[allowed]
        self.positions, self.amplitudes = positions[allowed], vg[allowed]
        self.on_detector = np.all(
            (self.positions >= -0.5) & (self.positions < detector.n - 0.5), axis=1
        )

    def target(self, sigma: float = TARGET_SIGMA) -> np.ndarray:
        """FCU-Net target: Gaussians of height |V_g| (V) at the Bragg positions."""
        return render_target(self.positions, self.amplitudes, self.detector.n, sigma)

    def table(self, pattern: np.ndarray, disk_radius: float) -> np.ndarray:
        """Peak table with dynamical disk intensities measured in ``pattern``.

        ``disk_radius`` (px) is the probe's; intensities are summed within one pixel more, so
        that an isolated disk is captured whole with its edge pixels (overlapping disks share).
        """
        keep = self.on_detector
        dynamical = disk_intensities(pattern, self.positions[keep], disk_radius + 1.0)
        return peak_table(
            self.hkl[keep], self.positions[keep], self.amplitudes[keep] ** 2, dynamical
        )
