"""Strain maps from fitted lattices, relative to a reference lattice.

Physics. A fitted reciprocal basis ``G`` (2×2, columns ``g1, g2``, no 2π: ``gᵢ·aⱼ = δᵢⱼ``)
belongs to the real-space basis ``A = G⁻ᵀ``. A deformation ``F`` maps real-space lattice
vectors ``a → F a``, so ``A = F A_ref`` and ``G = F⁻ᵀ G_ref``, giving

    F = G⁻ᵀ G_refᵀ.

``F`` is split by the polar decomposition ``F = R(θ) U`` into a rotation by ``θ`` and a
symmetric stretch ``U``; the strain is the Biot (finite) strain ``ε = U − I``, with
``e_xx = ε₀₀``, ``e_yy = ε₁₁``, ``e_xy = ε₀₁`` (tensor shear, half the engineering shear).
This is the exact inverse of the truth maps of :mod:`stemforge.simulate.strain`
(``F = R(θ)(I + ε)``), so strain and rotation are recovered without a small-strain
approximation; to first order it equals the infinitesimal strain ``sym(F) − I`` (they
differ by ~ε²/2, 5·10⁻⁵ at 1 %). Tensile is positive: a lattice stretched by 1 % in real
space has reciprocal vectors 1 % shorter and ``e = +0.01``. ``θ`` is the rotation of the
lattice relative to the reference, rad, counter-clockwise (from x toward y).

Frames. By default x, y are the detector axes -2, -1 (after the ellipse correction). With
``frame='scan'`` the tensors are expressed in scan coordinates using the calibration's
``qr_flip`` and ``qr_rotation`` (φ): a vector with detector components ``d`` has scan
components ``M d`` with ``M = R(φ) S``, ``S`` swapping x and y when ``qr_flip`` (the flip
is applied first), ``R(φ)`` the counter-clockwise rotation by φ. So with φ = 90° a strain
along detector x appears along scan y. Then ``F_scan = M F Mᵀ``, hence
``ε_scan = M ε Mᵀ`` and ``θ_scan = det(M)·θ`` (a flip reverses the sense of rotation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.lattice import LatticeFit, check_basis
from stemforge.simulate.strain import strain_from_deformation

FRAMES = ("detector", "scan")


@dataclass(frozen=True, eq=False)
class ReferenceLattice:
    """The unstrained reciprocal basis strain is measured against.

    Parameters
    ----------
    g1, g2
        ``(2,)`` basis vectors in the frame of the :class:`~stemforge.infer.lattice.LatticeFit`
        (centred, undistorted detector pixels), same ``(h, k)`` convention as the fit.
    source
        How it was obtained: ``'explicit'``, ``'median'`` (all valid positions) or
        ``'roi'`` (valid positions inside a region).
    """

    g1: np.ndarray
    g2: np.ndarray
    source: str = "explicit"

    def __post_init__(self) -> None:
        g1, g2 = check_basis(self.g1, self.g2)
        object.__setattr__(self, "g1", g1)
        object.__setattr__(self, "g2", g2)


def _roi_mask(roi: Any, scan_shape: tuple[int, int]) -> np.ndarray:
    """``(Rx, Ry)`` boolean mask of an ROI given as two slices or a boolean mask."""
    if isinstance(roi, tuple) and len(roi) == 2 and all(isinstance(s, slice) for s in roi):
        mask = np.zeros(scan_shape, dtype=bool)
        for axis, (s, n) in enumerate(zip(roi, scan_shape, strict=True)):
            for end in (s.start, s.stop):
                if end is not None and not (-n <= end <= n):
                    raise ShapeError(
                        f"ROI slice {s} along scan axis {axis} reaches outside the scan of shape {scan_shape}",
                        f"keep the ROI inside 0..{n} along axis {axis}",
                    )
            if not range(*s.indices(n)):
                raise ShapeError(
                    f"ROI slice {s} along scan axis {axis} is empty", "give a non-empty region"
                )
        mask[roi] = True
        return mask
    mask = np.asarray(roi)
    if mask.dtype != bool or mask.shape != scan_shape:
        raise ShapeError(
            f"ROI must be (slice rx, slice ry) or a boolean mask of the scan shape {scan_shape}, "
            f"got {type(roi).__name__} {getattr(mask, 'shape', '')}",
            "e.g. roi=(slice(0, 10), slice(0, 20))",
        )
    return mask


def reference_lattice(fit: LatticeFit, roi: Any = None) -> ReferenceLattice:
    """Reference basis: median of the fitted ``g1, g2`` over valid positions.

    Parameters
    ----------
    fit
        Per-position lattice fit.
    roi
        None for all valid positions, or the region to take the median over: a pair of
        slices ``(slice rx, slice ry)`` or a boolean ``(Rx, Ry)`` mask.

    Raises
    ------
    ShapeError
        ROI outside the scan, empty, or of the wrong shape.
    InvalidDataError
        No valid position (inside the ROI).
    """
    use = fit.mask.copy()
    if roi is not None:
        use &= _roi_mask(roi, fit.scan_shape)
    if not use.any():
        where = "inside the ROI" if roi is not None else "in the scan"
        raise InvalidDataError(
            f"no position {where} has a valid lattice fit to take the reference from",
            "choose an ROI over well-fitted positions (fit.mask), or give the reference g1, g2",
        )
    return ReferenceLattice(
        np.median(fit.g1[use], axis=0),
        np.median(fit.g2[use], axis=0),
        "median" if roi is None else "roi",
    )


def deformation_from_bases(g1: Any, g2: Any, g1_ref: Any, g2_ref: Any) -> np.ndarray:
    """Real-space deformation ``F = G⁻ᵀ G_refᵀ`` from reciprocal bases (columns ``g1, g2``).

    Parameters
    ----------
    g1, g2
        ``(..., 2)`` measured basis vectors (NaN propagates).
    g1_ref, g2_ref
        ``(2,)`` (or broadcastable) reference basis vectors.

    Returns
    -------
    numpy.ndarray
        ``(..., 2, 2)`` deformation gradients.
    """
    g1, g2 = np.asarray(g1, dtype=np.float64), np.asarray(g2, dtype=np.float64)
    r1, r2 = np.asarray(g1_ref, dtype=np.float64), np.asarray(g2_ref, dtype=np.float64)
    det = g1[..., 0] * g2[..., 1] - g1[..., 1] * g2[..., 0]
    # G⁻ᵀ written out for 2x2: columns are the real-space vectors a1, a2.
    inv_t = (
        np.stack(
            [np.stack([g2[..., 1], -g2[..., 0]], -1), np.stack([-g1[..., 1], g1[..., 0]], -1)], -1
        )
        / det[..., None, None]
    )
    ref_t = np.stack([r1, r2], axis=-2)  # G_refᵀ: rows g1_ref, g2_ref
    return inv_t @ ref_t


def scan_frame_matrix(qr_rotation: float, qr_flip: bool) -> np.ndarray:
    """``M = R(qr_rotation) S``: detector components → scan components of a vector."""
    if not math.isfinite(qr_rotation):
        raise ConfigurationError(
            f"qr_rotation is not finite: {qr_rotation!r}", "give the rotation in rad"
        )
    c, s = math.cos(qr_rotation), math.sin(qr_rotation)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ np.array([[0.0, 1.0], [1.0, 0.0]]) if qr_flip else rotation


@dataclass(frozen=True, eq=False)
class StrainMap:
    """Strain and rotation of every scan position relative to ``reference``.

    Attributes
    ----------
    e_xx, e_yy, e_xy
        ``(Rx, Ry)`` Biot strain components (``e_xy`` the tensor shear), tensile positive;
        NaN where ``mask`` is False.
    theta
        ``(Rx, Ry)`` lattice rotation relative to the reference, rad, counter-clockwise.
    mask
        ``(Rx, Ry)`` True where the lattice fit was valid.
    reference
        The reference lattice used.
    frame
        ``'detector'`` (x, y = detector axes -2, -1) or ``'scan'`` (x, y = scan axes Rx, Ry).
    """

    e_xx: np.ndarray
    e_yy: np.ndarray
    e_xy: np.ndarray
    theta: np.ndarray
    mask: np.ndarray
    reference: ReferenceLattice
    frame: str


def strain_map(
    fit: LatticeFit,
    reference: ReferenceLattice | Any = None,
    *,
    frame: str = "detector",
    calibration: Calibration | None = None,
) -> StrainMap:
    """Strain, relative to a reference lattice, at every scan position of a lattice fit.

    Parameters
    ----------
    fit
        From :func:`~stemforge.infer.lattice.fit_lattice`.
    reference
        A :class:`ReferenceLattice` (e.g. explicit ``g1, g2``); None for the median of all
        valid positions; or an ROI (``(slice rx, slice ry)`` or boolean mask) whose valid
        positions' median is the reference.
    frame
        ``'detector'`` (default): x, y along detector axes -2, -1. ``'scan'``: x, y along
        the scan axes, using ``calibration.qr_flip`` and ``calibration.qr_rotation`` (see the
        module notes for the exact convention).
    calibration
        Needed for ``frame='scan'``.

    Returns
    -------
    StrainMap
    """
    if frame not in FRAMES:
        raise ConfigurationError(f"unknown frame {frame!r}", f"use one of {FRAMES}")
    if frame == "scan" and calibration is None:
        raise ConfigurationError(
            "frame='scan' needs the calibration's QR rotation and flip",
            "pass calibration=... or use frame='detector'",
        )
    if not isinstance(reference, ReferenceLattice):
        reference = reference_lattice(fit, reference)
    f = deformation_from_bases(fit.g1, fit.g2, reference.g1, reference.g2)
    if frame == "scan":
        m = scan_frame_matrix(calibration.qr_rotation, calibration.qr_flip)
        f = m @ f @ m.T
    e_xx, e_yy, e_xy, theta = strain_from_deformation(f)
    return StrainMap(e_xx, e_yy, e_xy, theta, fit.mask.copy(), reference, frame)
