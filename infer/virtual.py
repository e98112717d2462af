"""Virtual imaging: detector masks contracted against every diffraction pattern.

The contraction is one pass over the data with all masks batched into a single matrix
product per block of patterns, so the cost is that of reading the data once. Data are
streamed in blocks of scan rows (memory maps) or mapped over Dask chunks of scan
positions (lazy cubes, including on a ``dask.distributed`` cluster).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from stemforge.core.datacube import DataCube, require_finite
from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.core.progress import track
from stemforge.infer.detectors import Detector, parse_detector

#: Patterns per product: ~2 MB of float32 stays in cache while every mask passes over it.
_INNER_BYTES = 2 * 2**20
#: Up to this many masks, one matrix-vector product per mask over a cached chunk beats a
#: skinny matrix-matrix product (measured: 35 vs 20 GB/s for two masks on 2 cores).
_GEMV_MAX_MASKS = 4


# ---- kernels ----------------------------------------------------------------------------
def contract(patterns: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sums of each pattern: ``(n, Qx, Qy) × (K, Qx, Qy) → (n, K)``.

    Parameters
    ----------
    patterns
        Stack of patterns, any real dtype.
    weights
        One mask per output channel (float32 is used for the products).
    """
    n = patterns.shape[0]
    flat = patterns.reshape(n, -1)
    w = np.ascontiguousarray(weights.reshape(weights.shape[0], -1), dtype=np.float32)
    out = np.empty((w.shape[0], n), np.float32)
    step = max(1, _INNER_BYTES // (4 * flat.shape[1]))
    # Casting chunk by chunk into a reused buffer avoids a float copy of the whole slab.
    buf = None if flat.dtype == np.float32 else np.empty((min(step, n), flat.shape[1]), np.float32)
    for i in range(0, n, step):
        chunk = flat[i : i + step]
        if buf is not None:
            np.copyto(buf[: len(chunk)], chunk, casting="unsafe")
            chunk = buf[: len(chunk)]
        if len(w) <= _GEMV_MAX_MASKS:
            for k in range(len(w)):
                np.matmul(chunk, w[k], out=out[k, i : i + step])
        else:
            np.matmul(w, chunk.T, out=out[:, i : i + step])
    return out.T.astype(np.float64)


def contract_following(
    patterns: np.ndarray, detectors: Sequence[Detector], origins: np.ndarray
) -> np.ndarray:
    """Like :func:`contract`, with each detector centred on each pattern's own origin.

    Parameters
    ----------
    patterns
        ``(n, Qx, Qy)``.
    detectors
        The detectors, defined relative to the origin.
    origins
        ``(n, 2)`` origin (qx0, qy0) of each pattern, pixels.
    """
    n, shape = patterns.shape[0], patterns.shape[1:]
    out = np.empty((n, len(detectors)), np.float64)
    step = max(1, _INNER_BYTES // (4 * shape[0] * shape[1]))
    for i in range(0, n, step):
        chunk = patterns[i : i + step].astype(np.float32, copy=False)
        for k, det in enumerate(detectors):
            masks = det.render(shape, origins[i : i + step])
            out[i : i + step, k] = np.einsum("nij,nij->n", chunk, masks, dtype=np.float64)
    return out


def _block_images(
    block: np.ndarray,
    rx_offset: int,
    detectors: Sequence[Detector],
    weights: np.ndarray | None,
    origins: np.ndarray | None,
    name: str,
) -> np.ndarray:
    """Virtual images of one slab ``(rx, ry, Qx, Qy)`` → ``(rx, ry, K)``.

    ``origins`` is None (fixed detectors, given as ``weights``) or the slab's own
    ``(rx, ry, 2)`` origins; ``rx_offset`` only serves error messages. NaN or inf anywhere
    in a pattern makes any product with it non-finite (0·NaN is NaN), and for float data
    the weights end with an all-ones row, so checking the small result replaces a
    second pass over the data.
    """
    rx, ry = block.shape[:2]
    patterns = block.reshape(rx * ry, *block.shape[2:])
    with np.errstate(invalid="ignore", over="ignore"):  # bad frames are reported just below
        if origins is None:
            values = contract(patterns, weights)
        else:
            values = contract_following(patterns, detectors, origins.reshape(-1, 2))
    if not np.isfinite(values).all():
        require_finite(block, rx_offset, name)
    return values.reshape(rx, ry, -1)


# ---- orchestration ------------------------------------------------------------------------
def virtual_images(
    cube: DataCube,
    detectors: Sequence[Detector],
    *,
    follow_origin: bool = False,
    origin: tuple[float, float] | None = None,
    max_bytes: int = 64 * 2**20,
) -> np.ndarray:
    """Virtual images of a datacube for several detectors in one pass.

    Parameters
    ----------
    cube
        The datacube (in memory, memory-mapped or lazy).
    detectors
        Detectors relative to the origin.
    follow_origin
        Centre the detectors on each pattern's calibrated origin (``cube.calibration.qx0``
        and ``qy0`` arrays) instead of one fixed origin.
    origin
        The fixed origin (qx0, qy0) in pixels when not following; default:
        :func:`default_origin`.
    max_bytes
        Memory for one block of patterns when streaming.

    Returns
    -------
    numpy.ndarray
        ``(K, Rx, Ry)`` float64, one image per detector.
    """
    if not detectors:
        raise ConfigurationError("no detector given", "pass at least one --detector")
    origins = None
    weights = None
    if follow_origin:
        qx0, qy0 = cube.calibration.origin_array(cube.scan_shape)
        origins = np.stack([qx0, qy0], axis=-1)
    else:
        fixed = np.asarray(origin if origin is not None else default_origin(cube), float)
        masks = [d.render(cube.detector_shape, fixed) for d in detectors]
        if cube.dtype.kind in "fc":  # a total-intensity row that catches NaN anywhere
            masks.append(np.ones((1, *cube.detector_shape), np.float32))
        weights = np.concatenate(masks)
    if cube.is_lazy:
        images = _virtual_images_dask(cube, detectors, weights, origins)
    else:
        images = np.empty((*cube.scan_shape, len(detectors)), np.float64)
        blocks = cube.iter_blocks(max_bytes, check_finite=False)  # checked per block below
        n_blocks = -(-cube.shape[0] // cube.rows_per_block(max_bytes))
        for sl, block in track(blocks, n_blocks, "virtual images"):
            sub = None if origins is None else origins[sl]
            images[sl] = _block_images(block, sl.start, detectors, weights, sub, cube.name)[..., : len(detectors)]
    return np.moveaxis(images, -1, 0)


def _virtual_images_dask(
    cube: DataCube, detectors: Sequence[Detector], weights: np.ndarray | None, origins: np.ndarray | None
) -> np.ndarray:
    """Map the block kernel over Dask chunks of scan positions, then compute."""
    from stemforge.core.progress import dask_progress

    data = cube.data.rechunk({2: -1, 3: -1})

    def kernel(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        (rx0, rx1), (ry0, ry1) = block_info[0]["array-location"][:2]
        sub = None if origins is None else origins[rx0:rx1, ry0:ry1]
        return _block_images(block, rx0, detectors, weights, sub, cube.name)[..., : len(detectors)]

    result = data.map_blocks(
        kernel, dtype=np.float64, drop_axis=(2, 3), new_axis=2, chunks=(*data.chunks[:2], (len(detectors),))
    )
    from threadpoolctl import threadpool_limits

    # Dask already runs one chunk per core: BLAS threads on top would oversubscribe them.
    with dask_progress("virtual images"), threadpool_limits(1):
        return np.asarray(result.compute())


def default_origin(cube: DataCube) -> tuple[float, float]:
    """Where fixed detectors sit when no origin is given.

    The calibrated mean origin; else the centre of the bright-field disk measured on a
    sample of patterns; else (blank or disk-less data) the detector centre.
    """
    if cube.calibration.has_origin:
        return cube.calibration.mean_origin()
    disk = estimate_bright_field(sample_patterns(cube))
    if disk is not None:
        return disk[0], disk[1]
    return (cube.shape[2] - 1) / 2, (cube.shape[3] - 1) / 2


# ---- virtual diffraction ------------------------------------------------------------------
def virtual_diffraction(cube: DataCube, mode: str = "mean", max_bytes: int = 64 * 2**20) -> np.ndarray:
    """Mean or maximum diffraction pattern over the scan, ``(Qx, Qy)`` float64.

    Parameters
    ----------
    cube
        The datacube.
    mode
        'mean' or 'max'.
    """
    if mode not in ("mean", "max"):
        raise ConfigurationError(f"unknown virtual diffraction mode {mode!r}", "use 'mean' or 'max'")
    if cube.is_lazy:
        from stemforge.core.progress import dask_progress

        reduced = cube.data.mean(axis=(0, 1), dtype=np.float64) if mode == "mean" else cube.data.max(axis=(0, 1))
        with dask_progress(f"{mode} pattern"):
            result = np.asarray(reduced.compute(), np.float64)
        if not np.all(np.isfinite(result)):
            raise InvalidDataError(
                f"{cube.name}: the {mode} pattern holds NaN or inf, so some frames do",
                "replace or mask the bad frames (e.g. numpy.nan_to_num) before the analysis",
            )
        return result
    acc = np.zeros(cube.detector_shape) if mode == "mean" else np.full(cube.detector_shape, -np.inf)
    n_blocks = -(-cube.shape[0] // cube.rows_per_block(max_bytes))
    for _, block in track(cube.iter_blocks(max_bytes), n_blocks, f"{mode} pattern"):
        if mode == "mean":
            acc += block.sum(axis=(0, 1), dtype=np.float64)
        else:
            np.maximum(acc, block.max(axis=(0, 1)), out=acc)
    return acc / (cube.shape[0] * cube.shape[1]) if mode == "mean" else acc


def estimate_bright_field(pattern: np.ndarray, threshold: float = 0.5) -> tuple[float, float, float] | None:
    """Centre and radius (pixels) of the bright-field disk of a (mean) pattern, or None.

    The disk is the connected region above ``threshold`` × the smoothed maximum that holds
    the brightest pixel; its radius is that of a circle of the same area, its centre the
    intensity-weighted centroid. None when there is no such disk: a blank pattern, or a
    bright region covering more than half the detector (flat or noise-only data).
    """
    pattern = np.asarray(pattern, float)
    smooth = ndimage.gaussian_filter(pattern, 1.0)
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    if not smooth[peak] > 0:
        return None
    labels, _ = ndimage.label(smooth > threshold * smooth[peak])
    disk = labels == labels[peak]
    if disk.sum() > disk.size / 2:
        return None
    qx0, qy0 = ndimage.center_of_mass(np.where(disk, pattern, 0.0))
    return float(qx0), float(qy0), float(np.sqrt(disk.sum() / np.pi))


def bright_field_radius(cube: DataCube) -> float:
    """Radius (pixels) of the bright-field disk: measured on a sample of patterns, or else
    from the calibrated convergence semiangle and Q pixel size."""
    disk = estimate_bright_field(sample_patterns(cube))
    if disk is not None:
        return disk[2]
    cal = cube.calibration
    if cal.convergence_semiangle and cal.q_units != "pixels" and (cal.energy or cal.q_units == "mrad"):
        return cal.convergence_semiangle / cal.q_pixel_size_mrad
    raise ConfigurationError(
        f"{cube.name}: no bright-field disk found in a sample of the patterns (blank or flat data), "
        "and no calibrated convergence semiangle to size it",
        "give the radii yourself: bf:R, adf:R0,R1",
    )


def sample_patterns(cube: DataCube, count: int = 64) -> np.ndarray:
    """Mean of up to ``count`` patterns spread evenly over the scan (a cheap preview)."""
    flat_index = np.unique(np.linspace(0, cube.shape[0] * cube.shape[1] - 1, count).round().astype(int))
    rx, ry = np.unravel_index(flat_index, cube.scan_shape)
    picks = [cube.data[i, j] for i, j in zip(rx, ry, strict=True)]
    if cube.is_lazy:
        import dask

        picks = dask.compute(*picks)
    return np.mean([np.asarray(p, float) for p in picks], axis=0)


def virtual_from_specs(
    cube: DataCube,
    detector_specs: Sequence[str],
    *,
    units: str = "px",
    centered: bool = False,
    pattern: str | None = None,
) -> dict[str, np.ndarray]:
    """Virtual images (and a virtual diffraction pattern) by name, from command-line specs.

    Bare ``bf`` and ``adf`` take the bright-field disk measured on a sample of the patterns;
    ``centered`` needs a calibrated per-pattern origin. See :func:`parse_detector`.
    """
    results = {}
    if pattern is not None:
        results[pattern] = virtual_diffraction(cube, pattern)
    if not detector_specs:
        return results
    bf_radius = max_radius = None
    if any(spec.strip().lower() in ("bf", "adf") for spec in detector_specs):
        bf_radius = bright_field_radius(cube)
        # the default ADF takes everything beyond 2·r_bf, out to the farthest detector corner
        ox, oy = default_origin(cube)
        max_radius = float(np.hypot(max(ox, cube.shape[2] - 1 - ox), max(oy, cube.shape[3] - 1 - oy))) + 1
        if "adf" in (spec.strip().lower() for spec in detector_specs) and 2 * bf_radius >= max_radius:
            raise ConfigurationError(
                f"{cube.name}: the detector ends {max_radius:.1f} px from the origin, inside twice the "
                f"bright-field radius ({bf_radius:.1f} px) where the default ADF starts",
                "give the annulus yourself: adf:R0,R1 or annulus:R0,R1",
            )
    detectors = [
        parse_detector(s, units=units, calibration=cube.calibration, bf_radius=bf_radius, max_radius=max_radius)
        for s in detector_specs
    ]
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"detectors share a name: {names}", "give each --detector once")
    results.update(zip(names, virtual_images(cube, detectors, follow_origin=centered), strict=True))
    return results
