"""Command-line command ``stemforge amorphous``: radial profiles, FEM, halo, rPDF, classes.

Only click is imported at module level (the CLI root lists commands without loading NumPy);
the command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stemforge.infer.commands import _load_npy, _open, _pair, lazy_option, scan_shape_option


def _ellipse(value: str | None) -> tuple[float, float, float] | None:
    """``A,B,THETA`` (θ in degrees) → ``(a, b, θ in rad)``."""
    if value is None:
        return None
    import math

    try:
        a, b, theta = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not A,B,THETA (three numbers)", param_hint="--ellipse"
        ) from None
    return a, b, math.radians(theta)


def _calibrated(cube: Any, options: dict[str, Any]) -> Any:  # DataCube
    """``cube`` with the calibration options applied over the file's own calibration."""
    changes: dict[str, Any] = {}
    if options["q_pixel_size"] is not None:
        changes.update(q_pixel_size=options["q_pixel_size"], q_units=options["q_units"])
    if options["energy"] is not None:
        changes["energy"] = options["energy"]
    origin = _pair(options["origin"], "--origin")
    if origin is not None:
        changes.update(qx0=origin[0], qy0=origin[1])
    ellipse = _ellipse(options["ellipse"])
    if ellipse is not None:
        changes["ellipse"] = ellipse
    return cube.with_calibration(cube.calibration.replace(**changes)) if changes else cube


def _d_spacings(cube: Any, summary: Any, options: dict[str, Any]) -> Any:  # ndarray | None
    """Reflections detected at the crystalline positions, tabulated and indexed."""
    from stemforge.infer.amorphous import d_spacing_table, index_d_spacings, reflection_lengths
    from stemforge.infer.bragg_commands import _roi
    from stemforge.infer.bragg_pipeline import detect_bragg_peaks, vacuum_probe
    from stemforge.infer.candidates import load_candidates

    crystalline = summary.maps["crystalline"]
    if not crystalline.any():
        click.echo("no crystalline positions: no d-spacing table")
        return None
    probe = vacuum_probe(
        cube,
        probe=_load_npy(options["probe"], "--probe"),
        region=_roi(options["probe_region"], "--probe-region"),
        radius=options["probe_radius"],
    )
    peaks = detect_bragg_peaks(cube, probe, max_bytes=options["memory_budget"])
    q_pixel = summary.settings["q_pixel_size"]
    lengths, intensity = reflection_lengths(
        peaks, cube.calibration, crystalline, summary.settings["q_range"][0]
    )
    # Peaks of one reflection scatter by a fraction of a pixel: clusters one pixel wide.
    table = d_spacing_table(lengths, intensity, tolerance=q_pixel)
    indexed = index_d_spacings(table, load_candidates(options["candidates"]), q_pixel)
    for row in indexed:
        name = row["candidate"].decode() or "unindexed"
        click.echo(f"  d = {row['d']:.4f} Å  ({row['count']} peaks)  {name} {row['hkl'].decode()}")
    return indexed


