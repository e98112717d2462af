"""Peak-list features: invariances, symmetry scores and robustness."""

import numpy as np
import pytest

from stemforge.core.errors import InvalidDataError
from stemforge.models.peak_features import PeakFeatures

FEATURES = PeakFeatures()


def _net(a1, a2, reach=4, q_max=1.5):
    n = np.array(
        [
            (i, j)
            for i in range(-reach, reach + 1)
            for j in range(-reach, reach + 1)
            if (i, j) != (0, 0)
        ]
    )
    q = n @ np.array([a1, a2], float)
    q = q[np.hypot(*q.T) <= q_max]
    return q, np.exp(-2 * np.hypot(*q.T))


def _rotate(q, angle):
    c, s = np.cos(angle), np.sin(angle)
    return q @ np.array([[c, s], [-s, c]])


def _encode(*patterns):
    q = np.concatenate([p[0] for p in patterns])
    intensity = np.concatenate([p[1] for p in patterns])
    offsets = np.concatenate([[0], np.cumsum([len(p[0]) for p in patterns])])
    return FEATURES(q, intensity, offsets)


def test_features_ignore_rotation_order_and_batching():
    rng = np.random.default_rng(0)
    q, intensity = _net((0.31, 0.0), (0.08, 0.43))
    intensity = intensity * rng.uniform(0.5, 1.5, len(q))
    base = _encode((q, intensity))[0]
    order = rng.permutation(len(q))
    for angle in (0.4, 2.0, -1.1):
        np.testing.assert_allclose(
            _encode((_rotate(q, angle)[order], intensity[order]))[0], base, atol=2e-5
        )
    other = _net((0.25, 0.0), (0.125, 0.2165))
    together = _encode(other, (q, intensity), other)
    np.testing.assert_allclose(together[1], base, atol=1e-6)


def test_symmetry_block_recognises_square_and_hexagonal_nets():
    names = FEATURES.names()
    block = FEATURES.block("symmetry")
    rot = {n: names.index(f"rotation[{n}]") - block.start for n in (2, 3, 4, 6)}
    square = _encode(_net((0.3, 0), (0, 0.3)))[0, block]
    hexagonal = _encode(_net((0.3, 0), (0.15, 0.3 * np.sqrt(3) / 2)))[0, block]
    oblique = _encode(_net((0.3, 0), (0.11, 0.37)))[0, block]
    assert square[rot[4]] > 0.8 and square[rot[3]] < 0.1
    assert hexagonal[rot[6]] > 0.8 and hexagonal[rot[3]] > 0.8 and hexagonal[rot[4]] < 0.1
    assert oblique[rot[2]] > 0.8 and max(oblique[rot[3]], oblique[rot[4]], oblique[rot[6]]) < 0.1
    # The reduced cell: |g1|, |g2| and the angle between them.
    cell = _encode(_net((0.3, 0), (0.15, 0.3 * np.sqrt(3) / 2)))[0, FEATURES.block("cell")]
    np.testing.assert_allclose(cell, [0.3, 0.3, np.pi / 3, 1.0], rtol=1e-5)


def test_calibration_error_scales_the_cell_and_keeps_its_shape():
    q, intensity = _net((0.31, 0.0), (0.08, 0.43))
    cell = FEATURES.block("cell")
    base, scaled = _encode((q, intensity))[0, cell], _encode((1.03 * q, intensity))[0, cell]
    np.testing.assert_allclose(scaled[:2], 1.03 * base[:2], rtol=1e-5)
    np.testing.assert_allclose(scaled[2:], base[2:], rtol=1e-5)


def test_missing_weak_spots_change_the_features_little():
    q, intensity = _net((0.31, 0.0), (0.08, 0.43))
    strong = intensity > 1e-3 * intensity.max()
    weak_only = intensity[~strong].sum() + 1e-30
    assert weak_only > 0  # the net has spots below 0.1 % to lose
    full, pruned = _encode((q, intensity))[0], _encode((q[strong], intensity[strong]))[0]
    relative = np.abs(full - pruned).sum() / np.abs(full).sum()
    assert relative < 0.05


def test_empty_patterns_and_bad_input():
    features = FEATURES(np.zeros((0, 2)), np.zeros(0), [0, 0])
    assert features.shape == (1, FEATURES.size) and np.all(np.isfinite(features))
    with pytest.raises(InvalidDataError, match="offsets"):
        FEATURES(np.zeros((3, 2)), np.ones(3), [0, 2])
    with pytest.raises(InvalidDataError, match="negative"):
        FEATURES(np.zeros((1, 2)), -np.ones(1), [0, 1])
    assert len(FEATURES.names()) == FEATURES.size
