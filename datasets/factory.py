"""Run the simulation factory: a resolved preset becomes files on disk.

``kind: patterns`` plans tasks (:mod:`stemforge.simulate.factory`) and builds a sharded,
resumable training set (:mod:`stemforge.datasets.build`). ``kind: strain_scan`` builds the
Si/SiGe strain benchmark: a calibrated 4D-STEM datacube plus its truth maps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import ConfigurationError

#: Files of a strain-scan output folder.
SCAN_FILE = "scan.h5"
TRUTH_FILE = "truth.h5"
PROBE_FILE = "probe.npy"
MANIFEST = "manifest.json"


def _plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def run_factory(cfg: Any) -> Path:
    """Produce what the configuration ``cfg`` (a resolved preset) describes; returns the folder."""
    config = _plain(cfg)
    kind = config.get("kind", "patterns")
    if kind == "patterns":
        return build_patterns(config)
    if kind == "strain_scan":
        return build_strain_scan(config)
    raise ConfigurationError(f"unknown factory kind {kind!r}", "use kind=patterns or kind=strain_scan")


def build_patterns(config: dict[str, Any]) -> Path:
    """A sharded training set of simulated patterns (resumes an interrupted build)."""
    from stemforge.datasets.build import build_dataset
    from stemforge.simulate.factory import plan_tasks, run_task

    tasks = plan_tasks(config)
    return build_dataset(
        config["out"],
        tasks,
        run_task,
        config=config,
        seed=config["seed"],
        samples_per_shard=int(config["samples_per_shard"]),
        client=config["cluster"]["address"],
        n_workers=config["cluster"]["n_workers"],
    )


def diamond_cell(material: Any):  # noqa: ANN202 - pymatgen Structure
    """Diamond-structure conventional cell of a :class:`~stemforge.simulate.strain.Material`:
    its relaxed lattice parameter, every site holding its composition (an alloy's sites are
    mixed: a virtual crystal, :mod:`~stemforge.simulate.virtual_crystal`)."""
    from pymatgen.core import Lattice, Structure

    species = {element: fraction for element, fraction in material.composition}
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(material.a), [species], [[0.0, 0.0, 0.0]])


def build_strain_scan(config: dict[str, Any]) -> Path:
    """The Si/SiGe multilayer strain benchmark: ``scan.h5`` (EMD 1.0) and ``truth.h5``.

    Every layer is simulated once, as a virtual crystal (each site scatters as the mean of
    Si and Ge at the layer's composition, so the SiGe disks differ from the Si reference's
    as a real alloy's do, while the geometry, which strain mapping measures, stays exact),
    viewed along ``zone_axis`` with the growth direction [001] along scan and detector x.
    """
    from stemforge.core.progress import track
    from stemforge.datasets.io import write_datacube
    from stemforge.simulate.factory import thickness_series
    from stemforge.simulate.pattern import simulate_patterns
    from stemforge.simulate.strain import sige_multilayer, strained_scan, truth_to_dict

    out = Path(config["out"])
    ry = int(config["scan_shape"][1])
    scan_shape = (math.ceil(int(config["n_patterns"]) / ry), ry)
    truth = sige_multilayer(scan_shape, float(config["scan_step"]), [tuple(layer) for layer in config["layers"]])
    micro, detector = config["microscope"], config["detector"]
    thickness = thickness_series(config["thickness"])[0]
    calls = []
    probes: list[np.ndarray] = []

    def simulate_fn(strain: np.ndarray, material: Any) -> np.ndarray:
        calls.append(material.name)
        sample = simulate_patterns(
            diamond_cell(material),
            tuple(config["zone_axis"]),
            thicknesses=[thickness],
            energy=float(micro["energy"]),
            semiangle=float(micro["semiangle"]),
            n_pixels=int(detector["n_pixels"]),
            q_pixel_size=float(detector["q_pixel_size"]),
            strain=strain,
            x_reflection=(0, 0, 1),
            phonons=int(config["phonons"]),
            seed=int(config["seed"]),
            device=str(config["device"]),
            engine=str(config["engine"]),
        )[0]
        probes.append(sample.probe)
        return sample.cbed

    states = len({(m, *h.round(10).ravel()) for m, h in zip(truth.material.ravel(), truth.applied_strain().reshape(-1, 9), strict=True)})
    for _ in track(range(1), 1, f"simulating {states} strain states"):
        cube, truth = strained_scan(
            truth,
            simulate_fn,
            q_pixel_size=float(detector["q_pixel_size"]),
            energy=float(micro["energy"]),
            semiangle=float(micro["semiangle"]),
        )
    out.mkdir(parents=True, exist_ok=True)
    write_datacube(cube, out / SCAN_FILE, overwrite=True)
    _write_truth(out / TRUTH_FILE, truth_to_dict(truth))
    # The vacuum probe on the same detector grid: the template for disk detection.
    with atomic_output(out / PROBE_FILE, overwrite=True) as tmp:
        np.save(tmp, probes[0])
    manifest = {
        "kind": "strain_scan",
        "config": config,
        "seed": config["seed"],
        "scan_shape": list(scan_shape),
        "simulations": len(calls),
        "files": [SCAN_FILE, TRUTH_FILE, PROBE_FILE],
    }
    with atomic_output(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return out


def _write_truth(path: Path, truth: dict[str, Any]) -> None:
    """Truth maps as HDF5 datasets (``e_xx, e_yy, e_xy, theta, e_zz, material``) + JSON attrs."""
    import h5py

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        for name, value in truth.items():
            if isinstance(value, np.ndarray):
                f.create_dataset(name, data=value)
            else:
                f.attrs[name] = json.dumps(value)
