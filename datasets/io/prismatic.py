"""Prismatic simulation output (EMD 0.x): ``4DSTEM_simulation/data/datacubes/*/datacube``.

Prismatic labels its dimension vectors ``[n_m]`` and ``[n_m^-1]`` but writes the probe
positions in Å and the detector frequencies in Å⁻¹ (its internal units): in Si100_4D.emd
the scan step equals the ``rx`` parameter (0.5 Å) and the frequency step is 1/5.43 Å⁻¹ for
a 5.43 Å cell. The values are therefore read as Å and Å⁻¹ and the labels ignored (read as
nm, as RosettaSciIO does, every size would be ten times too large).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.errors import FileFormatError
from stemforge.datasets.io.hdf5 import open_h5
from stemforge.datasets.io.jsonable import to_jsonable
from stemforge.datasets.io.lazy import H5Source, as_dask, file_token
from stemforge.datasets.io.memory import chunk_target, want_lazy

FORMAT = "Prismatic EMD"
SIMULATION = "4DSTEM_simulation"
DATACUBES = f"{SIMULATION}/data/datacubes"
PARAMETERS = f"{SIMULATION}/metadata/metadata_0/original/simulation_parameters"


def is_prismatic(f: Any) -> bool:
    """Whether an open h5py File is Prismatic output."""
    return DATACUBES in f


def _positive(params: dict[str, Any], key: str, scale: float = 1.0) -> float | None:
    value = params.get(key)
    return float(value) * scale if value is not None and np.isfinite(value) and value > 0 else None


def read_prismatic(
    path: Path, *, select: str | None, lazy: bool | None, memory_budget: int | None
) -> tuple[Any, Calibration, dict]:
    """Read one thickness of a Prismatic 4D output (the first unless ``select`` names one).

    Returns
    -------
    data, calibration, metadata
        Pixel sizes from the dimension vectors, origin where the frequency is zero, beam
        energy (``E``, keV) and probe semiangle (``sa``, mrad) from the simulation
        parameters.
    """
    with open_h5(path) as f:
        names = sorted(k for k in f[DATACUBES] if "datacube" in f[DATACUBES][k])
        name = (select or "").split("/")[-1] or (names[0] if names else None)
        if name not in names:
            raise FileFormatError(
                f"{path} has no Prismatic datacube {name!r}", f"choose one of {names} (FILE::NAME)"
            )
        group = f[f"{DATACUBES}/{name}"]
        dset = group["datacube"]
        r_step = float(group["dim1"][1] - group["dim1"][0])
        qx, qy = group["dim3"][()], group["dim4"][()]
        params = (
            {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f[PARAMETERS].attrs.items()}
            if PARAMETERS in f
            else {}
        )
        shape, dtype, dset_name = tuple(dset.shape), dset.dtype, dset.name
        if want_lazy(int(np.prod(shape)) * dtype.itemsize, lazy, memory_budget):
            source = H5Source(path, dset_name, shape, dtype)
            data = as_dask(source, file_token(path, dset_name), chunk_target(memory_budget))
        else:
            data = dset[()]
    q_step = float(qx[1] - qx[0])
    calibration = Calibration(
        r_pixel_size=r_step,
        r_units="A",
        q_pixel_size=q_step,
        q_units="A^-1",
        energy=_positive(params, "E", 1e3),  # keV → eV
        convergence_semiangle=_positive(params, "sa"),
        qx0=float(-qx[0] / q_step),
        qy0=float(-qy[0] / float(qy[1] - qy[0])),
    )
    metadata = {
        "format": FORMAT,
        "emd_path": f"{DATACUBES}/{name}",
        "datacubes_in_file": names,
        "simulation_parameters": to_jsonable(params),
    }
    return data, calibration, metadata
