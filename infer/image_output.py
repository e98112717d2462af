"""Writing 2D result images: ``.npy`` (exact values), ``.tif`` (float32) or ``.png`` (a view)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import ConfigurationError

IMAGE_SUFFIXES = (".npy", ".png", ".tif", ".tiff")


def check_image_path(path: str | Path) -> Path:
    """Validate an output image name before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigurationError(
            f"cannot write an image to {path.name!r}: unknown extension {path.suffix!r}",
            f"use one of {', '.join(IMAGE_SUFFIXES)}",
        )
    return path


def display_range(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """Percentile limits for display; a flat image gets a unit range."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(finite, [low, high])
    return (float(vmin), float(vmax)) if vmax > vmin else (float(vmin), float(vmin) + 1.0)


def write_image(path: str | Path, image: np.ndarray, *, log: bool = False, overwrite: bool = True) -> Path:
    """Write a 2D array atomically.

    Parameters
    ----------
    path
        Output file; the extension picks the format. ``.png`` is a grey-scale view with
        0.1–99.9 percentile contrast (log scale with ``log``); ``.npy`` and ``.tif`` keep
        the values (float32 for TIFF).
    image
        The 2D array, indexed (x, y): x runs down the rows of the picture.
    log
        Show log(1 + I) in the PNG view, for diffraction patterns.
    overwrite
        Replace an existing file.
    """
    path = check_image_path(path)
    image = np.asarray(image)
    suffix = path.suffix.lower()
    with atomic_output(path, overwrite=overwrite) as tmp:
        if suffix == ".npy":
            np.save(tmp, image)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, image.astype(np.float32))
        else:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            view = np.log1p(np.clip(image, 0, None)) if log else image
            vmin, vmax = display_range(view)
            plt.imsave(tmp, view, cmap="gray", vmin=vmin, vmax=vmax)
    return path
