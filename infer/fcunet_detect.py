"""Bragg disks by FCU-Net: predict the kinematic structure-factor image, pick its peaks.

The network (:mod:`stemforge.models.fcunet`, from the zoo) maps a pattern and the vacuum
probe to an image with a sharp peak at every Bragg position; peaks are then picked and
refined by the same code as correlation maxima (:func:`~stemforge.infer.disks.find_peaks`;
by default a Gaussian through each maximum, the shape the network draws), so the output
is the same table: raw detector pixels along axes -2 and -1, intensity = predicted peak
height (a |V_g|-like structure factor relative to the central beam).

Inputs go through :func:`~stemforge.datasets.datamodule.normalize_inputs`, the function
the model was trained with; a model recorded with another normalisation is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stemforge.core.braggpeaks import BraggPeaks
from stemforge.core.datacube import DataCube
from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.infer.checkpoint import BlockCheckpoint
from stemforge.infer.disks import (
    DetectionParams,
    _inside_edge,
    find_peaks,
    refine_dft,
    refine_gaussian,
    refine_parabolic,
    stream_peaks,
)
from stemforge.infer.templates import estimate_probe_radius

#: The zoo model ``--method fcunet`` uses unless told otherwise.
DEFAULT_MODEL = "fcunet"
#: Default floor of a predicted peak, as a fraction of the brightest (the central beam's
#: |V_000|). The network draws weak reflections weaker than their |V_g| (a regression to the
#: mean of what it cannot tell from noise) while its stray peaks stay low, so its floor lies
#: below correlation's 0.005. Chosen on pyxtal crystals (seed 104729, 12 structures × 5
#: regimes of benchmarks/fcunet_accuracy.py), fcunet@0.2.0, accuracy over all regimes:
#: 0.0005 95.7, 0.001 95.8, 0.002 95.1, 0.005 93.3, 0.008 91.3 %; the benchmark's held-out
#: AFLOW prototypes then moved from 86.7 / 87.6 / 83.0 / 89.9 / 85.6 to 87.5 / 87.5 / 89.3 /
#: 92.1 / 92.1 % in R1–R5 (stray peaks 161 → 274, misses 396 → 167), the Si/SiGe strain
#: RMSE stayed 0.057 %.
MIN_RELATIVE_INTENSITY = 0.001
# Patterns per forward pass on the CPU: bounds activations (~40 MB per 128² pattern for the
# default model). A GPU takes up to _GPU_BATCH as its free memory allows: on an H100 the
# network ran 2250 patterns/s at 16 and 8860 at 256 (benchmarks/fcunet_throughput.py).
_BATCH = 16
_GPU_BATCH = 256
_ACTIVATION_BYTES = 40e6 / 128**2  # per pixel of a pattern


def batch_size(device: Any, pattern_shape: tuple[int, int]) -> int:
    """Patterns per forward pass: :data:`_BATCH` on the CPU; on a GPU as many as half its
    free memory holds in activations, between :data:`_BATCH` and :data:`_GPU_BATCH`."""
    import torch

    if torch.device(device).type != "cuda":
        return _BATCH
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free / 2 / (_ACTIVATION_BYTES * pattern_shape[0] * pattern_shape[1]))
    return max(_BATCH, min(_GPU_BATCH, fits))


def load_detector_model(spec: str = DEFAULT_MODEL, device: str = "cpu") -> Any:
    """A trained network from the zoo (``name[@version]``) or a ``.safetensors`` file.

    Raises
    ------
    ConfigurationError
        The model was trained with another input normalisation than this version's.
    """
    from stemforge.datasets.datamodule import NORMALIZATION
    from stemforge.models import zoo

    model = (
        zoo.load_model_file(spec, device=device)
        if spec.endswith(".safetensors")
        else zoo.load_model(spec, device=device)
    )
    recorded = model.zoo_metadata.get("normalization")
    if recorded != NORMALIZATION:
        raise ConfigurationError(
            f"model {spec!r} was trained with input normalisation {recorded!r}, this stemforge uses {NORMALIZATION!r}",
            "use a model trained with this version (stemforge zoo list), or retrain it",
        )
    return model


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def predict(
    model: Any, patterns: np.ndarray, probe: np.ndarray, batch: int | None = None
) -> np.ndarray:
    """Predicted structure-factor images ``(N, Qx, Qy)`` of a stack of patterns, peaks
    as ``|V_g| / |V_0|``.

    Parameters
    ----------
    model
        A network taking ``(pattern, probe)`` as ``(B, 1, Qx, Qy)`` tensors.
    patterns
        ``(N, Qx, Qy)`` raw intensities.
    probe
        ``(Qx, Qy)`` vacuum probe, centred at ``(Qx // 2, Qy // 2)``.
    batch
        Patterns per forward pass; default :func:`batch_size` of the model's device.
    """
    import torch

    from stemforge.datasets.datamodule import normalize_inputs, structure_factor_image

    patterns = np.asarray(patterns, dtype=np.float32)
    if patterns.ndim != 3 or patterns.shape[1:] != np.shape(probe):
        raise ShapeError(
            f"patterns {patterns.shape} and probe {np.shape(probe)} do not match",
            "give a (N, Qx, Qy) stack and a (Qx, Qy) probe of the same detector",
        )
    device = _device(model)
    batch = batch or batch_size(device, patterns.shape[1:])
    out = np.empty(patterns.shape, dtype=np.float32)
    with torch.inference_mode():
        probe_t = torch.as_tensor(np.asarray(probe, dtype=np.float32), device=device)[None, None]
        for start in range(0, len(patterns), batch):
            x = torch.as_tensor(patterns[start : start + batch], device=device)[:, None]
            x, p = normalize_inputs(x, probe_t)
            y = structure_factor_image(model(x, p)[:, 0].float())
            out[start : start + batch] = y.cpu().numpy()
    return out


def shift_whole_pixels(patterns: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each ``(Qx, Qy)`` pattern of a stack moved by its integer ``(sx, sy)``; zeros enter."""
    moved = np.zeros_like(np.asarray(patterns))
    nx, ny = moved.shape[1:]
    for k, (sx, sy) in enumerate(np.asarray(shifts, dtype=np.int64)):
        moved[k, max(sx, 0) : nx + min(sx, 0), max(sy, 0) : ny + min(sy, 0)] = patterns[
            k, max(-sx, 0) : nx + min(-sx, 0), max(-sy, 0) : ny + min(-sy, 0)
        ]
    return moved


def peaks_from_prediction(prediction: np.ndarray, params: DetectionParams) -> list[np.ndarray]:
    """Peaks of predicted images, picked as correlation maxima are; refined by default as
    the Gaussians the network draws (``subpixel="gaussian"``)."""
    peaks = find_peaks(prediction, params)
    subpixel = params.subpixel or "gaussian"
    if subpixel == "gaussian":
        return refine_gaussian(prediction, peaks)
    if subpixel == "parabolic":
        return refine_parabolic(prediction, peaks)
    if subpixel == "dft":
        from scipy import fft

        return refine_dft(fft.rfft2(prediction), prediction.shape[1:], peaks, params.upsample)
    return peaks


def find_bragg_disks_fcunet(
    cube: DataCube,
    probe: np.ndarray,
    model: Any,
    params: DetectionParams | None = None,
    max_bytes: int | str | None = None,
    *,
    scheduler: Any = None,
    checkpoint: BlockCheckpoint | None = None,
) -> BraggPeaks:
    """FCU-Net disk detection over a datacube, block by block of scan rows.

    Where the datacube's calibration has an origin (``stemforge calibrate``), every pattern
    is first moved by whole pixels so that its central beam lies within a pixel of the
    detector centre, where the probe is: the network was trained on origins within ±1 px
    of the probe and loses the lattice beyond ~1.5 px (benchmarks/fcunet_accuracy.py,
    origin-offset table); peaks are reported in the raw detector frame.
    ``params`` as for correlation; unset ``min_spacing`` and ``edge`` default to the probe
    radius, as there, an unset ``min_relative_intensity`` to
    :data:`MIN_RELATIVE_INTENSITY`. ``max_bytes``, ``scheduler`` and ``checkpoint`` as for
    :func:`~stemforge.infer.disks.stream_peaks` (the network travels to each worker).
    """
    if np.shape(probe) != cube.detector_shape:
        raise ShapeError(
            f"the probe has shape {np.shape(probe)} but the patterns are {cube.detector_shape}",
            "record the vacuum probe with the same detector binning and cropping as the data",
        )
    params = (params or DetectionParams()).resolved(
        estimate_probe_radius(probe), MIN_RELATIVE_INTENSITY
    )
    calibration = cube.calibration
    origins = (
        np.stack(calibration.origin_array(cube.scan_shape), axis=-1).reshape(-1, 2)
        if calibration is not None and calibration.has_origin
        else None
    )
    centre = np.array(cube.detector_shape) // 2

    def detect(stack: np.ndarray, start: int) -> list[np.ndarray]:
        if origins is None:
            return peaks_from_prediction(predict(model, stack, probe), params)
        # toward the probe by whole pixels, leaving less than 1 px: the offsets the network
        # was trained on (counting noise stays as it was, unlike after resampling)
        shifts = np.fix(centre - origins[start : start + len(stack)]).astype(np.int64)
        tables = peaks_from_prediction(
            predict(model, shift_whole_pixels(stack, shifts), probe), params
        )
        tables = [t - np.array([sx, sy, 0.0]) for t, (sx, sy) in zip(tables, shifts, strict=True)]
        shape = cube.detector_shape
        return [t[_inside_edge(t[:, 0], t[:, 1], shape, params.edge)] for t in tables]

    return stream_peaks(
        cube, detect, max_bytes, "FCU-Net disks", scheduler=scheduler, checkpoint=checkpoint
    )
