"""Calibrating a datacube: origin per pattern and its drift, ellipse, Q pixel size.

Orchestration only: the measurements are the kernels of :mod:`stemforge.infer.origin`
and :mod:`stemforge.infer.ellipse`; this module chains them over a datacube and
produces a :class:`Calibration` plus the intermediate results worth reporting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import CalibrationError, ConfigurationError
from stemforge.infer.ellipse import EllipseFit, fit_ellipse_ring, q_pixel_size_from_ellipse
from stemforge.infer.origin import OriginFit, find_origin, fit_origin_drift
from stemforge.infer.virtual import virtual_diffraction

#: Names of the drift models on the command line → polynomial order.
DRIFT_ORDERS = {"none": None, "constant": 0, "plane": 1, "poly2": 2, "poly3": 3}


@dataclass
class CalibrationResult:
    """A new calibration and what it was measured from."""

    calibration: Calibration
    measured_qx0: np.ndarray
    measured_qy0: np.ndarray
    drift: OriginFit | None
    mean_pattern: np.ndarray
    ellipse: EllipseFit | None


def measure_origin(
    cube: DataCube,
    *,
    method: str = "com",
    template: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    drift: str = "plane",
) -> tuple[np.ndarray, np.ndarray, OriginFit | None]:
    """Measured origin of every pattern and, unless ``drift='none'``, its robust fit.

    See :func:`calibrate_datacube` for the parameters. Returns ``(qx0, qy0, fit)`` with the
    measured ``(Rx, Ry)`` arrays (NaN on blank patterns) and the :class:`OriginFit`.
    """
    if drift not in DRIFT_ORDERS:
        raise ConfigurationError(f"unknown drift model {drift!r}", f"use one of {list(DRIFT_ORDERS)}")
    options = {"mask": mask} if method == "friedel" and mask is not None else {}
    qx0, qy0 = find_origin(cube, method, template, **options)
    if not np.isfinite(qx0).any():
        raise CalibrationError(
            f"{cube.name}: the origin could not be measured on any pattern (they look blank)",
            "check the data (stemforge virtual FILE --pattern max); detectors without --centered sit at a fixed origin",
        )
    order = DRIFT_ORDERS[drift]
    if order is not None:
        return qx0, qy0, fit_origin_drift(qx0, qy0, order=order)
    if not (np.isfinite(qx0).all() and np.isfinite(qy0).all()):
        raise CalibrationError(
            f"the origin could not be measured on {int(np.sum(~np.isfinite(qx0)))} blank pattern(s)",
            "fit the drift (--fit plane) so that those patterns get the fitted origin",
        )
    return qx0, qy0, None


def calibrate_datacube(
    cube: DataCube,
    *,
    method: str = "com",
    template: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    drift: str = "plane",
    ring: tuple[float, float] | None = None,
    known_spacing: float | None = None,
) -> CalibrationResult:
    """Measure the origin of every pattern, fit its drift, and optionally the ellipse and Q.

    Parameters
    ----------
    cube
        The datacube; its current calibration supplies every field not measured here.
    method
        Origin method: 'com', 'xcorr' (needs ``template``) or 'friedel' (with ``mask``
        excluding a beam stop).
    template
        Vacuum probe image for 'xcorr'.
    mask
        Boolean ``(Qx, Qy)``, True on usable detector pixels (for 'friedel').
    drift
        'plane', 'poly2', 'poly3', 'constant' (robust fits over the scan) or 'none' (keep
        the measured origins; blank patterns then cannot be calibrated).
    ring
        ``(r_inner, r_outer)`` in pixels of a ring in the mean pattern (amorphous halo or
        polycrystalline ring) to fit the elliptical distortion on.
    known_spacing
        d-spacing in Å of that ring, which sets the Q pixel size.
    """
    if known_spacing is not None and ring is None:
        raise ConfigurationError(
            "--known-spacing needs the ring it belongs to", "give --ring R0,R1 (pixels) around that ring"
        )
    measured_qx0, measured_qy0, fit = measure_origin(cube, method=method, template=template, mask=mask, drift=drift)
    qx0, qy0 = (measured_qx0, measured_qy0) if fit is None else (fit.qx0, fit.qy0)
    calibration = cube.calibration.replace(qx0=qx0, qy0=qy0)

    mean_pattern = virtual_diffraction(cube, "mean")
    ellipse = None
    if ring is not None:
        ellipse = fit_ellipse_ring(
            mean_pattern, (float(np.mean(qx0)), float(np.mean(qy0))), r_inner=ring[0], r_outer=ring[1]
        )
        calibration = calibration.replace(ellipse=(ellipse.a, ellipse.b, ellipse.theta))
        if known_spacing is not None:
            q_pixel = q_pixel_size_from_ellipse(ellipse, known_spacing)
            calibration = calibration.replace(q_pixel_size=q_pixel, q_units="A^-1")
    return CalibrationResult(calibration, measured_qx0, measured_qy0, fit, mean_pattern, ellipse)


def write_calibration_report(result: CalibrationResult, out_dir: str | Path) -> list[Path]:
    """Origin maps (measured, fitted, residual) and the mean pattern, as PNG figures.

    Returns the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stemforge.core.atomic import atomic_output
    from stemforge.infer.image_output import display_range

    out_dir = Path(out_dir)
    cal = result.calibration
    qx0, qy0 = cal.origin_array(result.measured_qx0.shape)
    panels = [("measured qx0", result.measured_qx0), ("measured qy0", result.measured_qy0)]
    panels += [("fitted qx0", qx0), ("fitted qy0", qy0)]
    if result.drift is not None:
        panels += [("residual qx0", result.drift.qx0_residual), ("residual qy0", result.drift.qy0_residual)]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(8, 3.2 * len(panels) // 2), squeeze=False)
    for ax, (title, image) in zip(axes.flat, panels, strict=True):
        shown = ax.imshow(image, cmap="RdBu_r" if title.startswith("residual") else "viridis")
        ax.set(title=f"{title} (px)", xlabel="ry", ylabel="rx")
        fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    origin_png = out_dir / "origin.png"
    with atomic_output(origin_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    view = np.log1p(np.clip(result.mean_pattern, 0, None))
    vmin, vmax = display_range(view)
    ax.imshow(view, cmap="gray", vmin=vmin, vmax=vmax)
    mx, my = cal.mean_origin()
    ax.plot(my, mx, "r+", markersize=12)
    if result.ellipse is not None:
        e = result.ellipse
        t = np.linspace(0, 2 * np.pi, 361)
        x = e.qx0 + e.a * np.cos(t) * np.cos(e.theta) - e.b * np.sin(t) * np.sin(e.theta)
        y = e.qy0 + e.a * np.cos(t) * np.sin(e.theta) + e.b * np.sin(t) * np.cos(e.theta)
        ax.plot(y, x, "c-", linewidth=0.8)
    ax.set(title="mean pattern (log), origin +", xlabel="qy (px)", ylabel="qx (px)")
    mean_png = out_dir / "mean_pattern_calibration.png"
    with atomic_output(mean_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return [origin_png, mean_png]
