"""Figures and the HTML report of ``stemforge demo``: views of the numbers :mod:`demo` computes.

The strain figures put the truth and every method's map of one component side by side on one
colour scale, with the errors (map − truth) on a second, shared scale; a line profile shows
e_xx and e_yy across the layers. The report is one self-contained HTML file (every image is
embedded as a base64 PNG, so it can be mailed) holding the summary's tables and the figures.
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.infer.map_figures import symmetric_limit

#: Keys of a method's strain scores in the demo summary (also read by the report).
PEAKS = "peaks per pattern"
VALID = "valid lattice fits"
RMSE_STRAIN = "strain RMSE against truth (%)"
RMSE_THETA = "rotation RMSE against truth (mrad)"
LAYERS = "layers"
DETECTION_TIME = "disk detection (s)"

#: Strain components: (display name, unit, factor from the stored fraction or radian).
COMPONENTS: dict[str, tuple[str, str, float]] = {
    "e_xx": ("e_xx", "%", 100.0),
    "e_yy": ("e_yy", "%", 100.0),
    "e_xy": ("e_xy", "%", 100.0),
    "theta": ("θ", "mrad", 1000.0),
}
# Smallest colour limit per unit, so that maps that are zero up to rounding do not blow
# numerical noise up to full scale.
_FLOOR = {"%": 0.01, "mrad": 0.01}


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    plt = _pyplot()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_strain_comparison(
    path: str | Path,
    component: str,
    truth: np.ndarray,
    measured: Mapping[str, np.ndarray],
    *,
    step: float,
) -> Path:
    """One strain component: truth, each method, and each method − truth, side by side.

    Parameters
    ----------
    path
        Output PNG.
    component
        ``e_xx``, ``e_yy``, ``e_xy`` or ``theta`` (fractions; theta in rad).
    truth
        ``(Rx, Ry)`` true map.
    measured
        Method label → ``(Rx, Ry)`` measured map, NaN where the fit failed (drawn grey).
    step
        Scan step (Å), for the axes.

    The truth and the maps share one symmetric colour scale, the error maps a second one.
    Scan x (the growth direction) runs down the rows, as arrays print.
    """
    plt = _pyplot()
    name, unit, factor = COMPONENTS[component]
    truth = np.asarray(truth, dtype=np.float64) * factor
    maps = {label: np.asarray(m, dtype=np.float64) * factor for label, m in measured.items()}
    errors = {label: m - truth for label, m in maps.items()}
    limit = symmetric_limit([truth, *maps.values()], floor=_FLOOR[unit])
    error_limit = symmetric_limit(list(errors.values()), floor=_FLOOR[unit] / 10)
    rx, ry = truth.shape
    extent = (-0.5 * step, (ry - 0.5) * step, (rx - 0.5) * step, -0.5 * step)
    n = 1 + 2 * len(maps)
    panel = 1.9
    height = min(7.0, max(3.0, panel * rx / max(ry, 1) + 1.0))
    fig, axes = plt.subplots(
        1, n, figsize=(panel * n + 1.6, height), sharex=True, sharey=True, layout="constrained"
    )
    colours = plt.get_cmap("RdBu_r").with_extremes(bad="0.6")
    panels = [("truth", truth, limit), *((label, m, limit) for label, m in maps.items())]
    panels += [(f"{label} − truth", e, error_limit) for label, e in errors.items()]
    shown = []
    for ax, (title, image, lim) in zip(axes, panels, strict=True):
        shown.append(
            ax.imshow(
                np.ma.masked_invalid(image),
                cmap=colours,
                vmin=-lim,
                vmax=lim,
                extent=extent,
                interpolation="nearest",
            )
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("scan y (Å)")
    axes[0].set_ylabel("scan x (Å)")
    fig.colorbar(shown[0], ax=axes[: 1 + len(maps)], label=f"{name} ({unit})", shrink=0.9)
    fig.colorbar(shown[-1], ax=axes[1 + len(maps) :], label=f"error ({unit})", shrink=0.9)
    fig.suptitle(f"{name}: truth, measured, error")
    return _save(fig, Path(path))


def write_strain_profile(
    path: str | Path,
    truth: Mapping[str, np.ndarray],
    measured: Mapping[str, Mapping[str, np.ndarray]],
    *,
    step: float,
    components: Sequence[str] = ("e_xx", "e_yy"),
) -> Path:
    """Line profiles across the layers: each component averaged along scan y against scan x.

    Parameters
    ----------
    truth
        Component → ``(Rx, Ry)`` true map; ``material`` (int) marks the layer boundaries.
    measured
        Method label → component → ``(Rx, Ry)`` map (NaN where the fit failed). Error bars:
        the standard deviation along scan y.
    """
    plt = _pyplot()
    x = np.arange(np.shape(truth[components[0]])[0]) * step
    fig, axes = plt.subplots(
        1, len(components), figsize=(5.2 * len(components), 3.6), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    material = np.asarray(truth["material"])[:, 0] if "material" in truth else None
    markers = "os^dv"
    for ax, component in zip(axes, components, strict=True):
        name, unit, factor = COMPONENTS[component]
        ax.plot(x, np.mean(truth[component], axis=1) * factor, "k-", lw=1.5, label="truth")
        for i, (label, maps) in enumerate(measured.items()):
            values = np.asarray(maps[component], dtype=np.float64) * factor
            with warnings.catch_warnings():  # rows without a valid fit stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=1)
                spread = np.nanstd(values, axis=1)
            ax.errorbar(
                x + (i - (len(measured) - 1) / 2) * step * 0.15,
                mean,
                yerr=spread,
                fmt=markers[i % len(markers)],
                ms=4,
                capsize=2,
                label=label,
            )
        if material is not None:
            for edge in np.flatnonzero(np.diff(material)):
                ax.axvline((edge + 0.5) * step, color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("scan x, growth direction (Å)")
        ax.set_ylabel(f"{name} ({unit})")
        ax.set_title(f"{name} across the layers (mean along scan y)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, Path(path))


# ---- HTML ------------------------------------------------------------------------------------
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figure img.pixels { width: 240px; image-rendering: pixelated; }
figcaption { font-size: .85em; color: #555; max-width: 1200px; }
.note { color: #555; font-size: .9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{_e(value)}</td>"
    if isinstance(value, int | float):
        return f'<td class="num">{_e(value)}</td>'
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}: {_plain(v)}" for k, v in value.items())
        return f"<td>{_e(text)}</td>"
    if isinstance(value, list | tuple):
        return f"<td>{_e(', '.join(_plain(v) for v in value))}</td>"
    return f"<td>{_e(value)}</td>"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; every header and cell is escaped."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def key_value_table(values: Mapping[str, Any]) -> str:
    """Two-column table of ``values`` (nested mappings and lists shown inline)."""
    return table(("quantity", "value"), [(k, v) for k, v in values.items()])


def strain_error_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Method × component RMSE against the truth, with valid fits, peaks and detection time."""
    header = ["method", VALID, PEAKS]
    header += [f"RMSE {COMPONENTS[c][0]} (%)" for c in ("e_xx", "e_yy", "e_xy")]
    header += ["RMSE θ (mrad)", DETECTION_TIME]
    rows = [
        [
            label,
            scores.get(VALID),
            scores.get(PEAKS),
            *(scores[RMSE_STRAIN].get(c) for c in ("e_xx", "e_yy", "e_xy")),
            scores.get(RMSE_THETA),
            scores.get(DETECTION_TIME),
        ]
        for label, scores in methods.items()
    ]
    return table(header, rows)


