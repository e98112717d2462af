"""Augmentation kernels: what a real microscope and detector do to a simulated pattern.

Each kernel is a pure function of its inputs and of an explicit
:class:`numpy.random.Generator` where it draws random numbers. All take one pattern
``(Qx, Qy)`` or a batch ``(N, Qx, Qy)`` and return the same shape; per-pattern parameters
are scalars or length-``N`` arrays. Kernels that move intensity about the detector
(:func:`affine_distort`) also return the correspondingly moved labels.

The order :class:`Augmenter` applies them follows the electrons: inelastic (plasmon)
scattering in the specimen, the projector lens (rotation, elliptical distortion, origin
shift), arrival of a finite number of electrons (Poisson), the detector's point spread,
then defective pixels.

Grid convention as in :mod:`stemforge.simulate.sample`: pixel ``(n // 2, n // 2)`` is the
origin; positions are in pixels along axes (qx, qy) = (-2, -1); angles in rad,
counter-clockwise, i.e. from the qx axis toward qy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
from scipy import fft, ndimage

from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.simulate.labels import render_target
from stemforge.simulate.sample import Sample

# Pixels (summed over the patterns of a chunk) that affine_distort resamples at once:
# bounds its coordinate arrays, ~60 bytes per pixel.
_AFFINE_CHUNK_PIXELS = 2**21
# A fraction-of-beam pattern sums to <= 1; slack for resampling and round-off.
_MAX_BEAM_FRACTION = 1.05


# ---- input checks -------------------------------------------------------------------------
def _patterns(patterns: Any, name: str = "patterns") -> tuple[np.ndarray, bool]:
    """``(N, Qx, Qy)`` float view of one pattern or a batch, and whether it was one pattern."""
    arr = np.asarray(patterns)
    if arr.ndim not in (2, 3) or min(arr.shape) < 1:
        raise ShapeError(
            f"{name} must be one pattern (Qx, Qy) or a batch (N, Qx, Qy), got shape {arr.shape}",
            "pass a 2D pattern or stack patterns along a first axis",
        )
    if arr.dtype.kind not in "fiu":
        raise InvalidDataError(f"{name} has dtype {arr.dtype}", "pass real-valued intensities")
    if not np.isfinite(arr).all():
        raise InvalidDataError(
            f"{name} contains NaN or inf", "replace them (numpy.nan_to_num) before augmenting"
        )
    single = arr.ndim == 2
    return (arr[None] if single else arr), single


def _out_dtype(arr: np.ndarray) -> np.dtype:
    """Floating inputs keep their precision (float32 stays float32); integers become float64."""
    return arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)


def _per_pattern(value: Any, n: int, name: str, fix: str) -> np.ndarray:
    """A scalar or length-``n`` parameter as a finite float64 array of shape ``(n,)``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
        raise ShapeError(f"{name} has shape {arr.shape} for {n} pattern(s)", f"give a scalar or {n} values")
    if not np.isfinite(arr).all():
        raise ConfigurationError(f"{name} must be finite, got {value!r}", fix)
    return np.broadcast_to(arr, (n,))


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigurationError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}",
            "pass numpy.random.default_rng(seed) so that results are reproducible",
        )
    return rng


