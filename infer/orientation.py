"""Automated crystal orientation mapping (ACOM) by template matching of Bragg spot lists.

Library: for one candidate structure, kinematic spot patterns (with excitation errors, so
the intensities know about small tilts) for beam directions covering the fundamental sector
of the rotations of its Laue group, each at one reference in-plane angle.

Matching: every spot list (template or measured) stands for a polar image, spots drawn as
Gaussians of width σ_q in radius and σ_q/|q| (at least the angular step) in angle, held as
angular Fourier coefficients per radial bin and computed analytically from the spots, so no
image is ever rendered. The correlation of a pattern with a template over all in-plane
rotations is one inverse FFT of a sum over radial bins of coefficient products; batched over
patterns this is one complex matrix product per angular frequency.

Refinement: the best match is polished by maximising the overlap of the measured spots with
the kinematic spots of a continuously rotated crystal (Nelder–Mead over a rotation vector),
so the answer is not bound to the library's grid.

Conventions: a rotation ``U`` maps the crystal's Cartesian frame (that of the conventional
standard cell, pymatgen ``lattice.matrix`` rows) to the lab frame, ``g_lab = U @ g``; lab x
is detector qx (pattern axis 0), y is qy (axis 1), z the beam. The beam direction in crystal
coordinates is ``Uᵀ @ ẑ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.simulate.kinematic import (
    ReciprocalLattice,
    excitation_errors,
    in_plane_rotation,
    reciprocal_lattice,
    shape_factor_width,
    spot_intensities,
)
from stemforge.simulate.orientation import (
    conventional_standard_structure,
    point_group,
    quiet_spglib,
    zone_axes,
)

#: A generic direction (on no symmetry element of any point group): the fundamental sector
#: is the set of directions closer to it than any of their symmetry equivalents.
_REFERENCE = np.array([0.1187, 0.3046, 0.9451]) / np.linalg.norm([0.1187, 0.3046, 0.9451])
#: Spots whose polar factors are held at once.
_SPOT_BLOCK = 20000
#: Radial bins (σ_q apart) each side of a spot that its Gaussian reaches (±4 σ).
_RADIAL_REACH = 4
#: Memory for the correlation of one batch of patterns with the whole library.
_BATCH_BYTES = 128 * 2**20
#: Best templates of the polar correlation re-ranked by the exact spot score.
N_BEST = 8
#: Grid starts are up to a step off in tilt, which changes excitation errors a lot: they are
#: ranked with shape factors this many times wider.
RANK_TILT_TOLERANCE = 3.0
#: Leading candidates refined per pattern ...
N_REFINE = 6
#: ... when their grid score is at least this fraction of the best one's.
REFINE_WITHIN = 0.8
#: Scores a leader's quick refinement may spend (the winner's polish has its own budget).
QUICK_EVALUATIONS = 20
#: Angle steps around each library direction within which reflections are kept for scoring.
NEAR_REACH = 3
#: Low-index zone axes (max |u|, |v|, |w|) always in the library, exactly.
_ZONE_AXIS_INDEX = 3


@dataclass(frozen=True)
class LibrarySettings:
    """How a library is simulated and how spot lists are compared.

    Attributes
    ----------
    energy
        Beam energy (eV).
    q_max
        Spots with in-plane ``|q| ≤ q_max`` (Å⁻¹) take part; at most the detector's reach.
    thickness
        Sample thickness (Å) setting the excitation-error tolerance of the kinematic
        intensities; a thin value keeps spots of directions between grid points alive.
    semiangle
        Probe convergence semiangle (mrad).
    angle_step
        Step (degrees) of the beam-direction grid and of the in-plane correlation.
    sigma_q
        Spot width (Å⁻¹) of the comparison: the tolerance on spot positions.
    intensity_power
        Spot weights are ``intensity ** intensity_power`` (compresses the dynamic range
        and the kinematic-versus-dynamical mismatch).
    min_intensity
        Template spots weaker than this fraction of the strongest are left out: detectors
        do not report them, so a template must not expect them.
    """

    energy: float = 300e3
    q_max: float = 1.5
    thickness: float = 100.0
    semiangle: float = 1.0
    angle_step: float = 2.0
    sigma_q: float = 0.04
    intensity_power: float = 0.25
    min_intensity: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("energy", "q_max", "thickness", "sigma_q", "intensity_power", "min_intensity"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    f"library setting {name} must be positive, got {getattr(self, name)!r}"
                )
        if not 0.1 <= self.angle_step <= 15:
            raise ConfigurationError(
                f"angle_step {self.angle_step!r}° is outside 0.1–15°", "use e.g. 1 or 2 degrees"
            )
        if self.semiangle < 0:
            raise ConfigurationError(f"semiangle must be ≥ 0, got {self.semiangle!r} mrad")

    @property
    def n_angles(self) -> int:
        """In-plane angles of the correlation (even)."""
        return 2 * max(4, round(180.0 / self.angle_step))

    @property
    def radii(self) -> np.ndarray:
        """Centres (Å⁻¹) of the radial bins, one ``sigma_q`` apart."""
        return np.arange(0.0, self.q_max + 2.5 * self.sigma_q, self.sigma_q)


@dataclass(frozen=True)
class OrientationLibrary:
    """Templates of one candidate structure over its fundamental sector of beam directions.

    Attributes
    ----------
    name
        Label of the candidate.
    structure
        Its conventional standard cell (pymatgen ``Structure``): the crystal frame.
    crystal
        Its reflections with structure factors.
    symmetry
        ``(K, 3, 3)`` proper rotations of its Laue group (crystal Cartesian frame): ``U`` and
        ``U @ S`` are the same orientation to diffraction.
    directions
        ``(L, 3)`` beam directions (crystal frame, unit vectors).
    rotations
        ``(L, 3, 3)`` reference orientations: ``rotations[i] @ directions[i] = ẑ``.
    coefficients
        ``(n_k, L, n_r)`` complex conjugate angular Fourier coefficients of the templates.
    norms
        ``(L,)`` their L2 norms.
    near_offsets, near_index
        CSR lists of the reflections that can diffract within :data:`NEAR_REACH` angle
        steps of each direction (any in-plane angle), for cheap exact scoring and refinement.
    settings
        The :class:`LibrarySettings` used.
    """

    name: str
    structure: Any
    crystal: ReciprocalLattice
    symmetry: np.ndarray
    directions: np.ndarray
    rotations: np.ndarray
    coefficients: np.ndarray
    norms: np.ndarray
    near_offsets: np.ndarray
    near_index: np.ndarray
    settings: LibrarySettings

    @property
    def crystal_system(self) -> str:
        """The crystal system of the candidate (from its space group)."""
        from stemforge.simulate.structures.record import crystal_system_of

        with quiet_spglib():
            return crystal_system_of(self.structure.get_space_group_info(symprec=1e-3)[1])

    def __len__(self) -> int:
        return len(self.directions)

    def reflections_near(self, template: int) -> ReciprocalLattice:
        """The reflections that can diffract near template ``template``'s direction."""
        c = self.crystal
        index = self.near_index[self.near_offsets[template] : self.near_offsets[template + 1]]
        return ReciprocalLattice(c.hkl[index], c.g[index], c.amplitude[index], c.lattice)


