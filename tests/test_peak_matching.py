"""Peak matching for detector scores: one-to-one, optimal, tolerant, with ignored positions."""

from __future__ import annotations

import numpy as np
import pytest

from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.infer.peak_matching import match_peaks


def test_pairs_within_tolerance_and_reports_their_distances():
    truth = [[10.0, 10.0], [20.0, 30.0], [40.0, 5.0]]
    detected = [[20.3, 30.4], [10.0, 10.0], [50.0, 50.0]]
    tp, fp, fn, errors = match_peaks(detected, truth, tolerance=1.0)
    assert (tp, fp, fn) == (2, 1, 1)
    np.testing.assert_allclose(sorted(errors), [0.0, 0.5])


def test_pairs_are_one_to_one():
    # Two detections of one reflection: one pair, one false positive.
    tp, fp, fn, errors = match_peaks([[5.0, 5.0], [5.2, 5.0]], [[5.1, 5.0]], tolerance=1.0)
    assert (tp, fp, fn) == (1, 1, 0)
    np.testing.assert_allclose(errors, [0.1])


def test_assignment_keeps_matches_that_greedy_nearest_pairing_loses():
    # The detection at 1.1 is nearest to the truth at 2, but pairing it with 0 lets the
    # detection at 3 take 2: two pairs instead of one.
    truth = [[0.0, 0.0], [2.0, 0.0]]
    detected = [[1.1, 0.0], [3.0, 0.0]]
    tp, fp, fn, errors = match_peaks(detected, truth, tolerance=1.2)
    assert (tp, fp, fn) == (2, 0, 0)
    np.testing.assert_allclose(sorted(errors), [1.0, 1.1])


def test_detections_of_ignored_positions_are_not_false_positives():
    ignore = [[32.0, 32.0], [2.0, 60.0]]  # central beam, a reflection at the edge
    detected = [[32.1, 31.9], [2.2, 60.0], [12.0, 12.0], [40.0, 40.0]]
    tp, fp, fn, _ = match_peaks(detected, [[12.0, 12.5]], tolerance=1.0, ignore=ignore)
    assert (tp, fp, fn) == (1, 1, 0)


def test_empty_inputs():
    tp, fp, fn, errors = match_peaks(np.empty((0, 2)), [[1.0, 1.0]], tolerance=1.0)
    assert (tp, fp, fn, errors.size) == (0, 0, 1, 0)
    tp, fp, fn, errors = match_peaks([[1.0, 1.0]], [], tolerance=1.0, ignore=[])
    assert (tp, fp, fn, errors.size) == (0, 1, 0, 0)


@pytest.mark.parametrize(
    ("detected", "tolerance", "error"),
    [
        (np.zeros((3, 3)), 1.0, ShapeError),
        ([[np.nan, 1.0]], 1.0, ShapeError),
        ([[1.0, 1.0]], 0.0, ConfigurationError),
        ([[1.0, 1.0]], float("inf"), ConfigurationError),
    ],
)
def test_bad_input_is_refused(detected, tolerance, error):
    with pytest.raises(error):
        match_peaks(detected, [[1.0, 1.0]], tolerance)
