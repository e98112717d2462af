"""Amorphous and short-range-order analysis: polar transform, FEM, halo, rPDF, classifier.

Every pattern is resampled onto a polar grid about its own origin, in the frame where the
elliptical distortion of the detector is undone (:func:`polar_transform`); radii are then
pixels along the ellipse's ``a`` axis, the frame the Q pixel size refers to (see
:mod:`stemforge.infer.ellipse`). From the polar image ``P(q, φ)`` of each pattern:

- ring statistics (:func:`ring_statistics`): the radial mean ``I(q) = <P>_φ``, the variance
  over the ring and the normalised variance ``V(q) = <P²>_φ / <P>²_φ − 1`` (fluctuation
  electron microscopy, one pattern's ring); over a scan :class:`FEMSums` adds up what the
  two common FEM variances need (:func:`fem_variance`).
- the amorphous halo (:func:`fit_halo`): a Gaussian on a smooth background,
  ``I(q) = c + A w(q; q_s) + B exp(−(q − q₀)² / 2σ²)``, with ``w = (1 + q²/q_s²)⁻²`` the
  square of a screened-Coulomb (Wentzel) electron scattering factor, the shape of the
  ``<f²>`` that carries the diffuse intensity. Position ``q₀`` (Å⁻¹; ``d = 1/q₀`` Å) and
  FWHM ``2.355 σ`` are density and order proxies.
- the reduced pair-distribution function (:func:`reduced_pdf`): ``I/⟨fit⟩ − 1`` with the
  smooth ``c + A w`` fitted through the oscillations, ``F(q) = q (I/⟨fit⟩ − 1)``, a damping
  window, and ``G(r) = 8π ∫ F(q) sin(2π q r) dq``; with ``q = 1/d`` (no 2π, as everywhere in
  stemforge) this is the usual ``(2/π) ∫ Q (S − 1) sin(Q r) dQ = 4π r ρ₀ (g(r) − 1)`` when
  ``I/⟨fit⟩ = S(q)``.
- crystalline or amorphous (:func:`bragg_fraction`): Bragg disks are compact and much
  brighter than the gaps between them on their ring, while the speckle of an amorphous
  nano-diffraction pattern follows near-exponential statistics whose bright tail is thin.
  The fraction of the scattered intensity (area-weighted, outside the central disk) that
  stands above ``contrast ×`` its ring's lower quartile, after smoothing over about half a
  disk, separates the two.

Reflections detected at crystalline positions are gathered into a d-spacing table and
indexed against candidate structures (:func:`d_spacing_table`, :func:`index_d_spacings`).

Kernels are pure NumPy functions on stacks ``(N, Qx, Qy)`` or profiles ``(N, n_q)``;
:class:`AmorphousMapper` streams a datacube through them one block of scan rows at a time,
and :func:`write_amorphous` writes the results (HDF5, written as it streams, and PNG maps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from stemforge.core.atomic import atomic_output
from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import CalibrationError, ConfigurationError, ShapeError
from stemforge.core.progress import track
from stemforge.infer.ellipse import ellipse_correction

#: FWHM of a Gaussian in units of its σ.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# A ring needs this fraction of its samples on the detector to get statistics.
_MIN_RING_COVERAGE = 0.9
# Patterns per polar batch: their polar images and gather indices stay near 64 MiB.
_BATCH_BYTES = 64 * 2**20
# Halo-fit grid: Gaussian centres per q sample, widths and background screening lengths.
_CENTRES_PER_STEP = 2
_N_WIDTHS = 10
_N_SCREENINGS = 12
# Grid points refined per profile.
_N_STARTS = 6


# ---- polar transform ------------------------------------------------------------------------
@dataclass(frozen=True)
class PolarGrid:
    """Sample points of the polar transform, in the ellipse-corrected frame.

    Attributes
    ----------
    radii
        ``(n_r,)`` radii in corrected pixels, from 0 every ``dr``.
    angles
        ``(n_phi,)`` angles in rad from the qx axis toward qy, ``2π k / n_phi``.
    """

    radii: np.ndarray
    angles: np.ndarray

    @classmethod
    def build(cls, r_max: float, dr: float = 1.0, n_angles: int | None = None) -> PolarGrid:
        """Radii ``0, dr, ... ≤ r_max``; by default about one angle per pixel at ``r_max``."""
        if not (r_max > dr > 0):
            raise ConfigurationError(
                f"the polar grid needs 0 < dr < r_max, got dr={dr!r}, r_max={r_max!r}",
                "check the detector size and the origin",
            )
        if n_angles is None:
            n_angles = 4 * math.ceil(2 * math.pi * r_max / 4)
        if n_angles < 8:
            raise ConfigurationError(f"n_angles must be >= 8, got {n_angles}", "use the default")
        radii = np.arange(0.0, r_max + dr / 2, dr)
        return cls(radii, 2 * np.pi * np.arange(n_angles) / n_angles)


def polar_transform(
    patterns: Any,
    qx0: Any,
    qy0: Any,
    grid: PolarGrid,
    ellipse: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Polar images of a stack of patterns, each about its own origin, ellipse corrected.

    A sample at radius ``r`` and angle ``φ`` of the corrected frame (where the ellipse
    ``(a, b, θ)`` is a circle of radius ``a``) is read, by bilinear interpolation, at the raw
    detector point that :func:`~stemforge.infer.ellipse.ellipse_correction` maps onto it.

    Parameters
    ----------
    patterns
        ``(N, Qx, Qy)`` stack.
    qx0, qy0
        Origin of each pattern in pixels: scalars or ``(N,)``.
    grid
        Radii and angles.
    ellipse
        ``(a, b, θ)`` as in ``Calibration.ellipse``, or None for a round detector.

    Returns
    -------
    numpy.ndarray
        ``(N, n_r, n_phi)`` float64; NaN where a sample falls off the detector.
    """
    stack = np.asarray(patterns)
    if stack.ndim != 3:
        raise ShapeError(
            f"polar_transform needs a stack (N, Qx, Qy), got shape {stack.shape}",
            "reshape a datacube block to (-1, Qx, Qy)",
        )
    n, nx, ny = stack.shape
    qx0 = np.broadcast_to(np.asarray(qx0, float), (n,))
    qy0 = np.broadcast_to(np.asarray(qy0, float), (n,))
    u = np.outer(grid.radii, np.cos(grid.angles))
    v = np.outer(grid.radii, np.sin(grid.angles))
    if ellipse is not None:
        a, b, theta = ellipse
        # The correction stretches the b axis by a/b; swapping a and b gives its inverse.
        u, v = ellipse_correction(u, v, (0.0, 0.0), b, a, theta)
    x = qx0[:, None, None] + u
    y = qy0[:, None, None] + v
    inside = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    i = np.clip(np.floor(x).astype(np.intp), 0, nx - 2)
    j = np.clip(np.floor(y).astype(np.intp), 0, ny - 2)
    fx, fy = x - i, y - j
    flat = stack.reshape(n, -1).astype(np.float64, copy=False)
    base = (i * ny + j).reshape(n, -1)

    def at(offset: int) -> np.ndarray:
        return np.take_along_axis(flat, base + offset, axis=1).reshape(x.shape)

    out = (1 - fx) * ((1 - fy) * at(0) + fy * at(1)) + fx * ((1 - fy) * at(ny) + fy * at(ny + 1))
    out[~inside] = np.nan
    return out


