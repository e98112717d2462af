"""``stemforge phase``: which candidate phase is where, in which orientation.

Only click is imported at module level; the command imports what it needs when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from stemforge.infer.bragg_commands import (
    _check_new,
    _peaks_for,
    calibration_options,
    detection_options,
)


def _q_max(calibration: Any, cube: Any, peaks: Any) -> float:
    """Default library reach (Å⁻¹): the detector's inscribed circle, or the spots' extent."""
    import numpy as np

    from stemforge.infer.lattice import spot_lists

    if cube is not None:
        qx0 = np.nanmedian(np.asarray(calibration.qx0, float))
        qy0 = np.nanmedian(np.asarray(calibration.qy0, float))
        nx, ny = cube.detector_shape
        edge = min(qx0, qy0, nx - 1 - qx0, ny - 1 - qy0)
        return float(edge * calibration.q_pixel_size_inv_angstrom)
    q = spot_lists(peaks, calibration)[0]
    return float(np.percentile(np.hypot(q[:, 0], q[:, 1]), 99)) if len(q) else 1.5


@click.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("more_candidates", metavar="[CANDIDATE]...", nargs=-1)
@click.option(
    "--candidates",
    "candidate_flag",
    metavar="CIF|ID|NAME",
    multiple=True,
    help="Candidate structures, in order (phase i = the i-th): files, structure ids "
    "(mp-…, aflow-proto:…) or AFLOW prototype names; more may follow as arguments.",
)
@detection_options
@calibration_options
@click.option(
    "--q-max",
    type=float,
    metavar="INV_A",
    help="Spots up to this |q| take part (Å⁻¹) [default: the detector's inscribed circle].",
)
@click.option(
    "--angle-step",
    type=float,
    default=2.0,
    show_default=True,
    help="Library step (degrees) over beam directions and in-plane angles.",
)
@click.option(
    "--thickness",
    type=float,
    default=100.0,
    show_default=True,
    help="Thickness (Å) for the kinematic intensities' excitation-error tolerance.",
)
@click.option(
    "--semiangle",
    type=float,
    help="Convergence semiangle (mrad) of the library patterns [default: from the file, or 1].",
)
@click.option(
    "--sigma-q",
    type=float,
    default=0.04,
    show_default=True,
    help="Spot position tolerance (Å⁻¹) of the comparison.",
)
@click.option(
    "--min-score",
    type=float,
    default=0.3,
    show_default=True,
    help="Positions whose best candidate scores lower get phase -1.",
)
@click.option("--no-refine", is_flag=True, help="Keep the library's grid orientations.")
@click.option(
    "--amorphous/--no-amorphous",
    default=True,
    show_default=True,
    help="With a datacube: mark positions without Bragg peaks (diffuse rings only) as -1.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    help="Result .h5; PNG maps and an .ang file (orix/MTEX) go next to it.",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def phase(
    input_file: str,
    more_candidates: tuple[str, ...],
    candidate_flag: tuple[str, ...],
    q_max: float | None,
    angle_step: float,
    thickness: float,
    semiangle: float | None,
    sigma_q: float,
    min_score: float,
    no_refine: bool,
    amorphous: bool,
    out: str,
    overwrite: bool,
    **options: Any,
) -> None:
    """Phase and orientation map of INPUT against candidate structures.

    Example: ``stemforge phase scan.h5 --candidates A.cif B.cif --probe probe.npy --out
    phase.h5``. With a probe (--probe, --probe-region or --probe-radius) INPUT is a datacube
    whose disks are detected first (--method correlation|fcunet); without one INPUT is a
    peak file. Every candidate gets an orientation library over its fundamental zone
    (kinematic, with excitation errors); every pattern is matched to every library and
    refined. The HDF5 output holds `phase` (index of the candidate, -1 where none fits or
    the material is amorphous), `score`, `margin` over the runner-up, `orientation`
    (Rx, Ry, 3, 3), `euler`, `zone_axis`, `reliability`, per-candidate `scores` and NNLS
    `fractions`; PNGs show the phase, score and inverse-pole-figure maps; OUT.ang holds the
    orientations for orix / MTEX.
    """
    from stemforge.core.errors import ConfigurationError
    from stemforge.infer.candidates import load_candidates
    from stemforge.infer.orientation import LibrarySettings, build_library
    from stemforge.infer.phase import phase_summary, phases_from_peaks, write_phase_map
    from stemforge.infer.phase_figures import write_phase_outputs

    out_path = Path(out)
    if out_path.suffix.lower() not in (".h5", ".hdf5"):
        raise click.BadParameter(f"{out!r}: the output is HDF5 (.h5)", param_hint="--out")
    _check_new(out_path, overwrite)
    specs = (*candidate_flag, *more_candidates)
    if not specs:
        raise click.UsageError("give the candidate structures: --candidates A.cif B.cif ...")
    candidates = load_candidates(specs)
    peaks, calibration, cube, checkpoint = _peaks_for(input_file, options, out_path)
    if calibration.energy is None:
        raise ConfigurationError("the beam energy is not known", "pass --energy EV (e.g. 300e3)")
    reach = q_max if q_max is not None else _q_max(calibration, cube, peaks)
    settings = LibrarySettings(
        energy=float(calibration.energy),
        q_max=reach,
        thickness=thickness,
        semiangle=semiangle or calibration.convergence_semiangle or 1.0,
        angle_step=angle_step,
        sigma_q=sigma_q,
    )
    libraries = []
    for name, structure in candidates.items():
        libraries.append(build_library(structure, settings, name=name))
        click.echo(f"{name}: library of {len(libraries[-1])} beam directions")
    result = phases_from_peaks(
        peaks,
        calibration,
        libraries,
        cube=cube,
        find_amorphous=amorphous,
        max_bytes=options["memory_budget"],
        min_score=min_score,
        refine=not no_refine,
    )
    provenance = {
        "input": str(input_file),
        "candidates": list(specs),
        "q_max": reach,
        **{k: v for k, v in options.items() if v is not None},
    }
    written = [write_phase_map(result, out_path, libraries, provenance=provenance, overwrite=True)]
    written += write_phase_outputs(result, libraries, out_path, step=_scan_step(calibration))
    if checkpoint is not None:
        checkpoint.remove()
    click.echo(phase_summary(result))
    click.echo("wrote " + ", ".join(str(p) for p in written))


def _scan_step(calibration: Any) -> tuple[float, float]:
    """Scan step (x, y) in Å for the .ang grid (1 per position when uncalibrated)."""
    from stemforge.core.units import normalize_r_units, r_to_angstrom

    if normalize_r_units(calibration.r_units) == "pixels":
        return (1.0, 1.0)
    step = r_to_angstrom(calibration.r_pixel_size, calibration.r_units)
    return (step, step)
