"""PNG figures of scan maps with colour bars: strain components on one shared scale.

Figures are views for people; the numbers live in the HDF5 files written next to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stemforge.core.atomic import atomic_output


def symmetric_limit(maps: list[np.ndarray], percentile: float = 99.0, floor: float = 1e-6) -> float:
    """One colour limit ``L`` for the scale ``[-L, L]`` shared by ``maps``.

    The ``percentile`` of ``|value|`` over the finite values of all maps, so a few outliers
    (edge positions, failed fits) do not wash the scale out; at least ``floor``.
    """
    values = (
        np.concatenate([np.abs(m[np.isfinite(m)]).ravel() for m in maps]) if maps else np.zeros(0)
    )
    if values.size == 0:
        return floor
    return max(float(np.percentile(values, percentile)), floor)


def write_map_png(
    path: str | Path,
    image: np.ndarray,
    *,
    title: str,
    label: str,
    vmin: float,
    vmax: float,
    cmap: str = "RdBu_r",
    overwrite: bool = True,
) -> Path:
    """One ``(Rx, Ry)`` map with a colour bar; masked (NaN) positions are grey.

    The map is drawn with scan x down the rows and scan y across, as arrays print.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rx, ry = image.shape
    width = 4.0
    height = max(2.0, min(8.0, width * rx / max(ry, 1)))
    fig, ax = plt.subplots(figsize=(width + 1.2, height))
    colours = plt.get_cmap(cmap).with_extremes(bad="0.6")
    shown = ax.imshow(
        np.ma.masked_invalid(image), cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set_title(title)
    ax.set_xlabel("scan y (px)")
    ax.set_ylabel("scan x (px)")
    fig.colorbar(shown, ax=ax, label=label)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_strain_pngs(
    stem: str | Path, maps: Mapping[str, np.ndarray], mask: np.ndarray, overwrite: bool = True
) -> list[Path]:
    """PNG maps of ``e_xx, e_yy, e_xy`` (in %, one shared symmetric scale) and ``theta`` (°).

    Parameters
    ----------
    stem
        Output path without suffix: files are ``STEM_e_xx.png`` etc.
    maps
        ``e_xx, e_yy, e_xy`` (fractions) and ``theta`` (rad), ``(Rx, Ry)`` each.
    mask
        ``(Rx, Ry)`` True where the fit is valid; other positions are drawn grey.
    """
    stem = Path(stem)
    mask = np.asarray(mask, dtype=bool)
    shown = {
        name: np.where(mask, np.asarray(maps[name], dtype=np.float64), np.nan) for name in maps
    }
    strains = [shown[name] * 100 for name in ("e_xx", "e_yy", "e_xy")]
    limit = symmetric_limit(strains)
    written = [
        write_map_png(
            stem.with_name(f"{stem.name}_{name}.png"),
            values,
            title=name,
            label="strain (%)",
            vmin=-limit,
            vmax=limit,
            overwrite=overwrite,
        )
        for name, values in zip(("e_xx", "e_yy", "e_xy"), strains, strict=True)
    ]
    theta = np.degrees(shown["theta"])
    limit = symmetric_limit([theta], floor=1e-4)
    written.append(
        write_map_png(
            stem.with_name(f"{stem.name}_theta.png"),
            theta,
            title="theta",
            label="rotation (°, counter-clockwise)",
            vmin=-limit,
            vmax=limit,
            overwrite=overwrite,
        )
    )
    return written
