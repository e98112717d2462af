"""Scoring a Bragg peak detector: one-to-one matching of detected peaks to true positions.

A detected peak is a true positive when it is paired with a true position no farther than
a tolerance. Pairs are one-to-one and chosen by an optimal assignment (Hungarian
algorithm, :func:`scipy.optimize.linear_sum_assignment`): first as many pairs as
possible, then, among those, the smallest total distance. Greedy nearest-neighbour
pairing can lose matches that the assignment keeps (a detection between two reflections
taken by the wrong one). Unpaired detections are false positives, unpaired true
positions false negatives; ``accuracy = TP / (TP + FP + FN)``.

Positions that should be neither found nor missed (the central beam, reflections too weak
or too close to the detector edge to count) can be passed as ``ignore``: an unpaired
detection within the tolerance of one of them is dropped rather than counted as false.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from stemforge.core.errors import ConfigurationError, ShapeError


class PeakMatch(NamedTuple):
    """Outcome of :func:`match_peaks` for one pattern.

    Attributes
    ----------
    tp, fp, fn
        True positives (pairs), false positives (unpaired, not ignored detections) and
        false negatives (unpaired true positions).
    errors
        ``(tp,)`` distance of each pair, in the units of the positions.
    """

    tp: int
    fp: int
    fn: int
    errors: np.ndarray


def _points(value: Any, name: str) -> np.ndarray:
    points = np.asarray(value, dtype=np.float64)
    if points.size == 0:
        return points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ShapeError(
            f"{name} must be an (n, 2) array of positions, got shape {points.shape}",
            "pass the qx, qy columns only (e.g. table[:, :2])",
        )
    if not np.isfinite(points).all():
        raise ShapeError(f"{name} holds NaN or inf positions", "drop them before scoring")
    return points


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])


def match_peaks(detected: Any, truth: Any, tolerance: float, ignore: Any = None) -> PeakMatch:
    """Pair detected peaks with true positions one to one, within ``tolerance``.

    Parameters
    ----------
    detected
        ``(n, 2)`` detected positions.
    truth
        ``(m, 2)`` true positions, in the same units.
    tolerance
        Largest distance of a pair (> 0).
    ignore
        ``(k, 2)`` positions that are not scored: unpaired detections within ``tolerance``
        of one of them count neither as true nor as false positives.

    Returns
    -------
    PeakMatch
        ``(tp, fp, fn, errors)``.
    """
    if not (isinstance(tolerance, int | float | np.number) and 0 < tolerance < np.inf):
        raise ConfigurationError(
            f"tolerance must be a positive number, got {tolerance!r}", "e.g. half a disk radius"
        )
    detected, truth = _points(detected, "detected"), _points(truth, "truth")
    distance = _distances(detected, truth)
    feasible = distance <= tolerance
    # A pair outside the tolerance costs more than any set of feasible pairs, so the
    # assignment first maximises the number of feasible pairs, then minimises their length.
    cost = np.where(feasible, distance, tolerance * (min(distance.shape) + 1))
    rows, cols = linear_sum_assignment(cost)
    paired = feasible[rows, cols]
    rows, cols = rows[paired], cols[paired]
    unpaired = np.ones(len(detected), bool)
    unpaired[rows] = False
    fp = int(unpaired.sum())
    if ignore is not None and fp:
        ignored = _points(ignore, "ignore")
        fp -= int((_distances(detected[unpaired], ignored) <= tolerance).any(axis=1).sum())
    return PeakMatch(len(rows), fp, len(truth) - len(rows), distance[rows, cols])
