"""``stemforge identify``: crystal system, space group and lattice of a scan's patterns.

Only click is imported at module level; the command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stemforge.infer.bragg_commands import (
    _check_new,
    _peaks_for,
    _roi,
    calibration_options,
    detection_options,
)


@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@detection_options
@click.option(
    "--identifier",
    "identifier",
    help="Identification model: zoo NAME[@VERSION] or a .skops file [default: crystal_id].",
)
@calibration_options
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
    peaks, calibration, _, checkpoint = _peaks_for(input_file, options, out_path)
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
