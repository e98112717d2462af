"""Zone-axis orientation: a crystal turned so that [uvw] runs along the beam (z).

Conventions
-----------
- Zone axes ``[uvw]`` and reflections ``(hkl)`` are indexed in the conventional standard
  cell (spglib's standardisation, as :func:`conventional_standard_structure` returns it).
- Lab frame = detector frame: the beam travels along +z, detector axis -2 is qx ∥ x,
  axis -1 is qy ∥ y.
- In-plane rotation: +x (detector +qx) points along a zero-order-Laue-zone reciprocal
  vector ``g(hkl)`` with ``hu + kv + lw = 0`` (Weiss zone law, exact for every lattice).
  By default the shortest one, ties broken by the largest index tuple, so that a
  reflection of the first ring lies on the +qx axis (Si [001]: (100) ∥ x; Si [110]:
  (001) ∥ x). ``y = z × x``.
- Strain ``ε`` is the displacement gradient in the lab frame: the cell ``A`` (rows are
  lattice vectors) becomes ``A (I + ε)ᵀ``, reflections move as ``g' = (I + ε)⁻ᵀ g``.

abTEM simulates orthogonal periodic cells only, so the oriented crystal is repeated and cut
to an orthogonal supercell (:func:`abtem.orthogonalize_cell`), which applies whatever
strain is needed to close it silently. :func:`orient` measures that residual strain and
refuses cells that are strained more than a bound.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.virtual_crystal import mix, site_arrays, site_types

#: Default bound on the residual strain of the periodic approximation.
MAX_RESIDUAL_STRAIN = 0.01
#: Shift (Å) that takes lattice sites off the faces of the cell while it is cut.
_OFF_FACE = np.array([0.0737, 0.0519, 0.0311])


@dataclass(frozen=True)
class OrientedCell:
    """A crystal in an orthogonal periodic cell with the zone axis along z.

    Attributes
    ----------
    atoms
        The atoms that are simulated: orthogonal cell, lab frame, Å.
    zone_axis
        ``[uvw]`` in the conventional standard cell.
    x_reflection
        ``(hkl)`` whose reciprocal vector points along +x (detector +qx).
    rotation
        ``(3, 3)`` rotation taking Cartesian vectors of the conventional cell (pymatgen's
        frame) to the lab frame, ``v_lab = rotation @ v``.
    conventional_cell
        ``(3, 3)`` conventional lattice vectors (rows) in the lab frame, before the
        residual strain.
    supercell
        ``(3, 3)`` integer matrix: rows of the orthogonal cell in units of the conventional
        lattice vectors (``cell ≈ supercell @ conventional_cell``).
    deformation
        ``(3, 3)`` deformation gradient ``F`` that the periodic approximation applied
        (``cell = supercell @ conventional_cell @ Fᵀ``).
    residual_strain
        ``max |U - I|`` with ``F = R U`` (polar decomposition): the strain, without the
        rigid rotation, of the simulated lattice against the real one.
    """

    atoms: Atoms
    zone_axis: tuple[int, int, int]
    x_reflection: tuple[int, int, int]
    rotation: np.ndarray
    conventional_cell: np.ndarray
    supercell: np.ndarray
    deformation: np.ndarray
    residual_strain: float


# ---- crystal conversion ---------------------------------------------------------------------


@contextmanager
def quiet_spglib() -> Iterator[None]:
    """spglib ≥ 2.5 warns on every call about its error-handling switch; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*OLD_ERROR_HANDLING.*", category=DeprecationWarning
        )
        yield


