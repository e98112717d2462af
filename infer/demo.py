"""The demo: a real datacube calibrated and imaged, simulated samples mapped and scored.

Part one opens a real datacube, calibrates its origin and writes virtual images. Part two
simulates a small Si/SiGe multilayer with abTEM (the factory's ``sige_strain_scan``, made
small), finds its Bragg disks by correlation, maps the strain and scores it against the
truth. Part three simulates the phase test scan (rocksalt MgO and perovskite SrTiO3 grains
around amorphous Si, :func:`~stemforge.simulate.phase_scan.default_phase_scan`) and maps
phase, orientation and the amorphous region against the truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.infer.calibrate import calibrate_datacube, write_calibration_report
from stemforge.infer.image_output import write_image
from stemforge.infer.virtual import estimate_bright_field, virtual_from_specs

#: Reach (Å⁻¹) of the phase demo's libraries: inside the 128-pixel detector's 1.6 Å⁻¹ edge.
PHASE_Q_MAX = 1.55
#: The strained sample of the demo: the strain benchmark preset, small enough for a minute.
STRAIN_OVERRIDES = (
    "n_patterns=240",
    "scan_shape=[24,10]",
    "scan_step=5.0",
    "thickness={min:100.0,max:100.0,step:50.0}",
)


def run_strain_demo(out_dir: Path) -> tuple[list[Path], dict]:
    """Simulate the small multilayer, map its strain; returns files written and a summary."""
    import h5py

    from stemforge.datasets.commands import compose_config
    from stemforge.datasets.factory import PROBE_FILE, SCAN_FILE, TRUTH_FILE, run_factory
    from stemforge.datasets.io import read_datacube, write_braggpeaks
    from stemforge.infer.bragg_pipeline import detect_bragg_peaks, measure_strain, write_strain

    folder = out_dir / "strained_sample"
    run_factory(compose_config("sige_strain_scan", [f"out={folder}", *STRAIN_OVERRIDES]))
    cube = read_datacube(folder / SCAN_FILE)
    peaks = detect_bragg_peaks(cube, np.load(folder / PROBE_FILE))
    with h5py.File(folder / TRUTH_FILE) as f:
        truth = {name: f[name][...] for name in ("e_xx", "e_yy", "e_xy", "theta", "material")}
    # reference: the Si substrate, the last scan rows
    substrate = np.flatnonzero(np.all(truth["material"] == 0, axis=1))
    roi = (slice(int(substrate[-3]), int(substrate[-1]) + 1), slice(None))
    result = measure_strain(peaks, cube.calibration, reference=roi)
    written = [
        write_braggpeaks(
            peaks, out_dir / "strain_peaks.h5", overwrite=True, calibration=cube.calibration
        )
    ]
    written += write_strain(
        out_dir / "strain.h5", result, calibration=cube.calibration, overwrite=True
    )
    mask = result.strain.mask
    errors = {
        name: round(
            float(np.sqrt(np.mean((getattr(result.strain, name)[mask] - truth[name][mask]) ** 2)))
            * 100,
            4,
        )
        for name in ("e_xx", "e_yy", "e_xy")
    }
    layers = {
        f"material {m}": {
            "true e_xx (%)": round(float(truth["e_xx"][truth["material"] == m].mean()) * 100, 4),
            "measured e_xx (%)": round(
                float(np.nanmean(result.strain.e_xx[truth["material"] == m])) * 100, 4
            ),
        }
        for m in np.unique(truth["material"])
    }
    summary = {
        "datacube": "×".join(map(str, cube.shape)),
        "peaks per pattern": round(float(peaks.counts().mean()), 2),
        "valid lattice fits": f"{int(mask.sum())} of {mask.size}",
        "strain RMSE against truth (%)": errors,
        "layers": layers,
    }
    return written, summary


def run_phase_demo(out_dir: Path) -> tuple[list[Path], dict]:
    """Simulate the two-phase + amorphous test scan, map it; returns files and a summary."""
    from stemforge.infer.bragg_pipeline import detect_bragg_peaks
    from stemforge.infer.orientation import LibrarySettings, build_library
    from stemforge.infer.phase import phase_scores, phases_from_peaks, write_phase_map
    from stemforge.infer.phase_figures import write_phase_outputs
    from stemforge.simulate.phase_scan import default_candidates, default_phase_scan

    cube, truth = default_phase_scan()
    written = [truth.save(out_dir / "phase_truth.h5")]
    peaks = detect_bragg_peaks(cube, truth.probe)
    calibration = cube.calibration
    settings = LibrarySettings(
        energy=calibration.energy,
        q_max=PHASE_Q_MAX,
        semiangle=calibration.convergence_semiangle,
    )
    libraries = [build_library(s, settings) for s in default_candidates()]
    result = phases_from_peaks(peaks, calibration, libraries, cube=cube)
    path = out_dir / "phase.h5"
    written.append(write_phase_map(result, path, libraries, overwrite=True))
    written += write_phase_outputs(result, libraries, path, step=(truth.step, truth.step))
    summary = {
        "datacube": "×".join(map(str, cube.shape)),
        "candidates": [lib.name for lib in libraries],
        "grains": truth.description,
        **phase_scores(result, truth, [lib.symmetry for lib in libraries]),
    }
    return written, summary


def run_demo(
    input_file: str | Path, out_dir: str | Path, scan_shape: tuple[int, int] | None = None
) -> list[Path]:
    """Run the demo on ``input_file``; returns the files written under ``out_dir``."""
    from stemforge.datasets.io import read_datacube

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube = read_datacube(input_file, scan_shape=scan_shape)
    result = calibrate_datacube(cube, method="com", drift="plane")
    cube = cube.with_calibration(result.calibration)
    written = write_calibration_report(result, out_dir)

    calibration_json = out_dir / "calibration.json"
    with atomic_output(calibration_json) as tmp:
        tmp.write_text(result.calibration.to_json())
    written.append(calibration_json)

    images = virtual_from_specs(cube, ["bf", "adf"], centered=True)
    images["mean"] = result.mean_pattern
    images["max"] = virtual_from_specs(cube, [], pattern="max")["max"]
    for name, image in images.items():
        log = name in ("mean", "max")
        written.append(write_image(out_dir / f"{name}.png", image, log=log))
        written.append(write_image(out_dir / f"{name}.npy", image))

    disk = estimate_bright_field(result.mean_pattern)
    residual = np.hypot(result.drift.qx0_residual, result.drift.qy0_residual)
    summary = {
        "input": str(input_file),
        "shape (Rx, Ry, Qx, Qy)": list(cube.shape),
        "dtype": str(cube.dtype),
        "calibration": result.calibration.summary(),
        "bright-field disk radius (px)": None if disk is None else round(disk[2], 3),
        "origin residual from the drift fit, RMS (px)": round(
            float(np.sqrt(np.nanmean(residual**2))), 4
        ),
        "outlier patterns (weight 0)": int(np.sum(result.drift.weights == 0)),
        "virtual images": {
            name: {"shape": list(image.shape), "min": float(image.min()), "max": float(image.max())}
            for name, image in images.items()
        },
    }
    strain_files, summary["strain of a simulated Si/SiGe multilayer"] = run_strain_demo(out_dir)
    written += strain_files
    phase_files, summary["phases of a simulated MgO / SrTiO3 / amorphous scan"] = run_phase_demo(
        out_dir
    )
    written += phase_files
    summary_path = out_dir / "summary.json"
    with atomic_output(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    written.append(summary_path)
    return written
