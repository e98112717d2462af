"""Command-line commands of conventional analysis: ``stemforge disks`` and ``stemforge strain``.

Only click is imported at module level (the CLI root lists commands without loading NumPy
or torch); each command imports what it needs when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from stemforge.infer.commands import (
    _load_npy,
    _open,
    _pair,
    _scan_shape,
    lazy_option,
    memory_budget_option,
    scan_shape_option,
    scheduler_option,
)

PEAK_SUFFIXES = (".csv", ".h5", ".hdf5", ".emd")


def _roi(value: str | None, option: str) -> tuple[slice, slice] | None:
    """``RX0:RX1,RY0:RY1`` → two slices (half-open, Python style)."""
    if value is None:
        return None
    try:
        parts = [tuple(int(v) for v in part.split(":")) for part in value.split(",")]
        (x0, x1), (y0, y1) = parts
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not RX0:RX1,RY0:RY1 (integers)", param_hint=option
        ) from None
    return slice(x0, x1), slice(y0, y1)


def detection_options(func: Callable) -> Callable:
    """Options shared by ``disks`` and ``strain``: the template and the detector settings."""
    options = [
        click.option("--probe", help="Vacuum probe image (.npy), the detector shape of the data."),
        click.option(
            "--probe-region",
            metavar="RX0:RX1,RY0:RY1",
            help="Average these vacuum scan positions as the probe.",
        ),
        click.option(
            "--probe-radius",
            type=float,
            metavar="PX",
            help="Use a synthetic disk of this radius (pixels) as the probe.",
        ),
        click.option(
            "--method",
            type=click.Choice(["correlation", "fcunet"]),
            default="correlation",
            show_default=True,
            help="Disk detector: probe correlation, or the FCU-Net network.",
        ),
        click.option(
            "--model",
            help="FCU-Net model: zoo NAME[@VERSION] or a .safetensors file [default: fcunet].",
        ),
        click.option(
            "--kernel",
            type=click.Choice(["plain", "gaussian", "trench"]),
            help="Template made from the probe [default: the detector's].",
        ),
        click.option(
            "--exponent", type=float, help="Correlation power: 1 cross, 0 phase, between hybrid."
        ),
        click.option("--sigma", type=float, help="Gaussian smoothing of the correlation (px)."),
        click.option(
            "--min-relative-intensity",
            type=float,
            help="Drop peaks weaker than this fraction of the reference peak "
            "[default: 0.005 for correlation, 0.001 for fcunet].",
        ),
        click.option(
            "--min-absolute-intensity",
            type=float,
            help="Drop peaks with a correlation height below this.",
        ),
        click.option(
            "--min-spacing", type=float, help="Minimum peak spacing (px) [default: probe radius]."
        ),
        click.option(
            "--edge",
            type=float,
            help="Ignore peaks this close to the detector edge (px) [default: probe radius].",
        ),
        click.option("--max-peaks", type=int, help="At most this many peaks per pattern."),
        click.option(
            "--subpixel",
            type=click.Choice(["none", "parabolic", "dft", "gaussian"]),
            help="Subpixel refinement [default: dft for correlation, gaussian for fcunet].",
        ),
        click.option("--upsample", type=int, help="Upsampling factor of the DFT refinement."),
        click.option(
            "--backend",
            type=click.Choice(["auto", "numpy", "torch"]),
            default="auto",
            show_default=True,
        ),
        memory_budget_option,
        scheduler_option,
        scan_shape_option,
        lazy_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


DETECTION_KEYS = (
    "exponent",
    "sigma",
    "min_relative_intensity",
    "min_absolute_intensity",
    "min_spacing",
    "edge",
    "max_peaks",
    "subpixel",
    "upsample",
)


# Options that change the peaks: a checkpoint of other values is not resumed.
JOB_KEYS = (*DETECTION_KEYS, "method", "model", "kernel", "backend")


def _detect(input_file: str, options: dict[str, Any], out: Path):  # noqa: ANN202 - 3-tuple
    """Open ``input_file`` and detect its Bragg disks as the detection options say.

    Returns the cube, its peaks and their checkpoint: finished blocks are kept beside
    ``out`` (``OUT.partial``), so a rerun of the same command after a kill or an error
    skips them; the caller removes the checkpoint once its output is written.
    """
    from stemforge.datasets.io.lazy import file_token
    from stemforge.infer.bragg_pipeline import detect_bragg_peaks, vacuum_probe
    from stemforge.infer.checkpoint import BlockCheckpoint, array_digest, checkpoint_path
    from stemforge.infer.disks import DetectionParams

    params = DetectionParams(**{k: options[k] for k in DETECTION_KEYS if options[k] is not None})
    cube = _open(
        input_file,
        options["scan_shape"],
        options["lazy"],
        options["memory_budget"],
        options["scheduler"],
    )
    probe = vacuum_probe(
        cube,
        probe=_load_npy(options["probe"], "--probe"),
        region=_roi(options["probe_region"], "--probe-region"),
        radius=options["probe_radius"],
    )
    job = {
        "input": file_token(cube.source, input_file) if cube.source else input_file,
        "scan_shape": options["scan_shape"],
        "probe": array_digest(probe),
        "options": {k: options[k] for k in JOB_KEYS},
    }
    checkpoint = BlockCheckpoint(checkpoint_path(out), job)
    try:
        peaks = detect_bragg_peaks(
            cube,
            probe,
            method=options["method"],
            kernel=options["kernel"],
            params=params,
            max_bytes=options["memory_budget"],
            backend=options["backend"],
            model=options["model"],
            scheduler=options["scheduler"],
            checkpoint=checkpoint,
        )
    except BaseException:
        if any(checkpoint.folder.glob("block-*.npz")):
            click.echo(
                f"finished blocks are kept in {checkpoint.folder}: rerun the same command to resume",
                err=True,
            )
        raise
    return cube, peaks, checkpoint


def _peaks_for(input_file: str, options: dict[str, Any], out: Path):  # noqa: ANN202 - 4-tuple
    """The Bragg peaks of INPUT and their calibration, for commands that analyse peaks.

    With a probe option INPUT is a datacube (or a ``.npy`` stack) whose disks are detected
    (resumably, see :func:`_detect`), its calibration completed with measured origins;
    without one INPUT is a peak file. ``--energy`` and ``--q-pixel-size`` override the
    calibration. Returns ``(peaks, calibration, cube or None, checkpoint or None)``.
    """
    has_probe = any(options[k] is not None for k in ("probe", "probe_region", "probe_radius"))
    cube = checkpoint = None
    if has_probe:
        from stemforge.infer.bragg_pipeline import with_origin

        cube, peaks, checkpoint = _detect(input_file, options, out)
        cube = with_origin(cube, options["memory_budget"])
        calibration = cube.calibration
    else:
        from stemforge.datasets.io import read_braggpeaks_file

        found = read_braggpeaks_file(input_file, scan_shape=_scan_shape(options["scan_shape"]))
        peaks, calibration = found.peaks, found.calibration
    if options["energy"] is not None:
        calibration = calibration.replace(energy=options["energy"])
    if options["q_pixel_size"] is not None:
        if options["q_pixel_size"] <= 0:
            raise click.BadParameter("must be positive", param_hint="--q-pixel-size")
        calibration = calibration.replace(q_pixel_size=options["q_pixel_size"], q_units="A^-1")
    if cube is not None:
        cube = cube.with_calibration(calibration)
    return peaks, calibration, cube, checkpoint


def calibration_options(func: Callable) -> Callable:
    """``--q-pixel-size`` and ``--energy``, overriding the file's calibration."""
    func = click.option(
        "--energy",
        type=float,
        metavar="EV",
        help="Beam energy (eV), for files calibrated in mrad [default: from the file].",
    )(func)
    return click.option(
        "--q-pixel-size",
        type=float,
        metavar="INV_A",
        help="Reciprocal pixel size (Å⁻¹ per pixel) [default: from the file].",
    )(func)


