"""Origin (position of the unscattered beam) of every diffraction pattern.

Three measurements, each a pure kernel on a NumPy block of patterns ``(N, Qx, Qy)`` or
``(rx, ry, Qx, Qy)`` (a single ``(Qx, Qy)`` pattern works too, giving 0-d arrays):

- :func:`origin_com`: centre of mass of the central disk, refined in a window that follows
  the disk (fast, exact for a clean disk);
- :func:`origin_xcorr`: cross-correlation with a probe template, refined by local DFT
  upsampling (robust to structure inside the disk);
- :func:`origin_friedel`: masked correlation of each pattern with its point-inverted copy
  (Friedel symmetry; works with a beam stop over the central disk).

:func:`find_origin` streams one of them over a :class:`~stemforge.core.DataCube` with
bounded memory, and :func:`fit_origin_drift` smooths the result over the scan with a robust
low-order polynomial. Coordinates are in detector pixels along axes -2 (qx) and -1 (qy),
0 being the centre of the first pixel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from stemforge.core.datacube import DataCube
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.core.progress import track

# Complex spectra of one batch of patterns stay below this many bytes in the FFT kernels.
_FFT_BATCH_BYTES = 64 * 2**20


# ---- input checks -------------------------------------------------------------------------
def _pattern_stack(block: Any, name: str = "block") -> tuple[np.ndarray, tuple[int, ...]]:
    """``block`` as a float ``(N, Qx, Qy)`` stack, and its leading (scan) shape.

    float32 stays float32 (half the memory of a block); the kernels cast to float64 per batch
    or per patch where precision matters.
    """
    arr = np.asarray(block)
    if arr.ndim not in (2, 3, 4):
        raise ShapeError(
            f"{name} must be one pattern (Qx, Qy), a stack (N, Qx, Qy) or a scan block "
            f"(rx, ry, Qx, Qy); got shape {arr.shape}",
            "pass diffraction patterns with the detector on the last two axes",
        )
    if min(arr.shape[-2:]) < 3 or arr.size == 0:
        raise ShapeError(f"{name} has shape {arr.shape}: too small to hold a disk", "check the data")
    if arr.dtype.kind not in "biuf":
        raise InvalidDataError(
            f"{name} has dtype {arr.dtype}; diffraction intensities must be real numbers",
            "pass the intensity (e.g. numpy.abs(x)**2 of a complex wave)",
        )
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    stack = arr.reshape(-1, *arr.shape[-2:]).astype(dtype, copy=False)
    good = np.isfinite(stack).all(axis=(1, 2))
    if not good.all():
        first = np.unravel_index(int(np.argmin(good)), arr.shape[:-2]) if arr.ndim > 2 else ()
        raise InvalidDataError(
            f"{name}: {int((~good).sum())} pattern(s) contain NaN or inf, first at index {tuple(map(int, first))}",
            "replace or mask the bad frames (e.g. numpy.nan_to_num) before finding the origin",
        )
    return stack, arr.shape[:-2]


def _detector_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """A boolean ``shape`` mask, True for pixels to use."""
    m = np.asarray(mask)
    if m.shape != shape:
        raise ShapeError(
            f"mask has shape {m.shape} but the patterns are {shape}",
            "give a boolean mask with the detector shape, True for pixels to use",
        )
    m = m.astype(bool)
    if m.sum() < 3:
        raise InvalidDataError("mask excludes (almost) every pixel", "set True for the pixels to use")
    return m


def _batches(n: int, item_bytes: int) -> Iterator[slice]:
    step = max(1, _FFT_BATCH_BYTES // max(item_bytes, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


# ---- synthetic disk -----------------------------------------------------------------------
def synthetic_disk(
    shape: tuple[int, int], center: tuple[float, float], radius: float, supersample: int = 8
) -> np.ndarray:
    """An antialiased uniform disk: each pixel holds the fraction of its area inside the disk.

    Useful as a template for :func:`origin_xcorr` and for tests.

    Parameters
    ----------
    shape
        ``(Qx, Qy)``.
    center
        ``(qx, qy)`` of the disk centre in pixels (0 = centre of the first pixel).
    radius
        Disk radius in pixels.
    supersample
        Edge pixels are sampled on a ``supersample × supersample`` sub-grid.

    Returns
    -------
    numpy.ndarray
        Float array of ``shape`` with values in [0, 1].
    """
    if not (math.isfinite(radius) and radius > 0):
        raise ConfigurationError(f"disk radius must be positive, got {radius!r}", "give the radius in pixels")
    if supersample < 1:
        raise ConfigurationError(f"supersample must be >= 1, got {supersample}", "use e.g. 8")
    x = np.arange(shape[0])[:, None] - center[0]
    y = np.arange(shape[1])[None, :] - center[1]
    d = np.hypot(x, y)
    out = (d <= radius).astype(np.float64)
    # Only pixels the circle can cross (|d - r| < half a diagonal) need sub-sampling.
    ex, ey = np.nonzero(np.abs(d - radius) < 0.75)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    sx = x[ex, 0][:, None, None] + sub[None, :, None]
    sy = y[0, ey][:, None, None] + sub[None, None, :]
    out[ex, ey] = (sx**2 + sy**2 <= radius**2).mean(axis=(1, 2))
    return out


# ---- centre of mass -----------------------------------------------------------------------
def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of ``values[i][mask[i]]`` for each leading index i (0 where the mask is empty).

    One vectorised sort instead of a ``nanmedian`` loop over rows.
    """
    n = len(values)
    flat = np.sort(np.where(mask, values, np.inf).reshape(n, -1), axis=1)
    count = mask.reshape(n, -1).sum(axis=1)
    rows = np.arange(n)
    hi = flat[rows, np.maximum(count // 2, 0)]
    lo = flat[rows, np.maximum((count - 1) // 2, 0)]
    return np.where(count > 0, (lo + hi) / 2, 0.0)


def origin_com(
    block: Any,
    *,
    radius: float | None = None,
    threshold: float = 0.5,
    sigma: float = 1.0,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Origin from the centre of mass of the central disk, refined in a following window.

    A coarse centre is the centroid of the pixels brighter than ``threshold`` of the way from
    the background (median) to the maximum of the lightly smoothed pattern; its area also
    gives the disk radius when ``radius`` is None. The refinement then iterates a
    background-subtracted centre of mass inside a circular window of radius
    ``1.2 * radius + 2`` around the current estimate (pixels on its edge weighted by the
    fraction inside, so the estimate moves continuously); the background is the median of
    the annulus just outside the window. At the fixed point the window is centred on the
    disk, so clipping, a background error or symmetric pairs of Bragg disks cancel and the
    result is unbiased for a centrosymmetric disk. The central disk must be the brightest
    feature: otherwise use :func:`origin_xcorr` with ``max_shift``, or fit the drift.

    Parameters
    ----------
    block
        Patterns ``(N, Qx, Qy)``, ``(rx, ry, Qx, Qy)`` or one ``(Qx, Qy)`` pattern.
    radius
        Central disk radius in pixels; None estimates it per pattern.
    threshold
        Fraction between background and maximum defining the coarse disk (0 < t < 1);
        Bragg disks weaker than this are ignored by the coarse step.
    sigma
        Gaussian smoothing (pixels) for the coarse step only; 0 disables it.
    max_iter, tol
        Refinement stops when no estimate moves more than ``tol`` pixels.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        Origin in pixels, shaped like the leading axes of ``block``. Patterns with no signal
        (flat) give NaN; :func:`fit_origin_drift` fills them.
    """
    stack, lead = _pattern_stack(block)
    if max_iter < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}", "use e.g. 50")
    if not 0 < threshold < 1:
        raise ConfigurationError(f"threshold must be in (0, 1), got {threshold}", "use e.g. 0.5")
    if radius is not None and not (math.isfinite(radius) and radius > 0):
        raise ConfigurationError(f"radius must be positive, got {radius!r}", "give the disk radius in pixels or None")
    if sigma < 0:
        raise ConfigurationError(f"sigma must be >= 0, got {sigma}", "use e.g. 1")
    n, nx, ny = stack.shape

    smooth = ndimage.gaussian_filter(stack, (0, sigma, sigma)) if sigma > 0 else stack
    bg = np.median(smooth, axis=(1, 2))
    top = smooth.max(axis=(1, 2))
    has_signal = top > bg
    bright = smooth > (bg + threshold * (top - bg))[:, None, None]
    w = np.where(bright, smooth - bg[:, None, None], 0.0)
    mass = np.maximum(w.sum(axis=(1, 2)), np.finfo(float).tiny)
    cx = (w.sum(axis=2) @ np.arange(nx)) / mass
    cy = (w.sum(axis=1) @ np.arange(ny)) / mass
    r_disk = np.full(n, float(radius)) if radius is not None else np.sqrt(bright.sum(axis=(1, 2)) / np.pi)
    r_win = 1.2 * r_disk + 2.0
    r_bg = r_win + np.maximum(3.0, 0.5 * r_disk)
    half = int(np.ceil(r_bg.max())) + 1
    offs = np.arange(-half, half + 1)
    rows = np.arange(n)[:, None, None]

    for _ in range(max_iter):
        ix = np.rint(cx).astype(int)[:, None] + offs  # (n, P) pixel indices of the patch
        iy = np.rint(cy).astype(int)[:, None] + offs
        inside = ((ix >= 0) & (ix < nx))[:, :, None] & ((iy >= 0) & (iy < ny))[:, None, :]
        patch = stack[rows, np.clip(ix, 0, nx - 1)[:, :, None], np.clip(iy, 0, ny - 1)[:, None, :]].astype(np.float64)
        dx = ix - cx[:, None]
        dy = iy - cy[:, None]
        d2 = dx[:, :, None] ** 2 + dy[:, None, :] ** 2
        d = np.sqrt(d2)
        # A soft (pixel-area) window edge keeps the centroid continuous as the window moves.
        win = np.where(inside, np.clip(r_win[:, None, None] - d + 0.5, 0.0, 1.0), 0.0)
        in_bg = inside & (d > r_win[:, None, None] + 0.5) & (d <= r_bg[:, None, None])
        local_bg = _masked_median(patch, in_bg)
        w = win * (patch - local_bg[:, None, None])
        mass = w.sum(axis=(1, 2))
        ok = mass > 0
        safe = np.where(ok, mass, 1.0)
        new_cx = np.where(ok, cx + (w.sum(axis=2) * dx).sum(axis=1) / safe, cx)
        new_cy = np.where(ok, cy + (w.sum(axis=1) * dy).sum(axis=1) / safe, cy)
        step = np.hypot(new_cx - cx, new_cy - cy)
        cx, cy = new_cx, new_cy
        if step.max() < tol:
            break
    bad = ~(has_signal & ok)
    cx[bad] = np.nan
    cy[bad] = np.nan
    return cx.reshape(lead), cy.reshape(lead)


# ---- subpixel peak helpers ---------------------------------------------------------------
def _parabola_offset(left: np.ndarray, mid: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through three equally spaced samples, in samples from ``mid``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        curv = left - 2 * mid + right
        off = np.where(curv < 0, 0.5 * (left - right) / curv, 0.0)
    return np.clip(off, -0.5, 0.5)


def _peak_on_grid(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subpixel maximum of each ``(m, m)`` grid: argmax plus a 3-point parabola per axis."""
    n, mx, my = values.shape
    flat = np.argmax(values.reshape(n, -1), axis=1)
    i, j = np.unravel_index(flat, (mx, my))
    i = np.clip(i, 1, mx - 2)
    j = np.clip(j, 1, my - 2)
    r = np.arange(n)
    c = values[r, i, j]
    di = _parabola_offset(values[r, i - 1, j], c, values[r, i + 1, j])
    dj = _parabola_offset(values[r, i, j - 1], c, values[r, i, j + 1])
    return i + di, j + dj


def _dft_factors(
    shape: tuple[int, int], centers: np.ndarray, upsample: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Separable phase factors of the local DFT evaluation (see :func:`_dft_values`).

    The grid around each centre ``c`` spans ±0.75 samples in steps of ``1/upsample``; its
    phase ``exp(2πi (c + o) f)`` factors into a per-centre part and a per-offset part, so
    only ``(n + m) · P`` exponentials are needed instead of ``n · m · P``.

    Parameters
    ----------
    shape
        ``(Px, Py)`` of the real signals.
    centers
        ``(..., 2)`` grid centres in samples.
    upsample
        Grid steps per sample.

    Returns
    -------
    cx, cy
        ``(..., Px)`` and ``(..., Py // 2 + 1)`` centre phases (``cy`` carries the weights
        that let the ``rfft2`` half-spectrum stand for the full one).
    ox, oy
        ``(m, Px)`` and ``(m, Py // 2 + 1)`` offset phases.
    offs
        ``(m,)`` grid offsets in samples.
    """
    px, py = shape
    half = int(np.ceil(0.75 * upsample))
    offs = np.arange(-half, half + 1) / upsample
    fx = sfft.fftfreq(px)
    fy = sfft.rfftfreq(py)
    # The half-spectrum stands for the full one: columns with a mirror count twice.
    wy = np.full(fy.size, 2.0)
    wy[0] = 1.0
    if py % 2 == 0:
        wy[-1] = 1.0
    cx = np.exp(2j * np.pi * centers[..., 0, None] * fx)
    cy = wy * np.exp(2j * np.pi * centers[..., 1, None] * fy)
    ox = np.exp(2j * np.pi * offs[:, None] * fx)
    oy = np.exp(2j * np.pi * offs[:, None] * fy)
    return cx, cy, ox, oy, offs


def _dft_values(spectra: Any, cx: Any, cy: Any, ox: Any, oy: Any, shape: tuple[int, int]) -> Any:
    """Real signals evaluated from their ``rfft2`` half-spectra on small grids.

    The matrix-multiply DFT of Guizar-Sicairos et al., Opt. Lett. 33, 156 (2008): the
    trigonometric interpolant of the samples at ``m²`` points around each of ``k`` centres
    per signal, for the cost of two matrix products instead of an upsampled FFT. Written
    with operators only, so NumPy arrays and torch tensors (on any device) both work.

    Parameters
    ----------
    spectra
        ``(n, Px, Py // 2 + 1)`` half-spectra.
    cx, cy
        ``(n, k, Px)`` and ``(n, k, Py // 2 + 1)`` centre phases from :func:`_dft_factors`.
    ox, oy
        Offset phases from :func:`_dft_factors`.
    shape
        ``(Px, Py)``.

    Returns
    -------
    ``(n, k, m, m)`` real values.
    """
    n, k, px = cx.shape
    m = ox.shape[0]
    ex = (cx[:, :, None, :] * ox).reshape(n, k * m, px)
    ey = cy[:, :, None, :] * oy
    rows = (ex @ spectra).reshape(n, k, m, -1)
    return (rows @ ey.swapaxes(-1, -2)).real / (shape[0] * shape[1])


def _upsampled(
    spectra: np.ndarray, shape: tuple[int, int], centers: np.ndarray, upsample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate real signals from their ``rfft2`` half-spectra on a fine grid.

    One grid per signal, ±0.75 samples around ``centers`` ``(n, 2)`` in steps of
    ``1/upsample`` (see :func:`_dft_values`). Returns the values ``(n, m, m)`` and the grid
    offsets ``(m,)`` in samples.
    """
    cx, cy, ox, oy, offs = _dft_factors(shape, centers[:, None, :], upsample)
    return _dft_values(spectra, cx, cy, ox, oy, shape)[:, 0], offs


def _check_upsample(upsample: int) -> None:
    if int(upsample) != upsample or upsample < 2:
        raise ConfigurationError(f"upsample must be an integer >= 2, got {upsample!r}", "use e.g. 16")


# ---- cross-correlation with a template ----------------------------------------------------
def origin_xcorr(
    block: Any,
    template: Any,
    *,
    template_origin: tuple[float, float] | None = None,
    subpixel: str = "dft",
    upsample: int = 16,
    corr_power: float = 0.2,
    sigma: float = 1.0,
    max_shift: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Origin from the cross-correlation of each pattern with a probe template.

    The correlation ``C(s) = Σ_q I(q) T(q - s)`` peaks at the shift ``s`` of the pattern's
    central disk relative to the template, so the origin is ``template_origin + s``. The
    default is a hybrid correlation (``corr_power`` 0.2: the spectrum mostly whitened), which
    weights the disk edge over its interior, so structure inside the disk barely moves the
    peak (unlike a centre of mass); pattern and template are blurred by ``sigma`` so that the
    pixel-sampled disk edges do not alias into the subpixel position. The integer peak is
    refined by evaluating the correlation on a ``1/upsample`` grid within ±0.75 px (local DFT
    upsampling) and a final parabola on that grid, or by a parabola on the integer grid.

    Parameters
    ----------
    block
        Patterns ``(N, Qx, Qy)``, ``(rx, ry, Qx, Qy)`` or one ``(Qx, Qy)`` pattern.
    template
        ``(Qx, Qy)`` image of the unscattered probe: a vacuum probe or a
        :func:`synthetic_disk`.
    template_origin
        Position of the probe centre in ``template``; default its :func:`origin_com`.
    subpixel
        ``"dft"`` (local DFT upsampling, accurate) or ``"parabolic"`` (fast, biased by up to
        ~0.1 px on the cusp of a disk correlation).
    upsample
        Upsampling factor for ``"dft"`` (resolution ``1/upsample`` px before the parabola).
    corr_power
        1 for cross-correlation, 0 for phase correlation, in between for hybrid: the
        spectrum is divided by its modulus to the power ``1 - corr_power``. 1 is the most
        precise on clean disks (~0.002 px) but follows internal structure like a COM.
    sigma
        Gaussian blur (pixels) of pattern and template, applied in Fourier space.
    max_shift
        If given, only shifts up to this many pixels from ``template_origin`` are searched,
        so a strong Bragg disk cannot win.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        Origin in pixels, shaped like the leading axes of ``block``.
    """
    stack, lead = _pattern_stack(block)
    nx, ny = stack.shape[1:]
    tmpl, _ = _pattern_stack(template, "template")
    if tmpl.shape != (1, nx, ny):
        raise ShapeError(
            f"template has shape {np.shape(template)} but the patterns are {(nx, ny)}",
            "give a 2D template with the detector shape (e.g. the mean vacuum probe)",
        )
    tmpl = tmpl[0]
    if np.ptp(tmpl) == 0:
        raise InvalidDataError("the template is flat", "use a vacuum probe image or synthetic_disk(...)")
    if subpixel not in ("dft", "parabolic"):
        raise ConfigurationError(f"unknown subpixel method {subpixel!r}", "use 'dft' or 'parabolic'")
    if subpixel == "dft":
        _check_upsample(upsample)
    if not 0 <= corr_power <= 1:
        raise ConfigurationError(f"corr_power must be in [0, 1], got {corr_power}", "use e.g. 0.2")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigurationError(f"sigma must be >= 0, got {sigma}", "use e.g. 1 (pixels)")
    if template_origin is None:
        tx, ty = (float(v) for v in origin_com(tmpl))
    else:
        tx, ty = (float(v) for v in template_origin)

    ft_conj = np.conj(sfft.rfft2(tmpl))
    sx = sfft.fftfreq(nx, 1 / nx)  # signed integer shifts along each axis
    sy = sfft.fftfreq(ny, 1 / ny)
    f2 = sfft.fftfreq(nx)[:, None] ** 2 + sfft.rfftfreq(ny)[None, :] ** 2
    # Blurring pattern and template by sigma blurs the correlation by sigma·√2.
    smoothing = np.exp(-4 * np.pi**2 * sigma**2 * f2)
    allowed = None
    if max_shift is not None:
        allowed = sx[:, None] ** 2 + sy[None, :] ** 2 <= max_shift**2
    qx0 = np.empty(stack.shape[0])
    qy0 = np.empty(stack.shape[0])
    for sl in _batches(stack.shape[0], nx * (ny // 2 + 1) * 16):
        spec = sfft.rfft2(stack[sl].astype(np.float64), workers=-1) * ft_conj
        if corr_power != 1:
            spec = spec / np.maximum(np.abs(spec), np.finfo(float).tiny) ** (1 - corr_power)
        if sigma > 0:
            spec = spec * smoothing
        corr = sfft.irfft2(spec, s=(nx, ny), workers=-1)
        if allowed is not None:
            corr = np.where(allowed, corr, -np.inf)
        i, j = np.unravel_index(np.argmax(corr.reshape(len(corr), -1), axis=1), (nx, ny))
        if subpixel == "dft":
            centers = np.stack([sx[i], sy[j]], axis=1)
            values, offs = _upsampled(spec, (nx, ny), centers, upsample)
            fi, fj = _peak_on_grid(values)
            step = offs[1] - offs[0]
            dx = centers[:, 0] + offs[0] + fi * step
            dy = centers[:, 1] + offs[0] + fj * step
        else:
            r = np.arange(len(corr))
            c = corr[r, i, j]
            dx = sx[i] + _parabola_offset(corr[r, (i - 1) % nx, j], c, corr[r, (i + 1) % nx, j])
            dy = sy[j] + _parabola_offset(corr[r, i, (j - 1) % ny], c, corr[r, i, (j + 1) % ny])
        qx0[sl] = tx + dx
        qy0[sl] = ty + dy
    return qx0.reshape(lead), qy0.reshape(lead)


# ---- Friedel symmetry ---------------------------------------------------------------------
def origin_friedel(
    block: Any,
    *,
    mask: Any = None,
    upsample: int = 16,
    sigma: float = 0.75,
    min_overlap: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Origin from the Friedel (point) symmetry ``I(c + q) ≈ I(c - q)`` of each pattern.

    Correlating a pattern with its point-inverted copy is the same as convolving it with
    itself: ``(I * I)(t) = Σ_q I(q) I(t - q)`` pairs every pixel with its mirror image through
    ``t / 2`` and so peaks at ``t = 2c``, i.e. at ``2·(c − m)`` from the array centre ``m``
    in correlation terms. Excluded pixels (a beam stop, dead pixels) must not count as dark
    ones, so the score is the masked normalised cross-correlation of Padfield (IEEE Trans.
    Image Process. 21, 2706 (2012)), which for a pattern against its own mirror reduces to
    ``(A − S²/O) / (B − S²/O)`` with ``A = (mI)*(mI)``, ``S = (mI)*m``, ``B = (mI²)*m``,
    ``O = m*m`` (linear convolutions through zero-padded real FFTs). The four convolutions
    are Fourier-interpolated around the integer peak (local DFT upsampling) and the score is
    re-formed on that fine grid; the origin error is half the error in ``t``. A beam stop
    must be given as ``mask``: zeroed but unmasked it reads as structure and wrecks the
    symmetry.

    Parameters
    ----------
    block
        Patterns ``(N, Qx, Qy)``, ``(rx, ry, Qx, Qy)`` or one ``(Qx, Qy)`` pattern.
    mask
        Boolean ``(Qx, Qy)``, True for pixels to use, False under the beam stop and on dead
        pixels; default all True.
    upsample
        Upsampling factor of the refinement (resolution ``1/(2·upsample)`` px in the origin
        before the final parabola).
    sigma
        Gaussian blur (pixels) of each pattern before the correlation, against aliasing of
        pixel-sampled edges and noise. It is normalised over the valid pixels, and pixels
        within ~2σ of an excluded one are excluded too, so the mask edge cannot leak in.
    min_overlap
        Only centres where a pattern and its mirror share at least this fraction of the
        largest possible overlap are searched; 0.5 allows the origin to sit up to about a
        quarter of the detector from its centre, and keeps tiny noisy overlaps out.

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        Origin in pixels, shaped like the leading axes of ``block``. Patterns with no
        structure (flat) give NaN.
    """
    stack, lead = _pattern_stack(block)
    n, nx, ny = stack.shape
    _check_upsample(upsample)
    if not 0 < min_overlap < 1:
        raise ConfigurationError(f"min_overlap must be in (0, 1), got {min_overlap}", "use e.g. 0.5")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigurationError(f"sigma must be >= 0, got {sigma}", "use e.g. 0.75 (pixels)")
    m = np.ones((nx, ny)) if mask is None else _detector_mask(mask, (nx, ny)).astype(np.float64)
    # Overlap >= min_overlap needs |t - (n - 1)| <= reach on each axis. Convolutions live on
    # t in [0, 2n - 2]; a periodic length P >= n + reach keeps their wrapped copies (t ± P)
    # out of that search window, so index t is q + q' there without padding to 2n - 1.
    reach = (int((1 - min_overlap) * nx), int((1 - min_overlap) * ny))
    shape = (sfft.next_fast_len(nx + reach[0], real=True), sfft.next_fast_len(ny + reach[1], real=True))
    if sigma > 0:
        norm = ndimage.gaussian_filter(m, sigma, mode="constant")
        m_use = (norm > 0.99).astype(np.float64)
    else:
        m_use = m
    if m_use.sum() < 3:
        raise InvalidDataError(
            "the mask leaves (almost) no usable pixels once its edges are widened by 2·sigma",
            "mark only the beam stop and dead pixels False, or lower sigma",
        )
    fm = sfft.rfft2(m_use, s=shape)
    spec_o = fm * fm
    overlap = sfft.irfft2(spec_o, s=shape)
    window = np.zeros(shape, bool)
    window[nx - 1 - reach[0] : nx + reach[0], ny - 1 - reach[1] : ny + reach[1]] = True
    searchable = window & (overlap >= min_overlap * overlap[window].max())
    eps = 1e-9 * overlap.max()

    def score(a: np.ndarray, s: np.ndarray, b: np.ndarray, o: np.ndarray) -> np.ndarray:
        o = np.maximum(o, eps)
        den = b - s * s / o
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc = (a - s * s / o) / den
        # Constant-valued overlaps have no variance to normalise: not a candidate.
        return np.where(den > 1e-12 * np.abs(b).max(axis=(-2, -1), keepdims=True), ncc, -np.inf)

    qx0 = np.empty(n)
    qy0 = np.empty(n)
    for sl in _batches(n, shape[0] * (shape[1] // 2 + 1) * 16 * 4):
        f = stack[sl].astype(np.float64) * m
        if sigma > 0:
            sm = ndimage.gaussian_filter(f, (0, sigma, sigma), mode="constant")
            f = np.where(m_use > 0, sm / np.maximum(norm, 1e-12), 0.0)
        ff = sfft.rfft2(f, s=shape, workers=-1)
        fb = sfft.rfft2(f * f, s=shape, workers=-1)
        spectra = (ff * ff, ff * fm, fb * fm)
        a, s, b = (sfft.irfft2(x, s=shape, workers=-1) for x in spectra)
        ncc = np.where(searchable, score(a, s, b, overlap), -np.inf)
        flat = np.argmax(ncc.reshape(len(ncc), -1), axis=1)
        found = np.isfinite(ncc.reshape(len(ncc), -1)[np.arange(len(ncc)), flat])
        centers = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.float64)
        fine = [_upsampled(x, shape, centers, upsample)[0] for x in spectra]
        values, offs = _upsampled(np.broadcast_to(spec_o, spectra[0].shape), shape, centers, upsample)
        fi, fj = _peak_on_grid(score(*fine, values))
        step = offs[1] - offs[0]
        tx = centers[:, 0] + offs[0] + fi * step
        ty = centers[:, 1] + offs[0] + fj * step
        qx0[sl] = np.where(found, tx / 2, np.nan)
        qy0[sl] = np.where(found, ty / 2, np.nan)
    return qx0.reshape(lead), qy0.reshape(lead)


# ---- datacube level -----------------------------------------------------------------------
_METHODS = {"com": origin_com, "xcorr": origin_xcorr, "friedel": origin_friedel}


def find_origin(
    cube: DataCube | Any,
    method: str = "com",
    template: Any = None,
    *,
    max_bytes: int = 32 * 2**20,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Origin of every pattern of a datacube, streamed block by block with a progress bar.

    Works alike for in-memory, memory-mapped and Dask-backed cubes: only one block of scan
    rows (about ``max_bytes`` as float32) is in memory at a time, and a block holding NaN or
    inf raises :class:`~stemforge.core.InvalidDataError` naming the scan position.

    Parameters
    ----------
    cube
        A :class:`~stemforge.core.DataCube` (or a 4D array, wrapped in one).
    method
        ``"com"`` (:func:`origin_com`), ``"xcorr"`` (:func:`origin_xcorr`, needs
        ``template``) or ``"friedel"`` (:func:`origin_friedel`, for a beam stop).
    template
        ``(Qx, Qy)`` probe template for ``"xcorr"``.
    max_bytes
        Block size budget.
    **options
        Passed on to the kernel (e.g. ``radius=``, ``mask=``, ``upsample=``).

    Returns
    -------
    qx0, qy0 : numpy.ndarray
        ``(Rx, Ry)`` origin arrays in detector pixels, ready for ``Calibration(qx0=, qy0=)``
        after :func:`fit_origin_drift` (which also fills NaN from blank patterns).
    """
    if not isinstance(cube, DataCube):
        cube = DataCube(cube)
    if method not in _METHODS:
        raise ConfigurationError(f"unknown origin method {method!r}", f"use one of {sorted(_METHODS)}")
    kernel = _METHODS[method]
    if method == "xcorr":
        if template is None:
            raise ConfigurationError(
                "method 'xcorr' needs a template", "pass template= (a vacuum probe image or synthetic_disk(...))"
            )
        tmpl, _ = _pattern_stack(template, "template")
        if tmpl.shape[1:] != cube.detector_shape or tmpl.shape[0] != 1:
            raise ShapeError(
                f"template has shape {np.shape(template)} but the detector is {cube.detector_shape}",
                "give a 2D template with the detector shape",
            )
        if options.get("template_origin") is None:  # measured once, not per block
            options["template_origin"] = tuple(float(v) for v in origin_com(tmpl[0]))
        options["template"] = tmpl[0]
    elif template is not None:
        raise ConfigurationError(f"method {method!r} takes no template", "drop template=, or use method='xcorr'")

    qx0 = np.empty(cube.scan_shape)
    qy0 = np.empty(cube.scan_shape)
    n_blocks = -(-cube.shape[0] // cube.rows_per_block(max_bytes))
    blocks = cube.iter_blocks(max_bytes)
    for sl, block in track(blocks, total=n_blocks, description=f"origin ({method})"):
        qx0[sl], qy0[sl] = kernel(block, **options)
    return qx0, qy0


# ---- smooth drift over the scan -----------------------------------------------------------
class OriginFit(NamedTuple):
    """Result of :func:`fit_origin_drift`; all arrays are ``(Rx, Ry)``."""

    qx0: np.ndarray
    """Fitted origin along qx (pixels), defined everywhere."""
    qy0: np.ndarray
    """Fitted origin along qy (pixels)."""
    qx0_residual: np.ndarray
    """Measured minus fitted qx0 (NaN where the measurement was NaN)."""
    qy0_residual: np.ndarray
    """Measured minus fitted qy0."""
    weights: np.ndarray
    """Final robust weight of each pattern in [0, 1]; 0 for outliers and excluded ones."""


def _poly_design(shape: tuple[int, int], order: int) -> np.ndarray:
    """Monomials ``x^i y^j`` (i + j <= order) of scan coordinates scaled to [-1, 1]."""
    x, y = (np.linspace(-1, 1, s) if s > 1 else np.zeros(1) for s in shape)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    cols = [xx**i * yy**j for i in range(order + 1) for j in range(order + 1 - i)]
    return np.stack([c.ravel() for c in cols], axis=1)


def fit_origin_drift(
    qx0: Any,
    qy0: Any,
    order: int = 1,
    mask: Any = None,
    robust: bool = True,
    *,
    max_iter: int = 50,
) -> OriginFit:
    """Fit the origin over the scan with a plane or a low-order 2D polynomial.

    Descan makes the origin drift smoothly with the probe position; individual
    measurements scatter around that by noise and, where a grain diffracts strongly, by
    wild outliers. The fit is an iteratively reweighted least squares: three Huber steps
    (k = 1.345) from the ordinary fit, then Tukey's bisquare (c = 4.685) until the
    coefficients settle, on residuals scaled by their MAD (×1.4826). Both coordinates share
    one weight per pattern (a bad pattern is bad in qx and qy), computed from the
    2D scaled residual.

    Parameters
    ----------
    qx0, qy0
        ``(Rx, Ry)`` measured origins in pixels; NaN entries are left out of the fit.
    order
        Polynomial order in the scan coordinates: 1 plane, 2 quadratic, 3 cubic (0 constant).
    mask
        Boolean ``(Rx, Ry)``, True for patterns to use (e.g. vacuum or thin regions).
    robust
        False gives the ordinary least-squares fit.
    max_iter
        Iteration cap of the reweighting.

    Returns
    -------
    OriginFit
        ``(qx0, qy0, qx0_residual, qy0_residual, weights)``.
    """
    mx, my = np.asarray(qx0, dtype=np.float64), np.asarray(qy0, dtype=np.float64)
    if mx.ndim != 2 or mx.shape != my.shape:
        raise ShapeError(
            f"qx0 and qy0 must be two (Rx, Ry) arrays of one shape, got {mx.shape} and {my.shape}",
            "pass the origin maps returned by find_origin",
        )
    if isinstance(order, bool) or int(order) != order or not 0 <= order <= 3:
        raise ConfigurationError(f"order must be 0, 1, 2 or 3, got {order!r}", "use 1 (plane) or 2")
    use = np.isfinite(mx) & np.isfinite(my)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != mx.shape:
            raise ShapeError(f"mask has shape {m.shape} but the scan is {mx.shape}", "give a (Rx, Ry) boolean mask")
        use &= m.astype(bool)
    design = _poly_design(mx.shape, int(order))
    n_terms = design.shape[1]
    if use.sum() <= n_terms:
        raise InvalidDataError(
            f"only {int(use.sum())} usable origin measurements for {n_terms} polynomial terms",
            "lower the order, widen the mask, or measure the origin on more patterns",
        )
    X = design[use.ravel()]
    Y = np.stack([mx[use], my[use]], axis=1)
    w = np.ones(len(X))
    beta = np.linalg.lstsq(X, Y, rcond=None)[0]
    if robust:
        for it in range(max_iter):
            r = Y - X @ beta
            scale = 1.4826 * np.median(np.abs(r), axis=0)
            # A floor far below any detector precision keeps exact data from dividing by 0.
            scale = np.maximum(scale, 1e-9)
            u = np.hypot(r[:, 0] / scale[0], r[:, 1] / scale[1])
            if it < 3:
                w = np.minimum(1.0, 1.345 / np.maximum(u, 1e-300))
            else:
                w = np.where(u < 4.685, (1 - (u / 4.685) ** 2) ** 2, 0.0)
            if (w > 0).sum() <= n_terms:
                raise InvalidDataError(
                    "the robust origin fit rejected nearly every pattern",
                    "fit with robust=False or a lower order, or check the origin maps",
                )
            sw = np.sqrt(w)[:, None]
            new = np.linalg.lstsq(X * sw, Y * sw, rcond=None)[0]
            done = it >= 3 and np.abs(new - beta).max() < 1e-10 * (1 + np.abs(beta).max())
            beta = new
            if done:
                break
    fit = (design @ beta).reshape(*mx.shape, 2)
    weights = np.zeros(mx.shape)
    weights[use] = w
    return OriginFit(fit[..., 0], fit[..., 1], mx - fit[..., 0], my - fit[..., 1], weights)