def strain_layer_table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """Per material: the true mean e_xx, e_yy and each method's measured mean."""
    labels = list(methods)
    first = methods[labels[0]][LAYERS]
    header = ["material", "name", "positions", "true e_xx (%)"]
    header += [f"{label} e_xx (%)" for label in labels]
    header += ["true e_yy (%)"] + [f"{label} e_yy (%)" for label in labels]
    rows = []
    for key, layer in first.items():
        row = [key, layer.get("name", ""), layer.get("positions"), layer["true e_xx (%)"]]
        row += [methods[label][LAYERS][key]["measured e_xx (%)"] for label in labels]
        row += [layer.get("true e_yy (%)")]
        row += [methods[label][LAYERS][key].get("measured e_yy (%)") for label in labels]
        rows.append(row)
    return table(header, rows)


def _figure(path: Path, caption: str, pixels: bool = False) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cls = ' class="pixels"' if pixels else ""
    return (
        f'<figure><img{cls} alt="{_e(Path(path).name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)} <code>{_e(Path(path).name)}</code></figcaption></figure>"
    )


def figures_html(figures: Sequence[tuple[Path, str]], pixels: Sequence[Path] = ()) -> str:
    """Embedded PNGs with captions; those in ``pixels`` are scaled up without smoothing."""
    small = {Path(p) for p in pixels}
    return "".join(_figure(Path(p), caption, Path(p) in small) for p, caption in figures)


def write_html_report(
    path: str | Path,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
) -> Path:
    """Write a self-contained HTML page atomically.

    Parameters
    ----------
    title
        Page title (escaped).
    sections
        ``(heading, body HTML)``; headings are escaped, bodies must already be safe HTML
        (built with :func:`table`, :func:`figures_html`, ...).
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    for heading, body in sections:
        parts.append(f"<section><h2>{_e(heading)}</h2>{body}</section>")
    parts.append("</body></html>")
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path


def paragraph(text: str) -> str:
    """An escaped paragraph."""
    return f"<p>{_e(text)}</p>"


def note(text: str) -> str:
    """An escaped paragraph in the muted note style."""
    return f'<p class="note">{_e(text)}</p>'
