"""``stemforge identify``: crystal system, space group and lattice of a scan's patterns.

Only click is imported at module level; the command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stemforge.infer.bragg_commands import _check_new, _detect, _roi, detection_options
from stemforge.infer.commands import _scan_shape


@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@detection_options
@click.option(
    "--identifier",
    "identifier",
    help="Identification model: zoo NAME[@VERSION] or a .skops file [default: crystal_id].",
)
@click.option(
    "--q-pixel-size",
    type=float,
    metavar="INV_A",
    help="Reciprocal pixel size (Å⁻¹ per pixel) [default: from the file].",
)
@click.option(
    "--energy",
    type=float,
    metavar="EV",
    help="Beam energy (eV), for files calibrated in mrad [default: from the file].",
)
@click.option(
    "--roi",
    metavar="RX0:RX1,RY0:RY1",
    help="Aggregate only these scan positions [default: all with enough spots].",
)
@click.option(
    "--out",
    "-o",
    required=True,
    help="Result: .json or .h5; a crystal-system map PNG goes next to it.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def identify(
    input_file: str,
    identifier: str | None,
    q_pixel_size: float | None,
    energy: float | None,
    roi: str | None,
    out: str,
    overwrite: bool,
    **options: Any,
) -> None:
    """Identify the crystal of INPUT: crystal system, space group, lattice a b c α β γ.

    With a probe (--probe, --probe-region or --probe-radius) INPUT is a datacube, or a .npy
    stack (N, Qx, Qy), and its disks are detected first (--method correlation|fcunet);
    without one INPUT is a peak file (`stemforge disks` output or py4DSTEM Bragg vectors).
    Every pattern gets probabilities; the patterns of --roi (default all) are aggregated by
    summed log-probabilities into one answer with a confidence.
    """
    from stemforge.infer.identify import (
        DEFAULT_MODEL,
        identify_scan,
        load_identifier,
        write_identification,
    )

    out_path = Path(out)
    if out_path.suffix.lower() not in (".json", ".h5", ".hdf5"):
        raise click.BadParameter(f"{out!r}: use .json or .h5", param_hint="--out")
    _check_new(out_path, overwrite)
    has_probe = any(options[k] is not None for k in ("probe", "probe_region", "probe_radius"))
    checkpoint = None
    if has_probe:
        from stemforge.infer.bragg_pipeline import with_origin

        cube, peaks, checkpoint = _detect(input_file, options, out_path)
        calibration = with_origin(cube, options["memory_budget"]).calibration
    else:
        from stemforge.datasets.io import read_braggpeaks_file

        found = read_braggpeaks_file(input_file, scan_shape=_scan_shape(options["scan_shape"]))
        peaks, calibration = found.peaks, found.calibration
    if energy is not None:
        calibration = calibration.replace(energy=energy)
    if q_pixel_size is not None:
        if q_pixel_size <= 0:
            raise click.BadParameter("must be positive", param_hint="--q-pixel-size")
        calibration = calibration.replace(q_pixel_size=q_pixel_size, q_units="A^-1")
    model = load_identifier(identifier)
    result = identify_scan(peaks, calibration, model, roi=_roi(roi, "--roi"))
    written = write_identification(result, out_path, identifier or DEFAULT_MODEL)
    if checkpoint is not None:
        checkpoint.remove()
    agg = result.aggregate
    lattice = (
        ", ".join(f"{v:.3f}" for v in agg.lattice[:3])
        + ", "
        + ", ".join(f"{v:.1f}" for v in agg.lattice[3:])
    )
    click.echo(
        f"{agg.crystal_system} (confidence {agg.confidence:.2f}), space group {agg.space_group}, "
        f"lattice {lattice} from {agg.n_patterns} patterns"
    )
    click.echo("wrote " + ", ".join(str(p) for p in written))
