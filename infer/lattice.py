"""Lattice fitting to Bragg peaks: calibrated view, basis choice, indexing, per-position fit.

All positions here are in the *centred, undistorted* detector frame: pixels along detector
axes -2 (x) and -1 (y) relative to the origin (unscattered beam) of each pattern, after the
elliptical distortion of the calibration has been removed. Pixels are then square, so the
reciprocal lattice measured in pixels is the true one up to one scale factor (the Q pixel
size): strain, which is a ratio, needs no Å⁻¹ calibration.

A reciprocal lattice is ``g = g0 + h·g1 + k·g2`` with integer ``(h, k)``; ``g0`` is a free
offset that absorbs a residual error of the origin. The pipeline is

1. :func:`centered_peaks`: raw peaks → centred, undistorted positions;
2. :func:`choose_basis`: ``g1, g2`` from the Bragg vector map (automatic, reduced basis) or
   given by hand, refined through the map's spots;
3. :func:`index_peaks` / :func:`fit_lattice`: ``(h, k)`` of every peak and a weighted
   least-squares lattice at every scan position, outliers rejected, vectorised over the
   whole ragged table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.core.units import normalize_q_units
from stemforge.infer.bragg_vector_map import bragg_vector_map
from stemforge.infer.ellipse import ellipse_correction

# Lattice vectors closer in angle than this (sin of the angle) are collinear: no real basis.
_MIN_SIN = 0.05
# Vectors whose lengths differ by less than this fraction count as equally short when the
# basis convention picks among symmetry-equivalent choices.
_SAME_LENGTH = 0.02
# A candidate basis must index this fraction of the Bragg-vector-map spot intensity.
_MIN_INDEXED = 0.9
# Spot positions on the map are indexed to within this fraction of the shorter basis vector.
_SPOT_TOLERANCE = 0.15
# Default per-peak indexing tolerance, as a fraction of the nearest-node distance.
_PEAK_TOLERANCE = 0.2
# The shortest vectors of this many spots are tried as basis pairs.
_N_BASIS_SPOTS = 12
# An index-2 finer net replaces a pair's when the spots on its new nodes carry at least
# this fraction of the weight (and are at least two: a Friedel pair).
_HALF_NODE_WEIGHT = 0.03
# Indexing/fitting passes of fit_lattice (later passes index with the fitted lattice and
# leave out the peaks the previous fit rejected).
_MAX_PASSES = 5


# ---- calibrated view ------------------------------------------------------------------------
def estimate_origin(
    peaks: BraggPeaks, radius: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Origin of every pattern from its peaks, for tables without a calibrated origin.

    The origin of a pattern is taken as its brightest peak within ``radius`` pixels of the
    detector centre ``((Qx - 1)/2, (Qy - 1)/2)`` (the unscattered beam is the brightest spot
    of a thin-crystal pattern); patterns without such a peak get the median origin of the
    others. Calibrate the origin instead (``stemforge calibrate``) when a Bragg spot can
    outshine the direct beam.

    Parameters
    ----------
    peaks
        The peak table, raw detector pixels.
    radius
        Search radius in pixels; default a quarter of the smaller detector side.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        ``(Rx, Ry)`` origins in detector pixels.

    Raises
    ------
    InvalidDataError
        No pattern has a peak within ``radius`` of the centre.
    """
    nx, ny = peaks.detector_shape
    if radius is None:
        radius = min(nx, ny) / 4
    if not (math.isfinite(radius) and radius > 0):
        raise ConfigurationError(
            f"radius must be a positive number of pixels, got {radius!r}", "e.g. radius=20"
        )
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    near = np.flatnonzero((peaks.qx - cx) ** 2 + (peaks.qy - cy) ** 2 <= radius**2)
    if near.size == 0:
        raise InvalidDataError(
            f"no peak lies within {radius:g} px of the detector centre ({cx:g}, {cy:g}), so the "
            "origin cannot be estimated",
            "calibrate the origin (stemforge calibrate) and pass the Calibration",
        )
    flat = peaks.rx[near] * peaks.scan_shape[1] + peaks.ry[near]
    # Sorted by position, then intensity: the last row of each position is its brightest.
    order = np.lexsort((peaks.intensity[near], flat))
    last = np.flatnonzero(np.diff(flat[order], append=-1) != 0)
    brightest = near[order[last]]
    qx0 = np.full(peaks.scan_shape, np.median(peaks.qx[brightest]))
    qy0 = np.full(peaks.scan_shape, np.median(peaks.qy[brightest]))
    qx0[peaks.rx[brightest], peaks.ry[brightest]] = peaks.qx[brightest]
    qy0[peaks.rx[brightest], peaks.ry[brightest]] = peaks.qy[brightest]
    return qx0, qy0


