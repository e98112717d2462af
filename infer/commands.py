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


def _open(path: str, scan_shape: str | None, lazy: bool | None = None):  # noqa: ANN202 - DataCube
    from stemforge.datasets.io import read_datacube

    return read_datacube(path, scan_shape=_scan_shape(scan_shape), lazy=lazy)


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


# ---- info -----------------------------------------------------------------------------------
@click.command()
@click.argument("file", type=click.Path(path_type=str))
@scan_shape_option
def info(file: str, scan_shape: str | None) -> None:
    """Describe a datacube: shape, dtype, size, calibration, lazy or in memory."""
    cube = _open(file, scan_shape)
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
    scan_shape: str | None,
    lazy: bool | None,
) -> None:
    """Virtual images (bright field, annular dark field, any mask) and virtual diffraction."""
    from stemforge.core.errors import ConfigurationError
    from stemforge.infer.image_output import check_image_path, write_image

    out_path = check_image_path(out)
    if not detectors and pattern is None:
        raise ConfigurationError("nothing to compute", "give --detector SPEC (repeatable) and/or --pattern mean|max")
    cube = _open(file, scan_shape, lazy)
    results = compute_virtual(cube, detectors, units=units, centered=centered, pattern=pattern)
    paths = output_paths(out_path, list(results))
    for path in paths.values():  # refuse before writing anything
        if path.exists() and not overwrite:
            raise ConfigurationError(f"{path} already exists", "choose another --out or pass --overwrite")
    for name, image in results.items():
        write_image(paths[name], image, log=name in ("mean", "max"), overwrite=overwrite)
        click.echo(f"wrote {paths[name]}  ({name}, shape {image.shape})")


def output_paths(out: Path, names: list[str]) -> dict[str, Path]:
    """One output file per result: ``out`` itself for a single one, else ``stem-NAME.ext``."""
    if len(names) == 1:
        return {names[0]: out}
    return {name: out.with_name(f"{out.stem}-{name}{out.suffix}") for name in names}


def compute_virtual(
    cube,  # noqa: ANN001 - DataCube; imported lazily
    detector_specs: tuple[str, ...] | list[str],
    *,
    units: str = "px",
    centered: bool = False,
    pattern: str | None = None,
) -> dict:
    """Virtual images (and a virtual diffraction pattern) by name, as the CLI computes them."""
    from stemforge.infer.detectors import parse_detector
    from stemforge.infer.virtual import (
        default_origin,
        estimate_bright_field,
        sample_patterns,
        virtual_diffraction,
        virtual_images,
    )

    results = {}
    if pattern is not None:
        results[pattern] = virtual_diffraction(cube, pattern)
    if not detector_specs:
        return results
    if centered and not cube.calibration.has_origin:
        from stemforge.infer.origin import find_origin

        click.echo("origin not calibrated: measuring it by centre of mass (run `stemforge calibrate` to keep it)")
        qx0, qy0 = find_origin(cube, method="com")
        cube = cube.with_calibration(cube.calibration.replace(qx0=qx0, qy0=qy0))
    bf_radius = max_radius = None
    if any(spec.strip().lower() in ("bf", "adf") for spec in detector_specs):
        _, _, bf_radius = estimate_bright_field(sample_patterns(cube))
        ox, oy = default_origin(cube)
        max_radius = min(ox, oy, cube.shape[2] - 1 - ox, cube.shape[3] - 1 - oy)
    dets = [
        parse_detector(s, units=units, calibration=cube.calibration, bf_radius=bf_radius, max_radius=max_radius)
        for s in detector_specs
    ]
    names = [d.name for d in dets]
    if len(set(names)) != len(names):
        from stemforge.core.errors import ConfigurationError

        raise ConfigurationError(f"detectors share a name: {names}", "give each --detector once")
    images = virtual_images(cube, dets, follow_origin=centered)
    results.update(zip(names, images, strict=True))
    return results
