"""Files for people and other programs next to a phase map: PNG maps and an ``.ang`` file."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stemforge.infer.map_figures import write_ipf_png, write_map_png, write_phase_png
from stemforge.infer.orientation import OrientationLibrary
from stemforge.infer.orientation_export import (
    AngPhase,
    ipf_colors,
    ipf_key,
    ipf_key_labels,
    write_ang,
)
from stemforge.infer.phase import PhaseMap


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "phase"


def write_phase_outputs(
    result: PhaseMap,
    libraries: Sequence[OrientationLibrary],
    out: str | Path,
    *,
    step: tuple[float, float] = (1.0, 1.0),
) -> list[Path]:
    """PNG maps (phase, score, one IPF-Z map per phase present) and ``OUT.ang``.

    Parameters
    ----------
    result, libraries
        The phase map and the candidates' libraries, in the same order.
    out
        The HDF5 result's path; the files go next to it (``OUT_phase.png``, ...).
    step
        Scan step ``(x, y)`` in Å for the ``.ang`` grid.
    """
    out = Path(out)
    stem = out.with_suffix("")
    written = [
        write_phase_png(
            f"{stem}_phase.png",
            result.phase,
            result.names,
            title="phase (brightness: score)",
            score=result.score,
        ),
        write_map_png(
            f"{stem}_score.png",
            np.where(result.phase >= 0, result.score, np.nan),
            title="match score of the best phase",
            label="cosine score",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
        ),
    ]
    for index, library in enumerate(libraries):
        here = result.phase == index
        if not here.any():
            continue
        system = library.crystal_system
        lattice = library.structure.lattice.matrix
        colors = ipf_colors(result.orientation, library.symmetry, system, lattice=lattice)
        written.append(
            write_ipf_png(
                f"{stem}_ipf_{_slug(library.name)}.png",
                colors,
                mask=here,
                key=ipf_key(library.symmetry, system, lattice=lattice),
                key_labels=ipf_key_labels(library.symmetry, system, lattice=lattice),
                title=f"IPF-Z (beam direction) of {library.name}",
            )
        )
    phases = [AngPhase.from_structure(lib.structure, name=lib.name) for lib in libraries]
    written.append(
        write_ang(
            out.with_suffix(".ang"),
            result.orientation,
            result.phase,
            phases=phases,
            score=np.nan_to_num(result.score),
            reliability=np.nan_to_num(result.reliability, nan=-1.0),
            step=step,
        )
    )
    return written
