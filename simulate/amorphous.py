"""Amorphous cells for multislice: random dense packings, optionally seeded with crystal grains.

:func:`random_dense_packing` fills an orthogonal periodic box with atoms at a given mass
density, no two closer than ``min_distance``: atoms start uniformly at random and are pushed
apart pair by pair (minimum image) until no pair overlaps. Below the jamming limit (packing
fraction ``π n d³ / 6`` well under 0.64) this converges in a few dozen sweeps to a hard-sphere
glass-like structure: g(r) = 0 below ``d``, a contact peak at ``d``, and a first peak of the
structure factor near ``q ≈ 1.1 / d`` (q = 1/d convention). :func:`crystal_grains` cuts
randomly oriented spherical grains out of a crystal; passed as ``fixed`` they give a
crystal-seeded (paracrystalline-like) cell with medium-range order.

The box is orthogonal with its third vector along the beam, as
:func:`~stemforge.simulate.multislice.simulate_cbed` needs; give it the specimen thickness as
height, so the beam crosses the random structure once (the box repeats laterally only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from stemforge.core.errors import ConfigurationError

# Avogadro's number × 1e-24 cm³/Å³: g/cm³ ÷ (g/mol) → atoms per Å³.
_PER_CUBIC_ANGSTROM = 6.02214076e23 * 1e-24
# Overlapping pairs are pushed a little beyond contact so the sweeps settle quickly.
_OVERSHOOT = 1.02
# Largest packing fraction accepted: random close packing is 0.64; the relaxation slows well
# before it.
_MAX_PACKING = 0.5


def _check_box(size: Sequence[float]) -> np.ndarray:
    box = np.asarray(size, dtype=float)
    if box.shape != (3,) or not np.all(np.isfinite(box)) or np.any(box <= 0):
        raise ConfigurationError(
            f"the box must be three positive lengths (Å), got {size!r}", "e.g. (20, 20, 60)"
        )
    return box


def _minimum_image(delta: np.ndarray, box: np.ndarray) -> np.ndarray:
    return delta - box * np.round(delta / box)


def crystal_grains(
    crystal: Atoms,
    size: Sequence[float],
    *,
    n_grains: int,
    radius: float,
    seed: int = 0,
    rotation: str = "random",
) -> Atoms:
    """Randomly placed and oriented spherical grains cut from a crystal, in a periodic box.

    Parameters
    ----------
    crystal
        A periodic crystal (e.g. ``ase.build.bulk("Si", "diamond", a=5.431)``).
    size
        Box lengths ``(Lx, Ly, Lz)`` in Å.
    n_grains
        Number of grains; they do not overlap (centres at least ``2 radius`` apart).
    radius
        Grain radius (Å).
    seed
        Seed of the grain centres and orientations.
    rotation
        ``"random"``: uniformly random 3D orientations; ``"in-plane"``: random rotations
        about the beam (z) only, so every grain keeps the crystal's z direction as its zone
        axis (grains near a zone axis diffract the most, the case FEM is most sensitive to).

    Returns
    -------
    ase.Atoms
        The grains' atoms in the box (periodic), to pass as ``fixed`` to
        :func:`random_dense_packing`.
    """
    from scipy.spatial.transform import Rotation

    box = _check_box(size)
    if not (radius > 0 and 2 * radius < box.min()):
        raise ConfigurationError(
            f"grain radius {radius!r} Å does not fit the box {tuple(box)}",
            "give 0 < radius < half the smallest box length",
        )
    rng = np.random.default_rng(seed)
    reps = [math.ceil(2 * radius / np.linalg.norm(v)) * 2 + 1 for v in crystal.cell]
    block = crystal.repeat(reps)
    block.positions -= block.cell.sum(axis=0) / 2
    ball = block.positions[np.linalg.norm(block.positions, axis=1) <= radius]
    numbers = block.numbers[np.linalg.norm(block.positions, axis=1) <= radius]
    centres: list[np.ndarray] = []
    for _ in range(1000 * n_grains):
        if len(centres) == n_grains:
            break
        c = rng.uniform(0, box)
        if all(np.linalg.norm(_minimum_image(c - o, box)) >= 2 * radius for o in centres):
            centres.append(c)
    if len(centres) < n_grains:
        raise ConfigurationError(
            f"{n_grains} grains of radius {radius} Å do not fit the box {tuple(box)}",
            "use fewer or smaller grains, or a larger box",
        )
    if rotation == "random":
        rotations = Rotation.random(n_grains, random_state=rng)
    elif rotation == "in-plane":
        rotations = Rotation.from_rotvec(np.outer(rng.uniform(0, 2 * np.pi, n_grains), [0, 0, 1]))
    else:
        raise ConfigurationError(
            f"unknown grain rotation {rotation!r}", "use 'random' or 'in-plane'"
        )
    positions = np.concatenate([rotations[i].apply(ball) + c for i, c in enumerate(centres)])
    out = Atoms(numbers=np.tile(numbers, n_grains), positions=positions, cell=np.diag(box))
    out.pbc = True
    out.wrap()
    return out


def random_dense_packing(
    size: Sequence[float],
    *,
    density: float,
    min_distance: float,
    symbol: str = "Si",
    seed: int = 0,
    fixed: Atoms | None = None,
    max_sweeps: int = 500,
) -> Atoms:
    """A random dense packing of one element in an orthogonal periodic box.

    Parameters
    ----------
    size
        Box lengths ``(Lx, Ly, Lz)`` in Å; ``Lz`` along the beam (the specimen thickness).
    density
        Mass density in g/cm³ (amorphous Si: 2.28), counting the ``fixed`` atoms.
    min_distance
        Smallest allowed interatomic distance ``d`` (Å), the hard-sphere diameter.
    symbol
        Element of the random atoms.
    seed
        Seed of the initial positions; the same arguments give the same atoms, bit for bit.
    fixed
        Atoms that stay where they are (e.g. :func:`crystal_grains`); random atoms keep
        ``min_distance`` from them too.
    max_sweeps
        Relaxation sweeps before giving up.

    Returns
    -------
    ase.Atoms
        Periodic cell ``diag(size)``, the fixed atoms first. ``atoms.info`` holds
        ``number_density`` (Å⁻³), ``packing_fraction`` and ``min_distance``.

    Raises
    ------
    ConfigurationError
        For a packing fraction over 0.5 or a relaxation that does not converge.
    """
    from ase.data import atomic_masses, atomic_numbers
    from scipy.spatial import cKDTree

    box = _check_box(size)
    if symbol not in atomic_numbers:
        raise ConfigurationError(f"unknown element {symbol!r}", "give a chemical symbol, e.g. 'Si'")
    if not (density > 0 and math.isfinite(density)):
        raise ConfigurationError(f"density must be positive (g/cm³), got {density!r}", "e.g. 2.28")
    if not (min_distance > 0 and math.isfinite(min_distance)):
        raise ConfigurationError(
            f"min_distance must be positive (Å), got {min_distance!r}", "e.g. 2.2 for Si"
        )
    number = atomic_numbers[symbol]
    volume = float(np.prod(box))
    n_fixed = 0 if fixed is None else len(fixed)
    fixed_mass = 0.0 if fixed is None else float(fixed.get_masses().sum())
    total_mass = density * _PER_CUBIC_ANGSTROM * volume  # g/mol in the box
    n_random = round((total_mass - fixed_mass) / atomic_masses[number])
    n_total = n_fixed + max(n_random, 0)
    packing = math.pi * n_total / volume * min_distance**3 / 6
    if n_random < 1 or packing > _MAX_PACKING:
        raise ConfigurationError(
            f"{n_total} atoms of diameter {min_distance} Å in {volume:.0f} Å³ "
            f"(packing fraction {packing:.2f}, {n_random} random atoms) cannot be packed randomly",
            f"lower the density or min_distance (packing fraction ≤ {_MAX_PACKING})",
        )
    rng = np.random.default_rng(seed)
    start = np.empty((0, 3)) if fixed is None else np.mod(fixed.positions, box)
    positions = np.concatenate([start, rng.uniform(0, 1, (n_random, 3)) * box])
    mobile = np.arange(n_total) >= n_fixed
    for _ in range(max_sweeps):
        pairs = cKDTree(positions, boxsize=box).query_pairs(min_distance, output_type="ndarray")
        pairs = pairs[mobile[pairs].any(axis=1)]  # fixed-fixed pairs are the crystal's own
        if len(pairs) == 0:
            break
        pairs = pairs[np.lexsort(pairs.T[::-1])]  # a fixed order: bit-for-bit reproducible
        delta = _minimum_image(positions[pairs[:, 1]] - positions[pairs[:, 0]], box)
        r = np.maximum(np.linalg.norm(delta, axis=1), 1e-9)[:, None]
        push = delta / r * (_OVERSHOOT * min_distance - r)
        # a pair with one fixed atom moves the mobile one the whole way
        share = np.where(mobile[pairs], 1.0, 0.0)
        share /= share.sum(axis=1, keepdims=True)
        move = np.zeros_like(positions)
        np.add.at(move, pairs[:, 0], -push * share[:, :1])
        np.add.at(move, pairs[:, 1], push * share[:, 1:])
        positions = np.mod(positions + move, box)
    else:
        raise ConfigurationError(
            f"the packing did not relax in {max_sweeps} sweeps (packing fraction {packing:.2f})",
            "lower the density or min_distance, or raise max_sweeps",
        )
    numbers = np.concatenate(
        [np.empty(0, int) if fixed is None else fixed.numbers, np.full(n_random, number)]
    )
    atoms = Atoms(numbers=numbers, positions=positions, cell=np.diag(box), pbc=True)
    atoms.info.update(
        number_density=n_total / volume, packing_fraction=packing, min_distance=min_distance
    )
    return atoms
