"""The demo: a real datacube calibrated and imaged, simulated samples mapped and scored.

Part one opens a real datacube, calibrates its origin and writes virtual images. Part two
simulates a thick (40 nm) strained Si/SiGe multilayer with abTEM (the factory's
``sige_strain_scan``, on a smaller scan), finds its Bragg disks twice, by correlation and
with the shipped FCU-Net (the zoo's embedded default, offline), maps the strain of both
against the same reference region and scores both against the truth. Part three simulates
the phase test scan (rocksalt MgO and perovskite SrTiO3 grains around amorphous Si,
:func:`~stemforge.simulate.phase_scan.default_phase_scan`) and maps phase, orientation and
the amorphous region against the truth. Everything ends in ``summary.json`` (the numbers)
and ``report.html`` (tables and figures, self-contained; :mod:`demo_report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.infer import demo_report as report
from stemforge.infer.calibrate import calibrate_datacube, write_calibration_report
from stemforge.infer.image_output import write_image
from stemforge.infer.virtual import estimate_bright_field, virtual_from_specs

#: Reach (Å⁻¹) of the phase demo's libraries: inside the 128-pixel detector's 1.6 Å⁻¹ edge.
PHASE_Q_MAX = 1.55
#: Thickness (Å) of the strained sample: 40 nm, thick enough that dynamical scattering
#: fills the disks unevenly (the regime FCU-Net is trained for, up to 40 nm).
STRAIN_THICKNESS = 400.0
#: The strained sample of the demo: the strain benchmark preset on a 24×10 scan (3 abTEM
#: simulations, one per composition: about a minute at 40 nm on 2 cores).
STRAIN_OVERRIDES = (
    "n_patterns=240",
    "scan_shape=[24,10]",
    "scan_step=5.0",
    f"thickness={{min:{STRAIN_THICKNESS},max:{STRAIN_THICKNESS},step:50.0}}",
)
#: Disk detection methods of the strain demo: label → (detect_bragg_peaks method, file stem).
STRAIN_METHODS = {"correlation": ("correlation", "strain"), "FCU-Net": ("fcunet", "strain_fcunet")}
STRAIN_KEY = "strain of a simulated Si/SiGe multilayer"
PHASE_KEY = "phases of a simulated MgO / SrTiO3 / amorphous scan"
REPORT_FILE = "report.html"


def strain_scores(strain: Any, truth: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    """Valid fits, RMSE of every component against the truth and per-material means.

    ``strain`` is a :class:`~stemforge.infer.strain.StrainMap`; ``truth`` holds the true
    ``e_xx, e_yy, e_xy, theta`` maps and the ``material`` index, ``names`` the materials'
    names. RMSE over the valid positions: strain in %, rotation in mrad.
    """
    mask = strain.mask

    def r4(value: float) -> float | None:  # None (JSON null) where nothing was measured
        return round(value, 4) + 0.0 if np.isfinite(value) else None  # + 0.0: no "-0.0"

    def rmse(name: str) -> float:
        if not mask.any():
            return float("nan")
        return float(np.sqrt(np.mean((getattr(strain, name)[mask] - truth[name][mask]) ** 2)))

    layers = {}
    for m in np.unique(truth["material"]):
        here = truth["material"] == m
        valid = here & mask
        layers[f"material {m}"] = {
            "name": names[m] if m < len(names) else str(m),
            "positions": int(here.sum()),
            "true e_xx (%)": r4(float(truth["e_xx"][here].mean()) * 100),
            "measured e_xx (%)": r4(float(strain.e_xx[valid].mean()) * 100)
            if valid.any()
            else None,
            "true e_yy (%)": r4(float(truth["e_yy"][here].mean()) * 100),
            "measured e_yy (%)": r4(float(strain.e_yy[valid].mean()) * 100)
            if valid.any()
            else None,
        }
    return {
        report.VALID: f"{int(mask.sum())} of {mask.size}",
        report.RMSE_STRAIN: {name: r4(rmse(name) * 100) for name in ("e_xx", "e_yy", "e_xy")},
        report.RMSE_THETA: r4(rmse("theta") * 1000),
        report.LAYERS: layers,
    }


def run_strain_demo(
    out_dir: Path, overrides: Sequence[str] = STRAIN_OVERRIDES
) -> tuple[list[Path], dict, list[Path]]:
    """Simulate the thick multilayer, map its strain by correlation and by FCU-Net.

    ``overrides`` of the factory's ``sige_strain_scan`` preset (default: the demo's
    40 nm, 24×10 scan; ``benchmarks/fcunet_strain.py`` runs the whole preset).

    Returns
    -------
    written, summary, figures
        Files written; the summary (the correlation's scores at its top level, as before
        FCU-Net joined, and the FCU-Net's under ``"FCU-Net"``); the comparison figures.
    """
    import h5py

    from stemforge.datasets.commands import compose_config
    from stemforge.datasets.factory import PROBE_FILE, SCAN_FILE, TRUTH_FILE, run_factory
    from stemforge.datasets.io import read_datacube, write_braggpeaks
    from stemforge.infer.bragg_pipeline import detect_bragg_peaks, measure_strain, write_strain
    from stemforge.infer.fcunet_detect import DEFAULT_MODEL
    from stemforge.models.zoo.registry import resolve

    folder = out_dir / "strained_sample"
    config = compose_config("sige_strain_scan", [f"out={folder}", *overrides])
    run_factory(config)
    cube = read_datacube(folder / SCAN_FILE)
    probe = np.load(folder / PROBE_FILE)
    with h5py.File(folder / TRUTH_FILE) as f:
        truth = {name: f[name][...] for name in ("e_xx", "e_yy", "e_xy", "theta", "material")}
        materials = json.loads(f.attrs["attrs"])["materials"] if "attrs" in f.attrs else []
    names = [m["name"] for m in materials]
    # reference: the Si substrate, the last scan rows; the same region for both methods
    substrate = np.flatnonzero(np.all(truth["material"] == 0, axis=1))
    rows = (int(substrate[-3]), int(substrate[-1]) + 1)
    roi = (slice(*rows), slice(None))
    model = resolve(DEFAULT_MODEL)
    written: list[Path] = []
    scores: dict[str, dict[str, Any]] = {}
    maps: dict[str, dict[str, np.ndarray]] = {}
    for label, (method, stem) in STRAIN_METHODS.items():
        start = time.perf_counter()
        peaks = detect_bragg_peaks(cube, probe, method=method)
        elapsed = time.perf_counter() - start
        result = measure_strain(peaks, cube.calibration, reference=roi)
        written.append(
            write_braggpeaks(
                peaks, out_dir / f"{stem}_peaks.h5", overwrite=True, calibration=cube.calibration
            )
        )
        provenance = {"demo": STRAIN_KEY, "disk detection": method}
        if method == "fcunet":
            provenance["model"] = f"{model.name}@{model.version}"
        written += write_strain(
            out_dir / f"{stem}.h5",
            result,
            calibration=cube.calibration,
            provenance=provenance,
            overwrite=True,
        )
        scores[label] = {
            report.PEAKS: round(float(peaks.counts().mean()), 2),
            **strain_scores(result.strain, truth, names),
            report.DETECTION_TIME: round(elapsed, 1),
        }
        maps[label] = {
            name: getattr(result.strain, name) for name in ("e_xx", "e_yy", "e_xy", "theta")
        }
    micro = config.microscope
    thickness = float(config.thickness.max)
    layers = " / ".join(names[1:]) if len(names) > 1 else "SiGe"
    summary: dict[str, Any] = {
        "datacube": "×".join(map(str, cube.shape)),
        "sample": (
            f"Si/SiGe multilayer ({layers} layers, pseudomorphic, virtual crystals) on a Si substrate, "
            f"zone axis {list(config.zone_axis)}, {thickness / 10:g} nm thick, "
            f"{float(micro.energy) / 1e3:g} kV, {float(micro.semiangle):g} mrad, "
            f"scan step {float(config.scan_step):g} Å, multislice ({config.engine} engine), noise-free"
        ),
        "thickness (nm)": thickness / 10,
        "reference lattice": f"median of the Si substrate, scan rows {rows[0]}–{rows[1] - 1}",
        **scores["correlation"],
        "FCU-Net": {"model": f"{model.name}@{model.version}", **scores["FCU-Net"]},
    }
    step = float(config.scan_step)
    figures = [
        report.write_strain_comparison(
            out_dir / f"strain_compare_{name}.png",
            name,
            truth[name],
            {label: m[name] for label, m in maps.items()},
            step=step,
        )
        for name in report.COMPONENTS
    ]
    figures.append(
        report.write_strain_profile(out_dir / "strain_profile.png", truth, maps, step=step)
    )
    return written + figures, summary, figures


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
    strain_files, summary[STRAIN_KEY], strain_figures = run_strain_demo(out_dir)
    written += strain_files
    phase_files, summary[PHASE_KEY] = run_phase_demo(out_dir)
    written += phase_files
    summary_path = out_dir / "summary.json"
    with atomic_output(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    written.append(summary_path)
    figures = {
        "calibration": [
            (
                out_dir / "origin.png",
                "Origin of every pattern: measured, drift-plane fit, residual.",
            ),
            (out_dir / "mean_pattern_calibration.png", "Mean pattern (log) with the mean origin."),
        ],
        "virtual": [
            (out_dir / f"{name}.png", caption)
            for name, caption in (
                ("bf", "Virtual bright field (centred)."),
                ("adf", "Virtual annular dark field (centred)."),
                ("mean", "Mean diffraction pattern (log)."),
                ("max", "Maximum diffraction pattern (log)."),
            )
        ],
        "strain": [(path, _STRAIN_CAPTIONS.get(path.stem, "")) for path in strain_figures],
        "phase": [
            (path, _phase_caption(path.stem)) for path in phase_files if path.suffix == ".png"
        ],
    }
    written.append(write_demo_report(out_dir / REPORT_FILE, summary, figures))
    return written


_STRAIN_CAPTIONS = {
    f"strain_compare_{name}": f"{label}: the truth, both methods' maps on the same colour "
    "scale, and their errors (map − truth) on a second shared scale. Grey: no valid fit."
    for name, label in (("e_xx", "e_xx"), ("e_yy", "e_yy"), ("e_xy", "e_xy"), ("theta", "θ"))
}
_STRAIN_CAPTIONS["strain_profile"] = (
    "e_xx and e_yy across the layers, averaged along scan y (bars: spread along y); "
    "dashed lines: layer boundaries."
)


def _phase_caption(stem: str) -> str:
    if stem.endswith("_phase"):
        return "Phase map (brightness: match score; grey: amorphous or not indexed)."
    if stem.endswith("_score"):
        return "Match score of the best phase."
    if "_ipf_" in stem:
        return f"Orientation (IPF-Z, beam direction) of the {stem.split('_ipf_', 1)[1]} grains."
    return ""


def write_demo_report(
    path: Path, summary: dict[str, Any], figures: dict[str, list[tuple[Path, str]]]
) -> Path:
    """The self-contained HTML report of the demo: the summary's tables and the figures."""
    overview = {
        key: summary[key]
        for key in (
            "input",
            "shape (Rx, Ry, Qx, Qy)",
            "dtype",
            "bright-field disk radius (px)",
            "origin residual from the drift fit, RMS (px)",
            "outlier patterns (weight 0)",
        )
    }
    strain = summary[STRAIN_KEY]
    methods = {"correlation": strain, "FCU-Net": strain["FCU-Net"]}
    about = {
        key: strain[key] for key in ("datacube", "sample", "thickness (nm)", "reference lattice")
    }
    about["FCU-Net model"] = strain["FCU-Net"]["model"]
    virtual = {
        name: f"{'×'.join(map(str, v['shape']))}, {v['min']:.6g} … {v['max']:.6g}"
        for name, v in summary["virtual images"].items()
    }
    pixels = [p for p, _ in figures["virtual"]]
    sections = [
        (
            "Part 1 · a real datacube: calibration and virtual images",
            report.key_value_table(overview)
            + "<h3>Calibration</h3>"
            + report.key_value_table(summary["calibration"])
            + report.figures_html(figures["calibration"])
            + "<h3>Virtual images (shape, range)</h3>"
            + report.key_value_table(virtual)
            + report.figures_html(figures["virtual"], pixels=pixels),
        ),
        (
            "Part 2 · strain of a simulated thick Si/SiGe multilayer: correlation vs FCU-Net",
            report.key_value_table(about)
            + "<h3>Error against the truth (RMSE over valid fits)</h3>"
            + report.strain_error_table(methods)
            + report.note(
                "Strain components in %, rotation θ in mrad; Biot strain relative to the "
                "reference lattice, tensile positive, x = detector axis −2 (the growth "
                "direction). Detection time: this run, this machine."
            )
            + "<h3>Per material (mean over its positions)</h3>"
            + report.strain_layer_table(methods)
            + report.figures_html(figures["strain"]),
        ),
        (
            "Part 3 · phases of a simulated MgO / SrTiO3 / amorphous scan",
            report.key_value_table(summary[PHASE_KEY]) + report.figures_html(figures["phase"]),
        ),
        (
            "Files",
            report.note(
                "All numbers are in summary.json next to this report; strain maps in "
                "strain.h5 (correlation) and strain_fcunet.h5 (FCU-Net), the phase map in "
                "phase.h5."
            ),
        ),
    ]
    return report.write_html_report(path, title="stemforge demo", sections=sections)
