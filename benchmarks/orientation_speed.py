"""Orientation matching (ACOM) on the CPU: stemforge against py4DSTEM ``match_orientations``.

Both matchers get the same spot lists and a library of the same angular step, and run one
after the other on the same machine, single process, with the same thread settings (the
script re-executes itself with ``OMP/OPENBLAS/MKL/NUMEXPR/VECLIB/NUMBA_NUM_THREADS`` set to
``--threads``, default 2; py4DSTEM's process inherits them). Timed: the matching of every
position, after a warm-up on a few patterns, as wall time (positions/s, the figure of the
target) and as process CPU time (steadier on a shared machine); not timed: building the
library (py4DSTEM's ``orientation_plan``), reported beside it. stemforge runs at the same
step and, as py4DSTEM scores every template twice (``inversion_symmetry``) on a somewhat
denser zone-axis grid, also at a finer step (``--dense-step``) where it scores at least as
many orientations per pattern.

Data sets
---------
*Synthetic* (truth known): spot lists from stemforge's kinematic simulator
(``simulate.kinematic.kinematic_spots``, 300 kV, 10 nm, 1 mrad, in-plane |q| ≤ 1.6 Å⁻¹) of
``scipy`` ``Rotation.random`` orientations ``U`` (crystal Cartesian frame of the conventional
standard cell → lab; lab x = qx, y = qy, z = beam), with the imperfections of measured
lists: Gaussian position noise (σ = 0.005 Å⁻¹ per axis), log-normal intensity noise (20 %),
spots weaker than 1 % of the strongest dropped, and the direct beam at the origin (small
position noise, 10× the strongest diffracted spot) as disk detection reports it. Crystals:
spinel LiMn2O4 (Fd-3m, cubic, the real scan's candidate) and monoclinic Li2MnO3 (C2/m, a
4× larger fundamental sector), from the CIFs in ``tests/data/py4dstem``.

*Real*: py4DSTEM's test scan ``tests/data/py4dstem/braggdisks_cali.h5`` (80×58 positions of
measured, calibrated Bragg peaks in Å⁻¹, direct beam included), matched against LiMn2O4 up
to 2.0 Å⁻¹ (of the three candidate CIFs the one whose py4DSTEM map is the most coherent:
72 % of neighbouring positions within 2°, LiCoO2 41 %). No truth: the table gives how often
the two matchers agree, and how coherent each one's map is (neighbours within 2°).

Accuracy: misorientation to the truth (or between the two matchers), the smallest rotation
angle over the proper rotations of the crystal's Laue group (24 for m-3m, 4 for 2/m; from
pymatgen here, independent of the matcher's own tables). Positions a matcher leaves
unmatched count as failures (infinite misorientation) in the percentiles.

py4DSTEM 0.14.18 runs in its own venv (``py4dstem_env.py``). Its settings: the defaults of
``orientation_plan`` (corr_kernel_size 0.08 Å⁻¹, sigma_excitation_error 0.02 Å⁻¹, powers 1 /
0.25 / 0.25) and ``match_orientations`` (inversion_symmetry, min_number_peaks 3), with
``angle_step_zone_axis = angle_step_in_plane = --step`` and ``k_max`` = the data's q range.
That venv has no pymatgen, which ``Crystal.from_CIF`` and ``zone_axis_range="auto"`` need: the
crystal is built from stemforge's conventional cell as ``from_CIF`` would build it (fractional
positions, Z, occupancies and the cell parameters a b c α β γ, so py4DSTEM lays it out in its
own Cartesian setting, a along x and b in the xy plane, which its zone-axis ranges assume;
a 3×3 lattice in pymatgen's setting put the 2-fold axis of Li2MnO3 where py4DSTEM's "2/m"
range does not expect it and lost half of the orientations), the zone-axis range is the
entry of py4DSTEM's own ``orientation_ranges`` table for the point group (what ``"auto"``
picks), and the results are rotated back into stemforge's setting. Peaks are handed over as
a ``BraggVectors`` in detector pixels with an origin and a Q pixel size (no ellipse or
rotation calibration), as ``match_orientations`` expects.

Frames: py4DSTEM's ``orientation.matrix`` M maps lab to crystal (its columns are the lab
axes in the crystal frame, column 2 the zone axis) and its excitation errors assume the beam
along −z (``k0 = [0, 0, −1/λ]``); with its x, y equal to the detector's, its lab frame is ours
mirrored in z, so with Friedel's law the same pattern belongs to ``U = diag(−1, −1, 1) @ Mᵀ``
(checked: this conversion gives the small misorientations, Mᵀ alone does not).

Usage::

    python benchmarks/orientation_speed.py                  # 20-30 min on 2 cores
    python benchmarks/orientation_speed.py --positions 2000 --step 1.5
    python benchmarks/orientation_speed.py --skip-py4dstem  # stemforge only, no ratios
    python benchmarks/orientation_speed.py --quick          # smoke run, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from py4dstem_env import run_in_py4dstem
from results_table import update_results

SECTION = "orientation"
HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data" / "py4dstem"
REAL_SCAN = DATA / "braggdisks_cali.h5"
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
)
#: The synthetic patterns: beam, sample, detector reach, imperfections.
ENERGY = 300e3
THICKNESS = 100.0  # Å
SEMIANGLE = 1.0  # mrad
Q_MAX = 1.6  # Å⁻¹, synthetic detector reach (and both libraries' q range)
Q_MAX_REAL = 2.0  # Å⁻¹, the real scan's peaks reach 2.0
POSITION_NOISE = 0.005  # Å⁻¹ per axis
INTENSITY_NOISE = 0.2  # log-normal σ
DETECTION_THRESHOLD = 0.01  # of the strongest diffracted spot
DIRECT_BEAM = 10.0  # × the strongest diffracted spot
#: py4DSTEM sees the peaks in detector pixels: q = (raw − origin) × pixel size.
PIXEL_SIZE = 0.01  # Å⁻¹ / pixel
ORIGIN = (200.25, 199.75)  # pixels
DETECTOR = (400, 400)
#: Lab frame of py4DSTEM's results → ours (see the module docstring); also the 180° turn
#: about the beam.
PY4DSTEM_TO_LAB = FLIP = np.diag([-1.0, -1.0, 1.0])

PY4DSTEM_SCRIPT = """
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from emdfile import PointListArray
from py4DSTEM.braggvectors import BraggVectors
from py4DSTEM.process.diffraction import Crystal
from py4DSTEM.process.diffraction.crystal_ACOM import orientation_ranges

