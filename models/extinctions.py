"""Systematic absences: the space groups the indexed reflections of one crystal allow.

A space group with an operation ``(R, t)`` (rotation, fractional translation) forbids every
reflection ``h`` with ``h·R = h`` and ``h·t`` not an integer: its structure factor is its own
multiple by ``exp(2πi h·t) ≠ 1``, whatever the atoms. Glide planes empty the reflections of a
zone, screw axes those of a row, centring a fraction of all. Once the patterns of a crystal
have 3D indices in its conventional cell
(:attr:`~stemforge.models.lattice_reconstruction.LatticeSymmetry.to_conventional`), each
observed reflection that a candidate group forbids counts against it, and each net node
inside a pattern's measured disc that shows no spot counts for the groups that forbid it.
The lattice does not fix which axis is which in the group's standard setting (orthorhombic
axes; monoclinic cell choices), so each group takes its best setting. Double diffraction
lights forbidden reflections up in thick crystals, so a forbidden reflection may show
(:data:`SEEN_IF_FORBIDDEN`), and weak allowed ones go unseen as often as the crystal's
other nodes do.
"""

from __future__ import annotations

from functools import cache

import numpy as np

#: Probability that a forbidden reflection shows a spot (double diffraction). Against it,
#: an allowed reflection is unseen (too weak to detect) with the crystal's own probability
#: ``p``, the fraction of its net nodes in the measured discs without a spot (5–95 % of the
#: pyxtal seed-31 crystals: 0.13–0.57; clipped to [:data:`MIN_UNSEEN`, :data:`MAX_UNSEEN`]):
#: a seen node counts log(0.05 / (1 − p)) for each group forbidding it, an unseen one
#: log(0.95 / p). On pyxtal seed 31 the aggregated space group went 13.0 → 17.2 % with the
#: seen term, 22.2 % with both at a fixed p = 0.3; the crystal's own p then took top-1 /
#: top-3 38.5 / 72.2 → 39.5 / 73.4 %.
SEEN_IF_FORBIDDEN = 0.05
MIN_UNSEEN, MAX_UNSEEN = 0.05, 0.9
#: Largest total |log-likelihood| either way (a mis-indexed pattern must not decide alone).
MAX_ABSENCE_EVIDENCE = 20.0
#: Reflections weaker than this fraction of their pattern's strongest are not counted.
MIN_RELATIVE_INTENSITY = 0.01


@cache
def _operations(number: int) -> tuple[np.ndarray, np.ndarray]:
    from pymatgen.symmetry.groups import SpaceGroup

    ops = SpaceGroup.from_int_number(number).symmetry_ops
    rotations = np.array([np.rint(op.rotation_matrix) for op in ops]).astype(int)
    return rotations, np.array([op.translation_vector for op in ops], float)


def forbidden(number: int, hkl: np.ndarray) -> np.ndarray:
    """``(N,)`` True where space group ``number`` (standard setting) forbids the reflection.

    ``hkl`` are ``(N, 3)`` integer indices in the group's conventional cell.
    """
    rotations, translations = _operations(number)
    hkl = np.asarray(hkl, int).reshape(-1, 3)
    fixed = np.all(np.einsum("ni,oij->onj", hkl, rotations) == hkl[None], axis=2)
    phase = translations @ hkl.T  # (O, N)
    shifted = np.abs(phase - np.rint(phase)) > 1e-6
    return np.any(fixed & shifted, axis=0)


#: The six orders of the orthorhombic axes.
_PERMUTATIONS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))


@cache
def _settings(system: str) -> tuple[np.ndarray, ...]:
    """Index maps ``h → h·S`` from the lattice's standard cell to the group's possible ones."""
    identity = np.eye(3, dtype=int)
    if system == "orthorhombic":
        return tuple(identity[list(p)].T for p in _PERMUTATIONS)
    if system == "monoclinic":  # unique axis b: three cell choices, a and c either way round
        choices = [
            np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
            np.array([[0, 0, 1], [0, 1, 0], [-1, 0, -1]]),
            np.array([[-1, 0, -1], [0, 1, 0], [1, 0, 0]]),
        ]
        swap = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]])
        # A direct-cell change c' = T·c maps indices h → h·Tᵀ.
        return tuple((s @ t).T for t in choices for s in (identity, swap))
    return (identity,)


def absence_log_likelihood(
    groups: np.ndarray,
    spots: list[tuple[np.ndarray, np.ndarray]],
    unseen: list[np.ndarray],
    to_conventional: np.ndarray,
    system: str,
) -> np.ndarray:
    """``(G,)`` log-likelihood ratio of the reflections seen and not seen under each group,
    against a group without reflection conditions.

    Parameters
    ----------
    groups
        Space group numbers of ``system``.
    spots
        Each pattern's indexed spots, reduced-basis indices and intensities
        (:func:`~stemforge.models.laue_symmetry.indexed_spots`).
    unseen
        Each pattern's nodes with no spot (:func:`~stemforge.models.laue_symmetry.unseen_nodes`).
    to_conventional
        Index map to the lattice's conventional cell.
    system
        Crystal system of the groups (their possible settings).
    """
    to_conventional = np.asarray(to_conventional, int)
    seen = _distinct([h[i >= MIN_RELATIVE_INTENSITY * i.max()] for h, i in spots if len(h)])
    dark = _distinct(unseen)
    seen, dark = seen @ to_conventional, dark @ to_conventional
    dark = dark[~(dark[:, None, :] == seen[None]).all(-1).any(1)] if len(seen) else dark
    p = np.clip(len(dark) / max(len(dark) + len(seen), 1), MIN_UNSEEN, MAX_UNSEEN)
    seen_forbidden = np.log(SEEN_IF_FORBIDDEN / (1 - p))
    unseen_forbidden = np.log((1 - SEEN_IF_FORBIDDEN) / p)
    out = np.zeros(len(groups))
    for k, g in enumerate(groups):
        out[k] = max(
            seen_forbidden * forbidden(int(g), seen @ s).sum()
            + unseen_forbidden * forbidden(int(g), dark @ s).sum()
            for s in _settings(system)
        )
    return np.clip(out, -MAX_ABSENCE_EVIDENCE, MAX_ABSENCE_EVIDENCE)


def _distinct(parts: list[np.ndarray]) -> np.ndarray:
    """Distinct reflections, one of each Friedel pair (absences are centrosymmetric)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, 3), int)
    h = np.concatenate(parts)
    first = h[np.arange(len(h)), np.argmax(h != 0, axis=1)]
    return np.unique(np.where(first[:, None] < 0, -h, h), axis=0)