def centered_peaks(
    peaks: BraggPeaks,
    calibration: Calibration | None = None,
    *,
    units: str = "pixels",
    origin_radius: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Peak positions relative to the origin of their pattern, undistorted.

    The raw table is left untouched; this computes the calibrated view.

    Parameters
    ----------
    peaks
        Raw peaks (detector pixels).
    calibration
        Supplies the origin (scalar or per pattern) and the elliptical distortion. Without a
        calibrated origin it is estimated with :func:`estimate_origin`; without an ellipse no
        distortion correction is applied.
    units
        ``'pixels'`` (default; undistorted pixels, the scale of the ellipse's ``a`` axis) or
        ``'A^-1'`` (needs a calibrated Q pixel size).
    origin_radius
        Search radius for :func:`estimate_origin`, when the origin is estimated.

    Returns
    -------
    kx, ky : numpy.ndarray
        One value per peak, in the table's row order.
    """
    units = normalize_q_units(units)  # accepts spellings such as 'Å^-1' or 'px'
    if units not in ("pixels", "A^-1"):
        raise ConfigurationError(
            f"units must be 'pixels' or 'A^-1', got {units!r}", "use units='pixels' or 'A^-1'"
        )
    if calibration is not None and calibration.has_origin:
        qx0, qy0 = calibration.origin_array(peaks.scan_shape)
    else:
        qx0, qy0 = estimate_origin(peaks, origin_radius)
    x0, y0 = qx0[peaks.rx, peaks.ry], qy0[peaks.rx, peaks.ry]
    qx, qy = peaks.qx, peaks.qy
    if calibration is not None and calibration.ellipse is not None:
        qx, qy = ellipse_correction(qx, qy, (x0, y0), *calibration.ellipse)
    kx, ky = qx - x0, qy - y0
    if units == "A^-1":
        if calibration is None:
            raise ConfigurationError(
                "units='A^-1' needs a calibration", "pass a Calibration with the Q pixel size"
            )
        scale = calibration.q_pixel_size_inv_angstrom
        kx, ky = kx * scale, ky * scale
    return kx, ky


# ---- bases ---------------------------------------------------------------------------------
def _vector(name: str, value: Any) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (2,):
        raise ShapeError(
            f"{name} must be a 2-vector (x, y), got shape {v.shape}",
            f"give {name} as (gx, gy) in pixels",
        )
    if not np.isfinite(v).all():
        raise ConfigurationError(
            f"{name} = {value!r} is not finite", f"give {name} as two finite numbers"
        )
    return v


def check_basis(g1: Any, g2: Any) -> tuple[np.ndarray, np.ndarray]:
    """``g1, g2`` as float 2-vectors, checked finite and independent (more than ~3° apart).

    Raises
    ------
    ShapeError
        Not 2-vectors.
    ConfigurationError
        NaN, inf, zero or (nearly) collinear vectors.
    """
    a, b = _vector("g1", g1), _vector("g2", g2)
    norm = math.hypot(*a) * math.hypot(*b)
    if norm == 0 or abs(a[0] * b[1] - a[1] * b[0]) < _MIN_SIN * norm:
        raise ConfigurationError(
            f"g1 = {a.tolist()} and g2 = {b.tolist()} are zero or (nearly) collinear: no 2D lattice",
            "give two independent lattice vectors, or let choose_basis find them",
        )
    return a, b


def reduce_basis(g1: Any, g2: Any) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange–Gauss reduced, right-handed basis of the lattice spanned by ``g1, g2``.

    The result satisfies ``|g1| <= |g2|``, ``|g1·g2| <= |g1|²/2`` (the angle between them is
    60°–120°: ``g1`` is a shortest lattice vector and ``g2`` a shortest one independent of it)
    and ``g1 × g2 > 0`` (``g2`` counter-clockwise from ``g1``).
    """
    a, b = check_basis(g1, g2)
    if a @ a > b @ b:
        a, b = b, a
    while True:
        # Subtract the multiple of a that brings b closest to the origin (integer Euclid).
        b = b - np.rint((a @ b) / (a @ a)) * a
        if b @ b >= a @ a:
            break
        a, b = b, a
    if a[0] * b[1] - a[1] * b[0] < 0:
        b = -b
    return a, b


def conventional_basis(g1: Any, g2: Any) -> tuple[np.ndarray, np.ndarray]:
    """The conventional reduced basis of the lattice spanned by ``g1, g2``.

    Among the symmetry-equivalent reduced bases: ``g1`` is the shortest lattice vector (ties
    within 2 % of length) closest in angle to the +x axis (detector axis -2; an exact tie
    goes to the counter-clockwise one); ``g2`` is the shortest vector completing a
    right-handed primitive basis (``g1 × g2 > 0``), ties going to the smaller angle from
    ``g1`` (so a hexagonal lattice gets 60°, not 120°). Strain does not depend on this
    choice; it only makes the automatic basis reproducible.
    """
    a, b = reduce_basis(g1, g2)
    n = np.arange(-2, 3)
    hk = np.stack(np.meshgrid(n, n, indexing="ij"), axis=-1).reshape(-1, 2)
    hk = hk[(hk != 0).any(axis=1)]
    vecs = hk[:, :1] * a + hk[:, 1:] * b
    length = np.hypot(vecs[:, 0], vecs[:, 1])
    angle = np.arctan2(vecs[:, 1], vecs[:, 0])
    short = np.flatnonzero(length <= (1 + _SAME_LENGTH) * length.min())
    first = short[np.lexsort((-angle[short], np.round(np.abs(angle[short]), 9)))[0]]
    h1, k1 = hk[first]
    # Integer determinant +1 with (h1, k1): together a right-handed primitive basis.
    complete = np.flatnonzero(h1 * hk[:, 1] - k1 * hk[:, 0] == 1)
    short = complete[length[complete] <= (1 + _SAME_LENGTH) * length[complete].min()]
    turn = np.mod(angle[short] - angle[first], 2 * np.pi)
    return vecs[first], vecs[short[np.argmin(turn)]]


class Indexing(NamedTuple):
    """Miller indices of peaks in a 2D lattice basis."""

    h: np.ndarray
    """Index along ``g1`` (int64), the nearest lattice node; meaningful where ``indexed``."""
    k: np.ndarray
    """Index along ``g2`` (int64)."""
    indexed: np.ndarray
    """True where the peak lies within ``max_error`` of its node."""
    error: np.ndarray
    """Distance from the peak to its node, in the units of the positions."""


def _per_row(name: str, value: Any, n: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape not in ((2,), (n, 2)):
        raise ShapeError(
            f"{name} has shape {arr.shape}", f"give {name} as (2,) or one (x, y) per peak, ({n}, 2)"
        )
    if not np.isfinite(arr).all():
        raise ConfigurationError(f"{name} contains NaN or inf", f"give finite values of {name}")
    return np.broadcast_to(arr, (n, 2))


def index_peaks(
    kx: Any,
    ky: Any,
    g1: Any,
    g2: Any,
    origin: Any = (0.0, 0.0),
    max_error: float | None = None,
) -> Indexing:
    """Index peaks in a lattice basis by rounding their lattice coordinates.

    Solves ``r - origin = u·g1 + v·g2`` for each peak, rounds ``(u, v)`` to ``(h, k)`` and
    flags the peak as indexed when its distance to the node ``origin + h·g1 + k·g2`` is at
    most ``max_error``. Rounding in a reduced basis finds the nearest node for peaks within
    ``max_error`` of one, as long as ``max_error`` stays well under half the node spacing.

    Parameters
    ----------
    kx, ky
        Peak positions (1-D, one per peak), e.g. from :func:`centered_peaks`.
    g1, g2
        Basis vectors, ``(2,)`` or one per peak ``(N, 2)`` (e.g. per-position bases expanded
        to the peaks).
    origin
        Lattice offset ``g0``, ``(2,)`` or ``(N, 2)``.
    max_error
        Distance tolerance, same units as the positions; default 0.2 of the shortest of
        ``|g1|, |g2|, |g1 ± g2|`` (the node spacing).

    Returns
    -------
    Indexing
        ``h, k, indexed, error`` per peak.
    """
    x = np.asarray(kx, dtype=np.float64)
    y = np.asarray(ky, dtype=np.float64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ShapeError(
            f"kx and ky have shapes {x.shape} and {y.shape}",
            "give two 1-D arrays, one value per peak",
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InvalidDataError("peak positions contain NaN or inf", "drop those peaks first")
    n = x.size
    a, b, o = _per_row("g1", g1, n), _per_row("g2", g2, n), _per_row("origin", origin, n)
    det = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    norm = np.hypot(a[:, 0], a[:, 1]) * np.hypot(b[:, 0], b[:, 1])
    if np.any(np.abs(det) < _MIN_SIN * norm) or np.any(norm == 0):
        raise ConfigurationError(
            "g1 and g2 are zero or (nearly) collinear: no 2D lattice",
            "give two independent lattice vectors, or let choose_basis find them",
        )
    if max_error is None:
        spacing = np.min([np.hypot(*v.T) for v in (a, b, a + b, a - b)], axis=0)
        max_error = _PEAK_TOLERANCE * spacing
    elif not (math.isfinite(max_error) and max_error > 0):
        raise ConfigurationError(
            f"max_error must be a positive distance, got {max_error!r}",
            "e.g. max_error=2.0 (pixels)",
        )
    dx, dy = x - o[:, 0], y - o[:, 1]
    # Inverse of the 2x2 matrix with columns g1, g2, applied row by row.
    u = (b[:, 1] * dx - b[:, 0] * dy) / det
    v = (a[:, 0] * dy - a[:, 1] * dx) / det
    h, k = np.rint(u), np.rint(v)
    error = np.hypot(dx - h * a[:, 0] - k * b[:, 0], dy - h * a[:, 1] - k * b[:, 1])
    return Indexing(h.astype(np.int64), k.astype(np.int64), error <= max_error, error)


def _weighted_lattice_lsq(
    group: np.ndarray,
    n_groups: int,
    h: np.ndarray,
    k: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched weighted least squares ``(x, y) = g0 + h·g1 + k·g2``, one fit per group.

    The normal equations ``Σ w d dᵀ · [g0 g1 g2]ᵀ = Σ w d (x, y)`` with ``d = (1, h, k)`` are
    summed per group with ``bincount`` and solved as a stack of 3×3 systems.

    Returns
    -------
    solution
        ``(n_groups, 3, 2)``: rows g0, g1, g2 (NaN where not solvable).
    n
        ``(n_groups,)`` number of rows with positive weight.
    solvable
        ``(n_groups,)``: the nodes ``(h, k)`` with positive weight are not all collinear.
    """
    d = (np.ones_like(h, dtype=np.float64), h.astype(np.float64), k.astype(np.float64))
    used = w > 0

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=values, minlength=n_groups)

    normal = np.empty((n_groups, 3, 3))
    counts = np.empty((n_groups, 3, 3))
    rhs = np.empty((n_groups, 3, 2))
    for i in range(3):
        rhs[:, i, 0], rhs[:, i, 1] = total(w * d[i] * x), total(w * d[i] * y)
        for j in range(i, 3):
            normal[:, i, j] = normal[:, j, i] = total(w * d[i] * d[j])
            counts[:, i, j] = counts[:, j, i] = total(used * d[i] * d[j])
    # The unweighted Gram matrix of integer rows has an integer determinant (Cauchy–Binet),
    # >= 1 exactly when three of the nodes are not collinear.
    solvable = np.linalg.det(counts) > 0.5
    solution = np.full((n_groups, 3, 2), np.nan)
    if solvable.any():
        solution[solvable] = np.linalg.solve(normal[solvable], rhs[solvable])
    return solution, counts[:, 0, 0].astype(np.int64), solvable


# ---- automatic basis from the Bragg vector map ---------------------------------------------
def _map_spots(
    kx: np.ndarray, ky: np.ndarray, intensity: np.ndarray, min_spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spots of the count-weighted Bragg vector map: centroids, counts and summed intensities.

    Every peak counts once (not by intensity) so that a spot's count says how many patterns
    show it: a weak low-order reflection present everywhere outweighs scattered spurious
    detections however bright. Maxima of the map smoothed by 1 px, at least
    ``min_spacing`` apart, are measured by the summed counts, centroid and summed
    intensity (clipped at 0) within ``min_spacing / 2`` (bilinear deposition keeps
    centroids exact).

    Returns
    -------
    positions, counts, intensities
        ``(M, 2)``, ``(M,)``, ``(M,)``.
    """
    half = (int(math.ceil(max(np.abs(kx).max(), np.abs(ky).max()))) + 3,) * 2
    shape = (2 * half[0], 2 * half[1])
    bvm = bragg_vector_map(kx, ky, 1.0, shape, 0.0, 0.0)
    smooth = ndimage.gaussian_filter(bvm, 1.0)
    size = 2 * int(math.ceil(min_spacing / 2)) + 1
    is_max = (smooth == ndimage.maximum_filter(smooth, size=size)) & (smooth > 0)
    r = min_spacing / 2
    n = int(math.ceil(r))
    ox, oy = np.mgrid[-n : n + 1, -n : n + 1]
    disk = (ox**2 + oy**2 <= r**2).astype(np.float64)
    counts = ndimage.correlate(bvm, disk, mode="constant")
    first_x = ndimage.correlate(bvm, disk * ox, mode="constant")
    first_y = ndimage.correlate(bvm, disk * oy, mode="constant")
    bright = bragg_vector_map(kx, ky, np.clip(intensity, 0.0, None), shape, 0.0, 0.0)
    summed = ndimage.correlate(bright, disk, mode="constant")
    i, j = np.nonzero(is_max)
    c = counts[i, j]
    pos = np.stack([i - half[0] + first_x[i, j] / c, j - half[1] + first_y[i, j] / c], axis=1)
    return pos, c, summed[i, j]


class Basis(NamedTuple):
    """Reciprocal basis chosen on the Bragg vector map, centred undistorted pixels."""

    g1: np.ndarray
    """First basis vector ``(2,)``."""
    g2: np.ndarray
    """Second basis vector ``(2,)``."""
    spots: np.ndarray
    """``(M, 2)`` positions of the map spots used (the origin spot included, if present)."""
    counts: np.ndarray
    """``(M,)`` number of peaks in each spot."""
    hk: np.ndarray
    """``(M, 2)`` indices of the spots in ``(g1, g2)``."""
    indexed: np.ndarray
    """``(M,)`` True for spots indexed by the basis (those the refinement used)."""


def _best_pair(vecs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The basis pair of smallest cell area that indexes ≥ 90 % of the spot weight.

    Any two spots of a lattice generate a sub-lattice of it, never a finer one, so among the
    pairs that index (nearly) all spots the smallest cell is primitive: a pair such as
    ``(g1, 2·g1 + g2)`` or ``(g1, 2·g2)`` misses spots and a spot missing from the map
    cannot trick the choice into a non-primitive cell. The weights are the spots' summed
    peak intensities (see :func:`choose_basis`). The pair chosen (or, where none indexes
    enough, the one indexing most) may still span twice the true cell when extinctions
    empty the rows between the shortest spots: :func:`_index_two_net` halves it then.
    """
    order = np.argsort(np.hypot(vecs[:, 0], vecs[:, 1]))
    short = vecs[order[:_N_BASIS_SPOTS]]
    i, j = np.triu_indices(len(short), k=1)
    a, b = short[i], short[j]
    length_a, length_b = np.hypot(*a.T), np.hypot(*b.T)
    area = np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    ok = area >= _MIN_SIN * length_a * length_b
    a, b, area = a[ok], b[ok], area[ok]
    if not len(a):
        raise InvalidDataError(
            "the Bragg vector map has no two independent spots: no 2D lattice",
            "check the origin calibration, lower threshold or min_spacing, or give g1 and g2",
        )
    fraction, _ = _indexed_weight(vecs, weights, a, b)
    good = np.flatnonzero(fraction >= _MIN_INDEXED)
    best = good[np.argmin(area[good])] if good.size else int(np.argmax(fraction))
    a, b = _index_two_net(vecs, weights, a[best], b[best])
    if _indexed_weight(vecs, weights, a[None], b[None])[0][0] < _MIN_INDEXED:
        raise InvalidDataError(
            f"no pair of Bragg-vector-map spots indexes {_MIN_INDEXED:.0%} of the spot intensity: "
            "they do not form one 2D lattice (polycrystal, several grains, or a wrong origin)",
            "give g1 and g2 by hand, or restrict the peaks to one grain",
        )
    return a, b


def _indexed_weight(
    vecs: np.ndarray, weights: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of the spot weight each basis ``(a[i], b[i])`` indexes, and which spots.

    Each basis is reduced first and spots are indexed to :data:`_SPOT_TOLERANCE` of its
    shortest vector (two long spots can span a dense lattice whose nodes lie closer than
    their own lengths). Every spot in every basis at once: bases × spots.
    """
    reduced = np.array([reduce_basis(p, q) for p, q in zip(a, b, strict=True)])
    a, b = reduced[:, 0], reduced[:, 1]
    tol = _SPOT_TOLERANCE * np.hypot(a[:, 0], a[:, 1])
    m = len(vecs)
    error = index_peaks(
        np.tile(vecs[:, 0], len(a)),
        np.tile(vecs[:, 1], len(a)),
        np.repeat(a, m, 0),
        np.repeat(b, m, 0),
    ).error.reshape(len(a), m)
    indexed = error <= tol[:, None]
    return (indexed * weights).sum(axis=1) / weights.sum(), indexed


def _index_two_net(
    vecs: np.ndarray, weights: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The basis ``a, b``, or the index-2 finer net whose new nodes hold spots.

    Glide planes and screw axes empty every other row of some zone-axis nets near the
    origin (a 2D net that looks centred), so the shortest spots span a net of twice the
    true cell and the odd rows further out are missed. Of the three nets with half the
    cell (``a/2``, ``b/2`` or ``(a + b)/2`` added), the one whose added nodes carry at
    least :data:`_HALF_NODE_WEIGHT` of the weight in two or more spots replaces it (spots
    off the zero-order net, such as higher-order Laue zone reflections of a thin crystal,
    fall on such nodes only by chance).
    """
    finer = np.array([[a / 2, b], [a, b / 2], [(a + b) / 2, b]])
    before, parent = _indexed_weight(vecs, weights, a[None], b[None])
    fraction, indexed = _indexed_weight(vecs, weights, finer[:, 0], finer[:, 1])
    added = indexed & ~parent
    gain = (added * weights).sum(axis=1) / weights.sum()
    rejected = (added.sum(axis=1) < 2) | (gain < _HALF_NODE_WEIGHT) | (fraction < before)
    gain[rejected] = -np.inf
    best = int(np.argmax(gain + fraction))
    return (finer[best, 0], finer[best, 1]) if np.isfinite(gain[best]) else (a, b)


def fit_net(vectors: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced basis of the 2D lattice through one pattern's spots, fitted to all of them.

    The smallest cell indexing ≥ 90 % of the weight of the shortest spots (:func:`choose_basis`
    step 2), then weighted least-squares fits ``spot = g0 + h·g1 + k·g2`` through the indexed
    spots, first the short ones, then all: a basis read off two noisy spots is off by their
    position error, which grows with the index and would mis-index the far spots, while the
    fitted basis carries the precision of every spot.

    Parameters
    ----------
    vectors
        ``(M, 2)`` spot positions relative to the origin (any units), direct beam removed.
    weights
        ``(M,)`` positive spot weights.

    Returns
    -------
    g1, g2
        Lagrange–Gauss reduced basis (:func:`reduce_basis`).

    Raises
    ------
    InvalidDataError
        The spots do not form one 2D lattice.
    """
    vectors = np.asarray(vectors, np.float64).reshape(-1, 2)
    weights = np.asarray(weights, np.float64).reshape(-1)
    short = np.argsort(np.hypot(vectors[:, 0], vectors[:, 1]))[: 2 * _N_BASIS_SPOTS]
    a, b = reduce_basis(*_best_pair(vectors[short], weights[short]))
    for subset in (short, np.arange(len(vectors))):
        v = vectors[subset]
        idx = index_peaks(
            v[:, 0], v[:, 1], a, b, max_error=_SPOT_TOLERANCE * min(np.hypot(*a), np.hypot(*b))
        )
        solution, _, solvable = _weighted_lattice_lsq(
            np.zeros(len(v), np.int64), 1, idx.h, idx.k, *v.T, weights[subset] * idx.indexed
        )
        if solvable[0]:
            a, b = solution[0, 1], solution[0, 2]
    return reduce_basis(a, b)


def choose_basis(
    peaks: BraggPeaks,
    calibration: Calibration | None = None,
    *,
    g1: Any = None,
    g2: Any = None,
    min_spacing: float = 5.0,
    threshold: float = 0.1,
    refine: bool = True,
) -> Basis:
    """Reciprocal lattice basis ``g1, g2`` of a scan, from its Bragg vector map.

    Automatic choice (``g1``, ``g2`` not given):

    1. spots of the count-weighted Bragg vector map of the centred, undistorted peaks,
       keeping those with at least ``threshold`` times the counts of the strongest spot
       away from the origin (intensities play no part, so bright high-order reflections
       cannot displace the short ones);
    2. among pairs of the shortest spots, the smallest cell that indexes ≥ 90 % of the
       spots' summed intensity (a primitive cell: never ``2·g1`` or ``g1 + g2`` in place of a
       shorter independent vector). Intensity, not counts, here: a weak feature found at a
       fixed place of every pattern, off the lattice, is a spot as frequent as any
       reflection (in 20–40 nm Si [110], displaced peaks of weak disks squeezed between
       bright ones made 4 of 12–16 spots, at 0.6–3 % of the brightest peak's height);
    3. its conventional reduced basis (:func:`conventional_basis`: shortest vectors, 60°–120°
       apart, ``g1`` nearest the +x axis, right-handed).

    Given ``g1`` and ``g2``, that basis is kept (any, not necessarily reduced: e.g. the
    basis of a conventional cell). Either way, with ``refine`` the vectors are then fitted
    by count-weighted least squares through the indexed spots, ``spot = g0 + h·g1 + k·g2``.

    Parameters
    ----------
    peaks
        Raw peak table of the scan.
    calibration
        Origin and ellipse (see :func:`centered_peaks`).
    g1, g2
        Manual basis, centred undistorted pixels; both or neither.
    min_spacing
        Smallest distance between two spots of the map, pixels; spots within it of the
        origin count as the origin.
    threshold
        Smallest spot weight kept, relative to the strongest spot off the origin.
    refine
        Fit the basis through the spots.

    Returns
    -------
    Basis
        ``g1, g2`` and the spots behind them.
    """
    if (g1 is None) != (g2 is None):
        raise ConfigurationError(
            "only one of g1, g2 is given",
            "give both basis vectors, or neither for the automatic choice",
        )
    if not (math.isfinite(min_spacing) and min_spacing >= 1):
        raise ConfigurationError(
            f"min_spacing must be >= 1 pixel, got {min_spacing!r}", "e.g. min_spacing=5"
        )
    if not (0 < threshold < 1):
        raise ConfigurationError(
            f"threshold must be in (0, 1), got {threshold!r}", "e.g. threshold=0.1"
        )
    if len(peaks) == 0:
        raise InvalidDataError(
            "the peak table is empty", "detect Bragg disks first (or lower the detection threshold)"
        )
    kx, ky = centered_peaks(peaks, calibration)
    spots, counts, summed = _map_spots(kx, ky, peaks.intensity, min_spacing)
    at_origin = np.hypot(spots[:, 0], spots[:, 1]) < min_spacing
    if not (~at_origin).any():
        raise InvalidDataError(
            "the Bragg vector map has no spot away from the origin",
            "check the peak table and the origin calibration",
        )
    keep = counts >= threshold * counts[~at_origin].max()
    spots, counts, summed, at_origin = spots[keep], counts[keep], summed[keep], at_origin[keep]
    if g1 is None:
        # Tables without positive intensities fall back on the counts.
        weight = summed if summed[~at_origin].sum() > 0 else counts
        a, b = conventional_basis(*_best_pair(spots[~at_origin], weight[~at_origin]))
    else:
        a, b = check_basis(g1, g2)
    idx = index_peaks(
        spots[:, 0], spots[:, 1], a, b, max_error=_SPOT_TOLERANCE * min(np.hypot(*a), np.hypot(*b))
    )
    if refine:
        group = np.zeros(len(spots), dtype=np.int64)
        w = counts * idx.indexed
        solution, _, solvable = _weighted_lattice_lsq(
            group, 1, idx.h, idx.k, spots[:, 0], spots[:, 1], w
        )
        if solvable[0]:
            a, b = solution[0, 1], solution[0, 2]
    return Basis(a, b, spots, counts, np.stack([idx.h, idx.k], axis=1), idx.indexed)


# ---- per-position lattice fit -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LatticeFit:
    """Lattice fitted at every scan position, centred undistorted detector pixels.

    Attributes
    ----------
    g1, g2
        ``(Rx, Ry, 2)`` basis vectors (x along detector axis -2, y along -1); NaN where
        ``mask`` is False.
    origin
        ``(Rx, Ry, 2)`` fitted lattice offset ``g0`` (residual origin error), pixels.
    residual
        ``(Rx, Ry)`` weighted RMS distance of the indexed peaks from the fitted nodes, pixels.
    n_peaks
        ``(Rx, Ry)`` number of indexed peaks with positive weight.
    mask
        ``(Rx, Ry)`` True where the fit is valid: at least ``min_peaks`` indexed peaks whose
        nodes are not all on one line.
    """

    g1: np.ndarray
    g2: np.ndarray
    origin: np.ndarray
    residual: np.ndarray
    n_peaks: np.ndarray
    mask: np.ndarray

    @property
    def scan_shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]


def _peak_weights(peaks: BraggPeaks, weights: Any) -> np.ndarray:
    if isinstance(weights, str):
        if weights == "intensity":
            w = peaks.intensity
        elif weights == "uniform":
            return np.ones(len(peaks))
        else:
            raise ConfigurationError(
                f"unknown weights {weights!r}", "use 'intensity', 'uniform' or one weight per peak"
            )
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(peaks),):
            raise ShapeError(
                f"weights has shape {w.shape} for {len(peaks)} peaks", "give one weight per peak"
            )
    if not np.isfinite(w).all() or (w < 0).any():
        raise InvalidDataError(
            "peak weights contain negative, NaN or inf values",
            "use weights='uniform', or clip the intensities at zero",
        )
    return w


def _group_median(group: np.ndarray, values: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` per group (the mean of the two middle values for even counts);
    NaN for empty groups."""
    order = np.lexsort((values, group))
    counts = np.bincount(group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    lo = starts + (counts - 1) // 2
    hi = starts + counts // 2
    med = np.full(n_groups, np.nan)
    some = counts > 0
    sorted_values = values[order]
    med[some] = 0.5 * (sorted_values[lo[some]] + sorted_values[hi[some]])
    return med


def _node_distances(
    kx: np.ndarray, ky: np.ndarray, h: np.ndarray, k: np.ndarray, lattice: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``(ex, ey)`` of peaks from their nodes ``g0 + h·g1 + k·g2`` (per-peak rows)."""
    ex = kx - lattice[:, 0, 0] - h * lattice[:, 1, 0] - k * lattice[:, 2, 0]
    ey = ky - lattice[:, 0, 1] - h * lattice[:, 1, 1] - k * lattice[:, 2, 1]
    return ex, ey


def fit_lattice(
    peaks: BraggPeaks,
    g1: Any,
    g2: Any,
    calibration: Calibration | None = None,
    *,
    origin: Any = (0.0, 0.0),
    min_peaks: int = 5,
    max_error: float | None = None,
    weights: Any = "intensity",
    reject: float | None = 3.0,
    reject_floor: float = 0.5,
) -> LatticeFit:
    """Fit ``r = g0 + h·g1 + k·g2`` to the peaks of every scan position.

    Each pass indexes every peak (:func:`index_peaks`) and solves a weighted least-squares
    problem per position for ``g0, g1, g2`` (six unknowns, three per axis with the shared
    design ``(1, h, k)``), all positions at once. The first pass indexes with the given basis;
    later passes index each position with its own fitted lattice (the given one where the
    fit failed), so that strongly strained positions keep their high-order peaks. After
    each pass, peaks farther from their fitted node than ``reject`` times the median
    distance of the position's fitted peaks (and than ``reject_floor``) are left out of the
    next one, and taken back if a later fit brings them in. Passes stop when neither the
    indexing nor the rejected set changes (at most five).

    Weights. Intensity weights are inverse-variance weights under counting noise: a disk's
    centre scatters as ``1/√N`` with its ``N`` electrons and its correlation height grows as
    ``N``. They also keep the weak, dynamically excited disks (kinematically forbidden
    reflections such as Si 002, whose positions are the least reliable) from counting as
    much as the strong ones. The direct beam, usually the brightest, constrains only
    ``g0`` as long as the diffracted peaks come in Friedel pairs; leaving it out changed
    the benchmark strains by < 0.01 %. On the Si/SiGe multilayer benchmark (see
    :func:`~stemforge.infer.templates.make_kernel`; 5–40 nm, Poisson noise) intensity
    weights gave an e_xx RMSE of at most 0.18 % at 1e5 electrons per pattern and 0.58 % at
    1e4, uniform weights 0.51 % and 4.6 %.

    Rejection. Spurious correlation maxima (counting noise, sidelobes of strong disks)
    that fall within ``max_error`` of a node are indexed as reflections; at 1e4 electrons
    per pattern such peaks took the benchmark's e_xx RMSE up to 1.25 %, and rejection at
    3 × the median (0.5 px floor) brought it to at most 0.58 % (at 1e5 it moved the 10
    and 20 nm scans from 0.14 to 0.10 and 0.16 %; no change without noise). The floor
    keeps the systematic offsets of whole reflections (dynamical contrast, up to 0.4 px
    with the edge kernel in 20–40 nm crystals) in the fit: rejecting them at some
    positions and not at others turns their offsets into strain steps. The plain
    kernel's offsets reach 1–3 px, past the floor: with it, rejection took the 40 nm
    benchmark from 0.23 to 1.2 %; pass ``reject=None``.

    Parameters
    ----------
    peaks
        Raw peak table.
    g1, g2
        Basis to index with (e.g. from :func:`choose_basis`), centred undistorted pixels.
    calibration
        Origin and ellipse (see :func:`centered_peaks`).
    origin
        Expected lattice offset ``g0`` for the first indexing pass, pixels.
    min_peaks
        Fewest indexed peaks for a valid fit (at least 3, the unknowns per axis).
    max_error
        Indexing tolerance in pixels; default 0.2 of the node spacing of ``g1, g2``.
    weights
        ``'intensity'`` (default), ``'uniform'`` or one non-negative weight per peak.
    reject
        Rejection threshold, a multiple (> 1) of the position's median node distance;
        None fits every indexed peak.
    reject_floor
        Node distances up to this many pixels are never rejected.

    Returns
    -------
    LatticeFit
        ``n_peaks`` and ``residual`` count only the peaks kept.
    """
    a, b = check_basis(g1, g2)
    o = _vector("origin", origin)
    if isinstance(min_peaks, bool) or int(min_peaks) != min_peaks or min_peaks < 3:
        raise ConfigurationError(
            f"min_peaks must be an integer >= 3, got {min_peaks!r}", "e.g. min_peaks=5"
        )
    if reject is not None and not (math.isfinite(reject) and reject > 1):
        raise ConfigurationError(
            f"reject must be a number > 1 (a multiple of the median residual), got {reject!r}",
            "e.g. reject=3.0, or None to keep every indexed peak",
        )
    if not (math.isfinite(reject_floor) and reject_floor >= 0):
        raise ConfigurationError(
            f"reject_floor must be a distance >= 0 in pixels, got {reject_floor!r}",
            "e.g. reject_floor=0.5",
        )
    if len(peaks) == 0:
        raise InvalidDataError(
            "the peak table is empty", "detect Bragg disks first (or lower the detection threshold)"
        )
    w = _peak_weights(peaks, weights)
    kx, ky = centered_peaks(peaks, calibration)
    n_pos = peaks.scan_shape[0] * peaks.scan_shape[1]
    group = peaks.rx * peaks.scan_shape[1] + peaks.ry
    given = np.stack([o, a, b])
    basis = np.broadcast_to(given, (n_pos, 3, 2))
    rejected = np.zeros(len(peaks), dtype=bool)
    previous = None
    for _ in range(_MAX_PASSES):
        rows = basis[group]
        idx = index_peaks(kx, ky, rows[:, 1], rows[:, 2], rows[:, 0], max_error)
        state = (idx.h, idx.k, idx.indexed, rejected)
        if previous is not None and all(
            np.array_equal(p, q) for p, q in zip(previous, state, strict=True)
        ):
            break
        previous = state
        wi = w * (idx.indexed & ~rejected)
        solution, n, solvable = _weighted_lattice_lsq(group, n_pos, idx.h, idx.k, kx, ky, wi)
        valid = solvable & (n >= min_peaks)
        # Where this pass failed, keep indexing with the given basis next time.
        basis = np.where(valid[:, None, None], solution, given)
        if reject is not None:
            ex, ey = _node_distances(kx, ky, idx.h, idx.k, basis[group])
            distance = np.hypot(ex, ey)
            # The scale comes from the peaks this pass fitted; outliers inflate it little.
            fitted = wi > 0
            median = _group_median(group[fitted], distance[fitted], n_pos)[group]
            limit = np.maximum(reject * np.nan_to_num(median, nan=np.inf), reject_floor)
            rejected = idx.indexed & (w > 0) & valid[group] & (distance > limit)
    ex, ey = _node_distances(kx, ky, idx.h, idx.k, solution[group])
    # Failed fits are NaN and positions without weight 0/0: both are masked just below.
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.sqrt(
            np.bincount(group, wi * (ex**2 + ey**2), n_pos) / np.bincount(group, wi, n_pos)
        )
    solution[~valid] = np.nan
    residual[~valid] = np.nan
    shape = peaks.scan_shape
    return LatticeFit(
        g1=solution[:, 1].reshape(*shape, 2),
        g2=solution[:, 2].reshape(*shape, 2),
        origin=solution[:, 0].reshape(*shape, 2),
        residual=residual.reshape(shape),
        n_peaks=n.reshape(shape),
        mask=valid.reshape(shape),
    )


#: Spots within this many pixels of the origin are the direct beam ...
DIRECT_BEAM_RADIUS = 1.5
#: ... but never beyond this (Å⁻¹): peak files calibrated straight in Å⁻¹ have 1 Å⁻¹ "pixels",
#: and the shortest reflections of large cells (~20 Å) lie at 0.05 Å⁻¹.
DIRECT_BEAM_REACH = 0.04


def spot_lists(
    peaks: BraggPeaks, calibration: Calibration
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR spot lists in Å⁻¹ about each pattern's origin, direct beam removed.

    Returns
    -------
    q, intensity, offsets
        As :class:`~stemforge.models.peak_features.PeakFeatures` takes them, one list per
        scan position in row-major (rx, ry) order.
    """
    if calibration.q_units == "pixels":
        raise ConfigurationError(
            "the reciprocal-space pixel size is not calibrated",
            "pass --q-pixel-size (Å⁻¹ per pixel, or mrad with --energy), or calibrate the file",
        )
    qx, qy = centered_peaks(peaks, calibration, units="A^-1")
    pixel = calibration.q_pixel_size_inv_angstrom
    diffracted = np.hypot(qx, qy) > min(DIRECT_BEAM_RADIUS * pixel, DIRECT_BEAM_REACH)
    kept = peaks.select(diffracted)
    q = np.stack([qx[diffracted], qy[diffracted]], axis=1)
    return q, np.asarray(kept.intensity, float), kept.offsets