data_file, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
d = np.load(data_file)
# a, b, c, α, β, γ as from_CIF passes them: py4DSTEM's own setting (a along x, b in xy)
crystal = Crystal(d["frac"], d["numbers"], d["cell"], occupancy=d["occupancy"])
start = time.perf_counter()
crystal.calculate_structure_factors(k_max=cfg["k_max"])
zone_range, fiber_axis, fiber_angles = orientation_ranges[cfg["point_group"]]  # as "auto"
if isinstance(zone_range, list):
    zone_range = np.array(zone_range, float)
crystal.orientation_plan(
    zone_axis_range=zone_range, fiber_axis=fiber_axis, fiber_angles=fiber_angles,
    angle_step_zone_axis=cfg["step"], angle_step_in_plane=cfg["step"],
    accel_voltage=cfg["energy"], progress_bar=False,
)
plan_seconds = time.perf_counter() - start

shape, offsets = tuple(int(v) for v in d["scan_shape"]), d["offsets"]
pix, (x0, y0) = cfg["pixel_size"], cfg["origin"]
pla = PointListArray(
    dtype=[("qx", np.float64), ("qy", np.float64), ("intensity", np.float64)], shape=shape
)
for i in range(shape[0] * shape[1]):
    lo, hi = offsets[i], offsets[i + 1]
    rows = np.zeros(hi - lo, pla.dtype)
    rows["qx"] = d["raw_qx"][lo:hi]
    rows["qy"] = d["raw_qy"][lo:hi]
    rows["intensity"] = d["intensity"][lo:hi]
    pla[divmod(i, shape[1])].add(rows)
bv = BraggVectors(shape, tuple(cfg["detector"]))
bv.set_raw_vectors(pla)
bv.calibration.set_Q_pixel_size(pix)
bv.calibration.set_Q_pixel_units("A^-1")
bv.calibration.set_origin((np.full(shape, x0), np.full(shape, y0)))
bv.setcal(center=True, ellipse=False, pixel=True, rotate=False)

for i in range(min(5, shape[0] * shape[1])):  # warm-up
    rx, ry = divmod(i, shape[1])
    vectors = bv.get_vectors(rx, ry, center=True, ellipse=False, pixel=True, rotate=False)
    crystal.match_single_pattern(vectors)
