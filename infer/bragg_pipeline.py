"""Datacube → Bragg peaks → lattice → strain: the steps behind ``stemforge disks|strain``.

Each step is a function on in-memory objects (the kernels live in :mod:`disks`,
:mod:`lattice` and :mod:`strain`); this module chooses the template, chains the steps and
writes the strain file. The CLI and the demo call it; scripts can too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.infer.checkpoint import BlockCheckpoint
from stemforge.infer.disks import DetectionParams, find_bragg_disks
from stemforge.infer.lattice import Basis, LatticeFit, choose_basis, fit_lattice
from stemforge.infer.map_figures import write_strain_pngs
from stemforge.infer.strain import ReferenceLattice, StrainMap, strain_map
from stemforge.infer.templates import make_kernel, probe_from_datacube, synthetic_probe

STRAIN_DATASETS: tuple[str, ...] = ("e_xx", "e_yy", "e_xy", "theta", "mask")
# Blocks of the origin measurement take 1/32 of a memory budget (at most 32 MiB) as float32:
# the centre-of-mass kernel holds about five times its block (smoothed copy, float64 weights).
_ORIGIN_SHARE = 32
_ORIGIN_BLOCK_BYTES = 32 * 2**20


def vacuum_probe(
    cube: DataCube,
    *,
    probe: Any = None,
    region: tuple[slice, slice] | None = None,
    radius: float | None = None,
    edge_width: float = 1.0,
) -> np.ndarray:
    """The vacuum probe image to build the correlation template from; exactly one source.

    Parameters
    ----------
    cube
        The datacube whose patterns will be searched (its detector shape is checked).
    probe
        A ``(Qx, Qy)`` image (e.g. loaded from ``PROBE.npy``).
    region
        ``(rx slice, ry slice)`` of vacuum positions of ``cube``, averaged and centred.
    radius
        Radius (pixels) of a synthetic soft-edged disk with edge width ``edge_width``.
    """
    given = [
        name
        for name, value in (("probe", probe), ("region", region), ("radius", radius))
        if value is not None
    ]
    if len(given) != 1:
        raise ConfigurationError(
            f"give exactly one probe source, got {given or 'none'}",
            "pass a vacuum probe image (--probe PROBE.npy), a vacuum region of the scan "
            "(--probe-region RX0:RX1,RY0:RY1) or a disk radius (--probe-radius PX)",
        )
    if region is not None:
        return probe_from_datacube(cube, *region)
    if radius is not None:
        return synthetic_probe(cube.detector_shape, radius, edge_width)
    image = np.asarray(probe)
    if image.shape != cube.detector_shape:
        raise ShapeError(
            f"the probe has shape {image.shape} but the patterns are {cube.detector_shape}",
            "record the vacuum probe with the same detector binning and cropping as the data",
        )
    return image


def detect_bragg_peaks(
    cube: DataCube,
    probe: np.ndarray,
    *,
    method: str = "correlation",
    kernel: str | None = None,
    params: DetectionParams | None = None,
    max_bytes: int | str | None = None,
    backend: str = "auto",
    model: str | None = None,
    scheduler: Any = None,
    checkpoint: BlockCheckpoint | None = None,
) -> BraggPeaks:
    """Bragg disks of a whole datacube, by correlation or by FCU-Net.

    Parameters
    ----------
    method
        ``"correlation"``: with a template made from ``probe`` (``kernel`` is a
        :func:`~stemforge.infer.templates.make_kernel` mode, default its own).
        ``"fcunet"``: the network ``model`` (zoo ``name[@version]`` or a ``.safetensors``
        file; default the zoo's ``fcunet``) predicts the structure-factor image.
    params
        Peak picking and refinement, for both methods.
    max_bytes, scheduler, checkpoint
        Memory budget, cluster and checkpoint, for both methods (see
        :func:`~stemforge.infer.disks.stream_peaks`).
    """
    streaming = {"max_bytes": max_bytes, "scheduler": scheduler, "checkpoint": checkpoint}
    if method == "correlation":
        template = make_kernel(probe) if kernel is None else make_kernel(probe, kernel)
        return find_bragg_disks(cube, template, params, backend=backend, **streaming)
    if method == "fcunet":
        from stemforge.infer.fcunet_detect import (
            DEFAULT_MODEL,
            find_bragg_disks_fcunet,
            load_detector_model,
        )

        # on a cluster the network runs on the workers' CPUs
        device = "cuda" if scheduler is None and backend != "numpy" and _cuda() else "cpu"
        network = load_detector_model(model or DEFAULT_MODEL, device=device)
        return find_bragg_disks_fcunet(cube, probe, network, params, **streaming)
    raise ConfigurationError(
        f"unknown disk detection method {method!r}", "use 'correlation' or 'fcunet'"
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def with_origin(cube: DataCube, max_bytes: int | str | None = None) -> DataCube:
    """``cube`` with a measured origin when its calibration has none.

    The lattice fit needs the origin of every pattern to centre the Bragg vector map; the
    brightest peak near the detector centre (the fallback on bare peak tables) is wrong
    whenever a Bragg disk outshines the direct beam. Here: the centre of mass of the central
    disk of each pattern (no drift model, so stacks of unrelated patterns work too); blank
    patterns get the median origin. ``stemforge calibrate`` gives more control. The cube is
    streamed in blocks sized from the memory budget ``max_bytes`` (bytes, ``"256MB"``, or
    None for the readers' default).
    """
    if cube.calibration.qx0 is not None:
        return cube
    from stemforge.core.errors import CalibrationError
    from stemforge.datasets.io.memory import budget_share
    from stemforge.infer.origin import find_origin

    block = budget_share(max_bytes, _ORIGIN_SHARE, _ORIGIN_BLOCK_BYTES)
    qx0, qy0 = find_origin(cube, "com", max_bytes=block)
    measured = np.isfinite(qx0) & np.isfinite(qy0)
    if not measured.any():
        raise CalibrationError(
            f"{cube.name}: the origin could not be measured on any pattern (they look blank)",
            "check the data (stemforge virtual FILE --pattern max)",
        )
    qx0 = np.where(measured, qx0, np.median(qx0[measured]))
    qy0 = np.where(measured, qy0, np.median(qy0[measured]))
    return cube.with_calibration(cube.calibration.replace(qx0=qx0, qy0=qy0))


@dataclass(frozen=True, eq=False)
class StrainResult:
    """A strain map with the basis choice and lattice fit it came from."""

    strain: StrainMap
    fit: LatticeFit
    basis: Basis


def measure_strain(
    peaks: BraggPeaks,
    calibration: Calibration | None = None,
    *,
    g1: Any = None,
    g2: Any = None,
    reference: Any = None,
    min_peaks: int = 5,
    frame: str = "detector",
) -> StrainResult:
    """Basis choice, per-position lattice fit and strain relative to a reference.

    Parameters
    ----------
    peaks
        Raw detected peaks of the scan.
    calibration
        Origin and ellipse for the centred view (estimated from the peaks when absent);
        QR rotation/flip for ``frame='scan'``.
    g1, g2
        Manual basis (centred detector pixels), refined by the fit; default automatic.
    reference
        None: median lattice of all valid positions; ``(rx slice, ry slice)``: median inside
        that ROI; a :class:`~stemforge.infer.strain.ReferenceLattice`: explicit.
    min_peaks
        Fewer indexed peaks than this masks a position.
    frame
        ``'detector'`` or ``'scan'`` axes for the tensor.
    """
    basis = choose_basis(peaks, calibration, g1=g1, g2=g2)
    fit = fit_lattice(peaks, basis.g1, basis.g2, calibration, min_peaks=min_peaks)
    return StrainResult(
        strain_map(fit, reference, frame=frame, calibration=calibration), fit, basis
    )


def _reference_attrs(reference: ReferenceLattice) -> dict[str, Any]:
    return {
        "g1": np.asarray(reference.g1).tolist(),
        "g2": np.asarray(reference.g2).tolist(),
        "source": reference.source,
    }


def write_strain(
    path: str | Path,
    result: StrainResult,
    *,
    calibration: Calibration | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the strain maps to HDF5 and PNG views beside it.

    The HDF5 file holds ``e_xx, e_yy, e_xy, theta`` (float64, ``(Rx, Ry)``, NaN where
    masked) and ``mask`` (bool) at its root, the lattice fit under ``lattice/`` (``g1, g2,
    origin, residual, n_peaks``), and as attributes the conventions, the frame, the
    reference lattice, the calibration and ``provenance``. PNGs: ``STEM_e_xx.png`` ... with
    ``STEM`` the path without its suffix.

    Returns
    -------
    list of Path
        The HDF5 file, then the PNGs.
    """
    import h5py

    path = Path(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise ConfigurationError(
            f"cannot write strain maps to {path.name!r}", "name the output STRAIN.h5"
        )
    strain, fit = result.strain, result.fit
    with atomic_output(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        for name in STRAIN_DATASETS:
            f.create_dataset(name, data=getattr(strain, name))
        lattice = f.create_group("lattice")
        for name in ("g1", "g2", "origin", "residual", "n_peaks"):
            lattice.create_dataset(name, data=getattr(fit, name))
        f.attrs["convention"] = (
            "Biot strain U - I of F = R(theta) U, F = deformation of the real-space lattice "
            "relative to the reference; e_xy tensor shear; tensile positive; theta rad "
            "counter-clockwise from x toward y"
        )
        f.attrs["frame"] = strain.frame + (
            " (x = detector axis -2, y = axis -1)"
            if strain.frame == "detector"
            else " (x = scan axis Rx, y = Ry)"
        )
        f.attrs["reference"] = json.dumps(_reference_attrs(strain.reference))
        f.attrs["basis_pixels"] = json.dumps(
            {"g1": result.basis.g1.tolist(), "g2": result.basis.g2.tolist()}
        )
        if calibration is not None:
            f.attrs["calibration"] = calibration.to_json()
        f.attrs["provenance"] = json.dumps(provenance or {})
    stem = path.with_suffix("")
    maps = {name: getattr(strain, name) for name in ("e_xx", "e_yy", "e_xy", "theta")}
    return [path, *write_strain_pngs(stem, maps, strain.mask, overwrite=overwrite)]


def read_strain(path: str | Path) -> dict[str, np.ndarray]:
    """The ``e_xx, e_yy, e_xy, theta, mask`` maps of a file written by :func:`write_strain`."""
    import h5py

    from stemforge.core.errors import FileFormatError, MissingFileError

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist", "check the path to the strain file")
    with h5py.File(path, "r") as f:
        missing = [name for name in STRAIN_DATASETS if name not in f]
        if missing:
            raise FileFormatError(
                f"{path} lacks the datasets {missing}", "give a file written by `stemforge strain`"
            )
        return {name: f[name][...] for name in STRAIN_DATASETS}
