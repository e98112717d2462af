"""Bragg peak files between stemforge and py4DSTEM 0.14.18, checked peak for peak.

1. stemforge writes a seeded random peak table (with empty positions and a per-pattern
   origin) to ``.emd``; py4DSTEM opens it with ``py4DSTEM.read`` in its own environment
   (:mod:`py4dstem_env`) and dumps ``.raw[rx, ry]`` and ``.cal[rx, ry]`` (origin + pixel
   size applied) of every position; both must match stemforge's table exactly (calibrated
   ones to 1e-12).
2. py4DSTEM runs ``find_Bragg_disks`` on a small synthetic datacube (a drifting origin, a
   blank pattern), attaches a calibration and saves the BraggVectors; stemforge reads the
   file and must find exactly the vectors py4DSTEM dumped, and the calibration.
3. py4DSTEM's legacy reader and stemforge read the 0.13 PointListArray in
   ``tests/data/py4dstem/braggdisks_cali.h5``; both must give the same peaks.

Prints a report and exits non-zero on any mismatch.

Usage::

    python benchmarks/braggpeaks_interop.py
    python benchmarks/braggpeaks_interop.py --write-fixture tests/data/py4dstem/py4dstem_0.14.18_braggvectors.h5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from py4dstem_env import run_in_py4dstem
from results_table import update_results

from stemforge.core import BraggPeaks, Calibration
from stemforge.datasets.io.braggpeaks_io import read_braggpeaks_file, write_braggpeaks

HERE = Path(__file__).resolve().parent
LEGACY = HERE.parent / "tests" / "data" / "py4dstem" / "braggdisks_cali.h5"

# Dump every position's vectors of a BraggVectors (or 0.13 PointListArray) in row-major order.
_DUMP = """
def dump(raw, cal, shape, out, **extra):
    import numpy as np
    rows = [raw(i, j) for i in range(shape[0]) for j in range(shape[1])]
    kw = dict(counts=np.array([len(r) for r in rows]), Rshape=np.array(shape), **extra)
    for name in ("qx", "qy", "intensity"):
        kw[name] = np.concatenate([np.asarray(r[name], float) for r in rows])
    if cal is not None:
        rows = [cal(i, j) for i in range(shape[0]) for j in range(shape[1])]
        for name in ("qx", "qy"):
            kw["cal_" + name] = np.concatenate([np.asarray(r[name], float) for r in rows])
    np.savez(out, **kw)
"""

# argv: file written by stemforge, npz out
PY4DSTEM_READS = (
    _DUMP
    + """
import sys, numpy as np, py4DSTEM
from py4DSTEM.braggvectors import BraggVectors
bv = py4DSTEM.read(sys.argv[1])
assert isinstance(bv, BraggVectors), type(bv)
cal = None
if bv.calibration.get_origin() is not None:
    bv.setcal(center=True, ellipse=False, pixel=True, rotate=False)
    cal = lambda i, j: bv.cal[i, j].data
dump(lambda i, j: bv.raw[i, j].data, cal, bv.Rshape, sys.argv[2],
     Qshape=np.array(bv.Qshape), Q_pixel_size=bv.calibration.get_Q_pixel_size())
"""
)

# argv: BraggVectors file to write, npz out
PY4DSTEM_WRITES = (
    _DUMP
    + """
import sys, numpy as np, py4DSTEM
from py4DSTEM.braggvectors import find_Bragg_disks
R, Q = (3, 4), (40, 48)
qx, qy = np.arange(Q[0])[:, None], np.arange(Q[1])[None, :]
def blob(x0, y0, s=1.5):
    return np.exp(-((qx - x0) ** 2 + (qy - y0) ** 2) / (2 * s * s))
origin_x = 20 + 0.25 * np.arange(R[0])[:, None] + np.zeros(R)
origin_y = 24 - 0.5 * np.arange(R[1])[None, :] + np.zeros(R)
data = np.zeros(R + Q)
for i in range(R[0]):
    for j in range(R[1]):
        if (i, j) == (2, 3):
            continue  # a blank pattern: no peaks there
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                x = origin_x[i, j] + 9 * a - 3 * b
                y = origin_y[i, j] + 2 * a + 10 * b
                data[i, j] += (1.0 if a == b == 0 else 0.4) * blob(x, y)
