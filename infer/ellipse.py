"""Elliptical distortion of the detector, measured on a ring, and the Q pixel size.

Projector lens aberrations map the circles of constant scattering angle onto ellipses.
:func:`fit_ellipse_ring` measures that ellipse on a ring: the amorphous ring of a mean
diffraction pattern, or a ring of Bragg peaks in a Bragg vector map.
:func:`ellipse_correction` maps raw detector coordinates to circularised ones, and
:func:`q_pixel_size_from_spacing` / :func:`q_pixel_size_from_ellipse` turn a ring of known
d-spacing into the detector pixel size in Å⁻¹ (q = 1/d, no 2π, as in ``stemforge.core.units``).

Conventions: ``(qx, qy)`` in detector pixels along array axes -2 and -1; an ellipse is
``(qx0, qy0, a, b, theta)`` with semi-axes ``a >= b`` in pixels and ``theta`` the angle of
the ``a`` axis from the qx axis toward qy, in rad, wrapped to (-π/2, π/2]. Only ``a/b`` and
``theta`` describe the distortion; this matches ``Calibration.ellipse = (a, b, theta)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from stemforge.core.errors import CalibrationError, ConfigurationError, InvalidDataError, ShapeError

# Radial sampling step of the polar transform, in pixels: fine enough that the centroid
# window edges (weighted by sample fraction) move smoothly.
_DR = 0.25
# Angles whose ring signal is below this fraction of the strongest are dropped (gaps
# between Bragg peaks, noise).
_MIN_SIGNAL = 0.05


class EllipseFit(NamedTuple):
    """An ellipse in detector pixels (unpacks as ``qx0, qy0, a, b, theta``)."""

    qx0: float
    """Centre along qx (axis -2), pixels."""
    qy0: float
    """Centre along qy (axis -1), pixels."""
    a: float
    """Semi-major axis, pixels."""
    b: float
    """Semi-minor axis, pixels."""
    theta: float
    """Angle of the ``a`` axis from the qx axis toward qy, rad, in (-π/2, π/2]."""


def _wrap_half_turn(theta: float) -> float:
    """Angle modulo π into (-π/2, π/2]."""
    return -((-theta + math.pi / 2) % math.pi - math.pi / 2)


def _conic_ellipse(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float, float]:
    """Weighted linear least-squares conic through points near a closed curve around (0, 0).

    Fits ``A x² + B xy + C y² + D x + E y = 1`` (the curve encloses the origin, so the
    constant term is nonzero and can be fixed) and returns ``(x0, y0, a, b, theta)``.
    """
    design = np.stack([x * x, x * y, y * y, x, y], axis=1)
    sw = np.sqrt(w)
    coef = np.linalg.lstsq(design * sw[:, None], sw, rcond=None)[0]
    A, B, C, D, E = coef
    M = np.array([[A, B / 2], [B / 2, C]])
    g = np.array([D, E])
    if np.linalg.det(M) <= 0:
        raise InvalidDataError(
            "the ring positions do not lie on an ellipse",
            "check that r_inner..r_outer brackets one ring all around the centre",
        )
    x0, y0 = np.linalg.solve(M, -g / 2)
    level = 1 + (D * x0 + E * y0) / 2  # value of the quadratic form on the curve, from the centre
    lam, vec = np.linalg.eigh(M)
    if level <= 0 or lam[0] <= 0:
        raise InvalidDataError(
            "the ring positions do not enclose the centre estimate",
            "give center= closer to the ring centre, or tighten r_inner..r_outer",
        )
    a, b = math.sqrt(level / lam[0]), math.sqrt(level / lam[1])
    theta = _wrap_half_turn(math.atan2(vec[1, 0], vec[0, 0]))
    return float(x0), float(y0), a, b, theta


def _ring_radii(
    profiles: np.ndarray, rho: np.ndarray, half_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ring radius and signal of each radial profile ``(n_angles, n_rho)``.

    A straight background through the mean of the first and last eighth of each profile is
    subtracted; the radius is then the centroid inside a window of ``±half_width`` that is
    moved onto its own centroid until it settles (so a symmetric peak is measured without
    bias wherever it sits in the annulus). The signal is the background-subtracted sum in
    the window (<= 0 where no ring was found).
    """
    k = max(2, len(rho) // 8)
    lo, hi = profiles[:, :k].mean(axis=1), profiles[:, -k:].mean(axis=1)
    r_lo, r_hi = rho[:k].mean(), rho[-k:].mean()
    p = profiles - (lo[:, None] + (hi - lo)[:, None] * (rho - r_lo) / (r_hi - r_lo))
    start = np.argmax(ndimage.gaussian_filter1d(p, 2.0, axis=1), axis=1)
    rc = rho[start]
    for _ in range(20):
        # Window edges weighted by the fraction of each sample inside: smooth in rc.
        win = np.clip((half_width - np.abs(rho - rc[:, None])) / _DR + 0.5, 0.0, 1.0)
        signal = (win * p).sum(axis=1)
        safe = np.where(signal > 0, signal, 1.0)
        new = np.clip(np.where(signal > 0, (win * p * rho).sum(axis=1) / safe, rc), rho[0], rho[-1])
        moved = np.abs(new - rc).max()
        rc = new
        if moved < 1e-4:
            break
    return rc, signal


def fit_ellipse_ring(
    image: Any,
    center: tuple[float, float] | None = None,
    *,
    r_inner: float,
    r_outer: float,
    mask: Any = None,
    n_angles: int | None = None,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> EllipseFit:
    """Fit an ellipse to a ring: an amorphous ring or a ring of Bragg peaks.

    Each iteration samples the image (bilinear) on rays from the current centre, in the
    frame of the current ellipse estimate (a circle at first): at ``n_angles`` angles, radii
    ``r_inner..r_outer`` every 0.25 px. On each ray the ring radius is the centroid of the
    background-subtracted profile in a window following the peak (``±(r_outer - r_inner)/4``);
    these points are fitted with a general conic by weighted linear least squares (weights:
    the ring signal on the ray; angles without signal are dropped, and outlying radii beyond
    5 MAD rejected) and converted to centre, axes and angle. Because the rays follow the
    current ellipse, at convergence the ring sits at the same place on every ray and any
    profile-dependent bias of the radius (background slope, window clipping) is common to all
    angles: it scales ``a`` and ``b`` together and leaves ``a/b``, ``theta`` and the centre
    unbiased.

    Parameters
    ----------
    image
        2D image ``(Qx, Qy)``: a mean diffraction pattern or a Bragg vector map.
    center
        ``(qx0, qy0)`` starting centre in pixels; default the centroid of the image above its
        median. It must lie inside the ring, roughly (within ``(r_outer - r_inner)/4``).
    r_inner, r_outer
        Annulus bracketing the ring, in pixels from the centre (in the circularised frame once
        the ellipse is known); keep some background on both sides of the ring.
    mask
        Boolean ``(Qx, Qy)``, True for pixels to use; rays touching excluded pixels (beam stop,
        dead pixels) are dropped, as are rays leaving the image.
    n_angles
        Number of rays; default about one per pixel of circumference at ``r_outer``.
    max_iter, tol
        Stop when centre and semi-axes move less than ``tol`` pixels.

    Returns
    -------
    EllipseFit
        ``(qx0, qy0, a, b, theta)``: ``a >= b`` are the ring's semi-axes in pixels.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ShapeError(
            f"fit_ellipse_ring needs a 2D image (Qx, Qy), got shape {img.shape}",
            "pass a mean diffraction pattern (e.g. cube.data.mean(axis=(0, 1))) or a Bragg vector map",
        )
    if img.dtype.kind not in "biuf":
        raise InvalidDataError(f"image has dtype {img.dtype}", "pass real intensities")
    img = img.astype(np.float64, copy=False)
    if not np.isfinite(img).all():
        raise InvalidDataError("image contains NaN or inf", "replace them (numpy.nan_to_num) or exclude them with mask=")
    for name, value in (("r_inner", r_inner), ("r_outer", r_outer)):
        if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{name} must be a positive number of pixels, got {value!r}", "read the ring radius off a radial profile")
    if r_outer - r_inner < 1:
        raise ConfigurationError(
            f"the annulus r_inner={r_inner} .. r_outer={r_outer} is empty or thinner than 1 px",
            "choose r_inner < r_outer bracketing the ring with some background on both sides",
        )
    if max_iter < 1:
        raise ConfigurationError(f"max_iter must be >= 1, got {max_iter}", "use e.g. 30")
    valid_img = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            raise ShapeError(f"mask has shape {m.shape} but the image is {img.shape}", "give a boolean mask of the image shape")
        valid_img = m.astype(np.float64)
    if center is None:
        w = np.clip(img - np.median(img), 0, None) * (1.0 if valid_img is None else valid_img)
        total = w.sum()
        if total > 0:
            cx, cy = (w.sum(axis=1) @ np.arange(img.shape[0])) / total, (w.sum(axis=0) @ np.arange(img.shape[1])) / total
        else:
            cx, cy = (img.shape[0] - 1) / 2, (img.shape[1] - 1) / 2
    else:
        c = np.asarray(center, dtype=np.float64)
        if c.shape != (2,) or not np.isfinite(c).all():
            raise ConfigurationError(f"center must be two finite numbers, got {center!r}", "give (qx0, qy0) in pixels")
        cx, cy = float(c[0]), float(c[1])
    if n_angles is None:
        n_angles = max(64, math.ceil(2 * math.pi * r_outer))
    if n_angles < 8:
        raise ConfigurationError(f"n_angles must be >= 8, got {n_angles}", "use the default")

    t = 2 * np.pi * np.arange(n_angles) / n_angles
    rho = np.arange(r_inner, r_outer + _DR / 2, _DR)
    half_width = (r_outer - r_inner) / 4
    ratio, theta = 1.0, 0.0
    a = b = 0.0
    for _ in range(max_iter):
        # Rays in the frame of the current ellipse, scaled to keep its area (sa * sb = 1).
        sa, sb = math.sqrt(ratio), 1 / math.sqrt(ratio)
        u = np.outer(sa * np.cos(t), rho)
        v = np.outer(sb * np.sin(t), rho)
        ct, st = math.cos(theta), math.sin(theta)
        coords = np.stack([cx + u * ct - v * st, cy + u * st + v * ct])
        profiles = ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=np.nan)
        usable = np.isfinite(profiles).all(axis=1)
        if valid_img is not None:
            inside = ndimage.map_coordinates(valid_img, coords, order=1, mode="constant", cval=0.0)
            usable &= (inside > 0.999).all(axis=1)
        rc, signal = _ring_radii(np.where(usable[:, None], profiles, 0.0), rho, half_width)
        keep = usable & (signal > 0)
        if keep.any():
            keep &= signal >= _MIN_SIGNAL * signal[keep].max()
        if keep.sum() >= 8:
            med = np.median(rc[keep])
            mad = 1.4826 * np.median(np.abs(rc[keep] - med))
            keep &= np.abs(rc - med) <= max(5 * mad, _DR)
        if keep.sum() < 8:
            raise InvalidDataError(
                f"no ring found in the annulus {r_inner}..{r_outer} px around ({cx:.2f}, {cy:.2f}): "
                f"{int(keep.sum())} of {n_angles} rays hold a usable ring signal",
                "bracket the ring with r_inner/r_outer read off a radial profile, and check center/mask",
            )
        scale = float(np.median(rc[keep]))
        x = (rc[keep] * sa * np.cos(t[keep]) * ct - rc[keep] * sb * np.sin(t[keep]) * st) / scale
        y = (rc[keep] * sa * np.cos(t[keep]) * st + rc[keep] * sb * np.sin(t[keep]) * ct) / scale
        x0, y0, a_new, b_new, theta = _conic_ellipse(x, y, signal[keep])
        cx_new, cy_new = cx + scale * x0, cy + scale * y0
        a_new, b_new = scale * a_new, scale * b_new
        moved = max(abs(cx_new - cx), abs(cy_new - cy), abs(a_new - a), abs(b_new - b))
        cx, cy, a, b, ratio = cx_new, cy_new, a_new, b_new, a_new / b_new
        if moved < tol:
            break
    return EllipseFit(float(cx), float(cy), float(a), float(b), float(theta))


def _check_axes(a: float, b: float) -> None:
    for name, value in (("a", a), ("b", b)):
        if not (math.isfinite(value) and value > 0):
            raise CalibrationError(f"ellipse semi-axis {name} must be positive, got {value!r}", "fit the ellipse again")


def ellipse_correction(
    qx: Any, qy: Any, center: tuple[Any, Any], a: float, b: float, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Map raw detector coordinates to undistorted (circularised) ones.

    The component along the ``b`` axis (relative to ``center``) is stretched by ``a/b``; the
    ``a`` axis is left alone. The ellipse ``(center, a, b, theta)`` thus becomes the circle
    of radius ``a`` about ``center``, and lengths along the ``a`` axis keep their pixel
    values (so a Q pixel size from :func:`q_pixel_size_from_ellipse` applies to the corrected
    coordinates). Only ``a/b`` matters, as for ``Calibration.ellipse``.

    Parameters
    ----------
    qx, qy
        Raw coordinates in pixels (arrays of any broadcastable shapes).
    center
        ``(qx0, qy0)`` the distortion is centred on, usually the origin (scalars, or arrays
        broadcastable with ``qx``, e.g. per peak).
    a, b, theta
        The distortion, as returned by :func:`fit_ellipse_ring` or stored in
        ``Calibration.ellipse``.

    Returns
    -------
    qx, qy : numpy.ndarray
        Corrected coordinates in pixels, in the same frame (the centre does not move).
    """
    _check_axes(a, b)
    if not math.isfinite(theta):
        raise CalibrationError(f"ellipse angle must be finite, got {theta!r}", "fit the ellipse again")
    qx = np.asarray(qx, dtype=np.float64)
    qy = np.asarray(qy, dtype=np.float64)
    dx = qx - np.asarray(center[0], dtype=np.float64)
    dy = qy - np.asarray(center[1], dtype=np.float64)
    # Stretch of the component along the b axis, direction (-sin θ, cos θ).
    along_b = (a / b - 1) * (-dx * math.sin(theta) + dy * math.cos(theta))
    return qx - along_b * math.sin(theta), qy + along_b * math.cos(theta)


def q_pixel_size_from_spacing(radius_px: float, d_spacing_angstrom: float) -> float:
    """Detector pixel size in Å⁻¹ from a ring or spot of known lattice spacing.

    A reflection of spacing ``d`` sits at ``|q| = 1/d`` (no 2π), so a ring of radius
    ``radius_px`` pixels gives ``1 / (d · radius_px)`` Å⁻¹ per pixel.

    Parameters
    ----------
    radius_px
        Distance from the origin in (undistorted) pixels.
    d_spacing_angstrom
        Known lattice spacing in Å, e.g. 3.1355 for Si {111}.
    """
    for name, value in (("radius_px", radius_px), ("d_spacing_angstrom", d_spacing_angstrom)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not (
            math.isfinite(value) and value > 0
        ):
            raise CalibrationError(
                f"{name} must be a positive finite number, got {value!r}",
                "give the ring radius in pixels and the d-spacing in Å",
            )
    return 1.0 / (float(d_spacing_angstrom) * float(radius_px))


def q_pixel_size_from_ellipse(fit: EllipseFit | tuple[float, ...], d_spacing_angstrom: float) -> float:
    """Detector pixel size in Å⁻¹ from a fitted ring of known d-spacing.

    Uses the semi-major axis ``a``, the ring radius after :func:`ellipse_correction`, so the
    result applies to corrected coordinates.

    Parameters
    ----------
    fit
        ``(qx0, qy0, a, b, theta)`` from :func:`fit_ellipse_ring` (in detector pixels: divide
        ``a`` by the sampling first if the ring was fitted on an upsampled Bragg vector map).
    d_spacing_angstrom
        Known spacing of the ring, Å.
    """
    if len(fit) != 5:
        raise CalibrationError(f"expected an ellipse (qx0, qy0, a, b, theta), got {fit!r}", "pass the result of fit_ellipse_ring")
    _check_axes(float(fit[2]), float(fit[3]))
    return q_pixel_size_from_spacing(float(fit[2]), d_spacing_angstrom)