seconds, cpu = float("inf"), float("inf")
for _ in range(cfg["repeats"]):  # best of
    start, start_cpu = time.perf_counter(), time.process_time()
    found = crystal.match_orientations(bv, progress_bar=False)
    seconds = min(seconds, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
np.savez(
    out,
    matrix=found.matrix[:, :, 0].reshape(-1, 3, 3),
    corr=found.corr[:, :, 0].reshape(-1),
    lattice=crystal.lat_real,
)
print(json.dumps({
    "seconds": seconds,
    "cpu_seconds": cpu,
    "plan_seconds": plan_seconds,
    "zones": int(crystal.orientation_num_zones),
    "in_plane": int(crystal.orientation_in_plane_steps),
    "shells": int(crystal.orientation_shell_radii.size),
}))
"""


@dataclass
class SpotData:
    """One data set: CSR spot lists in Å⁻¹ (lab frame, direct beam included) and the truth."""

    name: str
    structure: object  # pymatgen conventional standard cell: the crystal frame
    q: np.ndarray  # (N, 2)
    intensity: np.ndarray  # (N,)
    offsets: np.ndarray  # (P + 1,)
    scan_shape: tuple[int, int]
    q_max: float
    truth: np.ndarray | None = None  # (P, 3, 3) crystal → lab
    note: str = ""

    @property
    def positions(self) -> int:
        return len(self.offsets) - 1


@dataclass
class Run:
    """One matcher on one data set."""

    matcher: str
    rotation: np.ndarray  # (P, 3, 3), NaN where unmatched
    seconds: float  # wall time of the matching (best of the repeats)
    cpu_seconds: float  # process CPU time of the matching, all threads (best of the repeats)
    library: str  # its grid, in words
    evaluated: int  # orientations scored per pattern
    build_seconds: float
    load: tuple[float, float]  # 1-min load average before / after the timed run


# ---- data ----------------------------------------------------------------------------------


def load_structure(name: str):
    """The conventional standard cell of a candidate CIF (the crystal frame of everything)."""
    from pymatgen.core import Structure

    from stemforge.simulate.orientation import conventional_standard_structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CIF parser chatter
        return conventional_standard_structure(Structure.from_file(DATA / f"{name}.cif"))


def synthetic(name: str, positions: int, seed: int) -> SpotData:
    """Kinematic spot lists of ``positions`` random orientations, with measurement imperfections."""
    from scipy.spatial.transform import Rotation

    from stemforge.simulate.kinematic import kinematic_spots, reciprocal_lattice

    structure = load_structure(name)
    crystal = reciprocal_lattice(structure, Q_MAX * 1.05)
    truth = Rotation.random(positions, random_state=seed).as_matrix()
    rng = np.random.default_rng(seed + 1)
    tables = []
    for u in truth:
        q, intensity, _ = kinematic_spots(
            crystal, u, energy=ENERGY, thickness=THICKNESS, semiangle=SEMIANGLE, q_max=Q_MAX
        )
        intensity = intensity * rng.lognormal(0.0, INTENSITY_NOISE, len(intensity))
        q = q + rng.normal(0.0, POSITION_NOISE, q.shape)
        keep = intensity >= DETECTION_THRESHOLD * intensity.max(initial=0.0)
        q, intensity = q[keep], intensity[keep]
        beam = rng.normal(0.0, POSITION_NOISE / 2, (1, 2))
        top = intensity.max(initial=1.0)
        tables.append((np.vstack([beam, q]), np.concatenate([[DIRECT_BEAM * top], intensity])))
    counts = np.array([len(t[1]) for t in tables])
    return SpotData(
        name=f"{structure.composition.reduced_formula} synthetic",
        structure=structure,
        q=np.concatenate([t[0] for t in tables]),
        intensity=np.concatenate([t[1] for t in tables]),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        scan_shape=(positions, 1),
        q_max=Q_MAX,
        truth=truth,
        note=f"{np.median(counts - 1):.0f} diffracted spots per pattern (median)",
    )


def real_scan(name: str, rows: int | None) -> SpotData:
    """py4DSTEM's measured 80×58 peak scan (first ``rows`` scan rows), candidate ``name``."""
    from stemforge.datasets.io import read_braggpeaks_file

    peaks = read_braggpeaks_file(REAL_SCAN).peaks
    scan = (
        peaks.scan_shape if rows is None else (min(rows, peaks.scan_shape[0]), peaks.scan_shape[1])
    )
    offsets = peaks.offsets[: scan[0] * scan[1] + 1]
    end = offsets[-1]
    counts = np.diff(offsets)
    return SpotData(
        name=f"real scan {scan[0]}×{scan[1]} ({REAL_SCAN.name})",
        structure=load_structure(name),
        q=np.column_stack([peaks.qx[:end], peaks.qy[:end]]),
        intensity=peaks.intensity[:end].copy(),
        offsets=offsets,
        scan_shape=scan,
        q_max=Q_MAX_REAL,
        note=f"{np.median(counts):.0f} peaks per pattern (median), "
        f"{np.mean(counts < 3) * 100:.0f} % with fewer than 3",
    )


def laue_proper_rotations(structure) -> np.ndarray:
    """Proper rotations of the Laue group in the structure's Cartesian frame (pymatgen)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = SpacegroupAnalyzer(structure, symprec=1e-3).get_point_group_operations(cartesian=True)
    mats = np.array([op.rotation_matrix for op in ops])
    mats = np.concatenate([mats, -mats])
    return np.unique(np.round(mats[np.linalg.det(mats) > 0], 6), axis=0)


def point_group_symbol(structure) -> str:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SpacegroupAnalyzer(structure, symprec=1e-3).get_point_group_symbol()


def misorientation(a: np.ndarray, b: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """Degrees; min over ``b @ S``; inf where either orientation is missing (NaN)."""
    relative = np.swapaxes(a, -1, -2) @ b
    traces = np.einsum("pij,kji->pk", relative, symmetry)
    angle = np.degrees(np.arccos(np.clip((traces.max(axis=1) - 1) / 2, -1.0, 1.0)))
    missing = ~(np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=(1, 2)))
    return np.where(missing, np.inf, angle)


def accuracy(a: np.ndarray, b: np.ndarray, symmetry: np.ndarray) -> dict:
    """Misorientation statistics of ``b`` against ``a`` (unmatched = inf).

    Median, 90th percentile, fractions within 2° and 5°, and the fraction more than 5° off
    that a 180° turn about the beam brings within 5° (the in-plane flip that Friedel's law
    makes hard to see near zone axes).
    """
    angles = misorientation(a, b, symmetry)
    flipped = misorientation(a, FLIP @ b, symmetry)
    return {
        "matched": float(np.isfinite(angles).mean()),
        "median": float(np.percentile(angles, 50)),
        "p90": float(np.percentile(angles, 90)),
        "within2": float((angles <= 2).mean()),
        "within5": float((angles <= 5).mean()),
        "flips": float(((angles > 5) & (flipped <= 5)).mean()),
    }


# ---- the matchers --------------------------------------------------------------------------


def run_py4dstem(data: SpotData, step: float, folder: Path, repeats: int) -> Run:
    structure = data.structure
    species = [
        (site.frac_coords, el.Z, occ) for site in structure for el, occ in site.species.items()
    ]
    source, out = folder / "py4dstem_in.npz", folder / "py4dstem_out.npz"
    np.savez(
        source,
        cell=np.array([*structure.lattice.abc, *structure.lattice.angles]),
        frac=np.array([s[0] for s in species]),
        numbers=np.array([s[1] for s in species]),
        occupancy=np.array([s[2] for s in species], float),
        raw_qx=data.q[:, 0] / PIXEL_SIZE + ORIGIN[0],
        raw_qy=data.q[:, 1] / PIXEL_SIZE + ORIGIN[1],
        intensity=data.intensity,
        offsets=data.offsets,
        scan_shape=np.array(data.scan_shape),
    )
    settings = {
        "k_max": data.q_max,
        "step": step,
        "energy": ENERGY,
        "point_group": point_group_symbol(structure),
        "pixel_size": PIXEL_SIZE,
        "origin": ORIGIN,
        "detector": DETECTOR,
        "repeats": repeats,
    }
    load = os.getloadavg()[0]
    done = run_in_py4dstem(PY4DSTEM_SCRIPT, source, out, json.dumps(settings), timeout=7200)
    if done.returncode != 0:
        raise SystemExit(f"py4DSTEM failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as result:
        matrix, corr, lattice = result["matrix"], result["corr"], result["lattice"]
    # Same fractional coordinates, two Cartesian settings: v_py4dstem = frame @ v_ours.
    frame = np.linalg.inv(lattice) @ np.asarray(structure.lattice.matrix, float)
    if not np.allclose(frame @ frame.T, np.eye(3), atol=1e-6) or np.linalg.det(frame) < 0:
        raise SystemExit(f"py4DSTEM's cell is no rotation of ours:\n{lattice}")
    rotation = PY4DSTEM_TO_LAB @ np.swapaxes(matrix, 1, 2) @ frame
    rotation[corr <= 0] = np.nan  # no match (fewer than 3 peaks, or no correlation)
    zones, in_plane = report["zones"], report["in_plane"]
    return Run(
        matcher="py4DSTEM",
        rotation=rotation,
        seconds=report["seconds"],
        cpu_seconds=report["cpu_seconds"],
        library=f"{zones} zone axes ({settings['point_group']} range) × {in_plane} in-plane, "
        "× 2 (mirror)",
        # inversion_symmetry=True correlates every template with the pattern and its mirror
        evaluated=2 * zones * in_plane,
        build_seconds=report["plan_seconds"],
        load=(load, os.getloadavg()[0]),
    )


def run_stemforge(
    data: SpotData, step: float, thickness: float | None, repeats: int, label: str = ""
) -> list[Run]:
    """stemforge at ``step``, refinement off then on (one library, built once, not timed)."""
    from stemforge.infer.orientation import LibrarySettings, build_library, match_orientations

    options = {"energy": ENERGY, "q_max": data.q_max, "angle_step": step}
    if thickness is not None:
        options["thickness"] = thickness
    start = time.perf_counter()
    library = build_library(data.structure, LibrarySettings(**options))
    build = time.perf_counter() - start
    n_angles = library.settings.n_angles
    warm = data.offsets[: min(6, data.positions + 1)]
    runs = []
    for refine in (False, True):
        match_orientations(
            library, data.q[: warm[-1]], data.intensity[: warm[-1]], warm, refine=refine
        )  # warm-up
        load = os.getloadavg()[0]
        seconds, cpu = float("inf"), float("inf")
        for _ in range(repeats):  # best of
            start, start_cpu = time.perf_counter(), time.process_time()
            found = match_orientations(library, data.q, data.intensity, data.offsets, refine=refine)
            seconds = min(seconds, time.perf_counter() - start)
            cpu = min(cpu, time.process_time() - start_cpu)
        runs.append(
            Run(
                matcher=f"stemforge{label}, refine {'on' if refine else 'off'}",
                rotation=np.asarray(found.rotation, float),
                seconds=seconds,
                cpu_seconds=cpu,
                library=f"{len(library)} directions × {n_angles} in-plane ({step:g}°)",
                evaluated=len(library) * n_angles,
                build_seconds=build,
                load=(load, os.getloadavg()[0]),
            )
        )
    return runs


# ---- report --------------------------------------------------------------------------------


def _fmt_angle(value: float) -> str:
    return "∞" if not np.isfinite(value) else f"{value:.2f}°"


def render(results: list[dict], info: dict) -> str:
    loads = [v for r in results for run in r["runs"] for v in run.load]
    lines = [
        "## Orientation matching (ACOM): stemforge vs py4DSTEM",
        "",
        f"Measured by `python benchmarks/orientation_speed.py{info['args']}` on {info['machine']}. "
        f"Both matchers single process, {info['threads']} threads each (OMP/OpenBLAS/MKL/NumExpr "
        "thread variables set alike for both processes); the matching of every position timed "
        "after a warm-up; building the library (py4DSTEM's `orientation_plan`) not timed, shown "
        f"apart; {info['repeats']}. 1-min load average around the timed runs "
        f"{min(loads):.1f}–{max(loads):.1f} (a shared machine: wall-time figures move with it; "
        "CPU time, all threads of the process summed, much less, but it charges stemforge for "
        "its second BLAS thread while py4DSTEM's NumPy FFTs and loops use one). Same nominal "
        f"angular step for both ({info['step']}° for zone axes / beam directions and in-plane)"
        + (
            f"; stemforge also at a finer step ({info['dense']}°) so that it scores at least as "
            "many orientations per pattern as py4DSTEM."
            if info["dense"] > 0
            else "."
        ),
        "",
        "Synthetic spot lists: stemforge's kinematic simulator at random orientations (300 kV, "
        f"{THICKNESS / 10:.0f} nm, {SEMIANGLE:g} mrad, |q| ≤ {Q_MAX} Å⁻¹), position noise "
        f"σ = {POSITION_NOISE} Å⁻¹, {INTENSITY_NOISE * 100:.0f} % log-normal intensity noise, "
        f"spots below {DETECTION_THRESHOLD * 100:.0f} % of the strongest dropped, the direct beam "
        "at the origin. Real: py4DSTEM's measured 80×58 peak scan `braggdisks_cali.h5` (direct "
        f"beam included) against LiMn2O4 up to {Q_MAX_REAL} Å⁻¹. py4DSTEM 0.14.18 in its own "
        "venv with its default `orientation_plan` / `match_orientations` settings (kernel "
        '0.08 Å⁻¹, σ_excitation 0.02 Å⁻¹, zone-axis range = what `"auto"` picks for the point '
        "group, inversion_symmetry on: each template is also scored mirrored); stemforge with "
        f"its default `LibrarySettings`{info['library_note']}. py4DSTEM's result M (lab → crystal, "
        "beam along −z) is compared as U = diag(−1, −1, 1)·Mᵀ.",
        "",
        "| data set | positions | matcher | library | orientations scored / pattern | build (s) "
        "| positions/s | × py4DSTEM | CPU ms / position | × py4DSTEM (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = next((run for run in r["runs"] if run.matcher == "py4DSTEM"), None)
        for run in r["runs"]:
            rate = r["positions"] / run.seconds
            cpu = 1e3 * run.cpu_seconds / r["positions"]
            if base is None:
                ratio = cpu_ratio = "—"
            elif run is base:
                ratio = cpu_ratio = "1.0×"
            else:
                ratio = f"**{base.seconds / run.seconds:.1f}×**"
                cpu_ratio = f"{base.cpu_seconds / run.cpu_seconds:.1f}×"
            lines.append(
                f"| {r['name']} | {r['positions']} | {run.matcher} | {run.library} | "
                f"{run.evaluated:,} | {run.build_seconds:.1f} | {rate:.1f} | {ratio} | "
                f"{cpu:.1f} | {cpu_ratio} |"
            )
    lines += [
        "",
        "Accuracy: misorientation, the smallest rotation angle over the proper rotations of the "
        "crystal's Laue group (pymatgen's, not the matcher's), to the truth for synthetic data; "
        "for the real scan, to py4DSTEM's answer at the positions py4DSTEM matched, and between "
        "neighbouring positions (right and lower neighbours with ≥ 3 peaks each: grains make "
        "neighbours agree, so a steadier map scores higher). Unmatched positions count as "
        "failures (∞). *180° in-plane flips*: positions more than 5° off that a 180° turn about "
        "the beam would bring within 5° (near a zone axis Friedel's law makes the two "
        "orientations' patterns almost the same; only excitation errors tell them apart).",
        "",
        "| data set | matcher | against | matched | median | 90th percentile | ≤ 2° | ≤ 5° "
        "| 180° in-plane flips |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["accuracy"]:
            a = row["stats"]
            lines.append(
                f"| {r['name']} | {row['matcher']} | {row['against']} | "
                f"{a['matched'] * 100:.0f} % | {_fmt_angle(a['median'])} | {_fmt_angle(a['p90'])} "
                f"| {a['within2'] * 100:.0f} % | {a['within5'] * 100:.0f} % "
                f"| {a['flips'] * 100:.0f} % |"
            )
    notes = [f"{r['name']}: {r['note']}" for r in results if r["note"]]
    if notes:
        lines += ["", "Data: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def evaluate(data: SpotData, runs: list[Run]) -> list[dict]:
    """Accuracy rows: against the truth, or against py4DSTEM and neighbours (real scan)."""
    symmetry = laue_proper_rotations(data.structure)
    rows = []
    if data.truth is not None:
        for run in runs:
            stats = accuracy(data.truth, run.rotation, symmetry)
            rows.append({"matcher": run.matcher, "against": "truth", "stats": stats})
        return rows
    base = next((run for run in runs if run.matcher == "py4DSTEM"), None)
    if base is not None:
        both = np.isfinite(base.rotation).all(axis=(1, 2))
        for run in runs:
            if run is not base:
                stats = accuracy(base.rotation[both], run.rotation[both], symmetry)
                rows.append({"matcher": run.matcher, "against": "py4DSTEM", "stats": stats})
    # Neighbour pairs (right, lower) where both patterns have at least 3 peaks.
    shape = data.scan_shape
    index = np.arange(data.positions).reshape(shape)
    enough = (np.diff(data.offsets) >= 3).reshape(shape)
    right = enough[:, :-1] & enough[:, 1:]
    below = enough[:-1] & enough[1:]
    a = np.concatenate([index[:, :-1][right], index[:-1][below]])
    b = np.concatenate([index[:, 1:][right], index[1:][below]])
    for run in runs:
        stats = accuracy(run.rotation[a], run.rotation[b], symmetry)
        rows.append({"matcher": run.matcher, "against": "neighbours (own map)", "stats": stats})
    return rows


def pin_threads(threads: int) -> None:
    """Re-execute with the thread variables set, so NumPy/BLAS start with them (and children)."""
    want = {name: str(threads) for name in THREAD_VARS}
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.environ.update(want)
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1000, help="synthetic cubic positions")
    parser.add_argument(
        "--second-positions",
        type=int,
        default=200,
        help="synthetic monoclinic Li2MnO3 positions (0: leave out)",
    )
    parser.add_argument(
        "--real-rows",
        type=int,
        default=None,
        help="scan rows of the real scan to match (default all 80; 0: leave out)",
    )
    parser.add_argument("--step", type=float, default=2.0, help="angular step (deg), both codes")
    parser.add_argument(
        "--dense-step",
        type=float,
        default=1.5,
        help="stemforge's extra finer step (deg; 0: leave out)",
    )
    parser.add_argument(
        "--library-thickness",
        type=float,
        default=None,
        help="stemforge LibrarySettings.thickness in Å (default: its own default)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for both processes")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per matcher, best kept (both codes)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-py4dstem", action="store_true", help="stemforge only (no ratios)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 60 + 20 positions, 5 scan rows; no RESULTS.md update",
    )
    args = parser.parse_args()
    pin_threads(args.threads)
    os.environ.setdefault("STEMFORGE_PROGRESS", "0")
    if args.quick:
        args.positions = min(args.positions, 60)
        args.second_positions = min(args.second_positions, 20)
        args.real_rows = 5 if args.real_rows is None else min(args.real_rows, 5)

    sets = [lambda: synthetic("LiMn2O4", args.positions, args.seed)]
    if args.second_positions > 0:
        sets.append(lambda: synthetic("Li2MnO3", args.second_positions, args.seed + 10))
    if args.real_rows != 0:
        sets.append(lambda: real_scan("LiMn2O4", args.real_rows))

    results = []
    with tempfile.TemporaryDirectory(prefix="stemforge-orientation-") as tmp:
        for make in sets:
            data = make()
            print(f"\n== {data.name}: {data.positions} positions; {data.note}", flush=True)
            runs = []
            if not args.skip_py4dstem:
                runs.append(run_py4dstem(data, args.step, Path(tmp), args.repeats))
            runs += run_stemforge(data, args.step, args.library_thickness, args.repeats)
            if args.dense_step > 0:
                runs += run_stemforge(
                    data, args.dense_step, args.library_thickness, args.repeats, " (finer)"
                )
            for run in runs:
                print(
                    f"{run.matcher}: {data.positions / run.seconds:.1f} positions/s, "
                    f"{1e3 * run.cpu_seconds / data.positions:.1f} CPU ms/position; "
                    f"{run.library}, {run.evaluated:,} scored; build {run.build_seconds:.1f} s; "
                    f"load {run.load[0]:.1f}/{run.load[1]:.1f}",
                    flush=True,
                )
            rows = evaluate(data, runs)
            for row in rows:
                stats = ", ".join(f"{k} {v:.3g}" for k, v in row["stats"].items())
                print(f"  {row['matcher']} vs {row['against']}: {stats}", flush=True)
            results.append(
                {
                    "name": data.name,
                    "positions": data.positions,
                    "runs": runs,
                    "accuracy": rows,
                    "note": data.note,
                }
            )

    shown = " ".join(sys.argv[1:])
    info = {
        "args": f" {shown}" if shown else "",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}",
        "threads": args.threads,
        "repeats": "one timed run each"
        if args.repeats == 1
        else f"best of {args.repeats} timed runs each",
        "step": args.step,
        "dense": args.dense_step,
        "library_note": ""
        if args.library_thickness is None
        else f" but thickness {args.library_thickness:g} Å",
    }
    text = render(results, info)
    if not args.quick:
        update_results(SECTION, text)
    print("\n" + text)


if __name__ == "__main__":
    main()