def conventional_standard_structure(structure, symprec: float = 1e-3):
    """The conventional standard cell of a pymatgen ``Structure`` (zone axes are indexed in it)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with quiet_spglib():
        return SpacegroupAnalyzer(structure, symprec=symprec).get_conventional_standard_structure()


def structure_to_atoms(structure) -> Atoms:
    """pymatgen ``Structure`` → ase ``Atoms`` with the same cell and Cartesian positions; a
    site of two species (an alloy) becomes a virtual-crystal site
    (:mod:`~stemforge.simulate.virtual_crystal`)."""
    first, second, fraction = site_arrays(structure)
    atoms = Atoms(numbers=first, positions=structure.cart_coords, cell=structure.lattice.matrix, pbc=True)
    return mix(atoms, second, fraction)


# ---- geometry kernels ---------------------------------------------------------------------


def _primitive_index(index) -> tuple[int, int, int]:
    values = [int(v) for v in index]
    if len(values) != 3 or not all(
        float(v) == float(w) for v, w in zip(values, index, strict=True)
    ):
        raise ConfigurationError(
            f"a zone axis or reflection needs three integer indices, got {index!r}",
            "give it as [u, v, w] with integers, e.g. [1, 1, 0]",
        )
    divisor = math.gcd(*values)
    if divisor == 0:
        raise ConfigurationError("the zone axis [0 0 0] has no direction", "give a non-zero [uvw]")
    return tuple(v // divisor for v in values)


def shortest_zolz_reflection(
    lattice: np.ndarray, zone_axis, max_index: int = 6
) -> tuple[int, int, int]:
    """The shortest reciprocal-lattice vector ``(hkl)`` with ``hu + kv + lw = 0``.

    Ties (equal length within 1e-9 relative) go to the largest index tuple, which makes the
    choice deterministic and puts positive indices first.
    """
    u = np.asarray(_primitive_index(zone_axis))
    reciprocal = np.linalg.inv(lattice).T
    best, best_key = None, None
    for hkl in itertools.product(range(-max_index, max_index + 1), repeat=3):
        if hkl == (0, 0, 0) or int(np.dot(hkl, u)) != 0:
            continue
        length = float(np.linalg.norm(np.asarray(hkl) @ reciprocal))
        key = (round(length / np.linalg.norm(reciprocal, axis=1).min(), 9), tuple(-h for h in hkl))
        if best_key is None or key < best_key:
            best, best_key = hkl, key
    return best


def zone_axis_rotation(
    lattice: np.ndarray, zone_axis, x_reflection=None
) -> tuple[np.ndarray, tuple]:
    """Rotation that puts ``[uvw]`` along +z and ``g(x_reflection)`` along +x.

    Parameters
    ----------
    lattice
        ``(3, 3)`` conventional lattice vectors as rows (Å).
    zone_axis
        ``[uvw]``.
    x_reflection
        ``(hkl)`` of the zero-order Laue zone to put along +x; default
        :func:`shortest_zolz_reflection`.

    Returns
    -------
    rotation, x_reflection
        ``v_lab = rotation @ v`` and the reflection used.
    """
    uvw = _primitive_index(zone_axis)
    hkl = (
        shortest_zolz_reflection(lattice, uvw)
        if x_reflection is None
        else _primitive_index(x_reflection)
    )
    if int(np.dot(hkl, uvw)) != 0:
        raise ConfigurationError(
            f"reflection ({' '.join(map(str, hkl))}) is not in the zero-order Laue zone of "
            f"[{' '.join(map(str, uvw))}] (hu + kv + lw = {int(np.dot(hkl, uvw))})",
            "pick (hkl) with hu + kv + lw = 0, or leave x_reflection unset",
        )
    z = np.asarray(uvw, float) @ lattice
    x = np.asarray(hkl, float) @ np.linalg.inv(lattice).T
    z /= np.linalg.norm(z)
    x /= np.linalg.norm(x)
    rotation = np.stack([x, np.cross(z, x), z])
    return rotation, hkl


def polar_strain(deformation: np.ndarray) -> np.ndarray:
    """Biot strain ``U - I`` of the polar decomposition ``F = R U`` (rigid rotation removed)."""
    w, v = np.linalg.eigh(deformation.T @ deformation)
    return (v * np.sqrt(w)) @ v.T - np.eye(3)


def periodic_residual(conventional: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Supercell matrix and deformation gradient of a periodic approximation.

    Parameters
    ----------
    conventional
        ``(3, 3)`` exact lattice vectors (rows, lab frame).
    cell
        ``(3, 3)`` cell that approximates a supercell of it (rows).

    Returns
    -------
    supercell, deformation
        Integer ``N`` with ``cell ≈ N @ conventional`` and ``F`` with
        ``cell = N @ conventional @ Fᵀ`` exactly.
    """
    supercell = np.rint(cell @ np.linalg.inv(conventional)).astype(int)
    exact = supercell @ conventional
    deformation = np.linalg.solve(exact, cell).T
    return supercell, deformation


# ---- orchestration ------------------------------------------------------------------------