# ---- ring statistics and FEM ----------------------------------------------------------------
@dataclass(frozen=True)
class RingStatistics:
    """Per pattern and radius, ``(N, n_r)`` each; NaN where a ring is mostly off the detector."""

    mean: np.ndarray
    variance: np.ndarray
    normalized_variance: np.ndarray
    """``<P²>/<P>² − 1`` over the ring (NaN where the mean is not positive)."""


def ring_statistics(polar: np.ndarray) -> RingStatistics:
    """Radial mean, variance and normalised variance over the angles of each ring."""
    covered = np.isfinite(polar).mean(axis=-1) >= _MIN_RING_COVERAGE
    filled = np.where(np.isfinite(polar), polar, 0.0)
    count = np.maximum(np.isfinite(polar).sum(axis=-1), 1)
    mean = filled.sum(axis=-1) / count
    variance = np.where(np.isfinite(polar), (polar - mean[..., None]) ** 2, 0.0).sum(-1) / count
    mean, variance = np.where(covered, mean, np.nan), np.where(covered, variance, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(mean > 0, variance / mean**2, np.nan)
    return RingStatistics(mean, variance, normalized)


@dataclass
class FEMSums:
    """Running sums over scan positions of ``P`` and ``P²`` on the polar grid, for FEM.

    Add polar stacks with :meth:`add`; :func:`fem_variance` turns the sums into variances.
    """

    total: np.ndarray
    squares: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, shape: tuple[int, int]) -> FEMSums:
        return cls(np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def add(self, polar: np.ndarray) -> None:
        """Add a stack ``(N, n_r, n_phi)``; NaN samples are left out."""
        good = np.isfinite(polar)
        values = np.where(good, polar, 0.0)
        self.total += values.sum(axis=0)
        self.squares += (values**2).sum(axis=0)
        self.count += good.sum(axis=0)


def fem_variance(sums: FEMSums) -> tuple[np.ndarray, np.ndarray]:
    """The two common FEM variances ``(n_r,)`` from scan sums.

    Returns
    -------
    annular_mean, ring_ensemble : numpy.ndarray
        ``V_Ω(q)``: the normalised variance over positions of each polar pixel, averaged over
        the ring (the annular mean of the variance image); ``V_Γ(q)``: the normalised
        variance of all samples of the ring at all positions together. NaN where a ring has
        too few samples.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums.total / sums.count
        pixel = sums.squares / sums.count / mean**2 - 1
        pixel = np.where((sums.count > 1) & (mean > 0), pixel, np.nan)
        n_phi = sums.count.shape[-1]
        covered = np.isfinite(pixel).sum(axis=-1) >= _MIN_RING_COVERAGE * n_phi
        annular = np.where(covered, np.nanmean(np.where(covered[:, None], pixel, 0.0), -1), np.nan)
        ring_mean = sums.total.sum(-1) / sums.count.sum(-1)
        ensemble = sums.squares.sum(-1) / sums.count.sum(-1) / ring_mean**2 - 1
    return annular, np.where(covered & (ring_mean > 0), ensemble, np.nan)


# ---- crystalline or amorphous ---------------------------------------------------------------
def bragg_fraction(
    polar: np.ndarray,
    radii: np.ndarray,
    r_range: tuple[float, float],
    *,
    smooth: float,
    contrast: float = 10.0,
) -> np.ndarray:
    """Fraction of the scattered intensity in compact features far above their ring.

    The polar image is smoothed with a Gaussian of ``smooth`` pixels along the radius and
    along the arc (about half a disk radius: keeps disk-sized features, averages pixel
    noise); on each ring the intensity above ``contrast ×`` the ring's lower quartile is
    summed. The result is that sum over the annulus ``r_range``, divided by the annulus's
    intensity, both weighted by the radius (detector area). The lower quartile is the
    background between Bragg disks as long as they cover less than 3/4 of their ring (the
    median is not: low-order disks of a converged beam often cover half of it). Bragg disks
    give a large fraction; exponentially distributed speckle, whose lower quartile is
    ``ln(4/3) ≈ 0.29`` of its mean, puts ``exp(−0.29 κ)`` of its intensity above the
    threshold, below 0.1 % at the default ``κ = 10`` before smoothing narrows it further.
    Shot noise widens the distribution: below about one count per pixel in the halo, smooth
    more (or bin the detector).

    Parameters
    ----------
    polar
        ``(N, n_r, n_phi)`` from :func:`polar_transform`.
    radii
        ``(n_r,)`` radii of the polar grid (pixels).
    r_range
        ``(r_inner, r_outer)`` pixels: start outside the central disk.
    smooth
        Gaussian σ in pixels (0: none).
    contrast
        How many times the ring's lower quartile a feature must exceed.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` fractions in [0, 1] (NaN for a pattern without intensity in the annulus).
    """
    rows = (radii >= r_range[0]) & (radii <= r_range[1])
    if rows.sum() < 2:
        raise ConfigurationError(
            f"the annulus {r_range} px holds fewer than two rings of the polar grid",
            "widen the q range (or check the Q pixel size)",
        )
    p = polar[:, rows]
    r = radii[rows]
    fill = np.nanmean(np.where(np.isfinite(p), p, np.nan), axis=-1, keepdims=True)
    valid = np.isfinite(p)
    p = np.where(valid, p, np.nan_to_num(fill))
    if smooth > 0:
        p = ndimage.gaussian_filter1d(p, smooth, axis=1, mode="nearest")
        # Along the arc: σ of smooth/r radians, applied as a periodic Gaussian in Fourier space.
        n_phi = p.shape[-1]
        m = np.fft.rfftfreq(n_phi, 1.0 / n_phi)
        sigma_rad = smooth / np.maximum(r, 1.0)
        transfer = np.exp(-0.5 * (m[None, :] * sigma_rad[:, None]) ** 2)
        p = np.fft.irfft(np.fft.rfft(p, axis=-1) * transfer, n=n_phi, axis=-1)
    p = np.where(valid, p, np.nan)
    quartile = np.nanquantile(p, 0.25, axis=-1, keepdims=True)
    excess = np.clip(p - contrast * np.clip(quartile, 0, None), 0, None)
    weight = r[None, :, None]
    total = np.nansum(np.clip(p, 0, None) * weight, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, np.nansum(excess * weight, axis=(1, 2)) / total, np.nan)


# ---- halo -----------------------------------------------------------------------------------
def screened_background(q: np.ndarray, q_s: float | np.ndarray) -> np.ndarray:
    """``(1 + q²/q_s²)⁻²``: the square of a screened-Coulomb electron scattering factor."""
    return 1.0 / (1.0 + (q / q_s) ** 2) ** 2


@dataclass(frozen=True)
class HaloFit:
    """Halo of each profile, ``(N,)`` arrays; NaN where no halo lies inside the fit window."""

    q: np.ndarray
    """Peak position, Å⁻¹ (or the profile's q units)."""
    fwhm: np.ndarray
    """Full width at half maximum, same units."""
    amplitude: np.ndarray
    """Peak height above the background, intensity units."""
    residual: np.ndarray
    """rms misfit of the model relative to the rms of the profile in the window."""

    @property
    def d(self) -> np.ndarray:
        """``1/q``: the real-space length of the halo, Å."""
        with np.errstate(divide="ignore"):
            return 1.0 / self.q


def _orthonormal(design: np.ndarray) -> np.ndarray:
    """Orthonormal bases ``(..., n, k)`` of the column spaces of a stack of designs."""
    return np.linalg.qr(design)[0]


def _halo_design(q: np.ndarray, weight: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Weighted designs ``(N, n_q, 3)`` for ``params`` rows ``(log q_s, q₀, log σ)``."""
    q_s, q0, sigma = np.exp(params[:, 0]), params[:, 1], np.exp(params[:, 2])
    columns = (
        np.ones((len(params), len(q))),
        screened_background(q[None, :], q_s[:, None]),
        np.exp(-0.5 * ((q[None, :] - q0[:, None]) / sigma[:, None]) ** 2),
    )
    return np.stack(columns, axis=-1) * weight[None, :, None]


def _projected(
    yw: np.ndarray, q: np.ndarray, weight: np.ndarray, params: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals ``(N, n_q)`` and linear coefficients ``(N, 3)`` of the best linear fit."""
    design = _halo_design(q, weight, params)
    normal = np.einsum("nqi,nqj->nij", design, design)
    # A whisker of ridge keeps degenerate designs (q_s far outside the window) solvable.
    normal += 1e-12 * np.trace(normal, axis1=1, axis2=2)[:, None, None] * np.eye(3)
    coef = np.linalg.solve(normal, np.einsum("nqi,nq->ni", design, yw)[..., None])[..., 0]
    return yw - np.einsum("nqi,ni->nq", design, coef), coef


def _levenberg_marquardt(
    yw: np.ndarray, q: np.ndarray, weight: np.ndarray, params: np.ndarray, iterations: int = 30
) -> np.ndarray:
    """Refine the nonlinear parameters of every profile at once (variable projection)."""
    damping = np.full(len(params), 1e-3)
    residual, _ = _projected(yw, q, weight, params)
    cost = (residual**2).sum(-1)
    h = 1e-6
    for _ in range(iterations):
        jacobian = np.stack(
            [(_projected(yw, q, weight, params + h * e)[0] - residual) / h for e in np.eye(3)],
            axis=-1,
        )
        jtj = np.einsum("nqi,nqj->nij", jacobian, jacobian)
        gradient = np.einsum("nqi,nq->ni", jacobian, residual)
        scaled = jtj + damping[:, None, None] * (
            np.eye(3) * np.diagonal(jtj, axis1=1, axis2=2)[:, None, :] + 1e-12 * np.eye(3)
        )
        trial = params - np.linalg.solve(scaled, gradient[..., None])[..., 0]
        trial_residual, _ = _projected(yw, q, weight, trial)
        trial_cost = (trial_residual**2).sum(-1)
        better = trial_cost < cost
        params = np.where(better[:, None], trial, params)
        residual = np.where(better[:, None], trial_residual, residual)
        cost = np.where(better, trial_cost, cost)
        damping = np.where(better, damping / 3, damping * 3)
    return params


def fit_halo(profiles: Any, q: Any, q_range: tuple[float, float]) -> HaloFit:
    """Fit one amorphous halo per radial profile: Gaussian on a screened-Coulomb background.

    The model ``c + A w(q; q_s) + B exp(−(q − q₀)²/2σ²)`` is linear in ``c, A, B`` (variable
    projection: for given ``q_s, q₀, σ`` the best linear fit is a projection). A grid of
    ``q_s, q₀, σ`` shared by all profiles gives the start (each grid point's projection, for
    the whole stack at once, is one contraction with an orthonormal basis); Levenberg–
    Marquardt iterations, batched over the profiles, then refine the three. Rows are weighted
    by ``q``, which balances the steep fall of the profile (and matches ``F(q) = q(S − 1)``).
    Profiles whose Gaussian is not positive, or whose centre leaves the window, get NaN.

    Parameters
    ----------
    profiles
        ``(N, n_q)`` radial means (or ``(n_q,)``).
    q
        ``(n_q,)`` increasing radii, Å⁻¹.
    q_range
        ``(q_min, q_max)``: the fit window, outside the central disk.
    """
    y_all = np.atleast_2d(np.asarray(profiles, float))
    q = np.asarray(q, float)
    sel = (q >= q_range[0]) & (q <= q_range[1])
    if sel.sum() < 8:
        raise ConfigurationError(
            f"the halo fit window {q_range} holds {int(sel.sum())} samples of the profile",
            "widen the q range (at least 8 radial samples)",
        )
    qs_ = q[sel]
    step = float(np.median(np.diff(qs_)))
    lo, hi = float(qs_[0]), float(qs_[-1])
    weight = qs_ / hi
    yw = y_all[:, sel] * weight
    finite = np.all(np.isfinite(yw), axis=1)
    yw = np.where(finite[:, None], yw, 0.0)
    grid = np.stack(
        np.meshgrid(
            np.log(np.geomspace(max(lo, step) / 2, 2 * hi, _N_SCREENINGS)),
            np.arange(lo, hi + step / 4, step / _CENTRES_PER_STEP),
            np.log(np.geomspace(step, (hi - lo) / 3, _N_WIDTHS)),
            indexing="ij",
        ),
        axis=-1,
    ).reshape(-1, 3)
    basis = _orthonormal(_halo_design(qs_, weight, grid))
    captured = (np.einsum("gqk,nq->ngk", basis, yw) ** 2).sum(-1)
    # Several starts: a background shape between grid points can make a wrong one look best.
    starts = np.argsort(-captured, axis=1)[:, :_N_STARTS]
    n, k = starts.shape
    tried = _levenberg_marquardt(np.repeat(yw, k, 0), qs_, weight, grid[starts.ravel()])
    cost = (_projected(np.repeat(yw, k, 0), qs_, weight, tried)[0] ** 2).sum(-1).reshape(n, k)
    params = tried.reshape(n, k, 3)[np.arange(n), np.argmin(cost, axis=1)]
    residual, coef = _projected(yw, qs_, weight, params)
    q0, sigma, amplitude = params[:, 1], np.exp(params[:, 2]), coef[:, 2]
    ok = finite & (amplitude > 0) & (q0 > lo) & (q0 < hi) & (sigma < hi - lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        misfit = np.sqrt((residual**2).mean(-1) / (yw**2).mean(-1))
    return HaloFit(
        q=np.where(ok, q0, np.nan),
        fwhm=np.where(ok, FWHM_PER_SIGMA * sigma, np.nan),
        amplitude=np.where(ok, amplitude, np.nan),
        residual=np.where(finite, misfit, np.nan),
    )


# ---- reduced pair-distribution function ------------------------------------------------------
@dataclass(frozen=True)
class ReducedPDF:
    """A reduced structure function and its pair-distribution function."""

    q: np.ndarray
    """Å⁻¹, the fit window."""
    background: np.ndarray
    """The smooth ``c + A w(q; q_s)`` the profile is normalised by."""
    reduced_structure: np.ndarray
    """``F(q) = q (I/⟨fit⟩ − 1)`` times the damping window, Å⁻¹."""
    r: np.ndarray
    """Å."""
    g: np.ndarray
    """``G(r) = 8π ∫ F(q) sin(2π q r) dq``, Å⁻²."""


def reduced_pdf(
    q: Any,
    profile: Any,
    q_range: tuple[float, float],
    *,
    r_max: float = 10.0,
    dr: float = 0.01,
    taper: float = 0.1,
) -> ReducedPDF:
    """Reduced PDF ``G(r)`` of a radial profile by the structure-function route.

    The smooth background ``c + A w(q; q_s)`` (the ``<f²>``-like shape of :func:`fit_halo`)
    is fitted through the oscillations by minimising ``Σ F(q)²``, i.e. the misfit relative to
    the profile and weighted by ``q`` (two reweighting passes); ``I/⟨fit⟩ − 1`` then plays
    ``S(q) − 1``. The damping window is a sin² ramp over ``taper`` of the window at its low
    end (the profile starts abruptly outside the central disk) times the Lorch function
    ``sin(πq/q_max)/(πq/q_max)`` at the high end, which removes the truncation ripples at a
    resolution of about ``1/q_max`` Å.

    Parameters
    ----------
    q, profile
        ``(n_q,)`` radii (Å⁻¹) and the radial mean intensity.
    q_range
        The window used, Å⁻¹.
    r_max, dr
        ``G(r)`` on ``0, dr, ... ≤ r_max`` Å.
    taper
        Fraction of the window under the low-q ramp.
    """
    q = np.asarray(q, float)
    profile = np.asarray(profile, float)
    sel = (q >= q_range[0]) & (q <= q_range[1]) & np.isfinite(profile)
    if sel.sum() < 8 or np.any(profile[sel] <= 0):
        raise ConfigurationError(
            f"the profile has {int(sel.sum())} positive samples in the window {q_range}",
            "widen the q range; the rPDF needs a positive radial profile",
        )
    qs_, y = q[sel], profile[sel]
    lo, hi = float(qs_[0]), float(qs_[-1])
    screenings = np.geomspace(max(lo, 1e-3) / 2, 2 * hi, 8 * _N_SCREENINGS)
    model = y
    for _ in range(2):
        weight = qs_ / model
        designs = np.stack(
            [
                np.broadcast_to(weight, (len(screenings), len(qs_))),
                screened_background(qs_[None, :], screenings[:, None]) * weight,
            ],
            axis=-1,
        )
        basis = _orthonormal(designs)
        captured = (np.einsum("gqk,q->gk", basis, y * weight) ** 2).sum(-1)
        best = designs[int(np.argmax(captured))]
        coef = np.linalg.lstsq(best, y * weight, rcond=None)[0]
        model = best @ coef / weight
        if np.any(model <= 0):
            raise ConfigurationError(
                "the smooth background fitted to the profile is not positive",
                "narrow the q range to where the profile is diffuse scattering",
            )
    x = (qs_ - lo) / max(hi - lo, 1e-12)
    low = np.sin(0.5 * np.pi * np.clip(x / taper, 0, 1)) ** 2 if taper > 0 else 1.0
    window = low * np.sinc(qs_ / hi)  # np.sinc(t) = sin(πt)/(πt): the Lorch function
    f = qs_ * (y / model - 1) * window
    r = np.arange(0.0, r_max + dr / 2, dr)
    dq = np.gradient(qs_)
    g = 8 * np.pi * (np.sin(2 * np.pi * np.outer(r, qs_)) * (f * dq)).sum(-1)
    return ReducedPDF(qs_, model, f, r, g)


# ---- d-spacing table --------------------------------------------------------------------------
D_SPACING_DTYPE = np.dtype(
    [
        ("q", np.float64),  # Å⁻¹, intensity-weighted mean
        ("q_std", np.float64),  # Å⁻¹
        ("d", np.float64),  # Å
        ("count", np.int64),  # peaks in the cluster
        ("intensity", np.float64),  # summed peak intensities
    ]
)


def d_spacing_table(q: Any, intensity: Any, tolerance: float, min_count: int = 3) -> np.ndarray:
    """Cluster reflection lengths ``|g|`` into a d-spacing table.

    The lengths are histogrammed in bins of ``tolerance / 4``, smoothed over one bin; every
    local maximum holding at least ``min_count`` peaks within ``± tolerance / 2`` is a
    reflection, and the peaks within that window of it make up its row. Unlike a chain of
    gaps, this keeps apart reflections closer than a pixel that each hold many peaks
    (Si [110]: {111} at 0.319 and {002} at 0.368 Å⁻¹).

    Parameters
    ----------
    q
        ``(M,)`` lengths of detected reflections, Å⁻¹ (origin-centred, ellipse-corrected).
    intensity
        ``(M,)`` their intensities (weights of the mean).
    tolerance
        Width of one reflection's cluster, Å⁻¹ (about the Q pixel size).
    min_count
        Smallest cluster kept.

    Returns
    -------
    numpy.ndarray
        Structured array of :data:`D_SPACING_DTYPE`, strongest cluster first.
    """
    q = np.asarray(q, float)
    w = np.clip(np.asarray(intensity, float), 0, None)
    if len(q) == 0:
        return np.zeros(0, dtype=D_SPACING_DTYPE)
    width = tolerance / 4
    edges = np.arange(q.min() - 2 * width, q.max() + 3 * width, width)
    counts = ndimage.gaussian_filter1d(np.histogram(q, edges)[0].astype(float), 1.0)
    centres = (edges[:-1] + edges[1:]) / 2
    peak = (counts >= np.roll(counts, 1)) & (counts > np.roll(counts, -1))
    rows = []
    for centre in centres[peak]:
        member = np.abs(q - centre) <= tolerance / 2
        if member.sum() < min_count:
            continue
        part_q, part_w = q[member], w[member]
        weights = part_w if part_w.sum() > 0 else np.ones_like(part_w)
        mean = float(np.average(part_q, weights=weights))
        rows.append((mean, float(part_q.std()), 1.0 / mean, int(member.sum()), float(part_w.sum())))
    table = np.array(rows, dtype=D_SPACING_DTYPE)
    return table[np.argsort(-table["intensity"], kind="stable")]


def candidate_reflections(structure: Any, q_max: float) -> list[tuple[float, str, bool]]:
    """``(q, "{hkl}", kinematically allowed)`` of a pymatgen structure up to ``q_max`` Å⁻¹.

    One entry per distinct ``|g|`` (q = 1/d), named by its highest member ``{hkl}``. Allowed
    means a geometric structure factor (weighted by atomic number) above 1e-3 of its
    largest; forbidden ones are kept since dynamical scattering often shows them.
    """
    lattice = structure.lattice.reciprocal_lattice_crystallographic
    points = lattice.get_points_in_sphere([[0.0, 0.0, 0.0]], [0.0, 0.0, 0.0], q_max)
    frac = np.asarray(structure.frac_coords)
    z = np.array([site.specie.Z for site in structure], float)
    found: dict[float, tuple[tuple[int, ...], float]] = {}
    for _, length, _, image in points:
        if length < 1e-9:
            continue
        hkl = tuple(int(v) for v in image)
        amplitude = abs(np.sum(z * np.exp(2j * np.pi * frac @ np.asarray(hkl, float))))
        key = round(float(length), 5)
        family = tuple(sorted((abs(v) for v in hkl), reverse=True))
        known_family, known_amplitude = found.get(key, ((), 0.0))
        found[key] = (max(family, known_family), max(amplitude, known_amplitude))
    largest = max((amp for _, amp in found.values()), default=1.0)
    return [
        (key, "{" + "".join(str(v) for v in family) + "}", amp > 1e-3 * largest)
        for key, (family, amp) in sorted(found.items())
    ]


INDEX_DTYPE = np.dtype(
    [
        ("q", np.float64),
        ("d", np.float64),
        ("count", np.int64),
        ("candidate", "S64"),
        ("hkl", "S16"),
        ("d_reference", np.float64),
        ("error", np.float64),  # (d - d_reference) / d_reference
        ("allowed", np.bool_),
    ]
)


def index_d_spacings(
    table: np.ndarray, candidates: dict[str, Any], tolerance: float, relative: float = 0.02
) -> np.ndarray:
    """Index a d-spacing table against candidate structures' reflections.

    Each measured ``q`` takes the nearest reference reflection of any candidate within
    ``max(tolerance, relative · q)`` Å⁻¹ (kinematically allowed ones first at equal
    distance); unmatched rows keep an empty candidate and NaN reference.

    Returns
    -------
    numpy.ndarray
        Structured array of :data:`INDEX_DTYPE`, in the order of ``table``.
    """
    q_max = float(table["q"].max()) * (1 + relative) + tolerance if len(table) else 0.0
    references = [
        (name, q_ref, hkl, allowed)
        for name, structure in candidates.items()
        for q_ref, hkl, allowed in candidate_reflections(structure, q_max)
    ]
    out = np.zeros(len(table), dtype=INDEX_DTYPE)
    out["q"], out["d"], out["count"] = table["q"], table["d"], table["count"]
    out["d_reference"], out["error"] = np.nan, np.nan
    for row, q in zip(out, table["q"], strict=True):
        scored = [
            (abs(q - q_ref), not allowed, name, q_ref, hkl, allowed)
            for name, q_ref, hkl, allowed in references
            if abs(q - q_ref) <= max(tolerance, relative * q)
        ]
        if scored:
            _, _, name, q_ref, hkl, allowed = min(scored)
            row["candidate"], row["hkl"], row["allowed"] = name.encode(), hkl.encode(), allowed
            row["d_reference"] = 1.0 / q_ref
            row["error"] = (1.0 / q - 1.0 / q_ref) * q_ref
    return out


# ---- orchestration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AmorphousSettings:
    """Choices of the amorphous analysis (None: derived from the data).

    Parameters
    ----------
    q_range
        ``(q_min, q_max)`` Å⁻¹ for the halo fit, the classifier and the rPDF; default from
        1.5 bright-field radii + 1 px to the largest radius on the detector.
    smooth
        Smoothing of the classifier, pixels; default half the bright-field radius (≥ 1).
    contrast
        Classifier: times the ring's lower quartile a Bragg feature must exceed.
    threshold
        Classifier: a position is crystalline when its Bragg fraction exceeds this.
    n_angles
        Angles of the polar grid.
    r_max, dr
        Range and step of ``G(r)``, Å.
    """

    q_range: tuple[float, float] | None = None
    smooth: float | None = None
    contrast: float = 10.0
    threshold: float = 0.1
    n_angles: int | None = None
    r_max: float = 10.0
    dr: float = 0.01


@dataclass
class BlockResult:
    """Results for one block of scan rows: profiles ``(rows, Ry, n_q)``, maps ``(rows, Ry)``."""

    radial_mean: np.ndarray
    radial_variance: np.ndarray
    normalized_variance: np.ndarray
    halo_q: np.ndarray
    halo_fwhm: np.ndarray
    halo_amplitude: np.ndarray
    halo_variance: np.ndarray
    bragg_fraction: np.ndarray
    crystalline: np.ndarray


MAP_NAMES = (
    "halo_q",
    "halo_fwhm",
    "halo_amplitude",
    "halo_variance",
    "bragg_fraction",
    "crystalline",
)
PROFILE_NAMES = ("radial_mean", "radial_variance", "normalized_variance")


@dataclass
class AmorphousSummary:
    """Scan-level results after streaming."""

    q: np.ndarray
    maps: dict[str, np.ndarray]
    mean_profile: dict[str, np.ndarray]
    """Radial mean over all, amorphous and crystalline positions (NaN where none)."""
    fem: dict[str, np.ndarray]
    """``annular_mean`` and ``ring_ensemble`` variances, over all and amorphous positions."""
    halo: HaloFit | None
    """Halo of the mean amorphous profile."""
    pdf: ReducedPDF | None
    """rPDF of the mean amorphous profile, None without amorphous positions."""
    settings: dict[str, Any] = field(default_factory=dict)


def _q_pixel_size(calibration: Calibration) -> float:
    try:
        return calibration.q_pixel_size_inv_angstrom
    except CalibrationError as exc:
        raise CalibrationError(
            f"the amorphous analysis reports q in Å⁻¹ and d in Å, but the Q calibration is "
            f"unusable: {exc.problem}",
            "pass --q-pixel-size (in --q-units A^-1 or nm^-1; mrad also needs --energy), "
            "or calibrate the file first (stemforge calibrate --ring R0,R1 --known-spacing D)",
        ) from None


class AmorphousMapper:
    """Streams a datacube through the kernels; accumulates what the scan summary needs.

    Parameters
    ----------
    cube
        Calibrated in Q; the origin is measured (centre of mass per pattern) if absent, the
        ellipse is used when the calibration has one.
    settings
        See :class:`AmorphousSettings`.
    max_bytes
        Block size (bytes or "256MB"); default the memory budget, at most 128 MiB.
    """

    def __init__(
        self,
        cube: DataCube,
        settings: AmorphousSettings | None = None,
        max_bytes: int | str | None = None,
    ) -> None:
        from stemforge.datasets.io.memory import default_memory_budget, parse_size
        from stemforge.infer.bragg_pipeline import with_origin
        from stemforge.infer.virtual import bright_field_radius

        self.settings = settings or AmorphousSettings()
        self.q_pixel = _q_pixel_size(cube.calibration)
        self.cube = with_origin(cube)
        cal = self.cube.calibration
        self.qx0, self.qy0 = cal.origin_array(cube.scan_shape)
        self.ellipse = cal.ellipse
        self.budget = (
            min(128 * 2**20, default_memory_budget())
            if max_bytes is None
            else parse_size(max_bytes)
        )
        nx, ny = cube.detector_shape
        reach = min(
            self.qx0.min(), self.qy0.min(), nx - 1 - self.qx0.max(), ny - 1 - self.qy0.max()
        )
        if self.ellipse is not None:
            a, b, _ = self.ellipse
            reach /= max(1.0, b / a)  # raw radii are b/a times the corrected along the b axis
        self.grid = PolarGrid.build(math.floor(reach), 1.0, self.settings.n_angles)
        self.q = self.grid.radii * self.q_pixel
        self.bf_radius = bright_field_radius(self.cube)
        if self.settings.q_range is None:
            lo = (1.5 * self.bf_radius + 1) * self.q_pixel
            self.q_range = (lo, float(self.q[-1]))
        else:
            self.q_range = tuple(float(v) for v in self.settings.q_range)
        if not (0 <= self.q_range[0] < self.q_range[1]):
            raise ConfigurationError(
                f"the q range {self.q_range} Å⁻¹ is empty", "give --q-range Q0,Q1 with Q0 < Q1"
            )
        self.smooth = (
            max(1.0, self.bf_radius / 2) if self.settings.smooth is None else self.settings.smooth
        )
        shape = (len(self.grid.radii), len(self.grid.angles))
        self.sums = {"all": FEMSums.zeros(shape), "amorphous": FEMSums.zeros(shape)}
        self.profile_sums = {k: np.zeros(len(self.q)) for k in ("all", "amorphous", "crystalline")}
        self.counts = dict.fromkeys(self.profile_sums, 0)
        self.maps = {
            name: np.full(cube.scan_shape, False if name == "crystalline" else np.nan)
            for name in MAP_NAMES
        }

    def _batch(self, stack: np.ndarray, qx0: np.ndarray, qy0: np.ndarray) -> dict[str, np.ndarray]:
        polar = polar_transform(stack, qx0, qy0, self.grid, self.ellipse)
        stats = ring_statistics(polar)
        halo = fit_halo(stats.mean, self.q, self.q_range)
        pixel_range = (self.q_range[0] / self.q_pixel, self.q_range[1] / self.q_pixel)
        fraction = bragg_fraction(
            polar, self.grid.radii, pixel_range, smooth=self.smooth, contrast=self.settings.contrast
        )
        crystalline = fraction > self.settings.threshold
        halo_variance = np.array(
            [
                np.interp(h, self.q, v) if np.isfinite(h) else np.nan
                for h, v in zip(halo.q, stats.normalized_variance, strict=True)
            ]
        )
        for key, keep in (("all", slice(None)), ("amorphous", ~crystalline)):
            self.sums[key].add(polar[keep])
        for key, keep in (
            ("all", np.ones_like(crystalline)),
            ("amorphous", ~crystalline),
            ("crystalline", crystalline),
        ):
            rows = stats.mean[keep]
            self.profile_sums[key] += np.nansum(rows, axis=0)
            self.counts[key] += int(keep.sum())
        return {
            "radial_mean": stats.mean,
            "radial_variance": stats.variance,
            "normalized_variance": stats.normalized_variance,
            "halo_q": halo.q,
            "halo_fwhm": halo.fwhm,
            "halo_amplitude": halo.amplitude,
            "halo_variance": halo_variance,
            "bragg_fraction": fraction,
            "crystalline": crystalline,
        }

    def blocks(self) -> Iterator[tuple[slice, BlockResult]]:
        """Yield ``(rx slice, results)`` block by block (with a progress bar)."""
        cube = self.cube
        per_pattern = len(self.grid.radii) * len(self.grid.angles) * 8 * 8
        batch = max(1, _BATCH_BYTES // per_pattern)
        n_blocks = math.ceil(cube.scan_shape[0] / cube.rows_per_block(self.budget))
        for sl, block in track(cube.iter_blocks(self.budget), n_blocks, "amorphous analysis"):
            rows, ry = block.shape[:2]
            stack = block.reshape(-1, *cube.detector_shape)
            qx0, qy0 = self.qx0[sl].ravel(), self.qy0[sl].ravel()
            parts = [
                self._batch(stack[i : i + batch], qx0[i : i + batch], qy0[i : i + batch])
                for i in range(0, len(stack), batch)
            ]
            merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            result = BlockResult(
                **{k: v.reshape(rows, ry, *v.shape[1:]) for k, v in merged.items()}
            )
            for name in MAP_NAMES:
                self.maps[name][sl] = getattr(result, name)
            yield sl, result

    def summary(self) -> AmorphousSummary:
        """Scan-level results; call after :meth:`blocks` has been consumed."""
        mean_profile = {
            key: self.profile_sums[key] / self.counts[key]
            if self.counts[key]
            else np.full_like(self.q, np.nan)
            for key in self.profile_sums
        }
        fem = {}
        for key, sums in self.sums.items():
            fem[f"{key}_annular_mean"], fem[f"{key}_ring_ensemble"] = fem_variance(sums)
        halo = pdf = None
        if self.counts["amorphous"]:
            halo = fit_halo(mean_profile["amorphous"], self.q, self.q_range)
            pdf = reduced_pdf(
                self.q,
                mean_profile["amorphous"],
                self.q_range,
                r_max=self.settings.r_max,
                dr=self.settings.dr,
            )
        settings = {
            "q_range": list(self.q_range),
            "q_pixel_size": self.q_pixel,
            "smooth_px": self.smooth,
            "contrast": self.settings.contrast,
            "threshold": self.settings.threshold,
            "bright_field_radius_px": self.bf_radius,
            "ellipse": None if self.ellipse is None else list(self.ellipse),
            "n_angles": len(self.grid.angles),
        }
        return AmorphousSummary(self.q, self.maps, mean_profile, fem, halo, pdf, settings)


def map_amorphous(
    cube: DataCube, settings: AmorphousSettings | None = None, max_bytes: int | str | None = None
) -> tuple[dict[str, np.ndarray], AmorphousSummary]:
    """Run the whole analysis in memory: ``(profiles (Rx, Ry, n_q) by name, summary)``."""
    mapper = AmorphousMapper(cube, settings, max_bytes)
    profiles = {name: np.full((*cube.scan_shape, len(mapper.q)), np.nan) for name in PROFILE_NAMES}
    for sl, result in mapper.blocks():
        for name in PROFILE_NAMES:
            profiles[name][sl] = getattr(result, name)
    return profiles, mapper.summary()


def reflection_lengths(
    peaks: BraggPeaks, calibration: Calibration, keep: np.ndarray, q_min: float
) -> tuple[np.ndarray, np.ndarray]:
    """``|g|`` (Å⁻¹) and intensity of the peaks at scan positions ``keep`` (``(Rx, Ry)`` bool),
    origin-centred and ellipse-corrected, beyond ``q_min`` (which drops the direct beam)."""
    x, y = peaks.centered(*calibration.origin_array(peaks.scan_shape))
    if calibration.ellipse is not None:
        x, y = ellipse_correction(x, y, (0.0, 0.0), *calibration.ellipse)
    length = np.hypot(x, y) * _q_pixel_size(calibration)
    chosen = np.asarray(keep, bool)[peaks.rx, peaks.ry] & (length > q_min)
    return length[chosen], peaks.intensity[chosen]


# ---- output -----------------------------------------------------------------------------------
def write_amorphous(
    path: str | Path,
    mapper: AmorphousMapper,
    *,
    extra: Callable[[AmorphousSummary], dict[str, np.ndarray]] | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    pngs: bool = True,
) -> tuple[list[Path], AmorphousSummary]:
    """Stream the analysis into an HDF5 file (atomically) and write PNG maps beside it.

    Layout: ``q`` (Å⁻¹); ``profiles/radial_mean|radial_variance|normalized_variance``
    ``(Rx, Ry, n_q)``; ``maps/halo_q|halo_fwhm|halo_d`` (Å⁻¹, Å⁻¹, Å), ``halo_amplitude``,
    ``halo_variance`` (normalised variance at the halo), ``bragg_fraction``, ``crystalline``
    (bool); ``mean_profile/all|amorphous|crystalline``; ``fem/*`` variances ``(n_q,)``;
    ``halo`` attributes of the mean amorphous halo; ``rpdf/q, background,
    reduced_structure, r, g``; plus the datasets ``extra(summary)`` returns (e.g. the
    indexed ``d_spacings``), inside the same atomic write. Attributes: settings,
    calibration, provenance.

    Returns
    -------
    (paths, summary)
        The HDF5 file then the PNGs, and the scan summary.
    """
    import h5py

    path = Path(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ConfigurationError(
            f"cannot write the amorphous analysis to {path.name!r}", "name the output AMORPH.h5"
        )
    scan, n_q = mapper.cube.scan_shape, len(mapper.q)
    with atomic_output(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("q", data=mapper.q)
        chunks = (1, scan[1], n_q)
        group = f.create_group("profiles")
        sets = {
            name: group.create_dataset(name, (*scan, n_q), "f4", chunks=chunks, fillvalue=np.nan)
            for name in PROFILE_NAMES
        }
        for sl, result in mapper.blocks():
            for name, dataset in sets.items():
                dataset[sl] = getattr(result, name)
        summary = mapper.summary()
        maps = f.create_group("maps")
        for name, values in summary.maps.items():
            maps.create_dataset(name, data=values)
        with np.errstate(divide="ignore"):
            maps.create_dataset("halo_d", data=1.0 / summary.maps["halo_q"])
        profiles = f.create_group("mean_profile")
        for name, values in summary.mean_profile.items():
            profiles.create_dataset(name, data=values)
            profiles[name].attrs["positions"] = mapper.counts[name]
        fem = f.create_group("fem")
        for name, values in summary.fem.items():
            fem.create_dataset(name, data=values)
        if summary.halo is not None:
            f.attrs["halo"] = json.dumps(
                {
                    "q": float(summary.halo.q[0]),
                    "d": float(summary.halo.d[0]),
                    "fwhm": float(summary.halo.fwhm[0]),
                }
            )
        if summary.pdf is not None:
            pdf = f.create_group("rpdf")
            for name in ("q", "background", "reduced_structure", "r", "g"):
                pdf.create_dataset(name, data=getattr(summary.pdf, name))
        for name, values in (extra(summary) if extra is not None else {}).items():
            f.create_dataset(name, data=values)
        f.attrs["units"] = "q, halo_q, halo_fwhm in 1/A (q = 1/d); halo_d, r in A"
        f.attrs["settings"] = json.dumps(summary.settings)
        f.attrs["calibration"] = mapper.cube.calibration.to_json()
        f.attrs["provenance"] = json.dumps(provenance or {})
    written = [path]
    if pngs:
        written += write_amorphous_pngs(path.with_suffix(""), summary, overwrite=overwrite)
    return written, summary


def write_amorphous_pngs(
    stem: Path, summary: AmorphousSummary, overwrite: bool = True
) -> list[Path]:
    """PNG maps ``STEM_halo_q.png``, ``_halo_fwhm``, ``_halo_variance``, ``_bragg_fraction``,
    ``_crystalline``."""
    from stemforge.infer.image_output import display_range
    from stemforge.infer.map_figures import write_map_png

    views = {
        "halo_q": ("halo position", "q (Å⁻¹)", "viridis"),
        "halo_fwhm": ("halo width", "FWHM (Å⁻¹)", "viridis"),
        "halo_variance": ("normalised variance at the halo", "V", "magma"),
        "bragg_fraction": ("Bragg fraction", "fraction", "magma"),
        "crystalline": ("crystalline (1) / amorphous (0)", "class", "coolwarm"),
    }
    written = []
    for name, (title, label, cmap) in views.items():
        image = np.asarray(summary.maps[name], float)
        vmin, vmax = (0.0, 1.0) if name == "crystalline" else display_range(image, 1.0, 99.0)
        written.append(
            write_map_png(
                stem.with_name(f"{stem.name}_{name}.png"),
                image,
                title=title,
                label=label,
                vmin=vmin,
                vmax=vmax,
                cmap=cmap,
                overwrite=overwrite,
            )
        )
    return written
