"""Blind crystal identification of a scan: per-pattern predictions, an aggregate, a map.

The peak table of a datacube (from either disk detector, or read from a file) is put in
Å⁻¹ about each pattern's direct beam, which is then left out, and handed to a trained
:class:`~stemforge.models.crystal_id.CrystalIdentifier`; patterns of a region of interest
(default: all with enough spots) are aggregated into one answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.infer.lattice import DIRECT_BEAM_RADIUS, spot_lists
from stemforge.models.crystal_id import Aggregate, CrystalIdentifier, PatternPredictions, aggregate
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS

#: Default zoo model.
DEFAULT_MODEL = "crystal_id"
#: Patterns with fewer diffracted spots than this are not identified.
MIN_SPOTS = 3


def load_identifier(spec: str | None = None) -> CrystalIdentifier:
    """A crystal identifier from a ``.skops`` file or the zoo (``NAME[@VERSION]``)."""
    spec = spec or DEFAULT_MODEL
    if spec.endswith(".skops") or Path(spec).is_file():
        return CrystalIdentifier.load(spec)
    from stemforge.models.zoo import pull

    return CrystalIdentifier.load(pull(spec))


def detected_peak_lists(folder: str | Path, params: Any = None) -> Any:
    """Spot lists of a factory dataset as the correlation detector finds them in its patterns.

    Each pattern is searched with its own vacuum probe
    (:func:`~stemforge.infer.disks.detect_patterns` with ``params``); the direct beam is left
    out within :data:`DIRECT_BEAM_RADIUS` px of the exact 000 position, as
    :func:`spot_lists` does for a scan. Returns
    :class:`~stemforge.datasets.peak_lists.PeakLists` with the dataset's labels.
    """
    from stemforge.datasets.peak_lists import shard_peak_lists
    from stemforge.infer.disks import detect_patterns
    from stemforge.infer.templates import make_kernel

    def detected(reader: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
        kernel = make_kernel(reader.image("probe", index))
        found = detect_patterns(reader.image("cbed", index)[None], kernel, params, backend="numpy")[
            0
        ]
        return found[:, :2], found[:, 2]

    return shard_peak_lists(folder, detected, "correlation", DIRECT_BEAM_RADIUS)


@dataclass(frozen=True)
class Identification:
    """Result of :func:`identify_scan`.

    Attributes
    ----------
    predictions
        Per scan position (row-major), also where too few spots were found.
    scan_shape
        ``(Rx, Ry)``.
    valid
        ``(Rx, Ry)`` positions with at least :data:`MIN_SPOTS` spots.
    aggregate
        Over the valid positions of the region of interest.
    roi
        ``(Rx, Ry)`` the positions aggregated.
    """

    predictions: PatternPredictions
    scan_shape: tuple[int, int]
    valid: np.ndarray
    aggregate: Aggregate
    roi: np.ndarray

    def system_map(self) -> np.ndarray:
        """``(Rx, Ry)`` crystal-system index per position, −1 where not identified."""
        out = self.predictions.crystal_system.reshape(self.scan_shape).copy()
        out[~self.valid] = -1
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: ``aggregate`` and ``patterns`` (valid positions only)."""
        p = self.predictions
        systems, groups, top = p.crystal_system, p.space_group, p.top_groups(3)
        lattice = p.best_lattice()
        patterns = []
        for flat in np.flatnonzero(self.valid.ravel()):
            rx, ry = np.unravel_index(flat, self.scan_shape)
            patterns.append(
                {
                    "rx": int(rx),
                    "ry": int(ry),
                    "crystal_system": CRYSTAL_SYSTEMS[systems[flat]],
                    "space_group": int(groups[flat]),
                    "space_group_top3": [int(g) for g in top[flat]],
                    "probabilities": {
                        name: round(float(v), 6)
                        for name, v in zip(CRYSTAL_SYSTEMS, p.system_probability[flat], strict=True)
                    },
                    "lattice": dict(
                        zip(
                            ("a", "b", "c", "alpha", "beta", "gamma"),
                            map(float, lattice[flat]),
                            strict=True,
                        )
                    ),
                }
            )
        return {"aggregate": self.aggregate.to_dict(), "patterns": patterns}


def identify_scan(
    peaks: BraggPeaks,
    calibration: Calibration,
    model: CrystalIdentifier,
    roi: tuple[slice, slice] | None = None,
    min_spots: int = MIN_SPOTS,
) -> Identification:
    """Identify every pattern of a peak table and aggregate the region of interest.

    Raises
    ------
    InvalidDataError
        No pattern of the region has ``min_spots`` diffracted spots.
    """
    q, intensity, offsets = spot_lists(peaks, calibration)
    predictions = model.predict_peaks(q, intensity, offsets)
    scan_shape = tuple(int(v) for v in peaks.scan_shape)
    valid = (np.diff(offsets) >= min_spots).reshape(scan_shape)
    region = np.zeros(scan_shape, bool)
    region[roi if roi is not None else (slice(None), slice(None))] = True
    chosen = np.flatnonzero((valid & region).ravel())
    if len(chosen) == 0:
        raise InvalidDataError(
            f"no pattern of the region has {min_spots} or more diffracted spots",
            "check the calibration and the disk detection (stemforge disks), or widen --roi",
        )
    return Identification(
        predictions, scan_shape, valid, aggregate(predictions.take(chosen)), region
    )


def write_identification(result: Identification, path: str | Path, model_name: str) -> list[Path]:
    """Write the result as ``.json`` or ``.h5`` (atomically) plus the crystal-system map PNG."""
    from stemforge.core.atomic import atomic_output

    path = Path(path)
    document = {"model": model_name, **result.to_dict()}
    suffix = path.suffix.lower()
    if suffix == ".json":
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(document, indent=1))
    elif suffix in (".h5", ".hdf5"):
        import h5py

        p = result.predictions
        with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["aggregate"] = json.dumps(document["aggregate"])
            f.attrs["model"] = model_name
            f.attrs["crystal_systems"] = json.dumps(list(CRYSTAL_SYSTEMS))
            shape = result.scan_shape
            f["crystal_system"] = result.system_map()
            f["valid"] = result.valid
            f["system_probability"] = p.system_probability.reshape(*shape, -1)
            f["space_group"] = p.space_group.reshape(shape)
            f["space_group_top3"] = p.top_groups(3).reshape(*shape, 3)
            f["lattice"] = p.best_lattice().reshape(*shape, 6)
    else:
        raise ConfigurationError(f"unknown result format {path.suffix!r}", "use .json or .h5")
    return [path, write_system_map(result, path.with_suffix(".png"))]


def write_system_map(result: Identification, path: Path) -> Path:
    """PNG of the crystal system per position, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from stemforge.core.atomic import atomic_output

    colours = plt.get_cmap("tab10").colors[: len(CRYSTAL_SYSTEMS)]
    cmap = ListedColormap([(0.85, 0.85, 0.85), *colours])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.imshow(
        result.system_map().T + 1,
        cmap=cmap,
        vmin=0,
        vmax=len(CRYSTAL_SYSTEMS),
        origin="lower",
        interpolation="nearest",
    )
    ax.set_xlabel("rx")
    ax.set_ylabel("ry")
    agg = result.aggregate
    ax.set_title(
        f"{agg.crystal_system}, space group {agg.space_group} (confidence {agg.confidence:.2f})",
        fontsize=9,
    )
    handles = [Patch(color=c, label=name) for name, c in zip(CRYSTAL_SYSTEMS, colours, strict=True)]
    handles.append(Patch(color=(0.85, 0.85, 0.85), label="not identified"))
    ax.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False
    )
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