def orient(
    structure,
    zone_axis,
    *,
    x_reflection=None,
    max_repetitions: int = 8,
    max_residual_strain: float = MAX_RESIDUAL_STRAIN,
    standardize: bool = True,
) -> OrientedCell:
    """Orient a crystal along a zone axis in an orthogonal periodic cell.

    Parameters
    ----------
    structure
        pymatgen ``Structure``.
    zone_axis
        ``[uvw]`` in the conventional standard cell.
    x_reflection
        ``(hkl)`` to put along detector +qx (see the module conventions).
    max_repetitions
        Largest repetition of a conventional vector :func:`abtem.orthogonalize_cell` may
        combine; must be at least ``max |u|, |v|, |w|``.
    max_residual_strain
        Largest residual strain accepted (fraction, 0.01 = 1 %).
    standardize
        Convert ``structure`` to its conventional standard cell first (set False if it
        already is one and its setting must be kept).

    Returns
    -------
    OrientedCell

    Raises
    ------
    ConfigurationError
        The orthogonal cell needs more residual strain than ``max_residual_strain``.
    """
    import abtem

    if standardize:
        structure = conventional_standard_structure(structure)
    lattice = np.asarray(structure.lattice.matrix, float)
    uvw = _primitive_index(zone_axis)
    if max(abs(v) for v in uvw) > max_repetitions:
        raise ConfigurationError(
            f"zone axis [{' '.join(map(str, uvw))}] needs max_repetitions ≥ {max(abs(v) for v in uvw)}, "
            f"got {max_repetitions}",
            "raise max_repetitions",
        )
    rotation, hkl = zone_axis_rotation(lattice, uvw, x_reflection)
    atoms = structure_to_atoms(structure)
    conventional = lattice @ rotation.T
    atoms.set_cell(conventional)
    atoms.positions = atoms.positions @ rotation.T

    # Sites on the faces of the new cell (the origin atom, always) are kept or dropped by
    # rounding inside abTEM's cut; moving the crystal off the faces and back keeps them all.
    atoms.positions += _OFF_FACE
    oriented = abtem.orthogonalize_cell(atoms, max_repetitions=max_repetitions)
    supercell, deformation = periodic_residual(conventional, np.asarray(oriented.cell))
    oriented.positions -= deformation @ _OFF_FACE
    oriented.wrap()
    expected = round(abs(np.linalg.det(supercell))) * len(atoms)
    if len(oriented) != expected:
        raise ConfigurationError(
            f"the orthogonal cell of [{' '.join(map(str, uvw))}] holds {len(oriented)} atoms, "
            f"{expected} expected (atoms lost or doubled at the cell boundary)",
            "check the structure for overlapping or nearly coincident sites",
        )
    residual = float(np.abs(polar_strain(deformation)).max())
    if residual > max_residual_strain:
        raise ConfigurationError(
            f"the periodic cell of zone axis [{' '.join(map(str, uvw))}] is strained by "
            f"{residual:.2%} (bound {max_residual_strain:.2%}) with max_repetitions={max_repetitions}",
            "raise max_repetitions, raise max_residual_strain, or pick another zone axis",
        )
    return OrientedCell(
        atoms=oriented,
        zone_axis=uvw,
        x_reflection=hkl,
        rotation=rotation,
        conventional_cell=conventional,
        supercell=supercell,
        deformation=deformation,
        residual_strain=residual,
    )


def validate_strain(strain) -> np.ndarray:
    """A 3×3 displacement gradient that keeps the beam direction; 2×2 is taken as in-plane."""
    eps = np.asarray(strain, float)
    if eps.shape == (2, 2):
        eps = np.pad(eps, ((0, 1), (0, 1)))
    if eps.shape != (3, 3) or not np.all(np.isfinite(eps)):
        raise ConfigurationError(
            f"strain must be a finite 3×3 (or in-plane 2×2) matrix, got shape {eps.shape}",
            "give ε as [[e_xx, e_xy, 0], [e_xy, e_yy, 0], [0, 0, e_zz]]",
        )
    if np.any(np.abs(eps[2, :2]) > 1e-12) or np.any(np.abs(eps[:2, 2]) > 1e-12):
        raise ConfigurationError(
            "strain components ε_xz, ε_yz, ε_zx, ε_zy tilt the lattice against the beam",
            "set them to zero and give the tilt as a mistilt instead",
        )
    if np.linalg.det(np.eye(3) + eps) <= 0:
        raise ConfigurationError("strain inverts or collapses the cell", "use |ε| well below 1")
    return eps


