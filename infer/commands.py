"""Command-line commands of the analysis stage: info, virtual, calibrate, demo.

Only click is imported at module level: the CLI root lists these commands without
loading NumPy-heavy or torch code; each command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path

import click

SCAN_SHAPE_HELP = "Scan shape RX,RY for formats that do not store it (.mib, .npy stacks)."


def _scan_shape(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        rx, ry = (int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not RX,RY (two integers)", param_hint="--scan-shape") from None
    return rx, ry


def _open(  # noqa: ANN202 - DataCube
    path: str,
    scan_shape: str | None,
    lazy: bool | None = None,
    memory_budget: str | None = None,
    scheduler: str | None = None,
):
    """Open a datacube: lazily when larger than ``memory_budget`` or when run on a cluster
    (whose workers then read their own blocks from the file), unless ``lazy`` says otherwise."""
    from stemforge.datasets.io import read_datacube
    from stemforge.datasets.io.memory import parse_size

    if lazy is None and scheduler is not None:
        lazy = True
    budget = None if memory_budget is None else parse_size(memory_budget)
    return read_datacube(path, scan_shape=_scan_shape(scan_shape), lazy=lazy, memory_budget=budget)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _print_table(title: str, rows: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)


lazy_option = click.option(
    "--lazy/--eager", default=None, help="Force lazy (Dask) or in-memory reading; default: by size."
)
scan_shape_option = click.option("--scan-shape", metavar="RX,RY", help=SCAN_SHAPE_HELP)
memory_budget_option = click.option(
    "--memory-budget",
    metavar="SIZE",
    help="Memory for the data, e.g. 256MB: larger files are read lazily, in blocks that fit "
    "[default: $STEMFORGE_MEMORY_BUDGET, else a quarter of the free memory].",
)

scheduler_option = click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Run on dask.distributed: 'local' (a LocalCluster, one single-threaded worker "
    "process per core), a number of local workers, or a scheduler address tcp://HOST:PORT. "
    "Workers read their blocks from the file (on a remote cluster it must be on a shared "
    "filesystem).",
)


# ---- info -----------------------------------------------------------------------------------
@click.command()
@click.argument("file", type=click.Path(path_type=str))
@scan_shape_option
@memory_budget_option
def info(file: str, scan_shape: str | None, memory_budget: str | None) -> None:
    """Describe a datacube: shape, dtype, size, calibration, lazy or in memory."""
    cube = _open(file, scan_shape, memory_budget=memory_budget)
    rows = {
        "file": str(file),
        "shape (Rx, Ry, Qx, Qy)": str(cube.shape),
        "dtype": str(cube.dtype),
        "size": _human_bytes(cube.nbytes),
        "storage": f"lazy (Dask, chunks {cube.data.chunksize})" if cube.is_lazy else "in memory",
    }
    rows.update(cube.calibration.summary())
    _print_table(f"stemforge info: {cube.name}", rows)


# ---- virtual --------------------------------------------------------------------------------
@click.command()
@click.argument("file", type=click.Path(path_type=str))
@click.option(
    "--detector",
    "-d",
    "detectors",
    multiple=True,
    metavar="SPEC",
    help="bf | bf:R | adf | adf:R0,R1 | annulus:R0,R1 | circle:QX,QY,R (centre relative to "
    "the origin) | MASK.npy. Repeat for several images from one pass over the data. "
    "Bare bf/adf take the bright-field disk measured from the data.",
)
@click.option(
    "--units",
    type=click.Choice(["px", "mrad", "A^-1"]),
    default="px",
    show_default=True,
    help="Units of the numbers in detector specs (mrad and A^-1 need a calibrated Q).",
)
@click.option(
    "--centered",
    is_flag=True,
    help="Centre detectors on each pattern's own origin (from the calibration; measured by "
    "centre of mass now if the file has none).",
)
@click.option(
    "--pattern",
    type=click.Choice(["mean", "max"]),
    help="Write the mean or max diffraction pattern over the scan instead of (or as well as) images.",
)
@click.option("--out", "-o", required=True, help="Output .npy, .png or .tif; several outputs get -NAME added.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@memory_budget_option
@scheduler_option
@scan_shape_option
@lazy_option
def virtual(
    file: str,
    detectors: tuple[str, ...],
    units: str,
    centered: bool,
    pattern: str | None,
    out: str,
    overwrite: bool,
    memory_budget: str | None,
    scheduler: str | None,
    scan_shape: str | None,
    lazy: bool | None,
) -> None:
    """Virtual images (bright field, annular dark field, any mask) and virtual diffraction.

    With --scheduler the datacube is read lazily and the images are computed chunk by chunk
    on the cluster's workers, each reading its chunks from the file.
    """
    from stemforge.core.errors import ConfigurationError
    from stemforge.infer.image_output import check_image_path, write_image

    out_path = check_image_path(out)
    if not detectors and pattern is None:
        raise ConfigurationError("nothing to compute", "give --detector SPEC (repeatable) and/or --pattern mean|max")
    from stemforge.infer.virtual import virtual_from_specs

    cube = _open(file, scan_shape, lazy, memory_budget, scheduler)
    if centered and detectors and not cube.calibration.has_origin:
        from stemforge.infer.calibrate import measure_origin

        click.echo("origin not calibrated: measuring it by centre of mass (run `stemforge calibrate` to keep it)")
        _, _, fit = measure_origin(cube)
        cube = cube.with_calibration(cube.calibration.replace(qx0=fit.qx0, qy0=fit.qy0))
    with _cluster(scheduler):  # the default Dask scheduler inside: lazy cubes compute there
        results = virtual_from_specs(
            cube, detectors, units=units, centered=centered, pattern=pattern
        )
    paths = output_paths(out_path, list(results))
    for path in paths.values():  # refuse before writing anything
        if path.exists() and not overwrite:
            raise ConfigurationError(f"{path} already exists", "choose another --out or pass --overwrite")
    for name, image in results.items():
        write_image(paths[name], image, log=name in ("mean", "max"), overwrite=overwrite)
        click.echo(f"wrote {paths[name]}  ({name}, shape {image.shape})")


def _cluster(scheduler: str | None):  # noqa: ANN202 - a context manager
    """A dask.distributed client for ``--scheduler`` (the default scheduler while open), or
    nothing."""
    if scheduler is None:
        from contextlib import nullcontext

        return nullcontext()
    from stemforge.core.cluster import connect

    return connect(scheduler)


def output_paths(out: Path, names: list[str]) -> dict[str, Path]:
    """One output file per result: ``out`` itself for a single one, else ``stem-NAME.ext``."""
    if len(names) == 1:
        return {names[0]: out}
    return {name: out.with_name(f"{out.stem}-{name}{out.suffix}") for name in names}


# ---- calibrate ------------------------------------------------------------------------------
def _load_npy(path: str | None, what: str):  # noqa: ANN202 - ndarray or None
    if path is None:
        return None
    import numpy as np

    from stemforge.core.errors import FileFormatError, MissingFileError

    if not Path(path).is_file():
        raise MissingFileError(f"{what} file {path} does not exist", f"check the path to the {what}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FileFormatError(f"cannot read {what} {path}: {exc}", "save it with numpy.save") from exc


def _pair(value: str | None, option: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        a, b = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not two numbers A,B", param_hint=option) from None
    return a, b


@click.command()
@click.argument("file", type=click.Path(path_type=str))
@click.option(
    "--method",
    type=click.Choice(["com", "xcorr", "friedel"]),
    default="com",
    show_default=True,
    help="Origin per pattern: centre of mass of the central disk, cross-correlation with --probe, "
    "or Friedel symmetry (works with a beam stop given as --beamstop).",
)
@click.option("--probe", help="Vacuum probe image (.npy) for --method xcorr.")
@click.option("--beamstop", help="Boolean .npy mask, True on usable pixels (--method friedel).")
@click.option(
    "--fit",
    "drift",
    type=click.Choice(["plane", "poly2", "poly3", "constant", "none"]),
    default="plane",
    show_default=True,
    help="Robust fit of the origin drift over the scan (none keeps the raw measurements).",
)
@click.option("--ring", metavar="R0,R1", help="Annulus (px) around a ring of the mean pattern: fits the ellipse.")
@click.option("--known-spacing", type=float, metavar="D", help="d-spacing (Å) of the --ring: sets the Q pixel size.")
@click.option("--energy", type=float, help="Beam energy in eV (e.g. 300e3).")
@click.option("--semiangle", type=float, help="Probe convergence semiangle in mrad.")
@click.option("--r-pixel-size", type=float, help="Scan step, in --r-units.")
@click.option("--r-units", type=click.Choice(["A", "nm"]), default="A", show_default=True)
@click.option("--q-pixel-size", type=float, help="Detector pixel size, in --q-units (overridden by --known-spacing).")
@click.option("--q-units", type=click.Choice(["A^-1", "nm^-1", "mrad"]), default="A^-1", show_default=True)
@click.option("--out", help="Write the calibration (JSON) here instead of next to the data / into the EMD file.")
@click.option("--report", "report_dir", help="Folder for PNG maps of the origin and the mean pattern.")
@memory_budget_option
@scan_shape_option
@lazy_option
def calibrate(
    file: str,
    method: str,
    probe: str | None,
    beamstop: str | None,
    drift: str,
    ring: str | None,
    known_spacing: float | None,
    energy: float | None,
    semiangle: float | None,
    r_pixel_size: float | None,
    r_units: str,
    q_pixel_size: float | None,
    q_units: str,
    out: str | None,
    report_dir: str | None,
    memory_budget: str | None,
    scan_shape: str | None,
    lazy: bool | None,
) -> None:
    """Measure the origin of every pattern (and its drift), the ellipse and the Q pixel size.

    The calibration is written into an EMD/py4DSTEM .h5 file, or next to other formats as
    FILE.calibration.json, where every other command finds it.
    """
    from stemforge.core.errors import ConfigurationError
    from stemforge.infer.calibrate import calibrate_datacube, write_calibration_report

    if method == "xcorr" and probe is None:
        raise ConfigurationError("--method xcorr needs a template", "give --probe PROBE.npy (a vacuum probe image)")
    cube = _open(file, scan_shape, lazy, memory_budget)
    manual = {
        key: value
        for key, value in {
            "energy": energy,
            "convergence_semiangle": semiangle,
            "r_pixel_size": r_pixel_size,
            "q_pixel_size": q_pixel_size,
        }.items()
        if value is not None
    }
    if r_pixel_size is not None:
        manual["r_units"] = r_units
    if q_pixel_size is not None:
        manual["q_units"] = q_units
    cube = cube.with_calibration(cube.calibration.replace(**manual))
    result = calibrate_datacube(
        cube,
        method=method,
        template=_load_npy(probe, "probe"),
        mask=_load_npy(beamstop, "beam-stop mask"),
        drift=drift,
        ring=_pair(ring, "--ring"),
        known_spacing=known_spacing,
    )
    written = _write_calibration(file, result.calibration, out)
    _print_table(f"stemforge calibrate: {cube.name}", result.calibration.summary())
    click.echo(f"wrote {written}")
    if report_dir is not None:
        for path in write_calibration_report(result, report_dir):
            click.echo(f"wrote {path}")


def _write_calibration(file: str, calibration, out: str | None) -> Path:  # noqa: ANN001 - Calibration
    if out is None:
        from stemforge.datasets.io import write_calibration

        return write_calibration(file, calibration)
    from stemforge.core.atomic import atomic_output

    with atomic_output(out) as tmp:
        tmp.write_text(calibration.to_json())
    return Path(out)


# ---- demo -----------------------------------------------------------------------------------
@click.command()
@click.option("--input", "input_file", required=True, help="A datacube in any supported format.")
@click.option("--out", "out_dir", default="demo_out", show_default=True, help="Folder for the outputs.")
@scan_shape_option
def demo(input_file: str, out_dir: str, scan_shape: str | None) -> None:
    """The end-to-end example: calibrate a datacube and image it; simulate a 40 nm strained
    Si/SiGe multilayer and map its strain from correlation and FCU-Net disks against the
    truth; map the phases of a simulated two-phase scan; write summary.json and report.html."""
    from stemforge.infer.demo import run_demo

    for path in run_demo(input_file, out_dir, scan_shape=_scan_shape(scan_shape)):
        click.echo(f"wrote {path}")
