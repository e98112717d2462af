"""Crystal-ID predictions of a model that cannot tell: shared by the aggregate tests."""

from __future__ import annotations

import numpy as np

from stemforge.models.crystal_id import PatternPredictions


def uninformed_predictions(lists) -> PatternPredictions:
    """Equal system and group probabilities for every pattern of ``lists`` (a
    :class:`~stemforge.datasets.peak_lists.PeakLists`), with its nets and indexed spots: the
    patterns alone decide the aggregate."""
    n = len(lists)
    return PatternPredictions(
        np.full((n, 7), 1 / 7), np.full((n, 230), 1 / 230), np.zeros((n, 7, 6))
    ).with_nets(lists.q, lists.intensity, lists.offsets)
