"""Lattice parameters from measured reciprocal-lattice spacings: index, then fit.

A forest's lattice regression is a coarse prior (trees average training lattices). The
spots themselves measure the lattice: every strong zero-order-Laue-zone spacing |g| of every
pattern is the length of some reciprocal-lattice vector, ``|g|² = Σ_j c_j(hkl) x_j`` with
``x = (1/a², 1/c²)`` and ``c(hkl) = (h² + k² + l²)`` (cubic), ``(h² + k², l²)``
(tetragonal) or ``(4/3 (h² + hk + k²), l²)`` (hexagonal axes: hexagonal and trigonal).

:func:`refine_lattice` searches the free lengths on a log grid around the prior, scores each
grid point by how well its reflection list explains all measured spacings (misfit in |g|
over the measurement tolerance, capped so that a spot of another zone or a wrong basis
costs a fixed amount), and takes, among the points that score within the noise of the best, the one of
smallest cell volume: a supercell (2a, a√2...) indexes every spacing too, but has more
lines than the data need (the powder-indexing rule of parsimony).
"""

from __future__ import annotations

import numpy as np

#: Systems whose lattice the spacings fix with one or two free lengths.
REFINABLE = ("cubic", "tetragonal", "trigonal", "hexagonal")
#: Misfit in |g| that counts as fully unexplained: relative (calibration, ellipticity) plus
#: absolute (position error of a spot, Å⁻¹), which dominates for the short |g| of big cells.
TOLERANCE = 0.02
ABSOLUTE_TOLERANCE = 0.006
#: Largest Miller index considered.
MAX_INDEX = 5
#: Default per-pattern calibration uncertainty searched as a nuisance scale.
SCALE_ERROR = 0.03


def _coefficients(system: str, max_index: int = MAX_INDEX) -> np.ndarray:
    """Distinct ``c(hkl)`` rows of a system, 000 excluded."""
    r = np.arange(-max_index, max_index + 1)
    h, k, l = (v.ravel() for v in np.meshgrid(r, r, r, indexing="ij"))  # noqa: E741
    if system == "cubic":
        c = (h**2 + k**2 + l**2)[:, None].astype(float)
    elif system == "tetragonal":
        c = np.stack([h**2 + k**2, l**2], axis=1).astype(float)
    else:
        c = np.stack([4 / 3 * (h**2 + h * k + k**2), l**2], axis=1)
    c = np.unique(c, axis=0)
    return c[np.any(c > 0, axis=1)]


def _grid(prior: np.ndarray, span: float, steps: int) -> np.ndarray:
    """Log grid of free lengths around the prior: ``(G, F)``."""
    axes = [length * np.exp(np.linspace(-np.log(span), np.log(span), steps)) for length in prior]
    return np.stack([v.ravel() for v in np.meshgrid(*axes, indexing="ij")], axis=1)


def refine_lattice(
    system: str,
    lengths: np.ndarray,
    spacings: np.ndarray,
    *,
    span: float = 1.6,
    tolerance: float = TOLERANCE,
    absolute_tolerance: float = ABSOLUTE_TOLERANCE,
    scale_error: float = SCALE_ERROR,
) -> np.ndarray:
    """Free lattice lengths that index the measured spacings best (see the module notes).

    Parameters
    ----------
    system
        One of :data:`REFINABLE`; other systems return ``lengths`` unchanged.
    lengths
        Prior free lengths: ``(a,)`` cubic, ``(a, c)`` otherwise (Å).
    spacings
        ``(P, M)`` measured |g| (Å⁻¹) of strong reflections, a row per pattern; zeros and
        non-finite values are ignored.
    span
        The search covers ``lengths / span`` to ``lengths · span``.
    tolerance, absolute_tolerance
        A spacing misfit by ``tolerance · |g| + absolute_tolerance`` counts as unexplained.
    scale_error
        Each pattern's calibration may be off by up to this fraction (a nuisance scale per
        pattern, searched with the lattice); 0 when all share one calibration.

    Returns
    -------
    np.ndarray
        The refined free lengths (the prior where nothing can be refined).
    """
    lengths = np.asarray(lengths, float)
    q = np.atleast_2d(np.asarray(spacings, float))
    q = np.where(np.isfinite(q) & (q > 0), q, 0.0)
    if system not in REFINABLE or np.count_nonzero(q) < 2 * len(lengths) or not np.all(lengths > 0):
        return lengths
    q = q[np.any(q > 0, axis=1)]
    coefficients = _coefficients(system)
    scales = 1 + np.linspace(-scale_error, scale_error, 2 * round(scale_error / 0.005) + 1)
    steps = 801 if len(lengths) == 1 else 81
    best = lengths
    for fine in (False, True):  # a coarse pass over the span, then a fine one around its answer
        grid = _grid(best, span, steps)
        lines = np.sqrt((1.0 / grid**2) @ coefficients.T)  # (G, H) |g| of every reflection
        cost = np.zeros(len(grid))
        chosen = []  # each pattern's best scale at every grid point
        for row in q:
            values = row[row > 0]
            per_scale = np.zeros((len(grid), len(scales)))
            for j, kappa in enumerate(scales):
                for value in values * kappa:
                    misfit = np.abs(lines - value).min(axis=1)
                    allowed = tolerance * value + absolute_tolerance
                    per_scale[:, j] += np.minimum(misfit / allowed, 1.0) ** 2
            cost += per_scale.min(axis=1)
            chosen.append(scales[np.argmin(per_scale, axis=1)])
        n = np.count_nonzero(q)
        # Within the noise of the best: as if each spacing misfit by a quarter tolerance more.
        acceptable = cost <= cost.min() + n * 0.25**2
        volume = np.prod(grid, axis=1) * (grid[:, 0] if len(lengths) == 2 else grid[:, 0] ** 2)
        # The smallest acceptable cell's basin (supercells are ≥ √2 larger in volume), and
        # the best-scoring point in it.
        basin = np.flatnonzero(acceptable & (volume <= 1.2 * volume[acceptable].min()))
        pick = basin[np.argmin(cost[basin])]
        best = grid[pick]
        if not fine:
            span = 1.0 + 4 * (span - 1.0) / steps * 2
    # The per-pattern scales leave the overall scale free within ±scale_error; calibration
    # errors average out, so the lattice whose patterns need no scale on average is the one:
    # matching κ |g| to a lattice L means L = L_true / κ, hence L_true = L · mean κ.
    return best * float(np.mean([c[pick] for c in chosen]))
