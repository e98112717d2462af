"""The demo: open a real datacube, calibrate it, write virtual images and a summary.

Later stages extend it into the full pipeline (simulate → train → infer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.infer.calibrate import calibrate_datacube, write_calibration_report
from stemforge.infer.image_output import write_image
from stemforge.infer.virtual import estimate_bright_field, virtual_from_specs


def run_demo(input_file: str | Path, out_dir: str | Path, scan_shape: tuple[int, int] | None = None) -> list[Path]:
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
        "origin residual from the drift fit, RMS (px)": round(float(np.sqrt(np.nanmean(residual**2))), 4),
        "outlier patterns (weight 0)": int(np.sum(result.drift.weights == 0)),
        "virtual images": {
            name: {"shape": list(image.shape), "min": float(image.min()), "max": float(image.max())}
            for name, image in images.items()
        },
    }
    summary_path = out_dir / "summary.json"
    with atomic_output(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    written.append(summary_path)
    return written