cube = py4DSTEM.DataCube(data)
kernel = np.fft.ifftshift(blob(Q[0] // 2, Q[1] // 2))
bv = find_Bragg_disks(cube, kernel, corrPower=1, sigma=0, edgeBoundary=2, minPeakSpacing=4,
                      minRelativeIntensity=0.05, subpixel="poly")
bv.calibration.set_Q_pixel_size(0.05)
bv.calibration.set_Q_pixel_units("A^-1")
bv.calibration.set_origin((origin_x, origin_y))
py4DSTEM.save(sys.argv[1], bv, mode="o")
dump(lambda i, j: bv.raw[i, j].data, None, bv.Rshape, sys.argv[2], Qshape=np.array(bv.Qshape),
     qx0=origin_x, qy0=origin_y)
"""
)

# argv: 0.13 file, group, npz out
PY4DSTEM_READS_LEGACY = (
    _DUMP
    + """
import sys, py4DSTEM
pla = py4DSTEM.read(sys.argv[1], root=sys.argv[2])
dump(lambda i, j: pla[i, j].data, None, pla.shape, sys.argv[3])
"""
)


def _run(script: str, *args: object) -> None:
    done = run_in_py4dstem(script, *map(str, args))
    if done.returncode:
        raise RuntimeError(f"py4DSTEM script failed:\n{done.stderr[-3000:]}")


def _same(peaks: BraggPeaks, dumped: dict) -> bool:
    """Exact equality of a stemforge table with a py4DSTEM dump (same row-major order)."""
    return (
        tuple(dumped["Rshape"]) == peaks.scan_shape
        and np.array_equal(dumped["counts"], peaks.counts().ravel())
        and all(np.array_equal(dumped[k], getattr(peaks, k)) for k in ("qx", "qy", "intensity"))
    )


def random_peaks(seed: int = 0) -> tuple[BraggPeaks, Calibration]:
    """A table over a 7×5 scan, 0–6 peaks per position (some empty), and a calibration."""
    rng = np.random.default_rng(seed)
    scan, detector = (7, 5), (128, 96)
    tables = [
        np.column_stack(
            [rng.uniform(0, detector[0], n), rng.uniform(0, detector[1], n), rng.exponential(1, n)]
        )
        for n in rng.integers(0, 7, scan[0] * scan[1])
    ]
    cal = Calibration(
        q_pixel_size=0.0123,
        q_units="A^-1",
        qx0=64 + rng.normal(0, 0.5, scan),
        qy0=48 + rng.normal(0, 0.5, scan),
    )
    return BraggPeaks.from_patterns(tables, scan, detector), cal


def check_stemforge_to_py4dstem(tmp: Path) -> tuple[bool, str]:
    peaks, cal = random_peaks()
    path = write_braggpeaks(peaks, tmp / "stemforge.emd", calibration=cal)
    _run(PY4DSTEM_READS, path, tmp / "read.npz")
    got = dict(np.load(tmp / "read.npz"))
    cx, cy = peaks.centered(cal.qx0, cal.qy0)
    cal_ok = np.allclose(got["cal_qx"], cx * cal.q_pixel_size, rtol=0, atol=1e-12) and np.allclose(
        got["cal_qy"], cy * cal.q_pixel_size, rtol=0, atol=1e-12
    )
    ok = (
        _same(peaks, got)
        and tuple(got["Qshape"]) == peaks.detector_shape
        and float(got["Q_pixel_size"]) == cal.q_pixel_size
        and cal_ok
    )
    # an empty table without a calibration (py4DSTEM's default one is written)
    empty = BraggPeaks.empty((3, 2), (32, 32))
    _run(PY4DSTEM_READS, write_braggpeaks(empty, tmp / "empty.emd"), tmp / "empty.npz")
    ok = ok and _same(empty, dict(np.load(tmp / "empty.npz")))
    n_empty = int((peaks.counts() == 0).sum())
    return ok, (
        f"stemforge .emd → py4DSTEM.read: {len(peaks)} peaks, {n_empty} empty positions, "
        f"raw exact and .cal (origin + pixel size) to 1e-12; an empty table: "
        f"{'PASS' if ok else 'FAIL'}"
    )


def check_py4dstem_to_stemforge(tmp: Path, fixture: Path | None) -> tuple[bool, str]:
    path = fixture or tmp / "py4dstem_braggvectors.h5"
    _run(PY4DSTEM_WRITES, path, tmp / "written.npz")
    want = dict(np.load(tmp / "written.npz"))
    got = read_braggpeaks_file(path)
    cal = got.calibration
    ok = (
        _same(got.peaks, want)
        and got.peaks.detector_shape == tuple(want["Qshape"])
        and cal is not None
        and cal.q_pixel_size == 0.05
        and np.array_equal(cal.qx0, want["qx0"])
        and np.array_equal(cal.qy0, want["qy0"])
    )
    return ok, (
        f"py4DSTEM find_Bragg_disks + save → stemforge: {len(got.peaks)} peaks over "
        f"{got.peaks.scan_shape}, {int((got.peaks.counts() == 0).sum())} empty, calibration "
        f"(Q 0.05 Å⁻¹, per-pattern origin): {'PASS' if ok else 'FAIL'}"
    )


def check_legacy(tmp: Path) -> tuple[bool, str]:
    got = read_braggpeaks_file(LEGACY)
    _run(PY4DSTEM_READS_LEGACY, LEGACY, got.group, tmp / "legacy.npz")
    ok = _same(got.peaks, dict(np.load(tmp / "legacy.npz")))
    return ok, (
        f"py4DSTEM 0.13 {LEGACY.name}::{got.group}, py4DSTEM's legacy reader vs stemforge: "
        f"{len(got.peaks)} peaks over {got.peaks.scan_shape}: {'PASS' if ok else 'FAIL'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-fixture", type=Path, help="keep py4DSTEM's BraggVectors file at this path"
    )
    options = parser.parse_args()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for check in (
            lambda: check_stemforge_to_py4dstem(Path(tmp)),
            lambda: check_py4dstem_to_stemforge(Path(tmp), options.write_fixture),
            lambda: check_legacy(Path(tmp)),
        ):
            results.append(check())
            print(results[-1][1], flush=True)
    passed = sum(ok for ok, _ in results)
    summary = (
        f"Bragg peak interop with py4DSTEM 0.14.18: {passed} passed, {len(results) - passed} "
        f"failed ({time.perf_counter() - t0:.0f} s)"
    )
    print(summary)
    lines = [f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in results]
    body = "## Bragg peaks: py4DSTEM interoperability\n\n"
    body += "Checked by `python benchmarks/braggpeaks_interop.py` (py4DSTEM in its own venv).\n\n"
    update_results("interop", body + "\n".join(lines) + f"\n\n{summary}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