@dataclass(frozen=True)
class OrientationMatch:
    """Best orientation of each pattern against one library.

    Attributes
    ----------
    rotation
        ``(P, 3, 3)`` crystal → lab rotations (NaN where a pattern has no spots).
    score
        ``(P,)`` overlap of the measured and the kinematic spots at that orientation, the
        cosine of the two spot images (0 … 1; NaN without spots).
    coarse_score
        ``(P,)`` the same for the best library template (before refinement).
    reliability
        ``(P,)`` ``1 − s₂/s₁``: how much better the best candidate fits than the best one
        more than two angle steps away (0: ambiguous, e.g. a half-turn twin).
    n_spots
        ``(P,)`` measured spots that took part.
    """

    rotation: np.ndarray
    score: np.ndarray
    coarse_score: np.ndarray
    reliability: np.ndarray
    n_spots: np.ndarray


# ---- symmetry and the fundamental sector -----------------------------------------------------


def laue_rotations(structure, symprec: float = 1e-3) -> np.ndarray:
    """Proper rotations ``(K, 3, 3)`` of the Laue group of ``structure``'s point group.

    In the Cartesian frame of ``structure`` (pass its conventional standard cell). Friedel's
    law makes a kinematic pattern centrosymmetric, so inversion and the point group's
    improper operations combine into proper ones that leave the pattern set unchanged.
    """
    lattice = np.asarray(structure.lattice.matrix, float)
    fractional = point_group(structure, symprec).astype(float)
    # r = latticeᵀ x, so an operation W on fractional x is latticeᵀ W latticeᵀ⁻¹ on r.
    cartesian = np.einsum("ij,kjl,lm->kim", lattice.T, fractional, np.linalg.inv(lattice.T))
    both = np.concatenate([cartesian, -cartesian])
    proper = both[np.linalg.det(both) > 0]
    return np.unique(np.round(proper, 6), axis=0)