@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, help="Output HDF5 (AMORPH.h5); PNG maps go beside it.")
@click.option("--q-pixel-size", type=float, help="Detector pixel size, in --q-units.")
@click.option(
    "--q-units", type=click.Choice(["A^-1", "nm^-1", "mrad"]), default="A^-1", show_default=True
)
@click.option("--energy", type=float, help="Beam energy in eV (needed with --q-units mrad).")
@click.option(
    "--origin",
    metavar="QX0,QY0",
    help="Fixed origin (px) [default: the file's calibration, else measured per pattern].",
)
@click.option(
    "--ellipse",
    metavar="A,B,THETA",
    help="Elliptical distortion: semi-axes and angle of A from qx in degrees "
    "[default: the file's calibration, else none].",
)
@click.option(
    "--q-range",
    metavar="Q0,Q1",
    help="Window (Å⁻¹) of the halo fit, classifier and rPDF [default: outside the central "
    "disk to the detector edge].",
)
@click.option(
    "--smooth", type=float, help="Classifier smoothing (px) [default: half the disk radius]."
)
@click.option(
    "--contrast",
    type=float,
    default=10.0,
    show_default=True,
    help="Classifier: a Bragg feature exceeds this many times its ring's lower quartile.",
)
@click.option(
    "--threshold",
    type=float,
    default=0.1,
    show_default=True,
    help="Classifier: crystalline above this Bragg fraction.",
)
@click.option("--r-max", type=float, default=10.0, show_default=True, help="Range of G(r), Å.")
@click.option("--probe", help="Vacuum probe (.npy): detect reflections for the d-spacing table.")
@click.option("--probe-region", metavar="RX0:RX1,RY0:RY1", help="Vacuum positions as the probe.")
@click.option("--probe-radius", type=float, metavar="PX", help="Synthetic disk probe radius.")
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    metavar="CIF|ID",
    help="Structure to index the d-spacings against (file or structure id); repeatable.",
)
@click.option("--memory-budget", help="Read the datacube in blocks of about this size, e.g. 256MB.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@scan_shape_option
@lazy_option
def amorphous(input_file: str, out: str, overwrite: bool, **options: Any) -> None:
    """Amorphous / short-range-order maps of INPUT.

    Every pattern is polar-transformed about its origin with the elliptical distortion
    undone. The HDF5 output holds per position the radial mean, variance and normalised
    variance (FEM) profiles, the halo position (Å⁻¹), d = 1/q (Å) and width, the Bragg
    fraction and the crystalline/amorphous class; for the scan the FEM variances, mean
    profiles, the halo and reduced PDF G(r) of the amorphous positions, and with a probe
    (--probe, --probe-region or --probe-radius) the d-spacings of the crystalline
    positions indexed against --candidate structures. Needs a Q calibration: from the file,
    or --q-pixel-size.
    """
    from stemforge.core.errors import ConfigurationError
    from stemforge.infer.amorphous import AmorphousMapper, AmorphousSettings, write_amorphous

    out_path = Path(out)
    if out_path.suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(f"{out!r}: the output is HDF5 (.h5)", param_hint="--out")
    if out_path.exists() and not overwrite:
        raise click.UsageError(f"{out_path} exists; pass --overwrite to replace it")
    has_probe = any(options[k] is not None for k in ("probe", "probe_region", "probe_radius"))
    if options["candidates"] and not has_probe:
        raise ConfigurationError(
            "--candidate indexes detected reflections, but no probe was given to detect them",
            "add --probe PROBE.npy, --probe-region RX0:RX1,RY0:RY1 or --probe-radius PX",
        )
    opened = _open(input_file, options["scan_shape"], options["lazy"], options["memory_budget"])
    cube = _calibrated(opened, options)
    settings = AmorphousSettings(
        q_range=_pair(options["q_range"], "--q-range"),
        smooth=options["smooth"],
        contrast=options["contrast"],
        threshold=options["threshold"],
        r_max=options["r_max"],
    )
    mapper = AmorphousMapper(cube, settings, options["memory_budget"])

    def d_spacings(summary: Any) -> dict[str, Any]:
        table = _d_spacings(mapper.cube, summary, options) if has_probe else None
        return {} if table is None else {"d_spacings": table}

    provenance = {"input": str(input_file), **{k: v for k, v in options.items() if v}}
    written, summary = write_amorphous(
        out_path, mapper, extra=d_spacings, provenance=provenance, overwrite=overwrite
    )
    crystalline = summary.maps["crystalline"]
    click.echo(
        f"crystalline: {int(crystalline.sum())}, amorphous: {int((~crystalline).sum())} "
        f"of {crystalline.size} positions"
    )
    if summary.halo is not None:
        h = summary.halo
        click.echo(
            f"amorphous halo: q = {h.q[0]:.4f} Å⁻¹ (d = {h.d[0]:.4f} Å), FWHM {h.fwhm[0]:.4f} Å⁻¹"
        )
    for path in written:
        click.echo(f"wrote {path}")
