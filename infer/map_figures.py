"""PNG figures of scan maps with colour bars: strain components on one shared scale.

Figures are views for people; the numbers live in the HDF5 files written next to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    return _save_png(fig, path, overwrite)


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


def _figure_size(rx: int, ry: int, extra: float) -> tuple[float, float]:
    width = 4.0
    return width + extra, max(2.0, min(8.0, width * rx / max(ry, 1)))


def write_ipf_png(
    path: str | Path,
    colors: np.ndarray,
    *,
    mask: np.ndarray,
    key: np.ndarray,
    title: str,
    key_labels: Sequence[tuple[str, tuple[float, float]]] = (),
    overwrite: bool = True,
) -> Path:
    """An inverse-pole-figure map ``(Rx, Ry, 3)`` with its colour key as an inset.

    Parameters
    ----------
    path
        Output PNG.
    colors
        RGB in ``[0, 1]`` per scan position (``orientation_export.ipf_colors``).
    mask
        ``(Rx, Ry)`` True where the orientation is valid; other positions (and NaN colours)
        are drawn grey.
    key
        RGBA image of the colour key (``orientation_export.ipf_key``).
    title
        Figure title, e.g. the phase and the lab direction ("IPF-Z").
    key_labels
        ``(text, (row, col))`` in key pixels (``orientation_export.ipf_key_labels``).

    The map is drawn with scan x down the rows and scan y across, as arrays print.
    """
    colors = np.asarray(colors, dtype=np.float64)
    valid = np.asarray(mask, dtype=bool) & np.all(np.isfinite(colors), axis=-1)
    shown = np.where(valid[..., None], np.clip(np.nan_to_num(colors), 0.0, 1.0), 0.6)
    fig, ax = _rgb_map(shown, title, 1.8)
    inset = ax.inset_axes((1.04, 0.55, 0.42, 0.42))
    inset.imshow(key, interpolation="bilinear")
    for text, (row, col) in key_labels:
        inset.annotate(
            text,
            (col, row),
            fontsize=7,
            ha="center",
            va="center",
            xytext=(0, -7 if row > key.shape[0] / 2 else 7),
            textcoords="offset points",
        )
    inset.set_axis_off()
    return _save_png(fig, path, overwrite)


def write_phase_png(
    path: str | Path,
    phase: np.ndarray,
    names: Sequence[str],
    *,
    title: str,
    score: np.ndarray | None = None,
    overwrite: bool = True,
) -> Path:
    """A categorical phase map ``(Rx, Ry)`` with a legend of the phase names.

    Parameters
    ----------
    path
        Output PNG.
    phase
        ``(Rx, Ry)`` int index into ``names``; ``-1`` (no phase: amorphous or not indexed) is
        drawn grey.
    names
        Phase names, one per index.
    title
        Figure title.
    score
        Optional ``(Rx, Ry)`` match score: brightness runs from 35 % (lowest finite score)
        to 100 % (highest), so weak matches look dark.

    The map is drawn with scan x down the rows and scan y across, as arrays print.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    phase = np.asarray(phase)
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = np.array([palette(i % palette.N)[:3] for i in range(len(names))]).reshape(-1, 3)
    none = np.array([0.6, 0.6, 0.6])
    known = (phase >= 0) & (phase < len(names))
    lookup = np.vstack([colours, none])  # the last row stands for "no phase"
    image = lookup[np.where(known, phase, len(names))]
    if score is not None:
        score = np.asarray(score, dtype=np.float64)
        finite = known & np.isfinite(score)
        if np.any(finite):
            lo, hi = score[finite].min(), score[finite].max()
            level = np.where(finite, (score - lo) / (hi - lo) if hi > lo else 1.0, 1.0)
            image = image * (0.35 + 0.65 * level[..., None])
    fig, ax = _rgb_map(image, title, 2.2)
    handles = [
        Patch(color=colours[i], label=f"{name} ({np.count_nonzero(phase == i)})")
        for i, name in enumerate(names)
    ]
    handles.append(Patch(color=none, label=f"none/amorphous ({np.count_nonzero(~known)})"))
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
    )
    return _save_png(fig, path, overwrite)


def _rgb_map(image: np.ndarray, title: str, extra_width: float):  # noqa: ANN202 - (fig, ax)
    """A figure showing an ``(Rx, Ry, 3)`` RGB map, scan x down the rows, with room at the
    right (inches) for a legend or key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_figure_size(*image.shape[:2], extra_width))
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("scan y (px)")
    ax.set_ylabel("scan x (px)")
    return fig, ax


def _save_png(fig, path: str | Path, overwrite: bool) -> Path:  # noqa: ANN001 - a Figure
    """Write ``fig`` as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
