"""Bragg disk detection by Fourier-space correlation with a probe kernel.

Each pattern ``I`` is correlated with a kernel ``K``
(:func:`~stemforge.infer.templates.make_kernel`, wrapped with its centre at pixel ``(0, 0)``)
through its spectrum,
``Ĉ = Î · conj(K̂) · |Î · conj(K̂)|^(e − 1) · G_σ``: ``e = 1`` is the cross-correlation (the
matched filter, best against counting noise), ``e = 0`` the phase correlation (sharpest
peaks, insensitive to the disk's intensity profile), in between a hybrid; ``G_σ`` smooths
the correlation with a Gaussian of ``σ`` pixels. The correlation ``C(s) = Σ_q I(q) K(q − s)``
then peaks at every disk position ``s``. Peaks are its 8-neighbour maxima, thresholded,
thinned to a minimum spacing (weaker neighbours of a stronger peak are dropped) and
refined to subpixel precision, either by a parabola through the maximum and its four
neighbours, or by evaluating the correlation's trigonometric interpolant on a
``1/upsample`` grid within ±0.75 px (a local matrix-multiply DFT, Guizar-Sicairos et al.,
Opt. Lett. 33, 156 (2008)) and a parabola on that grid; peaks of disks not wholly on the
detector are dropped (``edge``).

Positions are raw detector pixels, ``qx`` along axis -2 and ``qy`` along axis -1, 0 being
the centre of the first pixel; intensities are correlation heights (for a cross-correlation
with a plain kernel, proportional to the disk intensity; see
:mod:`stemforge.infer.templates`).

Pure kernels (:func:`correlate`, :func:`find_peaks`, :func:`refine_parabolic`,
:func:`refine_dft`) work on NumPy stacks ``(N, Qx, Qy)``; :func:`detect_patterns` chains them
batch by batch on NumPy or torch (CUDA when available), and :func:`find_bragg_disks` streams
a datacube through it with bounded memory.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import fft as sfft

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.cluster import map_ordered
from stemforge.core.datacube import DataCube, load_block
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.checkpoint import BlockCheckpoint
from stemforge.infer.origin import _dft_factors, _dft_values, _parabola_offset, _peak_on_grid
from stemforge.infer.templates import kernel_radius

SUBPIXEL_METHODS: tuple[str, ...] = ("none", "parabolic", "dft", "gaussian")
BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch")

# Complex spectra of one FFT batch stay below this many bytes (and a share of a budget).
_FFT_BATCH_BYTES = 64 * 2**20
# DFT matrices of one refinement batch stay below this many bytes (and a share of a budget).
_DFT_BATCH_BYTES = 32 * 2**20
# Largest block of scan rows (as float32): a few hundred patterns, enough work per block
# that reading and scheduling cost nothing, small enough that a cluster gets many blocks to
# share out and a checkpoint loses little to a kill. The FFT batches inside bound the working
# memory, so larger blocks would buy nothing.
_MAX_BLOCK_BYTES = 32 * 2**20
# Shares of a memory budget: a block takes 1/8 of it as float32, the spectra of an FFT batch
# and the matrices of a DFT batch 1/16 each. With their temporaries (the chunks a block is
# read from, float32 batches, correlations) a detection then holds about half the budget,
# leaving the rest to the interpreter and libraries (~100 MB) from 256 MB up.
_BLOCK_SHARE = 8
_BATCH_SHARE = 16
# Default edge margin beyond the probe radius, pixels: a probe's soft edge (10 % at R + 1.1
# px for a 1-px edge) must lie on the detector too, or the cut pulls the peak inwards.
_EDGE_ALLOWANCE = 1.0
# Default smoothing of the correlation, pixels: max(_SMOOTHING, _SMOOTHING_RADIUS / R), more
# for disks under 3.5 px (see DetectionParams.sigma).
_SMOOTHING = 1.0
_SMOOTHING_RADIUS = 3.5
# Default spacing of peaks, in probe radii: beyond the √2 R reach of the positive skirt of a
# disk's edge-kernel correlation (see DetectionParams.min_spacing).
_SPACING_RADII = 1.5
# Default floor of a correlation peak, as a fraction of the reference peak.
CORRELATION_MIN_RELATIVE_INTENSITY = 0.005


# ---- parameters ---------------------------------------------------------------------------
def _check_number(name: str, value: Any, low: float, fix: str, high: float = math.inf) -> None:
    real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not real or not low <= value <= high:
        span = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigurationError(f"{name} must be a number {span}, got {value!r}", fix)


@dataclass(frozen=True)
class DetectionParams:
    """Settings of the correlation disk detector.

    Parameters
    ----------
    exponent
        Power of the correlation spectrum's modulus: 1 cross-correlation (the default), 0
        phase correlation, in between hybrid. Lower exponents weight the disk edges over
        their interior, as the default edge kernel does linearly (see
        :func:`~stemforge.infer.templates.make_kernel`), but the modulus power is not
        linear: whitening the spectrum of a disk, whose Airy-like modulus has zeros, rings,
        and the direct beam's correlation grows sidelobe rings (at 2.6 R and 4.4 R from it
        for a 10 px disk at 0.5) that pull weak disks near them by pixels and add rows of
        spurious maxima (15–50 per pattern instead of 13 on 20 nm Si [110]). Phase
        correlation also cannot see weak disks beside a dominant direct beam: a
        centrosymmetric pattern's spectrum is the probe's times
        ``A(f) = 1 + Σ a_g cos(2π f·g)``, which stays positive while the diffracted
        fractions ``a_g`` are small, so whitening turns it into 1 and leaves only the
        direct beam. On the Si/SiGe benchmark, exponents 0.3–0.7 gave e_xx errors of
        0.1–19 % (plain or trench kernels), and at 0.5 the basis could not be found on any
        of the 5–40 nm scans; keep 1 unless diffracted beams rival the direct one, and then
        raise ``min_relative_intensity``.
    sigma
        Gaussian smoothing of the correlation, pixels. None: 1, or 3.5 / R for disks of
        radius R < 3.5 px. Two errors pull apart. Pixel-sampled hard disk edges (an ideal
        aperture on the detector grid, as simulations give; real detectors blur them) alias
        into the band the edge kernel passes; smoothing cuts that band but reaches back
        into the disk interior, where thick crystals put their contrast, and widens the
        peak, which counting noise then moves further. Unsmoothed, the correlation peak of
        a small disk can split in two (Si [001], R = 4 px, 5 nm, 1 % strains: errors up to
        0.41 % at 0, 0.065 % at 0.5 px, 0.023 % at 1 px). Isolated hard-edged disks are
        placed to 0.002–0.004 px rms at 1 px for R ≥ 3, but R = 2.5 px needs more: 0.008 px
        at 1 px, 0.003 px at 1.25–1.5 px (thin Si [001], R = 2.5 px, 1 % strains and 1°: up
        to 0.037 % at 1 px, 0.016 % at 1.4 px). On larger disks more smoothing costs: Si/SiGe
        (R = 10 px, 5–40 nm) e_xx RMSE ≤ 0.021 % at 0, ≤ 0.043 % at 1 px, 0.072 % at 1.5
        px and 0.23 % at 2 px without noise, and at 1e5 electrons per pattern 0.09–0.18 % at
        1 px against 0.13–0.20 % at 1.4 px. Smoothing also rounds the cusp of the
        correlation of two hard-edged disks with a ``"plain"`` kernel (a cone), which a
        parabola fits with a bias of a few hundredths of a pixel (0.04 px unsmoothed, 0.01 px
        at 1 px on a hard 5 px disk).
    min_relative_intensity
        Peaks weaker than this fraction of the reference peak are dropped. None: the
        detector's own, 0.005 on correlation maps, 0.001 on FCU-Net images
        (:data:`~stemforge.infer.fcunet_detect.MIN_RELATIVE_INTENSITY`).
    relative_to_peak
        Rank of the reference peak after the spacing filter: 0 the brightest (usually the
        central beam), 1 the next one (to skip a saturated central beam), ...; a pattern
        with fewer peaks uses its weakest.
    min_absolute_intensity
        Peaks not above this correlation height are dropped (>= 0: with zero-mean kernels
        negative heights are background).
    min_spacing
        Peaks closer than this (pixels) to a stronger kept peak are dropped. None: 1.5
        probe radii. The edge kernel's correlation of a disk ``D`` is the Laplacian of
        its autocorrelation ``A`` (a cone of base 2R), whose skirt ``−∇²A`` stays
        positive out to ``√2 R`` and falls off only as ``1/s``: counting noise on that
        skirt makes maxima around every bright disk, which a spacing of R lets through
        (at 1e4 electrons per pattern they formed spots of the Bragg vector map and broke
        the basis choice of the 10 and 40 nm Si/SiGe scans; 1.5 R changed nothing at 1e5
        or without noise). Disks overlapping by more than a quarter of their diameter need
        a smaller value.
    edge
        Peaks closer than this (pixels) to the detector's outer boundary (the outer edges
        of the border pixels) are dropped; integer maxima are tested first, then the
        refined positions. None: the probe radius plus 1 px, i.e. only disks lying wholly
        on the detector with their soft edge: a cut disk's peak moves inwards (0.1–0.4 px
        for a 10 px disk centred 1–2 px over the limit), and a reflection counted at some
        scan positions and lost at others turns its own offset into strain steps (a 113
        disk of 20 nm SiGe, kept only in the layer whose strain brought it inwards, put
        0.11 % into that layer's e_xx).
    max_peaks
        At most this many peaks per pattern, the strongest: a safeguard, the thresholds are
        the filter. Small cells put many reflections on a detector: two of the twelve
        structures of the FCU-Net benchmark hold 116 above 5 % of their strongest one on
        128² pixels, and a cap of 100 cost both detectors ~50 of them per pattern.
    subpixel
        ``"dft"`` (local DFT upsampling; on clean disks 0.006 px hard-edged and 0.002 px
        soft-edged with the default kernel, 0.003 and 3e-4 px with ``"plain"``),
        ``"parabolic"`` (2–3× faster, 0.01–0.03 px), ``"gaussian"`` (a parabola through
        the logarithms: exact for sampled Gaussian peaks such as FCU-Net's, which the
        band-limited DFT interpolation of a 0.75 px Gaussian misplaces by up to 0.1 px
        with the sub-pixel phase) or ``"none"`` (integer pixels). None: the detector's own,
        ``"dft"`` on correlation maps, ``"gaussian"`` on FCU-Net images.
    upsample
        Grid steps per pixel of the ``"dft"`` refinement. 16 and 64 place clean disks
        within 1e-5 px of each other: what is left is the pixel sampling of the disk.
    """

    exponent: float = 1.0
    sigma: float | None = None
    min_relative_intensity: float | None = None
    relative_to_peak: int = 0
    min_absolute_intensity: float = 0.0
    min_spacing: float | None = None
    edge: float | None = None
    max_peaks: int = 400
    subpixel: str | None = None
    upsample: int = 16

    def __post_init__(self) -> None:
        _check_number("exponent", self.exponent, 0.0, "use 1 (cross), 0 (phase) or between", 1.0)
        if self.min_relative_intensity is not None:
            _check_number(
                "min_relative_intensity", self.min_relative_intensity, 0.0, "use e.g. 0.005", 1.0
            )
        _check_number("min_absolute_intensity", self.min_absolute_intensity, 0.0, "use e.g. 0")
        for name in ("sigma", "min_spacing", "edge"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, 0.0, f"give {name} in pixels, or None for the default")
        for name, low in (("relative_to_peak", 0), ("max_peaks", 1), ("upsample", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ConfigurationError(
                    f"{name} must be an integer >= {low}, got {value!r}", f"e.g. {name}={low + 1}"
                )
        if self.subpixel is not None and self.subpixel not in SUBPIXEL_METHODS:
            raise ConfigurationError(
                f"unknown subpixel method {self.subpixel!r}", f"use one of {SUBPIXEL_METHODS}"
            )

    @property
    def is_resolved(self) -> bool:
        """True once ``sigma``, ``min_spacing``, ``edge`` and ``min_relative_intensity`` are
        numbers."""
        return None not in (self.sigma, self.min_spacing, self.edge, self.min_relative_intensity)

    def resolved(
        self,
        probe_radius: float,
        min_relative_intensity: float = CORRELATION_MIN_RELATIVE_INTENSITY,
    ) -> DetectionParams:
        """A copy with ``sigma`` (``max(1, 3.5 / R)`` px), ``min_spacing`` (1.5 R) and ``edge``
        (R + 1 px) set from the probe radius ``R`` where None, and ``min_relative_intensity``
        set to the detector's default where None."""
        _check_number("probe_radius", probe_radius, 0.0, "give the disk radius in pixels")
        if probe_radius == 0:
            raise ConfigurationError("probe_radius is 0", "give the disk radius in pixels")
        return dataclasses.replace(
            self,
            sigma=max(_SMOOTHING, _SMOOTHING_RADIUS / probe_radius)
            if self.sigma is None
            else self.sigma,
            min_spacing=_SPACING_RADII * probe_radius
            if self.min_spacing is None
            else self.min_spacing,
            edge=float(probe_radius) + _EDGE_ALLOWANCE if self.edge is None else self.edge,
            min_relative_intensity=min_relative_intensity
            if self.min_relative_intensity is None
            else self.min_relative_intensity,
        )


def _require_resolved(params: DetectionParams) -> None:
    if not params.is_resolved:
        raise ConfigurationError(
            "sigma, min_spacing, edge or min_relative_intensity is None (defaults from the "
            "probe radius and the detector)",
            "call params.resolved(probe_radius) first, or give all four",
        )


# ---- input checks -------------------------------------------------------------------------
def _check_stack(patterns: Any) -> Any:
    """A ``(N, Qx, Qy)`` stack of real patterns with N >= 1 (not yet copied)."""
    if not hasattr(patterns, "shape") or not hasattr(patterns, "dtype"):
        patterns = np.asarray(patterns)
    if len(patterns.shape) != 3:
        raise ShapeError(
            f"patterns must be a stack (N, Qx, Qy), got shape {tuple(patterns.shape)}",
            "reshape to (N, Qx, Qy), e.g. cube.data.reshape(-1, Qx, Qy), or use find_bragg_disks",
        )
    if patterns.shape[0] == 0:
        raise ShapeError("the stack holds no patterns (N = 0)", "pass at least one pattern")
    if min(patterns.shape[1:]) < 3:
        raise ShapeError(
            f"patterns of shape {tuple(patterns.shape[1:])} are too small to hold a disk",
            "check the detector axes are the last two",
        )
    if np.dtype(patterns.dtype).kind not in "biuf":
        raise InvalidDataError(
            f"patterns have dtype {patterns.dtype}; diffraction intensities must be real",
            "pass the intensity (e.g. numpy.abs(wave)**2)",
        )
    return patterns


def _compute_dtype(dtype: Any) -> type:
    """float64 data is processed in float64, anything else in float32 (twice as fast)."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def _complex_dtype(dtype: Any) -> type:
    """complex128 for double-precision data or spectra, complex64 otherwise."""
    return np.complex128 if np.dtype(dtype) in (np.float64, np.complex128) else np.complex64


def _finite_batch(batch: Any, start: int) -> np.ndarray:
    """One batch in its compute dtype, raising on NaN or inf naming the first bad pattern."""
    out = np.asarray(batch, dtype=_compute_dtype(batch.dtype))
    good = np.isfinite(out).all(axis=(1, 2))
    if not good.all():
        raise InvalidDataError(
            f"{int((~good).sum())} pattern(s) contain NaN or inf, first at index "
            f"{start + int(np.argmin(good))}",
            "replace or mask the bad frames (e.g. numpy.nan_to_num) before detecting disks",
        )
    return out


def kernel_spectrum(kernel: Any, shape: tuple[int, int]) -> np.ndarray:
    """``rfft2`` of a wrapped kernel, checked against the pattern shape.

    Raises
    ------
    ShapeError
        The kernel's shape differs from the patterns'.
    InvalidDataError
        NaN or inf in the kernel, or an all-zero kernel.
    """
    k = np.asarray(kernel)
    if k.shape != tuple(shape):
        raise ShapeError(
            f"kernel has shape {k.shape} but the patterns are {tuple(shape)}",
            "build the kernel from a probe of the detector shape: make_kernel(probe) with "
            "probe.shape == patterns.shape[-2:]",
        )
    if k.dtype.kind not in "biuf" or not np.isfinite(k).all():
        raise InvalidDataError(
            "the kernel holds NaN, inf or non-real values", "rebuild it with make_kernel(probe)"
        )
    if not np.any(k):
        raise InvalidDataError("the kernel is all zero", "rebuild it with make_kernel(probe)")
    return sfft.rfft2(k.astype(np.float64))


def _smoothing(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Transfer function ``exp(−2π²σ²|f|²)`` of a Gaussian blur of ``sigma`` pixels."""
    f2 = sfft.fftfreq(shape[0])[:, None] ** 2 + sfft.rfftfreq(shape[1])[None, :] ** 2
    return np.exp(-2 * np.pi**2 * sigma**2 * f2)


def _filters(
    kernel_fft: np.ndarray, exponent: float, sigma: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Spectral factors applied before and after the modulus power.

    For a cross-correlation the smoothing folds into the kernel (one product per pattern);
    otherwise it must follow the power, which would undo it.
    """
    smoothing = _smoothing(shape, sigma) if sigma > 0 else None
    if exponent == 1 and smoothing is not None:
        return np.conj(kernel_fft) * smoothing, None
    return np.conj(kernel_fft), smoothing


def _correlate(
    stack: np.ndarray,
    pre: np.ndarray,
    post: np.ndarray | None,
    exponent: float,
    workers: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The correlation kernel on a checked stack (see :func:`correlate`)."""
    shape = stack.shape[1:]
    spec = sfft.rfft2(stack, workers=workers)
    spec *= pre.astype(spec.dtype, copy=False)
    if exponent != 1:
        tiny = np.finfo(stack.dtype).tiny
        spec /= np.maximum(np.abs(spec), tiny) ** (1 - exponent)
    if post is not None:
        spec *= post.astype(stack.dtype, copy=False)
    return sfft.irfft2(spec, s=shape, workers=workers), spec


# ---- pure kernels -------------------------------------------------------------------------
def correlate(
    patterns: Any,
    kernel_fft: np.ndarray,
    exponent: float = 1.0,
    sigma: float = 0.0,
    *,
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Correlate a stack of patterns with a kernel, all in one batched FFT.

    Parameters
    ----------
    patterns
        ``(N, Qx, Qy)`` real patterns (N FFTs per call; split very large stacks).
        float64 patterns are processed in float64, others in float32.
    kernel_fft
        ``(Qx, Qy // 2 + 1)`` ``rfft2`` of the wrapped kernel (:func:`kernel_spectrum`).
    exponent
        Power of the spectrum modulus (1 cross, 0 phase, between hybrid).
    sigma
        Gaussian smoothing of the correlation, pixels.
    workers
        Threads of ``scipy.fft`` (-1: all cores).

    Returns
    -------
    corr : numpy.ndarray
        ``(N, Qx, Qy)`` correlation; its maxima sit at the disk positions.
    spectrum : numpy.ndarray
        ``(N, Qx, Qy // 2 + 1)`` its half-spectrum (for :func:`refine_dft`).
    """
    stack = _finite_batch(_check_stack(patterns), 0)
    shape = stack.shape[1:]
    if np.shape(kernel_fft) != (shape[0], shape[1] // 2 + 1):
        raise ShapeError(
            f"kernel_fft has shape {np.shape(kernel_fft)}, expected the rfft2 of a "
            f"{shape} kernel, {(shape[0], shape[1] // 2 + 1)}",
            "pass kernel_spectrum(kernel, patterns.shape[-2:])",
        )
    _check_number("exponent", exponent, 0.0, "use 1 (cross), 0 (phase) or between", 1.0)
    _check_number("sigma", sigma, 0.0, "give the smoothing in pixels")
    pre, post = _filters(np.asarray(kernel_fft), exponent, sigma, shape)
    return _correlate(stack, pre, post, exponent, workers)


# The 8 neighbours, the two along a row first: they prune most pixels with cheap,
# contiguous comparisons before the others are gathered for the few candidates left.
_NEIGHBOURS = ((0, 1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (1, -1), (1, 0), (1, 1))


def _margin(edge: float) -> int:
    """Pixels skipped at each border: pixel ``i`` is kept when its centre is at least ``edge``
    from the detector's outer boundary, ``i + 0.5 >= edge`` (the same on the far side)."""
    return max(math.ceil(edge - 0.5), 0)


def _inside_edge(qx: np.ndarray, qy: np.ndarray, shape: tuple[int, int], edge: float) -> np.ndarray:
    """True for positions at least ``edge`` from the detector's outer boundary (pixel edges)."""
    return (np.minimum(qx, shape[0] - 1 - qx) + 0.5 >= edge) & (
        np.minimum(qy, shape[1] - 1 - qy) + 0.5 >= edge
    )


def _local_maxima(
    corr: np.ndarray, edge: float, floor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat ``(pattern, i, j, value)`` of 8-neighbour maxima above ``floor``, ``edge`` in.

    A maximum is not below any of its 8 neighbours; the correlation is periodic, so the
    neighbourhood wraps. A plateau (e.g. an all-zero pattern) is all maxima, but never
    above a ``floor`` >= 0 of zero. The margin is :func:`_margin`.
    """
    n, nx, ny = corr.shape
    e = _margin(edge)
    hx, hy = nx - 2 * e, ny - 2 * e
    if hx < 1 or hy < 1:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, corr.dtype)
    # With no margin the frame of neighbours comes from a periodic pad.
    work = np.pad(corr, ((0, 0), (1, 1), (1, 1)), mode="wrap") if e == 0 else corr
    s = max(e, 1)
    centre = work[:, s : s + hx, s : s + hy]
    cand = centre > floor
    for di, dj in _NEIGHBOURS[:2]:
        cand &= centre >= work[:, s + di : s + di + hx, s + dj : s + dj + hy]
    b, i, j = np.nonzero(cand)
    v = centre[b, i, j]
    keep = np.ones(len(b), bool)
    for di, dj in _NEIGHBOURS[2:]:
        keep &= v >= work[b, s + i + di, s + j + dj]
    return b[keep], i[keep] + e, j[keep] + e, v[keep]


def _ranks(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each item within its pattern (items grouped by pattern), and the counts."""
    counts = np.bincount(b, minlength=n)
    starts = np.cumsum(counts) - counts
    return np.arange(len(b)) - starts[b], counts


def _select(
    b: np.ndarray, i: np.ndarray, j: np.ndarray, v: np.ndarray, n: int, params: DetectionParams
) -> np.ndarray:
    """Indices of the candidates kept, ordered by pattern and then by falling height.

    Greedy spacing filter, run for all ``n`` patterns at once: each round keeps the
    strongest surviving candidate of every pattern and drops its neighbours closer than
    ``min_spacing``; the relative threshold then applies to the kept peaks (so the
    reference is a distinct disk, not a shoulder) and ``max_peaks`` to what is left.
    """
    order = np.lexsort((-v, b))
    if order.size == 0:
        return order
    b, i, j, v = b[order], i[order], j[order], v[order]
    rank, counts = _ranks(b, n)
    width = int(counts.max())
    alive = np.zeros((n, width), bool)
    alive[b, rank] = True
    grid_i = np.zeros((n, width))
    grid_j = np.zeros((n, width))
    grid_v = np.full((n, width), -np.inf)
    grid_i[b, rank], grid_j[b, rank], grid_v[b, rank] = i, j, v
    kept = np.zeros((n, width), bool)
    rows = np.arange(n)
    spacing2 = params.min_spacing**2
    n_kept = np.zeros(n, int)
    floor = np.full(n, -np.inf)  # the threshold height, once the reference peak is kept
    for _ in range(max(params.max_peaks, params.relative_to_peak + 1)):
        first = alive.argmax(axis=1)  # the strongest survivor (rows are sorted)
        live = alive[rows, first]
        if not live.any():
            break
        r, a = rows[live], first[live]
        kept[r, a] = True
        alive[r, a] = False
        d2 = (grid_i[r] - grid_i[r, a][:, None]) ** 2 + (grid_j[r] - grid_j[r, a][:, None]) ** 2
        alive[r] &= d2 >= spacing2
        known = n_kept[r] == params.relative_to_peak
        floor[r[known]] = params.min_relative_intensity * grid_v[r[known], a[known]]
        n_kept[r] += 1
        # Below the threshold nothing is kept, and what such a peak would suppress is weaker
        # still: drop it now, so that the rounds end with the last peak kept.
        alive[r] &= grid_v[r] >= floor[r][:, None]
    seen = np.cumsum(kept, axis=1)
    ref_rank = np.clip(np.minimum(params.relative_to_peak, seen[:, -1] - 1), 0, None)
    ref = grid_v[rows, np.argmax(seen > ref_rank[:, None], axis=1)]
    final = kept & (grid_v >= params.min_relative_intensity * ref[:, None])
    final &= seen <= params.max_peaks
    fb, fr = np.nonzero(final)
    starts = np.cumsum(counts) - counts
    return order[starts[fb] + fr]


def _parabolic(
    c: np.ndarray, xm: np.ndarray, xp: np.ndarray, ym: np.ndarray, yp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets along x and y and the peak height of a separable 3-point parabola fit."""
    dx = _parabola_offset(xm, c, xp)
    dy = _parabola_offset(ym, c, yp)
    # Height of each 1D parabola at its offset: c + (r − l)/2 · t + (l − 2c + r)/2 · t².
    gain_x = 0.5 * (xp - xm) * dx + 0.5 * (xm - 2 * c + xp) * dx**2
    gain_y = 0.5 * (yp - ym) * dy + 0.5 * (ym - 2 * c + yp) * dy**2
    return dx, dy, c + gain_x + gain_y


def _gaussian(*values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_parabolic` on the logarithms of ``c, x−, x+, y−, y+``: offsets and height of
    a separable Gaussian (values floored at 1e-6 of the maximum)."""
    values = [np.asarray(v, dtype=np.float64) for v in values]
    floor = 1e-6 * np.maximum(values[0], np.finfo(np.float64).tiny)
    dx, dy, h = _parabolic(*(np.log(np.maximum(v, floor)) for v in values))
    return dx, dy, np.exp(h)


def _flatten(peaks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pattern ``(n, 3)`` tables as flat ``(pattern, qx, qy, value)`` columns."""
    tables = [np.asarray(t, dtype=np.float64).reshape(-1, 3) for t in peaks]
    b = np.repeat(np.arange(len(tables)), [len(t) for t in tables])
    flat = np.concatenate(tables) if tables else np.zeros((0, 3))
    return b, flat[:, 0], flat[:, 1], flat[:, 2]


def _split(b: np.ndarray, qx: np.ndarray, qy: np.ndarray, v: np.ndarray, n: int) -> list:
    """Flat columns (grouped by pattern) back to ``n`` per-pattern ``(k, 3)`` tables."""
    table = np.stack([qx, qy, v], axis=1).astype(np.float64)
    return np.split(table, np.cumsum(np.bincount(b, minlength=n))[:-1])


def _integer_peaks(qx: np.ndarray, qy: np.ndarray, shape: tuple[int, int]) -> tuple:
    """Integer pixel indices of peaks from :func:`find_peaks`, checked against ``shape``."""
    i = np.rint(qx).astype(np.int64)
    j = np.rint(qy).astype(np.int64)
    if i.size and (i.min() < 0 or j.min() < 0 or i.max() >= shape[0] or j.max() >= shape[1]):
        raise ShapeError(
            f"peak positions fall outside the {shape} correlation", "pass peaks from find_peaks"
        )
    return i, j


def _real_stack(corr: Any, peaks: list[np.ndarray] | None = None) -> np.ndarray:
    """``corr`` as an ``(N, Qx, Qy)`` real array, with one peak table per pattern if given."""
    corr = np.asarray(corr)
    if corr.ndim != 3 or corr.dtype.kind != "f":
        raise ShapeError(
            f"corr must be a real (N, Qx, Qy) array, got {corr.dtype} {corr.shape}",
            "pass correlate(...)[0]",
        )
    if peaks is not None and len(peaks) != len(corr):
        raise ShapeError(
            f"{len(peaks)} peak tables for {len(corr)} correlations",
            "pass find_peaks(corr, params) with the same corr",
        )
    return corr


def find_peaks(corr: np.ndarray, params: DetectionParams) -> list[np.ndarray]:
    """Integer-pixel peaks of a stack of correlations.

    8-neighbour maxima (periodic) above ``min_absolute_intensity`` and at least ``edge``
    pixels from the detector's outer boundary, thinned to ``min_spacing`` (weaker
    neighbours dropped), then ``min_relative_intensity`` and ``max_peaks`` (see
    :class:`DetectionParams`).

    Parameters
    ----------
    corr
        ``(N, Qx, Qy)`` correlations (:func:`correlate`).
    params
        Resolved parameters (:meth:`DetectionParams.resolved`).

    Returns
    -------
    list[numpy.ndarray]
        Per pattern an ``(n, 3)`` array ``qx, qy, height``, strongest first.
    """
    _require_resolved(params)
    corr = _real_stack(corr)
    b, i, j, v = _local_maxima(corr, params.edge, params.min_absolute_intensity)
    keep = _select(b, i, j, v, len(corr), params)
    return _split(b[keep], i[keep], j[keep], v[keep], len(corr))


def refine_parabolic(corr: np.ndarray, peaks: list[np.ndarray]) -> list[np.ndarray]:
    """Subpixel peaks by a parabola through each maximum and its 4 neighbours, per axis.

    Fast; exact for a quadratic peak, biased by a few hundredths of a pixel on the cone
    that a disk correlation has at its tip, which the smoothing ``sigma`` rounds off.

    Parameters
    ----------
    corr
        ``(N, Qx, Qy)`` correlations.
    peaks
        Integer peaks per pattern from :func:`find_peaks`.

    Returns
    -------
    list[numpy.ndarray]
        Per pattern ``(n, 3)``: refined ``qx, qy`` and the fitted height.
    """
    corr = _real_stack(corr, peaks)
    b, qx, qy, _ = _flatten(peaks)
    i, j = _integer_peaks(qx, qy, corr.shape[1:])
    dx, dy, h = _parabolic(*_neighbours(corr, b, i, j))
    return _split(b, i + dx, j + dy, h, len(corr))


def refine_gaussian(images: np.ndarray, peaks: list[np.ndarray]) -> list[np.ndarray]:
    """Subpixel peaks by a Gaussian through each maximum and its 4 neighbours, per axis.

    The parabola of :func:`refine_parabolic` through the logarithms: exact for a sampled
    Gaussian peak (what FCU-Net is trained to draw), whatever its width and sub-pixel
    position. Values are floored at 1e-6 of the maximum, so a neighbour at zero caps the
    shift at half a pixel.

    Parameters
    ----------
    images
        ``(N, Qx, Qy)`` non-negative images with peaks.
    peaks
        Integer peaks per image from :func:`find_peaks`.

    Returns
    -------
    list[numpy.ndarray]
        Per image ``(n, 3)``: refined ``qx, qy`` and the fitted Gaussian's height.
    """
    images = _real_stack(images, peaks)
    b, qx, qy, _ = _flatten(peaks)
    i, j = _integer_peaks(qx, qy, images.shape[1:])
    dx, dy, h = _gaussian(*_neighbours(images, b, i, j))
    return _split(b, i + dx, j + dy, h, len(images))


def _neighbours(corr: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple:
    """Values at each peak and its 4 neighbours (periodic): ``c, x−, x+, y−, y+``."""
    nx, ny = corr.shape[1:]
    return (
        corr[b, i, j],
        corr[b, (i - 1) % nx, j],
        corr[b, (i + 1) % nx, j],
        corr[b, i, (j - 1) % ny],
        corr[b, i, (j + 1) % ny],
    )


def refine_dft(
    spectrum: np.ndarray, shape: tuple[int, int], peaks: list[np.ndarray], upsample: int = 16
) -> list[np.ndarray]:
    """Subpixel peaks by local DFT upsampling of the correlation.

    The correlation's trigonometric interpolant is evaluated from its spectrum on a
    ``1/upsample`` px grid within ±0.75 px of each integer maximum, and the grid maximum is
    refined by a parabola (resolution well below ``1/upsample``).

    Parameters
    ----------
    spectrum
        ``(N, Qx, Qy // 2 + 1)`` half-spectra of the correlations (:func:`correlate`).
    shape
        ``(Qx, Qy)``.
    peaks
        Integer peaks per pattern from :func:`find_peaks`.
    upsample
        Grid steps per pixel (>= 2).

    Returns
    -------
    list[numpy.ndarray]
        Per pattern ``(n, 3)``: refined ``qx, qy`` and the interpolated height.
    """
    shape = (int(shape[0]), int(shape[1]))
    if np.ndim(spectrum) != 3 or np.shape(spectrum)[1:] != (shape[0], shape[1] // 2 + 1):
        raise ShapeError(
            f"spectrum of shape {np.shape(spectrum)} is not the rfft2 of {shape} correlations",
            "pass correlate()[1] and the pattern shape",
        )
    if len(peaks) != len(spectrum):
        raise ShapeError(
            f"{len(peaks)} peak tables for {len(spectrum)} spectra", "give one table per pattern"
        )
    if isinstance(upsample, bool) or int(upsample) != upsample or upsample < 2:
        raise ConfigurationError(f"upsample must be an integer >= 2, got {upsample!r}", "e.g. 16")
    b, qx, qy, _ = _flatten(peaks)
    i, j = _integer_peaks(qx, qy, shape)
    spectrum = np.asarray(spectrum)
    fx, fy, h = _dft_refine(
        spectrum, shape, b, i, j, int(upsample), _dft_numpy, _complex_dtype(spectrum.dtype)
    )
    return _split(b, fx, fy, h, len(spectrum))


def _dft_numpy(spectrum: np.ndarray, lo: int, hi: int, factors: tuple) -> np.ndarray:
    return _dft_values(spectrum[lo:hi], *factors)


def _dft_refine(
    spectrum: Any,
    shape: tuple[int, int],
    b: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    upsample: int,
    evaluate: Any,
    complex_dtype: type,
    batch_bytes: int = _DFT_BATCH_BYTES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DFT refinement of flat peaks (grouped by pattern) on any backend.

    Peaks are laid out ``(pattern, rank)`` padded to the most peaks of a pattern, so each
    batch of patterns is two batched matrix products; ``evaluate(spectrum, lo, hi,
    factors)`` runs them where the spectrum lives and returns NumPy values. The phase
    factors take the spectrum's precision (``complex_dtype``): complex64 halves the cost.
    The factors of one batch stay within ``batch_bytes``.
    """
    n = len(spectrum)
    rank, counts = _ranks(b, n)
    qx = np.empty(len(b))
    qy = np.empty(len(b))
    h = np.empty(len(b))
    if len(b) == 0:
        return qx, qy, h
    width = int(counts.max())
    m = 2 * math.ceil(0.75 * upsample) + 1
    per_pattern = 16 * width * m * (2 * shape[0] + 2 * (shape[1] // 2 + 1))
    step = max(1, batch_bytes // per_pattern)
    centers = np.zeros((n, width, 2))
    centers[b, rank, 0] = i
    centers[b, rank, 1] = j
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        sel = (b >= lo) & (b < hi)
        if not sel.any():
            continue
        *phases, offs = _dft_factors(shape, centers[lo:hi], upsample)
        phases = [f.astype(complex_dtype) for f in phases]
        values = evaluate(spectrum, lo, hi, (*phases, shape))
        grids = values[b[sel] - lo, rank[sel]]
        fi, fj = _peak_on_grid(grids)
        res = offs[1] - offs[0]
        qx[sel] = i[sel] + offs[0] + fi * res
        qy[sel] = j[sel] + offs[0] + fj * res
        h[sel] = grids.reshape(len(grids), -1).max(axis=1)
    return qx, qy, h


# ---- backends -----------------------------------------------------------------------------
class _NumpyOps:
    """Correlation and peak search with NumPy/SciPy (threads: ``workers``)."""

    def __init__(
        self, kernel_fft: np.ndarray, params: DetectionParams, shape: tuple, workers: int
    ) -> None:
        self.params = params
        self.workers = workers
        self.pre, self.post = _filters(kernel_fft, params.exponent, params.sigma, shape)

    def correlate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _correlate(batch, self.pre, self.post, self.params.exponent, self.workers)

    def local_maxima(self, corr: np.ndarray) -> tuple:
        return _local_maxima(corr, self.params.edge, self.params.min_absolute_intensity)

    def neighbours(self, corr: np.ndarray, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple:
        return _neighbours(corr, b, i, j)

    dft = staticmethod(_dft_numpy)


class _TorchOps:
    """The same steps with ``torch.fft``, on CUDA when available, else on the CPU."""

    def __init__(self, kernel_fft: np.ndarray, params: DetectionParams, shape: tuple) -> None:
        import torch

        self.torch = torch
        self.params = params
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pre, post = _filters(kernel_fft, params.exponent, params.sigma, shape)
        self.pre = torch.from_numpy(pre).to(self.device)
        self.post = None if post is None else torch.from_numpy(post).to(self.device)

    def correlate(self, batch: np.ndarray) -> tuple[Any, Any]:
        torch, exponent = self.torch, self.params.exponent
        x = torch.from_numpy(batch).to(self.device)
        spec = torch.fft.rfft2(x)
        spec *= self.pre.to(spec.dtype)
        if exponent != 1:
            spec /= spec.abs().clamp_min(np.finfo(batch.dtype).tiny) ** (1 - exponent)
        if self.post is not None:
            spec *= self.post.to(x.dtype)
        return torch.fft.irfft2(spec, s=tuple(batch.shape[1:])), spec

    def local_maxima(self, corr: Any) -> tuple:
        functional = self.torch.nn.functional
        padded = functional.pad(corr[:, None], (1, 1, 1, 1), mode="circular")
        is_max = corr >= functional.max_pool2d(padded, 3, stride=1)[:, 0]
        is_max &= corr > self.params.min_absolute_intensity
        e = _margin(self.params.edge)
        b, i, j = self.torch.nonzero(is_max[:, e : corr.shape[1] - e, e : corr.shape[2] - e]).T
        i, j = i + e, j + e
        return tuple(t.cpu().numpy() for t in (b, i, j, corr[b, i, j]))

    def neighbours(self, corr: Any, b: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple:
        idx = [self.torch.from_numpy(a).to(self.device) for a in (b, i, j)]
        return tuple(v.cpu().numpy() for v in _neighbours(corr, *idx))

    def dft(self, spectrum: Any, lo: int, hi: int, factors: tuple) -> np.ndarray:
        *phases, shape = factors
        phases = [self.torch.from_numpy(f).to(self.device) for f in phases]
        return _dft_values(spectrum[lo:hi], *phases, shape).cpu().numpy()


def _cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device.

    On Linux without an NVIDIA device node torch is not even imported: that alone would
    add ~200 MB to the memory of a correlation run that never uses it.
    """
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia*"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class _Detector:
    """A kernel and resolved parameters, ready to run on batches of patterns."""

    def __init__(
        self,
        kernel: Any,
        shape: tuple[int, int],
        params: DetectionParams | None,
        backend: str,
        workers: int,
        max_bytes: int | str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigurationError(f"unknown backend {backend!r}", f"use one of {BACKENDS}")
        params = DetectionParams() if params is None else params
        if not isinstance(params, DetectionParams):
            raise ConfigurationError(
                f"params must be a DetectionParams, got {type(params).__name__}",
                "pass DetectionParams(...)",
            )
        kernel_fft = kernel_spectrum(kernel, shape)
        if not params.is_resolved:
            params = params.resolved(kernel_radius(np.asarray(kernel)))
        self.params = params
        self.shape = shape
        if backend == "auto":
            backend = "torch" if _cuda_available() else "numpy"
        if backend == "torch":
            self.ops: Any = _TorchOps(kernel_fft, params, shape)
        else:
            self.ops = _NumpyOps(kernel_fft, params, shape, workers)
        fft_bytes, self.dft_bytes = _FFT_BATCH_BYTES, _DFT_BATCH_BYTES
        if max_bytes is not None:  # a memory budget: batches take shares of it
            from stemforge.datasets.io.memory import budget_share

            fft_bytes = budget_share(max_bytes, _BATCH_SHARE, _FFT_BATCH_BYTES)
            self.dft_bytes = budget_share(max_bytes, _BATCH_SHARE, _DFT_BATCH_BYTES)
        # Patterns per FFT batch: their complex spectra stay within fft_bytes.
        self.batch = max(1, fft_bytes // (16 * shape[0] * (shape[1] // 2 + 1)))

    def __call__(self, patterns: Any, start: int = 0) -> list[np.ndarray]:
        patterns = _check_stack(patterns)
        if tuple(patterns.shape[1:]) != self.shape:
            raise ShapeError(
                f"patterns of shape {tuple(patterns.shape[1:])} do not match the kernel's "
                f"{self.shape}",
                "build the kernel from a probe of the detector shape",
            )
        from threadpoolctl import threadpool_limits

        tables: list[np.ndarray] = []
        # BLAS on one thread: OpenBLAS's complex products of the DFT refinement differ in the
        # last bits between thread counts, and cluster workers run one thread, so this keeps
        # a block's peaks the same wherever it runs; threads gained those products <= 10 %.
        with threadpool_limits(1, user_api="blas"):
            for lo in range(0, patterns.shape[0], self.batch):
                batch = _finite_batch(patterns[lo : lo + self.batch], start + lo)
                tables.extend(self._detect(batch))
        return tables

    def _detect(self, batch: np.ndarray) -> list[np.ndarray]:
        ops, p, n = self.ops, self.params, len(batch)
        corr, spec = ops.correlate(batch)
        b, i, j, v = ops.local_maxima(corr)
        keep = _select(b, i, j, v, n, p)
        b, i, j, v = b[keep], i[keep], j[keep], v[keep]
        subpixel = p.subpixel or "dft"
        if subpixel == "parabolic":
            dx, dy, v = _parabolic(*ops.neighbours(corr, b, i, j))
            qx, qy = i + dx, j + dy
        elif subpixel == "gaussian":
            dx, dy, v = _gaussian(*ops.neighbours(corr, b, i, j))
            qx, qy = i + dx, j + dy
        elif subpixel == "dft":
            cdtype = _complex_dtype(batch.dtype)
            qx, qy, v = _dft_refine(
                spec, self.shape, b, i, j, p.upsample, ops.dft, cdtype, self.dft_bytes
            )
        else:
            return _split(b, i, j, v, n)
        # The integer margin lets refined peaks up to half a pixel inside the edge through.
        inside = _inside_edge(qx, qy, self.shape, p.edge)
        return _split(b[inside], qx[inside], qy[inside], v[inside], n)


# ---- orchestration ------------------------------------------------------------------------
def detect_patterns(
    patterns: Any,
    kernel: Any,
    params: DetectionParams | None = None,
    backend: str = "auto",
    *,
    workers: int = -1,
) -> list[np.ndarray]:
    """Find the Bragg disks of a stack of patterns.

    Parameters
    ----------
    patterns
        ``(N, Qx, Qy)`` real patterns (NumPy, or anything indexable along N).
    kernel
        ``(Qx, Qy)`` wrapped kernel (:func:`~stemforge.infer.templates.make_kernel`).
    params
        Detection settings; default :class:`DetectionParams` (), with ``min_spacing`` and
        ``edge`` derived from the kernel's radius where None.
    backend
        ``"numpy"`` (SciPy FFT), ``"torch"`` (``torch.fft``: CUDA when available, else
        CPU) or ``"auto"`` (torch with CUDA, else numpy). Both give the same peaks.
    workers
        Threads of the NumPy backend's FFTs (-1: all cores).

    Returns
    -------
    list[numpy.ndarray]
        Per pattern an ``(n, 3)`` float64 array ``qx, qy, intensity`` (raw detector pixels,
        strongest first); all-zero patterns give ``(0, 3)``.
    """
    patterns = _check_stack(patterns)
    return _Detector(kernel, tuple(patterns.shape[1:]), params, backend, workers)(patterns)


def find_bragg_disks(
    cube: DataCube,
    kernel: Any,
    params: DetectionParams | None = None,
    max_bytes: int | str | None = None,
    backend: str = "auto",
    *,
    workers: int = -1,
    scheduler: Any = None,
    checkpoint: BlockCheckpoint | None = None,
) -> BraggPeaks:
    """Find the Bragg disks of every pattern of a datacube, block by block.

    Memory stays bounded for in-memory, memory-mapped and Dask-backed cubes alike: one
    block of scan rows is read at a time and the FFTs and refinements inside run in
    batches, all sized from the memory budget ``max_bytes`` (a detection holds about half
    of it). A progress bar shows on a terminal.

    Parameters
    ----------
    cube
        The datacube ``(Rx, Ry, Qx, Qy)``.
    kernel
        ``(Qx, Qy)`` wrapped kernel (:func:`~stemforge.infer.templates.make_kernel`).
    params
        Detection settings (see :func:`detect_patterns`).
    max_bytes
        Memory budget, bytes or a size such as ``"256MB"``; default the readers' budget
        (``STEMFORGE_MEMORY_BUDGET``, else a quarter of the free memory).
    backend, workers
        See :func:`detect_patterns`; on a cluster ``workers=-1`` means one FFT thread per
        task (each worker thread runs its own task).
    scheduler, checkpoint
        See :func:`stream_peaks`.

    Returns
    -------
    BraggPeaks
        The peaks with their scan positions.

    Raises
    ------
    InvalidDataError
        A pattern holds NaN or inf (the error names its ``rx, ry``).
    """
    _require_cube(cube)
    if scheduler is not None and workers == -1:
        workers = 1
    detector = _Detector(kernel, cube.detector_shape, params, backend, workers, max_bytes)
    return stream_peaks(
        cube, detector, max_bytes, "Bragg disks", scheduler=scheduler, checkpoint=checkpoint
    )


def _require_cube(cube: Any) -> None:
    if not isinstance(cube, DataCube):
        raise ConfigurationError(
            f"disk detection needs a DataCube, got {type(cube).__name__}",
            "wrap the array: DataCube(array), or use detect_patterns for a (N, Qx, Qy) stack",
        )


def stream_peaks(
    cube: DataCube,
    detect: Callable[..., list[np.ndarray]],
    max_bytes: int | str | None = None,
    description: str = "Bragg disks",
    *,
    scheduler: Any = None,
    checkpoint: BlockCheckpoint | None = None,
) -> BraggPeaks:
    """Run a per-stack peak detector over a datacube, one block of scan rows at a time.

    Shared by every disk detector (correlation, FCU-Net), so memory stays bounded the same
    way for in-memory, memory-mapped and Dask-backed cubes, NaN/inf are reported by
    position, and every detector runs on a cluster and resumes from a checkpoint alike.

    Parameters
    ----------
    cube
        The datacube ``(Rx, Ry, Qx, Qy)``.
    detect
        ``detect(stack, start=...)`` → one ``(n, 3)`` table per pattern of the
        ``(N, Qx, Qy)`` stack; ``start`` is the flat scan index of its first pattern. On a
        cluster it travels to the workers (cloudpickle).
    max_bytes
        Memory budget, bytes or a size such as ``"256MB"``; default the readers' budget
        (``STEMFORGE_MEMORY_BUDGET``, else a quarter of the free memory). Blocks of scan
        rows take 1/8 of it as float32 (at most 32 MiB); give the detector the same budget
        for its batches.
    description
        Label of the progress bar.
    scheduler
        None: run in this process. ``"local"``, a worker count, a scheduler address or a
        ``distributed.Client``: one task per block on that cluster
        (:func:`~stemforge.core.cluster.map_ordered`: retried, in block order). Workers
        read their block from the file themselves when the cube is lazy (open it with
        ``read_datacube(..., lazy=True)``); an in-memory cube is sent to each worker whole.
    checkpoint
        Keep finished blocks here as they finish and skip those a previous run of the same
        job left (:class:`~stemforge.infer.checkpoint.BlockCheckpoint`).
    """
    # Imported here: the readers' package loads h5py and zarr, needed only to stream a cube.
    from stemforge.datasets.io.memory import budget_share

    _require_cube(cube)
    slices = cube.block_slices(budget_share(max_bytes, _BLOCK_SHARE, _MAX_BLOCK_BYTES))
    done: dict[int, list[np.ndarray]] = {}
    if checkpoint is not None:
        layout = {"shape": list(cube.shape), "rows_per_block": slices[0].stop}
        done = checkpoint.open(layout, len(slices))
    todo = [i for i in range(len(slices)) if i not in done]

    def finished(k: int, tables: list[np.ndarray]) -> None:
        done[todo[k]] = tables
        if checkpoint is not None:
            checkpoint.save(todo[k], tables)

    work = functools.partial(_block_peaks, detect, cube.data, cube.name)
    todo_slices = [slices[i] for i in todo]
    map_ordered(work, todo_slices, scheduler, on_result=finished, description=description)
    tables = [table for i in range(len(slices)) for table in done[i]]
    return BraggPeaks.from_patterns(tables, cube.scan_shape, cube.detector_shape)


def _block_peaks(
    detect: Callable[..., list[np.ndarray]], data: Any, name: str, rows: slice
) -> list[np.ndarray]:
    """Peak tables of the scan rows ``rows`` of ``data``, read here (on a worker, from the file)."""
    block = load_block(data, rows, name)
    return detect(block.reshape(-1, *block.shape[2:]), start=rows.start * block.shape[1])