def _check_new(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise click.UsageError(f"{path} exists; pass --overwrite to replace it")


# ---- disks ----------------------------------------------------------------------------------
@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@detection_options
@click.option(
    "--out",
    "-o",
    required=True,
    help="Peak table: .csv, .h5 (group braggpeaks) or .emd (py4DSTEM BraggVectors).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def disks(input_file: str, out: str, overwrite: bool, **options: Any) -> None:
    """Find the Bragg disks of every pattern of INPUT.

    INPUT is any datacube stemforge reads, or a .npy stack (N, Qx, Qy) (a scan of shape
    (N, 1)). The table has one row per peak: rx, ry, qx, qy, intensity, with qx, qy in raw
    detector pixels along array axes -2 and -1 (0 = first pixel) and intensity the
    correlation height. Give the template by --probe, --probe-region or --probe-radius.

    Finished blocks of scan rows are kept in OUT.partial while it runs: rerunning the same
    command after a kill or an error computes only the rest (strain does the same).
    """
    from stemforge.datasets.io import write_braggpeaks

    out_path = Path(out)
    if out_path.suffix.lower() not in PEAK_SUFFIXES:
        raise click.BadParameter(
            f"{out!r}: use one of {', '.join(PEAK_SUFFIXES)}", param_hint="--out"
        )
    _check_new(out_path, overwrite)
    cube, peaks, checkpoint = _detect(input_file, options, out_path)
    write_braggpeaks(peaks, out_path, overwrite=overwrite, calibration=cube.calibration)
    checkpoint.remove()
    counts = peaks.counts()
    click.echo(
        f"wrote {out_path}: {len(peaks)} peaks in {counts.size} patterns "
        f"({counts.mean():.1f} per pattern, {int((counts == 0).sum())} without any)"
    )


# ---- strain ---------------------------------------------------------------------------------
@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@detection_options
@click.option(
    "--reference",
    metavar="RX0:RX1,RY0:RY1",
    help="Reference lattice: median inside this ROI [default: whole scan].",
)
@click.option(
    "--g1",
    metavar="X,Y",
    help="First basis vector (centred detector px); with --g2, skips the automatic choice.",
)
@click.option("--g2", metavar="X,Y", help="Second basis vector (centred detector px).")
@click.option(
    "--min-peaks",
    type=int,
    default=5,
    show_default=True,
    help="Mask positions with fewer indexed peaks.",
)
@click.option(
    "--frame",
    type=click.Choice(["detector", "scan"]),
    default="detector",
    show_default=True,
    help="Axes of the tensor: detector (x = axis -2) or scan (QR rotation/flip of the calibration applied).",
)
@click.option("--peaks-out", help="Also write the detected peaks here (.csv, .h5, .emd).")
@click.option(
    "--out", "-o", required=True, help="Strain file (.h5); PNG maps are written next to it."
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def strain(
    input_file: str,
    reference: str | None,
    g1: str | None,
    g2: str | None,
    min_peaks: int,
    frame: str,
    peaks_out: str | None,
    out: str,
    overwrite: bool,
    **options: Any,
) -> None:
    """Strain map (e_xx, e_yy, e_xy, theta) of INPUT relative to a reference lattice.

    With a probe (--probe, --probe-region or --probe-radius) INPUT is a datacube and its
    disks are detected first; without one INPUT is a peak file (a `stemforge disks` output,
    or py4DSTEM Bragg vectors). The HDF5 output holds e_xx, e_yy, e_xy, theta and mask of
    shape (Rx, Ry): x = detector axis -2, y = axis -1 (or the scan axes with --frame scan),
    tensile positive, theta in rad counter-clockwise.
    """
    from stemforge.infer.bragg_pipeline import measure_strain, write_strain

    out_path = Path(out)
    if out_path.suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(f"{out!r}: the strain file is HDF5 (.h5)", param_hint="--out")
    _check_new(out_path, overwrite)
    if (g1 is None) != (g2 is None):
        raise click.UsageError("give both --g1 and --g2, or neither")
    has_probe = any(options[k] is not None for k in ("probe", "probe_region", "probe_radius"))
    if has_probe:
        from stemforge.infer.bragg_pipeline import with_origin

        cube, peaks, checkpoint = _detect(input_file, options, out_path)
        calibration = with_origin(cube, options["memory_budget"]).calibration
        if peaks_out is not None:
            from stemforge.datasets.io import write_braggpeaks

            write_braggpeaks(peaks, peaks_out, overwrite=overwrite, calibration=calibration)
    else:
        from stemforge.datasets.io import read_braggpeaks_file

        if peaks_out is not None:
            raise click.UsageError("--peaks-out needs a datacube INPUT and a probe")
        found = read_braggpeaks_file(input_file, scan_shape=_scan_shape(options["scan_shape"]))
        peaks, calibration, checkpoint = found.peaks, found.calibration, None
    result = measure_strain(
        peaks,
        calibration,
        g1=_pair(g1, "--g1"),
        g2=_pair(g2, "--g2"),
        reference=_roi(reference, "--reference"),
        min_peaks=min_peaks,
        frame=frame,
    )
    provenance = {"input": str(input_file), "reference_roi": reference, "min_peaks": min_peaks}
    written = write_strain(
        out_path, result, calibration=calibration, provenance=provenance, overwrite=overwrite
    )
    if checkpoint is not None:
        checkpoint.remove()
    valid = result.strain.mask
    click.echo(f"valid lattice fits: {int(valid.sum())} of {valid.size} positions")
    for path in written:
        click.echo(f"wrote {path}")