def reduce_directions(directions: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """Each direction's symmetry equivalent inside the fundamental sector."""
    orbit = np.einsum("kij,nj->nki", symmetry, np.asarray(directions, float))
    best = np.argmax(orbit @ _REFERENCE, axis=1)
    return orbit[np.arange(len(orbit)), best]


def _sphere_grid(step: float) -> np.ndarray:
    """Near-uniform unit vectors about ``step`` (radians) apart (a Fibonacci lattice)."""
    n = max(16, math.ceil(4 * math.pi / step**2))
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def fundamental_directions(structure, symmetry: np.ndarray, step: float) -> np.ndarray:
    """Beam directions (crystal frame) covering the fundamental sector ``step`` (deg) apart.

    A near-uniform sphere grid restricted to the sector, plus every zone axis up to index 3
    exactly (the orientations microscopists tilt to, where a grid point would be off by up to
    half a step).
    """
    grid = _sphere_grid(math.radians(step))
    grid = grid[np.all(np.isclose(reduce_directions(grid, symmetry), grid, atol=1e-9), axis=1)]
    lattice = np.asarray(structure.lattice.matrix, float)
    axes = np.asarray(zone_axes(_ZONE_AXIS_INDEX, structure), float) @ lattice
    axes = reduce_directions(axes / np.linalg.norm(axes, axis=1, keepdims=True), symmetry)
    # Grid points closer than a third of a step to a zone axis add nothing but cost.
    near = (grid @ axes.T).max(axis=1) > math.cos(math.radians(step) / 3)
    return np.concatenate([axes, grid[~near]])


def beam_rotations(directions: np.ndarray) -> np.ndarray:
    """Rotations ``(L, 3, 3)`` taking each direction to ``ẑ`` (reference in-plane angle)."""
    z = np.asarray(directions, float)
    helper = np.where(np.abs(z[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    x = helper - (helper * z).sum(1, keepdims=True) * z
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.stack([x, np.cross(z, x), z], axis=1)


def misorientation(a: np.ndarray, b: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """Smallest rotation angle (degrees) between orientations ``a`` and ``b`` ``(..., 3, 3)``.

    Minimised over the symmetry-equivalent forms ``b @ S``; NaN where either is NaN.
    """
    relative = np.swapaxes(np.asarray(a, float), -1, -2) @ np.asarray(b, float)
    traces = np.einsum("...ij,kji->...k", relative, np.asarray(symmetry, float))
    cosine = np.clip((traces.max(axis=-1) - 1) / 2, -1.0, 1.0)
    return np.degrees(np.arccos(cosine))


def zone_axis_indices(rotations: np.ndarray, library: OrientationLibrary) -> np.ndarray:
    """Beam direction ``[uvw]`` (conventional cell, largest |index| 1) in the sector."""
    beam = np.asarray(rotations, float)[..., 2, :]
    shape = beam.shape
    flat = beam.reshape(-1, 3)
    good = np.all(np.isfinite(flat), axis=1)
    out = np.full_like(flat, np.nan)
    if good.any():
        reduced = reduce_directions(flat[good], library.symmetry)
        uvw = reduced @ np.linalg.inv(np.asarray(library.structure.lattice.matrix, float))
        out[good] = uvw / np.abs(uvw).max(axis=1, keepdims=True)
    return out.reshape(shape)


# ---- polar images as angular Fourier coefficients ---------------------------------------------


def polar_coefficients(
    q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray, settings: LibrarySettings
) -> tuple[np.ndarray, np.ndarray]:
    """Angular Fourier coefficients of the polar images of CSR spot lists.

    Parameters
    ----------
    q, intensity, offsets
        ``(N, 2)`` spot positions (Å⁻¹ about the direct beam, which is left out), ``(N,)``
        intensities and ``(P + 1,)`` row pointers.
    settings
        Radial bins, angular resolution, spot width and intensity power.

    Returns
    -------
    coefficients, norms
        ``(P, n_r, n_k)`` complex64 coefficients ``Σ_spots w R(r) e^{-ikφ - k²σ_φ²/2}`` (spots
        beyond ``q_max`` or within ``sigma_q`` of the origin, the direct beam, dropped) and
        ``(P,)`` L2 norms of the images (0 without spots).
    """
    q = np.asarray(q, float).reshape(-1, 2)
    intensity = np.asarray(intensity, float)
    offsets = np.asarray(offsets, np.int64)
    from scipy import sparse

    n = len(offsets) - 1
    n_r, n_k = len(settings.radii), settings.n_angles // 2
    out = np.zeros((n, n_r, n_k), np.complex64)
    pattern = np.repeat(np.arange(n), np.diff(offsets))
    for lo in range(0, len(q), _SPOT_BLOCK):
        hi = min(len(q), lo + _SPOT_BLOCK)
        first, last = pattern[lo], pattern[hi - 1] + 1
        bins, radial, angular = _spot_factors(q[lo:hi], intensity[lo:hi], settings)
        # Each spot touches a few radial bins: a sparse (pattern, bin) × spot matrix times
        # the spots' angular factors sums every pattern's spots at once.
        rows = (pattern[lo:hi, None] - first) * n_r + bins
        columns = np.broadcast_to(np.arange(hi - lo)[:, None], bins.shape)
        weights = sparse.csr_matrix(
            (radial.ravel(), (rows.ravel(), columns.ravel())),
            shape=((last - first) * n_r, hi - lo),
        )
        out[first:last] += (weights @ angular).reshape(last - first, n_r, n_k)
    return out, _norms(out)


def _spot_factors(
    q: np.ndarray, intensity: np.ndarray, settings: LibrarySettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial bins and profiles ``(N, w)`` and angular Fourier factors ``(N, n_k)`` of spots.

    Each spot's radial Gaussian is kept over the ``w`` bins within ±4 σ of its radius.
    """
    radii = settings.radii
    rho = np.hypot(q[:, 0], q[:, 1])
    keep = (rho <= settings.q_max) & (rho > settings.sigma_q)
    weight = np.where(keep, np.clip(intensity, 0, None) ** settings.intensity_power, 0.0)
    reach = _RADIAL_REACH
    start = np.clip(np.round(rho / settings.sigma_q).astype(np.int64) - reach, 0, len(radii) - 1)
    bins = np.minimum(start[:, None] + np.arange(2 * reach + 1), len(radii) - 1)
    radial = weight[:, None] * np.exp(-0.5 * ((radii[bins] - rho[:, None]) / settings.sigma_q) ** 2)
    # Clipped duplicates of the last bin would count twice.
    radial[:, 1:][bins[:, 1:] == bins[:, :-1]] = 0.0
    step = 2 * math.pi / settings.n_angles
    sigma_phi = np.maximum(settings.sigma_q / np.maximum(rho, 1e-9), step)
    k = np.arange(settings.n_angles // 2)
    # e^{-ikφ} by repeated products (far cheaper than complex exponentials of every k).
    turn = np.exp(-1j * np.arctan2(q[:, 1], q[:, 0]))
    phases = np.cumprod(
        np.concatenate([np.ones((len(q), 1)), np.repeat(turn[:, None], len(k) - 1, 1)], 1), 1
    )
    angular = phases * np.exp(-0.5 * np.outer(sigma_phi**2, k**2))
    return bins, radial, angular


def _norms(coefficients: np.ndarray) -> np.ndarray:
    """L2 norms of real polar images from their non-negative-frequency coefficients."""
    power = np.abs(coefficients) ** 2
    total = power[..., 0].sum(-1) + 2 * power[..., 1:].sum((-1, -2))
    return np.sqrt(total)


# ---- the library ---------------------------------------------------------------------------


def template_spots(
    library: OrientationLibrary, rotation: np.ndarray, crystal: ReciprocalLattice | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Kinematic spots ``(q, intensity)`` of ``library``'s crystal at one orientation.

    As :func:`~stemforge.simulate.kinematic.kinematic_spots` (unsorted, no indices).
    ``crystal`` may restrict the reflections (:meth:`OrientationLibrary.reflections_near`).
    """
    return SpotScore(library, crystal=crystal).spots(rotation)


def _template_mask(g_lab: np.ndarray, intensity: np.ndarray, s: LibrarySettings) -> np.ndarray:
    """Which reflections ``(..., M)`` are template spots: within ``q_max``, and above
    ``min_intensity`` of the strongest of their orientation."""
    inside = g_lab[..., 0] ** 2 + g_lab[..., 1] ** 2 <= s.q_max**2
    strongest = np.where(inside, intensity, 0.0).max(axis=-1, keepdims=True)
    return inside & (intensity > 0) & (intensity >= s.min_intensity * strongest)


def _spot_batch(
    crystal: ReciprocalLattice, rotations: np.ndarray, s: LibrarySettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated reflections ``(C, M, 3)``, their intensities and which are template spots,
    for ``C`` rotations."""
    g_lab = np.einsum("cij,mj->cmi", rotations, crystal.g)
    intensity = spot_intensities(crystal, g_lab, s.energy, s.thickness, s.semiangle)
    return g_lab, intensity, _template_mask(g_lab, intensity, s)


def _template_chunk(crystal: ReciprocalLattice) -> int:
    """Orientations whose rotated reflections fit in about 64 MB."""
    return max(1, 64 * 2**20 // (len(crystal.g) * 3 * 8 * 3))


def _template_lists(
    library: OrientationLibrary, rotations: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR kinematic spot lists of many orientations at once (as :func:`template_spots`),
    and the mask ``(C, M)`` of the reflections near each (see :func:`near_ewald_sphere`)."""
    s = library.settings
    g_lab, intensity, keep = _spot_batch(library.crystal, rotations, s)
    rows, cols = np.nonzero(keep)
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    near = near_ewald_sphere(g_lab, s, NEAR_REACH * math.radians(s.angle_step))
    return g_lab[rows, cols, :2], intensity[rows, cols], offsets, near


def near_ewald_sphere(g_lab: np.ndarray, settings: LibrarySettings, reach: float) -> np.ndarray:
    """Which reflections ``g_lab`` ``(..., M, 3)`` can diffract within ``reach`` (rad).

    A turn by δ changes a reflection's excitation error by at most ``|g| δ`` and its
    in-plane length by as much; reflections farther than that plus four shape-factor widths
    from the Ewald sphere, or beyond ``q_max``, stay dark. Leaving them out makes every
    evaluation of a refinement an order of magnitude cheaper.
    """
    s = settings
    length = np.linalg.norm(g_lab, axis=-1)
    width = shape_factor_width(length, s.thickness, s.semiangle)
    near = np.abs(excitation_errors(g_lab, s.energy)) <= length * reach + 4 * width
    return near & (np.hypot(g_lab[..., 0], g_lab[..., 1]) <= s.q_max + length * reach)


def build_library(
    structure, settings: LibrarySettings | None = None, name: str | None = None
) -> OrientationLibrary:
    """Simulate the templates of one candidate structure.

    Parameters
    ----------
    structure
        pymatgen ``Structure`` (any setting: its conventional standard cell is used).
    settings
        Simulation and comparison settings (default :class:`LibrarySettings`).
    name
        Label (default: the reduced formula).
    """
    settings = settings or LibrarySettings()
    conventional = conventional_standard_structure(structure)
    # Reflections a little beyond q_max: tilted ones project inside.
    crystal = reciprocal_lattice(conventional, settings.q_max * 1.05)
    if len(crystal.g) == 0:
        raise ConfigurationError(
            f"{conventional.composition.reduced_formula} has no reflection within "
            f"q_max = {settings.q_max} Å⁻¹",
            "raise q_max (the detector's reach in Å⁻¹)",
        )
    symmetry = laue_rotations(conventional)
    directions = fundamental_directions(conventional, symmetry, settings.angle_step)
    rotations = beam_rotations(directions)
    library = OrientationLibrary(
        name=name or conventional.composition.reduced_formula,
        structure=conventional,
        crystal=crystal,
        symmetry=symmetry,
        directions=directions,
        rotations=rotations,
        coefficients=np.zeros((0,), np.complex64),
        norms=np.zeros(0),
        near_offsets=np.zeros(1, np.int64),
        near_index=np.zeros(0, np.int64),
        settings=settings,
    )
    chunk = _template_chunk(crystal)
    parts, near = [], []
    for lo in range(0, len(rotations), chunk):
        q, intensity, offsets, near_chunk = _template_lists(library, rotations[lo : lo + chunk])
        parts.append(polar_coefficients(q, intensity, offsets, settings)[0])
        near.append(near_chunk)
    coefficients = np.concatenate(parts)
    near_mask = np.concatenate(near)
    return OrientationLibrary(
        **{
            **library.__dict__,
            "coefficients": np.ascontiguousarray(np.conj(coefficients).transpose(2, 0, 1)),
            "norms": _norms(coefficients),
            "near_offsets": np.concatenate([[0], np.cumsum(near_mask.sum(axis=1))]),
            "near_index": np.nonzero(near_mask)[1],
        }
    )


# ---- matching --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """The best templates of each pattern from the polar correlation.

    Attributes
    ----------
    index, angle, score
        ``(P, K)`` template indices, in-plane angles (rad, parabola-refined) and cosine
        scores of the best templates of ``K`` regions of directions (each more than two
        angle steps from the better ones), best first.
    """

    index: np.ndarray
    angle: np.ndarray
    score: np.ndarray

    def rotations(self, library: OrientationLibrary) -> np.ndarray:
        """``(P, K, 3, 3)`` orientations of the candidates."""
        return in_plane_rotation(self.angle) @ library.rotations[self.index]


def _peak_angles(curves: np.ndarray) -> np.ndarray:
    """Angle (in steps) of the maximum of each periodic curve, parabola-refined."""
    n = curves.shape[-1]
    j = np.argmax(curves, axis=-1)
    left = np.take_along_axis(curves, ((j - 1) % n)[..., None], -1)[..., 0]
    mid = np.take_along_axis(curves, j[..., None], -1)[..., 0]
    right = np.take_along_axis(curves, ((j + 1) % n)[..., None], -1)[..., 0]
    curvature = left - 2 * mid + right
    safe = np.where(curvature < 0, curvature, -1.0)
    shift = np.where(curvature < 0, 0.5 * (left - right) / safe, 0.0)
    return j + np.clip(shift, -0.5, 0.5)


def correlate(
    library: OrientationLibrary, coefficients: np.ndarray, norms: np.ndarray, n_best: int = 1
) -> Candidates:
    """Normalised correlation of patterns with every template over every in-plane angle.

    Parameters
    ----------
    library
        Templates.
    coefficients, norms
        Of the patterns, from :func:`polar_coefficients`.
    n_best
        Templates kept per pattern, from as many regions of directions.
    """
    from scipy import fft as scipy_fft

    n_angles = library.settings.n_angles
    n_lib = len(library)
    k = min(n_best, n_lib)
    batch = max(1, _BATCH_BYTES // (n_lib * n_angles * 4 * 3))
    n = len(coefficients)
    index = np.zeros((n, k), np.int64)
    angle = np.zeros((n, k))
    score = np.zeros((n, k))
    near = math.cos(math.radians(library.settings.angle_step))
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        # Normalised before the transform, on the smaller array; single precision throughout.
        scale = n_angles / np.maximum(norms[lo:hi], 1e-30)
        measured = np.ascontiguousarray(
            (coefficients[lo:hi] * scale[:, None, None].astype(np.float32)).transpose(2, 1, 0)
        )  # (k, r, p)
        spectrum = library.coefficients @ measured  # (k, L, p)
        spectrum /= np.maximum(library.norms, 1e-30)[None, :, None].astype(np.float32)
        curve = scipy_fft.irfft(spectrum.transpose(2, 1, 0), n=n_angles, axis=-1)  # (p, L, θ)
        peak = curve.max(axis=-1)  # (p, L)
        rows = np.arange(hi - lo)
        # Best templates of k different regions (non-maximum suppression over directions):
        # neighbours of a wrong answer must not crowd out the right one.
        left = peak.copy()
        for j in range(k):
            top = np.argmax(left, axis=1)
            index[lo:hi, j] = top
            score[lo:hi, j] = peak[rows, top]
            angle[lo:hi, j] = _peak_angles(curve[rows, top]) * 2 * math.pi / n_angles
            left[library.directions[top] @ library.directions.T >= near] = -np.inf
    return Candidates(index, angle, score)


def spot_overlap(
    q_a: np.ndarray, w_a: np.ndarray, q_b: np.ndarray, w_b: np.ndarray, sigma: float
) -> float:
    """Inner product of two images of Gaussian spots of width ``sigma``."""
    d2 = ((q_a[:, None, :] - q_b[None, :, :]) ** 2).sum(-1)
    return float(w_a @ np.exp(-d2 / (4 * sigma**2)) @ w_b)


class SpotScore:
    """Similarity of one measured spot list with a crystal's kinematic spots at any orientation.

    What does not change with the orientation (shape-factor widths, the measured image's
    norm) is computed once: a refinement scores hundreds of orientations.

    Parameters
    ----------
    library
        Crystal and comparison settings.
    q, weight
        Measured spots (Å⁻¹) and weights (``intensity ** intensity_power``); none to use
        :meth:`spots` only.
    crystal
        May restrict the reflections (:meth:`OrientationLibrary.reflections_near`).
    width_factor
        Widens the excitation-error shape factors: a score tolerant to tilt.
    """

    def __init__(
        self,
        library: OrientationLibrary,
        q: np.ndarray | None = None,
        weight: np.ndarray | None = None,
        crystal: ReciprocalLattice | None = None,
        width_factor: float = 1.0,
    ) -> None:
        s = self.settings = library.settings
        self.crystal = library.crystal if crystal is None else crystal
        length = np.linalg.norm(self.crystal.g, axis=1)
        self.width = width_factor * shape_factor_width(length, s.thickness, s.semiangle)
        self.q = np.zeros((0, 2)) if q is None else q
        self.weight = np.zeros(0) if weight is None else weight
        self.norm = math.sqrt(spot_overlap(self.q, self.weight, self.q, self.weight, s.sigma_q))

    def spots(self, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Template spots ``(q, intensity)`` at ``rotation``."""
        s = self.settings
        g_lab = self.crystal.g @ np.asarray(rotation, float).T
        intensity = spot_intensities(
            self.crystal, g_lab, s.energy, s.thickness, s.semiangle, self.width
        )
        keep = _template_mask(g_lab, intensity, s)
        return g_lab[keep, :2], intensity[keep]

    def __call__(self, rotation: np.ndarray) -> float:
        """Cosine similarity of the two spot images at ``rotation`` (0 … 1)."""
        s = self.settings
        q_t, intensity = self.spots(rotation)
        w_t = intensity**s.intensity_power
        norm = self.norm * math.sqrt(max(spot_overlap(q_t, w_t, q_t, w_t, s.sigma_q), 1e-300))
        return spot_overlap(self.q, self.weight, q_t, w_t, s.sigma_q) / norm if norm > 0 else 0.0


def _rotation_vector_matrix(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by ``|omega|`` about ``omega``."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-15:
        return np.eye(3)
    k = omega / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def refine_orientation(
    library: OrientationLibrary,
    rotation: np.ndarray,
    q: np.ndarray,
    weight: np.ndarray,
    crystal: ReciprocalLattice | None = None,
    *,
    simplex_size: float = 0.5,
    tolerance: float = 1e-3,
    max_evaluations: int = 200,
) -> tuple[np.ndarray, float]:
    """Polish ``rotation`` by maximising the :class:`SpotScore` (Nelder–Mead, rotation vector).

    Parameters
    ----------
    crystal
        May restrict the reflections to those near ``rotation``
        (:meth:`OrientationLibrary.reflections_near`).
    simplex_size
        First steps, in library angle steps.
    tolerance, max_evaluations
        Stop when the simplex is this small (rad) or after this many scores.

    Returns the refined rotation and its similarity.
    """
    from scipy.optimize import minimize

    step = math.radians(library.settings.angle_step)
    score = SpotScore(library, q, weight, crystal)

    def cost(omega: np.ndarray) -> float:
        return -score(_rotation_vector_matrix(omega) @ rotation)

    simplex = np.vstack([np.zeros(3), simplex_size * step * np.eye(3)])
    options = {"initial_simplex": simplex, "xatol": tolerance, "fatol": 1e-4}
    found = minimize(
        cost, np.zeros(3), method="Nelder-Mead", options={**options, "maxfev": max_evaluations}
    )
    start = -cost(np.zeros(3))
    if -found.fun <= start:
        return rotation, start
    return _rotation_vector_matrix(found.x) @ rotation, float(-found.fun)


def check_spot_lists(
    q: Any, intensity: Any, offsets: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated CSR spot lists as float/int arrays (clear errors on bad shapes or NaNs)."""
    q = np.asarray(q, float)
    intensity = np.asarray(intensity, float)
    offsets = np.asarray(offsets, np.int64)
    if q.ndim != 2 or q.shape[1] != 2:
        raise ShapeError(f"spot positions must be (N, 2), got {q.shape}")
    if intensity.shape != (len(q),):
        raise ShapeError(f"intensities must be ({len(q)},), got {intensity.shape}")
    if (
        offsets.ndim != 1
        or offsets[0] != 0
        or offsets[-1] != len(q)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ShapeError("offsets must rise from 0 to the number of spots (CSR row pointers)")
    if not (np.isfinite(q).all() and np.isfinite(intensity).all()):
        raise ShapeError("spot positions and intensities must be finite (NaN/inf found)")
    return q, intensity, offsets


def match_orientations(
    library: OrientationLibrary,
    q: Any,
    intensity: Any,
    offsets: Any,
    *,
    refine: bool = True,
    min_spots: int = 3,
    n_best: int = N_BEST,
    n_refine: int = N_REFINE,
) -> OrientationMatch:
    """Best orientation of each spot list against ``library``.

    Parameters
    ----------
    library
        From :func:`build_library`.
    q, intensity, offsets
        CSR spot lists: ``(N, 2)`` positions in Å⁻¹ about the direct beam, lab frame
        (spots within ``sigma_q`` of the origin, the direct beam, are ignored); ``(N,)``
        intensities; ``(P + 1,)`` row pointers.
    refine
        Polish each best match off the grid (:func:`refine_orientation`).
    min_spots
        Patterns with fewer spots within ``q_max`` get NaN.
    n_best
        Regions of directions whose best templates (and their half-turned twins) are
        re-ranked with the exact spot score before refinement.
    n_refine
        Leading candidates refined; the best refined one wins.
    """
    q, intensity, offsets = check_spot_lists(q, intensity, offsets)
    settings = library.settings
    coefficients, norms = polar_coefficients(q, intensity, offsets, settings)
    rho = np.hypot(q[:, 0], q[:, 1])
    inside = (rho <= settings.q_max) & (rho > settings.sigma_q)
    cumulative = np.concatenate([[0], np.cumsum(inside)])
    n_spots = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    found = correlate(library, coefficients, norms, n_best)
    coarse = found.score[:, 0]
    starts = found.rotations(library)
    # Friedel's law makes every zero-order pattern invariant under a half turn about the
    # beam, which is no crystal symmetry for most directions: only excitation errors
    # (intensities) tell U from its half-turned twin, so both are scored.
    starts = np.concatenate([starts, in_plane_rotation(np.pi) @ starts], axis=1)

    def _distinct(a: np.ndarray, b: np.ndarray) -> bool:
        return bool(misorientation(a, b, library.symmetry) > 2 * settings.angle_step)

    n = len(n_spots)
    rotation = np.full((n, 3, 3), np.nan)
    score = np.full(n, np.nan)
    reliability = np.full(n, np.nan)
    for i in np.flatnonzero(n_spots >= min_spots):
        lo, hi = offsets[i], offsets[i + 1]
        keep = inside[lo:hi]
        spots = q[lo:hi][keep]
        weight = np.clip(intensity[lo:hi][keep], 0, None) ** settings.intensity_power
        # The polar images blur angles by a step: re-rank the candidates with the exact score.
        nearby = [library.reflections_near(j) for j in np.tile(found.index[i], 2)]
        ranked = np.array(
            [
                SpotScore(library, spots, weight, c, RANK_TILT_TOLERANCE)(u)
                for u, c in zip(starts[i], nearby, strict=True)
            ]
        )
        order = np.argsort(-ranked, kind="stable")
        # A close runner-up can overtake once on its own orientation: the leaders (within
        # REFINE_WITHIN of the best) are compared with the sharp score, after a quick
        # refinement when refining; the winner is then polished.
        leaders = [j for j in order[:n_refine] if ranked[j] >= REFINE_WITHIN * ranked[order[0]]]
        # ... and the best by the sharp score, which the tolerant ranking can bury when a
        # tilt away from a zone axis mimics missing spots.
        sharp = [
            SpotScore(library, spots, weight, c)(u) for u, c in zip(starts[i], nearby, strict=True)
        ]
        leaders += [j for j in np.argsort(sharp)[::-1][:2] if j not in leaders]
        if refine:
            found_leaders = [
                refine_orientation(
                    library,
                    starts[i, j],
                    spots,
                    weight,
                    nearby[j],
                    tolerance=3e-3,
                    max_evaluations=QUICK_EVALUATIONS,
                )
                for j in leaders
            ]
        else:
            found_leaders = [(starts[i, j], sharp[j]) for j in leaders]
        best = int(np.argmax([found[1] for found in found_leaders]))
        rotation[i], score[i] = found_leaders[best]
        if refine:
            rotation[i], score[i] = refine_orientation(
                library, rotation[i], spots, weight, nearby[leaders[best]], simplex_size=0.1
            )
        # Reliability: the sharp score of the best clearly different candidate against it.
        rivals = [found[1] for found in found_leaders if _distinct(found[0], rotation[i])]
        rivals += [sharp[j] for j in order if _distinct(starts[i, j], rotation[i])]
        runner_up = max(rivals, default=0.0)
        reliability[i] = max(0.0, 1 - runner_up / score[i]) if score[i] > 0 else 0.0
    return OrientationMatch(
        rotation=rotation,
        score=score,
        coarse_score=np.where(n_spots >= min_spots, coarse, np.nan),
        reliability=reliability,
        n_spots=n_spots,
    )
