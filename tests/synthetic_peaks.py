"""Synthetic Bragg peak tables of known lattices, shared by the lattice and strain tests."""

from __future__ import annotations

import numpy as np

from stemforge.core.braggpeaks import BraggPeaks

DETECTOR = (128, 128)
ORIGIN = (63.6, 64.3)


def nodes(hk_max: int = 8) -> np.ndarray:
    n = np.arange(-hk_max, hk_max + 1)
    return np.stack(np.meshgrid(n, n, indexing="ij"), -1).reshape(-1, 2).astype(float)


def lattice_peaks(
    G: np.ndarray,
    scan_shape: tuple[int, int],
    *,
    origin: tuple[float, float] | np.ndarray = ORIGIN,
    sigma: float = 0.05,
    p_missing: float = 0.2,
    n_spurious: int = 2,
    brightness: str = "low orders",
    seed: int = 0,
) -> BraggPeaks:
    """Peaks of the lattice ``G`` (``(2, 2)`` or ``(Rx, Ry, 2, 2)``, columns g1, g2).

    ``origin`` is one ``(qx0, qy0)`` or ``(Rx, Ry, 2)``. Reflections closer than 3 px to the
    detector edge are not detected; each other one is missing with ``p_missing`` (never the
    direct beam). ``brightness`` 'low orders' gives a Gaussian envelope (direct beam
    brightest), 'high orders' intensities growing as ``|g|²``. Spurious peaks are uniform
    over the detector with 1–5 % of a strong reflection's intensity.
    """
    rng = np.random.default_rng(seed)
    G = np.broadcast_to(np.asarray(G, float), (*scan_shape, 2, 2))
    hk = nodes()
    g = np.einsum("xyij,mj->xymi", G, hk)
    pos = np.broadcast_to(np.asarray(origin, float), (*scan_shape, 2))[:, :, None, :] + g
    inside = ((pos >= 3) & (pos <= np.asarray(DETECTOR) - 4)).all(-1)
    direct = (hk == 0).all(-1)
    keep = inside & ((rng.random(inside.shape) >= p_missing) | direct)
    g2 = (g**2).sum(-1)
    if brightness == "low orders":
        intensity = 100 * np.exp(-g2 / (2 * 50.0**2)) + 900 * direct
    else:
        intensity = 0.1 * g2 + 5 * direct
    rx, ry, m = np.nonzero(keep)
    q = pos[rx, ry, m] + sigma * rng.standard_normal((m.size, 2))
    n = n_spurious * scan_shape[0] * scan_shape[1]
    srx, sry = rng.integers(0, scan_shape[0], n), rng.integers(0, scan_shape[1], n)
    sq = rng.uniform(0, DETECTOR[0] - 1, (n, 2))
    s_int = rng.uniform(1, 5, n) * (1 if brightness == "low orders" else 0.1 * g2.max() / 100)
    return BraggPeaks.from_columns(
        np.r_[rx, srx],
        np.r_[ry, sry],
        np.r_[q[:, 0], sq[:, 0]],
        np.r_[q[:, 1], sq[:, 1]],
        np.r_[intensity[rx, ry, m], s_int],
        scan_shape,
        DETECTOR,
    )