def _center(shape: tuple[int, int], center: tuple[float, float] | None) -> np.ndarray:
    return np.array([shape[0] // 2, shape[1] // 2] if center is None else center, dtype=np.float64)


def _finish(out: np.ndarray, single: bool, dtype: np.dtype) -> np.ndarray:
    out = out.astype(dtype, copy=False)
    return out[0] if single else out


# ---- dose ---------------------------------------------------------------------------------
def poisson_dose(patterns: Any, dose: Any, rng: np.random.Generator) -> np.ndarray:
    """Electron counts of a pattern recorded with a finite dose (shot noise).

    Parameters
    ----------
    patterns
        ``(Qx, Qy)`` or ``(N, Qx, Qy)`` noise-free intensities as fractions of the incident
        beam (non-negative, summing to at most 1 per pattern).
    dose
        Incident electrons per pattern: a scalar or one value per pattern.
    rng
        Source of the Poisson draws.

    Returns
    -------
    numpy.ndarray
        Counts, same shape; each pixel is Poisson with mean ``dose × pattern``, so the
        expected total is ``dose × pattern.sum()`` and every pixel's variance equals its mean.
    """
    rng = _check_rng(rng)
    arr, single = _patterns(patterns)
    d = _per_pattern(dose, arr.shape[0], "dose", "give the dose in electrons per pattern, e.g. 1e6")
    if (d <= 0).any():
        raise ConfigurationError(f"dose must be positive, got {dose!r}", "give electrons per pattern, e.g. 1e6")
    if (arr < 0).any():
        raise InvalidDataError("patterns have negative intensities", "dose applies to non-negative |ψ|² patterns")
    totals = arr.sum(axis=(1, 2), dtype=np.float64)
    if (totals > _MAX_BEAM_FRACTION).any():
        raise InvalidDataError(
            f"a pattern sums to {totals.max():.4g} of the beam, more than 1: it looks like counts already",
            "apply the dose once, to the fraction-of-beam pattern (sum ≤ 1)",
        )
    counts = rng.poisson(arr * d[:, None, None])
    return _finish(counts, single, _out_dtype(arr))


# ---- plasmon background -------------------------------------------------------------------
def plasmon_background(
    probe: Any,
    q_pixel_size: float,
    q0: Any = 0.1,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Plasmon-like diffuse background, normalised to unit sum on the detector.

    Plasmon scattering has the Lorentzian angular distribution ``1 / (θ² + θ_E²)``, and
    every incident direction of the convergent probe scatters so: the background is a
    Lorentzian ``1 / (q² + q0²)`` about the origin convolved with the probe. For a single
    plasmon θ_E = E_p / γm₀v² is tiny (Si, 16.7 eV at 300 kV: 0.034 mrad); the width FCU-Net used,
    q0 ≈ 0.1 Å⁻¹ (2 mrad at 300 kV), stands for the broader mix of multiple inelastic and
    diffuse scattering seen in real patterns, so treat ``q0`` as an empirical width.

    Parameters
    ----------
    probe
        Vacuum probe image ``(Qx, Qy)`` or one per pattern ``(N, Qx, Qy)``, centred on the
        grid origin ``(Qx // 2, Qy // 2)`` as ``Sample.probe`` is; any normalisation.
    q_pixel_size
        Detector pixel size in Å⁻¹.
    q0
        Lorentzian width in Å⁻¹ (scalar or one per probe).
    center
        Where the background is centred (the pattern's origin), pixels; default
        ``(Qx // 2, Qy // 2)``.

    Returns
    -------
    numpy.ndarray
        Non-negative float64 background(s), shape of ``probe``, each summing to 1.
    """
    arr, single = _patterns(probe, "probe")
    if not (math.isfinite(q_pixel_size) and q_pixel_size > 0):
        raise ConfigurationError(
            f"q_pixel_size must be a positive number of Å⁻¹, got {q_pixel_size!r}",
            "pass the sample's Q pixel size (Sample.metadata['q_pixel_size'])",
        )
    n, qx, qy = arr.shape
    w = _per_pattern(q0, n, "q0", "give the Lorentzian width in Å⁻¹, e.g. 0.1")
    if (w <= 0).any():
        raise ConfigurationError(f"q0 must be positive, got {q0!r}", "give the Lorentzian width in Å⁻¹, e.g. 0.1")
    if (arr.sum(axis=(1, 2)) <= 0).any() or (arr < 0).any():
        raise InvalidDataError("probe is empty or negative", "pass the vacuum probe intensity (sum > 0)")
    c = _center((qx, qy), center)
    # The Lorentzian on a 2Q grid covering the detector ±Q/2 (probe tails reaching past the
    # detector edge pick up the Lorentzian out there), the probe as a kernel with its
    # centre at index 0; the circular convolution then does not wrap inside the crop.
    x = (np.arange(2 * qx) - qx // 2 - c[0]) * q_pixel_size
    y = (np.arange(2 * qy) - qy // 2 - c[1]) * q_pixel_size
    q2 = x[:, None] ** 2 + y[None, :] ** 2
    lorentz = 1.0 / (q2[None] + w[:, None, None] ** 2)
    kernel = np.zeros((n, 2 * qx, 2 * qy))
    kernel[:, :qx, :qy] = arr / arr.sum(axis=(1, 2), keepdims=True)
    kernel = np.roll(kernel, (-(qx // 2), -(qy // 2)), axis=(1, 2))
    full = fft.irfft2(fft.rfft2(lorentz) * fft.rfft2(kernel), s=(2 * qx, 2 * qy))
    bg = np.maximum(full[:, qx // 2 : qx // 2 + qx, qy // 2 : qy // 2 + qy], 0.0)  # FFT round-off
    bg /= bg.sum(axis=(1, 2), keepdims=True)
    return bg[0] if single else bg


def add_background(patterns: Any, background: Any, weight: Any) -> np.ndarray:
    """Move a fraction ``weight`` of each pattern's intensity into a diffuse background.

    Inelastically scattered electrons leave the elastic pattern, so the total is conserved:
    ``out = (1 − w) · pattern + w · pattern.sum() · background`` with ``background`` of unit
    sum. The background then holds exactly the fraction ``w`` of the detected intensity.

    Parameters
    ----------
    patterns
        ``(Qx, Qy)`` or ``(N, Qx, Qy)``.
    background
        Unit-sum background(s) from :func:`plasmon_background`, one or one per pattern.
    weight
        Fraction in [0, 1], scalar or one per pattern (FCU-Net used ~0.1).
    """
    arr, single = _patterns(patterns)
    bg = np.asarray(background, dtype=np.float64)
    if bg.shape not in (arr.shape[1:], arr.shape):
        raise ShapeError(
            f"background has shape {bg.shape}, patterns {arr.shape}",
            "compute the background on the patterns' detector grid",
        )
    w = _per_pattern(weight, arr.shape[0], "weight", "give a fraction between 0 and 1")
    if ((w < 0) | (w > 1)).any():
        raise ConfigurationError(f"background weight must be in [0, 1], got {weight!r}", "give a fraction, e.g. 0.1")
    bg = bg / bg.sum(axis=(-2, -1), keepdims=True)
    totals = arr.sum(axis=(1, 2), dtype=np.float64)
    out = (1 - w)[:, None, None] * arr + (w * totals)[:, None, None] * bg
    return _finish(out, single, _out_dtype(arr))


# ---- detector blur ------------------------------------------------------------------------
_PSFS = ("gaussian", "lorentzian")


def detector_blur(patterns: Any, width: Any, psf: str = "gaussian") -> np.ndarray:
    """Convolve with the detector's point spread function (intensity conserving).

    Parameters
    ----------
    patterns
        ``(Qx, Qy)`` or ``(N, Qx, Qy)``.
    width
        PSF width in pixels, scalar or one per pattern; 0 leaves a pattern unchanged.
    psf
        ``'gaussian'``: ``exp(−r²/2σ²)`` with σ = ``width`` (MTF ``exp(−2π²σ²f²)``), the
        blur of a direct electron detector. ``'lorentzian'``: the long-tailed
        ``γ / 2π(r² + γ²)^{3/2}`` with γ = ``width`` (MTF ``exp(−2πγf)``), like the light
        spread in the scintillator of an indirect (CCD/CMOS) camera. Either is sampled on
        the pixel grid within ±Q and normalised to unit sum.

    Returns
    -------
    numpy.ndarray
        Blurred patterns; intensity spread beyond the detector edge is lost, as on a detector.
    """
    if psf not in _PSFS:
        raise ConfigurationError(f"unknown PSF {psf!r}", f"use one of {list(_PSFS)}")
    arr, single = _patterns(patterns)
    n, qx, qy = arr.shape
    s = _per_pattern(width, n, "width", "give the PSF width in pixels")
    if (s < 0).any():
        raise ConfigurationError(f"PSF width must be >= 0, got {width!r}", "give the width in pixels")
    # The PSF sampled in real space on the padded grid (distances taken circularly about
    # index 0), normalised to unit sum: non-negative, so no ringing and an exact total.
    rx = np.minimum(np.arange(2 * qx), 2 * qx - np.arange(2 * qx))
    ry = np.minimum(np.arange(2 * qy), 2 * qy - np.arange(2 * qy))
    r2 = (rx[:, None] ** 2 + ry[None, :] ** 2)[None]
    w = np.where(s > 0, s, 1.0)[:, None, None]
    psf_values = np.exp(-r2 / (2 * w**2)) if psf == "gaussian" else (r2 + w**2) ** -1.5
    psf_values = np.where((s > 0)[:, None, None], psf_values, r2 == 0)  # width 0: identity
    mtf = fft.rfft2(psf_values / psf_values.sum(axis=(1, 2), keepdims=True))
    # Linear, not circular, convolution: the images zero-padded to 2Q, then cropped back.
    full = fft.irfft2(fft.rfft2(arr.astype(np.float64), s=(2 * qx, 2 * qy)) * mtf, s=(2 * qx, 2 * qy))
    out = np.maximum(full[:, :qx, :qy], 0.0)  # FFT round-off
    return _finish(out, single, _out_dtype(arr))


# ---- hot and dead pixels ------------------------------------------------------------------
def detector_defects(
    patterns: Any,
    rng: np.random.Generator,
    hot_fraction: Any = 1e-4,
    dead_fraction: Any = 1e-4,
    hot_level: Any = 1.0,
) -> np.ndarray:
    """Dead pixels (read 0) and hot pixels (read a high constant) at random places.

    Parameters
    ----------
    patterns
        ``(Qx, Qy)`` or ``(N, Qx, Qy)``.
    rng
        Source of the defect positions (independent for each pattern).
    hot_fraction, dead_fraction
        Probability of each pixel being hot / dead, scalars or one per pattern.
    hot_level
        Hot pixels read ``hot_level ×`` the pattern's maximum, so they stand out at any dose.
    """
    rng = _check_rng(rng)
    arr, single = _patterns(patterns)
    n = arr.shape[0]
    fix = "give a probability per pixel, e.g. 1e-4"
    hot = _per_pattern(hot_fraction, n, "hot_fraction", fix)[:, None, None]
    dead = _per_pattern(dead_fraction, n, "dead_fraction", fix)[:, None, None]
    level = _per_pattern(hot_level, n, "hot_level", "give a multiple of the pattern maximum, e.g. 1")
    if (hot < 0).any() or (dead < 0).any() or (hot + dead > 1).any():
        raise ConfigurationError(
            f"defect fractions must be >= 0 and sum to at most 1, got hot={hot_fraction!r}, dead={dead_fraction!r}",
            fix,
        )
    u = rng.random(arr.shape)
    out = np.array(arr, dtype=_out_dtype(arr))
    out[u < dead] = 0
    hot_mask = (u >= dead) & (u < dead + hot)
    hot_values = np.broadcast_to((level * arr.max(axis=(1, 2)))[:, None, None], arr.shape)
    out[hot_mask] = hot_values[hot_mask]
    return out[0] if single else out


# ---- affine distortion --------------------------------------------------------------------
class AffineLabels(NamedTuple):
    """Labels moved by :func:`affine_distort` (leading axis N for a batch)."""

    peaks: Any
    """The peaks, moved: same type as given (None if none were given)."""
    origin: np.ndarray
    """``(qx0, qy0)`` of the distorted pattern(s), pixels: the old origin plus the shift."""
    ellipse: np.ndarray
    """``(a, b, theta)`` as in ``Calibration.ellipse`` (``a·b = 1``, theta in (-π/2, π/2])."""
    matrix: np.ndarray
    """The linear part ``(2, 2)`` (``(N, 2, 2)``) acting on positions relative to the origin."""


def _rotation(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def affine_matrix(ellipticity: Any = 1.0, ellipse_angle: Any = 0.0, rotation: Any = 0.0) -> np.ndarray:
    """Linear part of the detector distortion: a rotation, then an area-preserving ellipse.

    ``M = E · R(rotation)`` with ``E = R(φ) diag(√r, 1/√r) R(−φ)``, r = ``ellipticity`` (a/b)
    and φ = ``ellipse_angle``: a circle becomes an ellipse with axis ratio r whose long
    axis lies at φ from qx toward qy. ``det M = 1``, so intensity per area is unchanged.
    ``infer.ellipse.ellipse_correction`` with ``(a, b, θ) = (√r, 1/√r, φ)`` undoes ``E``
    up to the overall scale √r.

    Parameters are scalars or equal-length arrays; the result is ``(..., 2, 2)``.
    """
    r = np.asarray(ellipticity, dtype=np.float64)
    if not np.isfinite(r).all() or (r < 1).any():
        raise ConfigurationError(
            f"ellipticity a/b must be >= 1, got {ellipticity!r}",
            "give a/b >= 1 and choose the long-axis direction with ellipse_angle",
        )
    phi = np.asarray(ellipse_angle, dtype=np.float64)
    rot = np.asarray(rotation, dtype=np.float64)
    if not (np.isfinite(phi).all() and np.isfinite(rot).all()):
        raise ConfigurationError("ellipse_angle and rotation must be finite", "give angles in rad")
    r, phi, rot = np.broadcast_arrays(r, phi, rot)
    stretch = np.zeros(r.shape + (2, 2))
    stretch[..., 0, 0] = np.sqrt(r)
    stretch[..., 1, 1] = 1 / np.sqrt(r)
    return _rotation(phi) @ stretch @ _rotation(-phi) @ _rotation(rot)


def transform_points(
    qx: Any, qy: Any, matrix: Any, shift: Any = (0.0, 0.0), center: Any = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """``q' = center + M (q − center) + shift`` for points in pixels.

    ``qx``, ``qy`` of any shape; ``matrix`` ``(2, 2)``; ``shift`` and ``center`` pairs.
    """
    m = np.asarray(matrix, dtype=np.float64)
    c = np.asarray(center, dtype=np.float64)
    s = np.asarray(shift, dtype=np.float64)
    dx = np.asarray(qx, dtype=np.float64) - c[0]
    dy = np.asarray(qy, dtype=np.float64) - c[1]
    return c[0] + m[0, 0] * dx + m[0, 1] * dy + s[0], c[1] + m[1, 0] * dx + m[1, 1] * dy + s[1]


def _move_peaks(peaks: Any, matrix: np.ndarray, shift: np.ndarray, center: np.ndarray) -> Any:
    """Peaks as a structured array with ``qx``/``qy`` fields, or a ``(P, 2)`` array."""
    arr = np.asarray(peaks)
    if arr.dtype.names is not None and {"qx", "qy"} <= set(arr.dtype.names):
        out = arr.copy()
        out["qx"], out["qy"] = transform_points(arr["qx"], arr["qy"], matrix, shift, center)
        return out
    if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype.kind in "fiu":
        return np.stack(transform_points(arr[:, 0], arr[:, 1], matrix, shift, center), axis=1)
    raise ShapeError(
        f"peaks must be a table with 'qx', 'qy' columns or a (P, 2) array, got dtype {arr.dtype} shape {arr.shape}",
        "pass Sample.peaks or an array of (qx, qy) rows in pixels",
    )


def _splat(src: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Push every source pixel's intensity to the four output pixels around its new position
    ``(fx, fy)`` with bilinear weights; shares falling off the detector are lost."""
    n, qx, qy = src.shape
    x0, y0 = np.floor(fx), np.floor(fy)
    tx, ty = fx - x0, fy - y0
    batch = np.arange(n)[:, None, None]
    out = np.zeros(n * qx * qy)
    for ox, wx in ((0, 1 - tx), (1, tx)):
        for oy, wy in ((0, 1 - ty), (1, ty)):
            ix, iy = x0 + ox, y0 + oy
            ok = (ix >= 0) & (ix < qx) & (iy >= 0) & (iy < qy)
            flat = (batch * qx + ix.astype(np.int64)) * qy + iy.astype(np.int64)
            out += np.bincount(flat[ok], weights=(src * wx * wy)[ok], minlength=out.size)
    return out.reshape(n, qx, qy)


_RESAMPLING = ("interpolate", "splat")


def affine_distort(
    patterns: Any,
    *,
    ellipticity: Any = 1.0,
    ellipse_angle: Any = 0.0,
    rotation: Any = 0.0,
    shift: Any = (0.0, 0.0),
    center: tuple[float, float] | None = None,
    peaks: Any = None,
    resample: str = "interpolate",
) -> tuple[np.ndarray, AffineLabels]:
    """Rotate, elliptically distort and shift patterns in one resampling about the origin.

    A point at ``q`` moves to ``center + M (q − center) + shift`` with ``M`` from
    :func:`affine_matrix`; the same map moves the peak labels.

    Parameters
    ----------
    patterns
        ``(Qx, Qy)`` or ``(N, Qx, Qy)``.
    ellipticity, ellipse_angle, rotation
        See :func:`affine_matrix`; scalars or one per pattern.
    shift
        Sub-pixel origin shift ``(dqx, dqy)`` in pixels, or ``(N, 2)``.
    center
        The origin the distortion is about; default ``(Qx // 2, Qy // 2)``.
    peaks
        For one pattern, a peak table (structured, with ``qx``, ``qy`` fields, e.g.
        ``Sample.peaks``) or a ``(P, 2)`` array; for a batch a sequence of N of these.
    resample
        ``'interpolate'`` (for patterns and probes): each output pixel averages bilinear
        reads of the input at the pre-images of a 2×2 sub-grid — smooth, never negative,
        no ringing between disks; the total is kept to ~1e-4 (exactly for pure shifts).
        ``'splat'`` (for sparse images of points): each input pixel
        is pushed bilinearly onto the output grid — every peak keeps its intensity and
        its centroid lands exactly on its moved label, but smooth images would show moiré.

    Returns
    -------
    patterns : numpy.ndarray
        Distorted pattern(s), same shape and float dtype.
    labels : AffineLabels
        Moved peaks, new origin, the distortion as a calibration ellipse, and ``M``.
    """
    if resample not in _RESAMPLING:
        raise ConfigurationError(f"unknown resampling {resample!r}", f"use one of {list(_RESAMPLING)}")
    arr, single = _patterns(patterns)
    n, qx, qy = arr.shape
    c = _center((qx, qy), center)
    angle_fix = "give angles in rad"
    r = _per_pattern(ellipticity, n, "ellipticity", "give a/b >= 1, e.g. 1.05")
    phi = _per_pattern(ellipse_angle, n, "ellipse_angle", angle_fix)
    rot = _per_pattern(rotation, n, "rotation", angle_fix)
    s = np.asarray(shift, dtype=np.float64)
    if s.shape not in ((2,), (n, 2)) or not np.isfinite(s).all():
        raise ShapeError(f"shift has shape {s.shape}", f"give (dqx, dqy) in pixels, or an ({n}, 2) array")
    s = np.broadcast_to(s, (n, 2))
    m = affine_matrix(r, phi, rot)
    # Interpolation pulls each output pixel p' back to p = c + M⁻¹(p' − c − s); splatting
    # pushes each input pixel p forward to p' = c + M(p − c) + s. Chunks of patterns bound
    # the coordinate arrays.
    pull = resample == "interpolate"
    a, offset = (np.linalg.inv(m), -s) if pull else (m, np.zeros_like(s))
    # Interpolation averages each output pixel over a 2×2 sub-grid: the bilinear read of a
    # sharp disk edge then keeps the total to ~1e-4 instead of ~0.5%.
    subpixels = (-0.25, 0.25) if pull else (0.0,)
    out = np.zeros((n, qx, qy), dtype=np.float64)
    gx, gy = np.meshgrid(np.arange(qx, dtype=np.float64), np.arange(qy, dtype=np.float64), indexing="ij")
    step = max(1, _AFFINE_CHUNK_PIXELS // (qx * qy))
    src = arr.astype(np.float64, copy=False)
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        for ox in subpixels:
            for oy in subpixels:
                dx = gx[None] + ox - c[0] + offset[sl, 0, None, None]
                dy = gy[None] + oy - c[1] + offset[sl, 1, None, None]
                fx = c[0] + a[sl, 0, 0, None, None] * dx + a[sl, 0, 1, None, None] * dy
                fy = c[1] + a[sl, 1, 0, None, None] * dx + a[sl, 1, 1, None, None] * dy
                if pull:
                    # Per pattern: 2D bilinear reads are ~3× faster than a 3D call over the batch.
                    for i, k in enumerate(range(sl.start, sl.stop)):
                        out[k] += ndimage.map_coordinates(src[k], (fx[i], fy[i]), order=1, mode="constant")
                else:
                    out[sl] = _splat(src[sl], fx + s[sl, 0, None, None], fy + s[sl, 1, None, None])
    if pull:
        out /= len(subpixels) ** 2 * np.abs(np.linalg.det(m))[:, None, None]  # intensity per area

    if peaks is None:
        moved = None
    elif single:
        moved = _move_peaks(peaks, m[0], s[0], c)
    else:
        if len(peaks) != n:
            raise ShapeError(f"{len(peaks)} peak tables for {n} patterns", "give one peak table per pattern")
        moved = [_move_peaks(p, m[i], s[i], c) for i, p in enumerate(peaks)]
    # E has its long axis √r at φ whatever the rotation before it (angle wrapped to (-π/2, π/2]).
    theta = -((-phi + np.pi / 2) % np.pi - np.pi / 2)
    ellipse = np.stack([np.sqrt(r), 1 / np.sqrt(r), theta], axis=-1)
    labels = AffineLabels(
        peaks=moved,
        origin=(c + s)[0] if single else c + s,
        ellipse=ellipse[0] if single else ellipse,
        matrix=m[0] if single else m,
    )
    return _finish(out, single, _out_dtype(arr)), labels


def moved_target(
    target: np.ndarray,
    peaks: np.ndarray,
    moved: np.ndarray,
    geometry: Mapping[str, Any],
    shift: Any,
) -> np.ndarray:
    """The FCU-Net target after :func:`affine_distort`: Gaussians redrawn at the moved labels.

    Splatting a sampled Gaussian of 0.75 px moves its maximum by up to 0.1 px with the
    sub-pixel shift and the ellipse (widening it by the shift's phase), and a network
    trained on that learns the error; redrawn, every peak stays the exact image of its
    reflection. The peak table lists only reflections centred on the detector, so the
    rest of ``target`` (tails of reflections just off it) is splatted.

    Parameters
    ----------
    target
        ``(Q, Q)`` image of :func:`~stemforge.simulate.labels.render_target` Gaussians of
        height ``sqrt(intensity_kinematic)`` at the ``peaks``.
    peaks, moved
        The peak table before and after the distortion (same rows).
    geometry, shift
        The distortion, as passed to :func:`affine_distort`.
    """
    n = target.shape[-1]
    heights = np.sqrt(peaks["intensity_kinematic"])
    listed = render_target(np.stack([peaks["qx"], peaks["qy"]], axis=1), heights, n)
    rest, _ = affine_distort(target - listed, **geometry, shift=shift, resample="splat")
    return render_target(np.stack([moved["qx"], moved["qy"]], axis=1), heights, n) + rest


# ---- the composable augmenter -------------------------------------------------------------
#: Augmentations in the order they are applied, each with its probability ``p`` and ranges
#: ``[low, high]`` sampled uniformly (``log10_dose`` log-uniformly in the dose).
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "background": {"p": 0.5, "weight": [0.0, 0.2], "q0": [0.05, 0.2]},
    "affine": {
        "p": 1.0,
        "ellipticity": [1.0, 1.15],
        "ellipse_angle": [-math.pi / 2, math.pi / 2],
        # Off by default: rotated patterns have empty corners that real ones never have.
        "rotation": [0.0, 0.0],
        "shift": [-1.0, 1.0],
    },
    "dose": {"p": 1.0, "log10_dose": [5.0, 10.0]},
    "blur": {"p": 0.5, "psf": "gaussian", "width": [0.0, 1.0]},
    "defects": {"p": 0.1, "hot_fraction": [0.0, 1e-4], "dead_fraction": [0.0, 1e-4], "hot_level": [0.5, 2.0]},
}

# Lowest allowed value of each range (upper bounds are physical only where stated).
_RANGE_MINIMA = {
    "weight": 0.0,
    "q0": 1e-6,
    "ellipticity": 1.0,
    "width": 0.0,
    "hot_fraction": 0.0,
    "dead_fraction": 0.0,
    "hot_level": 0.0,
}
_RANGE_MAXIMA = {"weight": 1.0, "hot_fraction": 1.0, "dead_fraction": 1.0}


def _merge_config(config: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Defaults overridden by ``config``; a section set to None or False is switched off."""
    merged = {name: dict(section) for name, section in DEFAULT_CONFIG.items()}
    for name, section in (config or {}).items():
        if name not in merged:
            raise ConfigurationError(f"unknown augmentation {name!r}", f"use sections {list(DEFAULT_CONFIG)}")
        if section is None or section is False:
            merged[name]["p"] = 0.0
            continue
        if not isinstance(section, Mapping):
            raise ConfigurationError(
                f"augmentation {name!r} must be a mapping of options, got {section!r}",
                f"e.g. {{'{name}': {DEFAULT_CONFIG[name]}}}",
            )
        unknown = set(section) - set(merged[name])
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {sorted(unknown)} for augmentation {name!r}", f"use {sorted(merged[name])}"
            )
        merged[name].update(section)
    for name, section in merged.items():
        p = section["p"]
        if not (isinstance(p, Real) and 0 <= p <= 1):
            raise ConfigurationError(f"{name}.p must be a probability in [0, 1], got {p!r}", "e.g. p: 0.5")
        for key, value in section.items():
            if key in ("p", "psf"):
                continue
            if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, Real) for v in value)):
                raise ConfigurationError(f"{name}.{key} must be a range [low, high], got {value!r}", "e.g. [0.0, 0.2]")
            low, high = float(value[0]), float(value[1])
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ConfigurationError(f"{name}.{key} range {value!r} is empty or not finite", "give low <= high")
            if low < _RANGE_MINIMA.get(key, -math.inf) or high > _RANGE_MAXIMA.get(key, math.inf):
                raise ConfigurationError(
                    f"{name}.{key} range {value!r} leaves the allowed interval "
                    f"[{_RANGE_MINIMA.get(key, -math.inf)}, {_RANGE_MAXIMA.get(key, math.inf)}]",
                    "narrow the range",
                )
    if merged["blur"]["psf"] not in _PSFS:
        raise ConfigurationError(f"unknown PSF {merged['blur']['psf']!r}", f"use one of {list(_PSFS)}")
    if merged["defects"]["hot_fraction"][1] + merged["defects"]["dead_fraction"][1] > 1:
        raise ConfigurationError("hot_fraction + dead_fraction can exceed 1", "lower the fractions")
    return merged


class Augmenter:
    """A random subset of the augmentations, drawn reproducibly per sample index.

    Parameters
    ----------
    config
        Per augmentation (``background``, ``affine``, ``dose``, ``blur``, ``defects``), a
        mapping of options overriding :data:`DEFAULT_CONFIG`; each is applied with its
        probability ``p``, with parameters drawn uniformly from its ranges. A section set
        to None is switched off.
    seed
        With the sample index, fixes every random choice: the same ``(seed, index)`` gives
        the same output, bit for bit, in any order of calls or any worker process.

    Examples
    --------
    >>> aug = Augmenter({"dose": {"log10_dose": [6, 8]}, "blur": None}, seed=7)
    >>> noisy = aug(sample, index=42)  # doctest: +SKIP
    """

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigurationError(f"seed must be a non-negative integer, got {seed!r}", "e.g. seed=0")
        self.config = _merge_config(config)
        self.seed = int(seed)

    def _streams(self, index: int) -> dict[str, np.random.Generator]:
        """One independent generator per augmentation, so changing one section of the
        config never changes the draws of another."""
        if not isinstance(index, int | np.integer) or index < 0:
            raise ConfigurationError(f"sample index must be a non-negative integer, got {index!r}", "pass the index")
        children = np.random.SeedSequence([self.seed, int(index)]).spawn(len(self.config))
        return {name: np.random.default_rng(ss) for name, ss in zip(self.config, children, strict=True)}

    @staticmethod
    def _parameters(config: Mapping[str, Mapping[str, Any]], rngs: Mapping[str, np.random.Generator]) -> dict[str, dict[str, Any]]:
        params: dict[str, dict[str, Any]] = {}
        for name, section in config.items():
            rng = rngs[name]
            # Every value is drawn even when the augmentation is skipped: the stream stays
            # aligned, so changing p never changes the parameters drawn.
            values = {
                key: [float(rng.uniform(*value)) for _ in range(2)] if key == "shift" else float(rng.uniform(*value))
                for key, value in section.items()
                if key not in ("p", "psf")
            }
            if rng.random() < section["p"]:
                if name == "dose":
                    values = {"dose": 10.0 ** values.pop("log10_dose")}
                if name == "blur":
                    values["psf"] = section["psf"]
                params[name] = values
        return params

    def draw(self, index: int) -> dict[str, dict[str, Any]]:
        """The augmentations applied to sample ``index`` and their parameters (JSON-ready)."""
        return self._parameters(self.config, self._streams(index))

    def __call__(self, sample: Sample, index: int) -> Sample:
        """An augmented copy of ``sample`` (the input is not modified).

        ``cbed`` gets every drawn augmentation; ``target`` and the peak table follow the
        geometry (peaks pushed off the detector are dropped, as their disks are);
        ``probe``, recorded on the same detector, gets its ellipse and blur but stays centred.
        ``metadata['augmentation']`` records the parameters and the resulting origin and
        ellipse; ``metadata['dose']`` the dose (``cbed`` is then in counts).
        """
        rngs = self._streams(index)
        # The noise of dose and defects continues the same per-augmentation streams.
        params = self._parameters(self.config, rngs)
        cbed = np.asarray(sample.cbed)
        probe = np.asarray(sample.probe)
        target = np.asarray(sample.target)
        peaks = np.array(sample.peaks, copy=True)
        qx, qy = cbed.shape[-2:]
        meta = dict(sample.metadata)
        record: dict[str, Any] = {"seed": self.seed, "index": int(index), **params}

        if "background" in params:
            q_pixel_size = meta.get("q_pixel_size")
            if q_pixel_size is None:
                raise ConfigurationError(
                    "the plasmon background needs the sample's Q pixel size, metadata has none",
                    "set metadata['q_pixel_size'] (Å⁻¹), or switch the background off",
                )
            p = params["background"]
            bg = plasmon_background(probe, float(q_pixel_size), p["q0"])
            cbed = add_background(cbed, bg, p["weight"])
        if "affine" in params:
            p = params["affine"]
            geometry = {k: p[k] for k in ("ellipticity", "ellipse_angle", "rotation")}
            cbed, labels = affine_distort(cbed, **geometry, shift=p["shift"], peaks=peaks)
            target = moved_target(target, peaks, labels.peaks, geometry, p["shift"])
            probe, _ = affine_distort(probe, ellipticity=p["ellipticity"], ellipse_angle=p["ellipse_angle"])
            inside = (
                (labels.peaks["qx"] >= -0.5)
                & (labels.peaks["qx"] < qx - 0.5)
                & (labels.peaks["qy"] >= -0.5)
                & (labels.peaks["qy"] < qy - 0.5)
            )
            peaks = labels.peaks[inside]
            record["origin"] = labels.origin.tolist()
            record["ellipse"] = labels.ellipse.tolist()
        if "dose" in params:
            cbed = poisson_dose(cbed, params["dose"]["dose"], rngs["dose"])
            meta["dose"] = params["dose"]["dose"]
        if "blur" in params:
            p = params["blur"]
            cbed = detector_blur(cbed, p["width"], p["psf"])
            probe = detector_blur(probe, p["width"], p["psf"])
        if "defects" in params:
            p = params["defects"]
            cbed = detector_defects(cbed, rngs["defects"], p["hot_fraction"], p["dead_fraction"], p["hot_level"])

        meta["augmentation"] = record
        return Sample(
            cbed=cbed.astype(np.float32),
            probe=probe.astype(np.float32),
            target=target.astype(np.float32),
            peaks=peaks,
            metadata=meta,
        )