def apply_strain(atoms: Atoms, strain) -> Atoms:
    """Homogeneously strain a cell: ``cell → cell (I + ε)ᵀ``, atoms moved with it.

    ``ε`` (lab frame, beam along z) may carry an in-plane rotation in its antisymmetric part;
    components that would tilt the cell against the beam are refused (use a mistilt).
    The cell may become oblique in-plane; :mod:`stemforge.simulate.multislice` handles that.
    """
    eps = validate_strain(strain)
    strained = atoms.copy()
    strained.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + eps).T, scale_atoms=True)
    return strained


# ---- zone-axis sampling -------------------------------------------------------------------


def point_group(structure, symprec: float = 1e-3) -> np.ndarray:
    """Operations (integer matrices in fractional coordinates of ``structure``'s cell) of its
    point group, proper and improper."""
    import spglib

    cell = (structure.lattice.matrix, structure.frac_coords, site_types(structure))
    with quiet_spglib():
        symmetry = spglib.get_symmetry(cell, symprec=symprec)
    return np.unique(symmetry["rotations"], axis=0)


def _canonical(direction, rotations: np.ndarray) -> tuple[int, int, int]:
    orbit = [tuple(int(v) for v in s * (r @ direction)) for r in rotations for s in (1, -1)]
    return min(orbit, key=lambda t: (sum(v < 0 for v in t), t))


def zone_axes(max_index: int, structure=None, symprec: float = 1e-3) -> list[tuple[int, int, int]]:
    """All zone axes ``[uvw]`` with ``max |u|, |v|, |w| ≤ max_index``.

    Unique up to sign and common factor; with ``structure`` (in its conventional standard
    cell) also up to its point-group symmetry. Sorted by real-space period ``|uvw·A|``
    (shortest, i.e. densest zero-order Laue zone, first) when a structure is given, else by
    index. Representatives have the fewest negative indices, then the smallest tuple
    (cubic: [001], [011], [111], ...).
    """
    if max_index < 1:
        raise ConfigurationError(f"max_index must be ≥ 1, got {max_index}", "use e.g. 1, 2 or 3")
    rotations = (
        np.eye(3, dtype=int)[None] if structure is None else point_group(structure, symprec)
    )
    found = set()
    for uvw in itertools.product(range(-max_index, max_index + 1), repeat=3):
        if uvw != (0, 0, 0) and math.gcd(*uvw) == 1:
            found.add(_canonical(np.asarray(uvw), rotations))
    if structure is None:
        return sorted(found, key=lambda t: (max(map(abs, t)), sum(map(abs, t)), t))
    lattice = structure.lattice.matrix
    return sorted(
        found, key=lambda t: (round(float(np.linalg.norm(np.asarray(t) @ lattice)), 6), t)
    )


def low_index_zone_axes(
    structure, count: int = 6, symprec: float = 1e-3
) -> list[tuple[int, int, int]]:
    """The ``count`` symmetry-distinct zone axes with the shortest real-space periods.

    These are the major zone axes a microscopist tilts to: the densest zero-order Laue
    zones (cubic: [001], [011], [111], [012], [112], [122]).
    """
    # Larger indices mean longer periods (all but strongly oblique cells), so widening the
    # search until it holds several times `count` axes settles the shortest ones.
    for max_index in range(1, 9):
        axes = zone_axes(max_index, structure, symprec)
        if len(axes) >= 3 * count:
            break
    return axes[:count]


def random_mistilts(count: int, max_angle: float, seed: int) -> np.ndarray:
    """Random crystal mistilts, uniform over the cone of half-angle ``max_angle``.

    Returns
    -------
    np.ndarray
        ``(count, 2)`` tilts ``(θx, θy)`` in mrad (lab frame), for the ``mistilt`` option of
        the simulation.
    """
    rng = np.random.default_rng(seed)
    radius = max_angle * np.sqrt(rng.random(count))
    phi = 2 * np.pi * rng.random(count)
    return np.stack([radius * np.cos(phi), radius * np.sin(phi)], axis=1)
