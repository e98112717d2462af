"""Virtual-imaging throughput against a plain NumPy reduction, in memory and out of core.

In memory: GB/s of ``virtual_images`` (a bright-field disk and an annular dark field,
batched into one pass) divided by GB/s of ``data.sum(axis=(2, 3))`` over the same array in
the same run. Out of core: a ``.npy`` and a ``.zarr`` datacube at least 4× a memory cap
are opened with that cap as stemforge's memory budget (so they open lazily) and reduced;
each measurement runs in a fresh process whose peak RSS is recorded. The NumPy baseline
out of core streams the same file block by block.

Usage::

    python benchmarks/virtual_imaging.py            # full run, writes benchmarks/RESULTS.md
    python benchmarks/virtual_imaging.py --quick    # small sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_table import peak_rss, update_results

HERE = Path(__file__).resolve().parent
SECTION = "virtual-imaging"


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def detectors(q: int):
    from stemforge.infer.detectors import parse_detector

    return [parse_detector(f"bf:{q / 16}"), parse_detector(f"annulus:{q / 8},{q / 2 - 1}")]


def in_memory(shape: tuple[int, ...], dtype: str) -> dict:
    from stemforge.core import Calibration, DataCube
    from stemforge.infer.virtual import virtual_images

    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, shape).astype(dtype)
    gb = data.nbytes / 1e9
    t_np = best_time(lambda: data.sum(axis=(2, 3)))
    dets = detectors(shape[2])
    cube = DataCube(data)
    t_sf = best_time(lambda: virtual_images(cube, dets))
    centre = (shape[2] - 1) / 2
    qx0 = centre + rng.uniform(-2, 2, shape[:2])
    following = DataCube(data, Calibration(qx0=qx0, qy0=qx0))
    t_follow = best_time(lambda: virtual_images(following, dets, follow_origin=True), repeats=1)
    return {
        "dtype": dtype,
        "shape": shape,
        "GB": gb,
        "numpy_GBps": gb / t_np,
        "stemforge_GBps": gb / t_sf,
        "ratio": t_np / t_sf,
        "following_GBps": gb / t_follow,
    }


def write_cube(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Write a datacube of random counts row by row, never holding it all in memory."""
    rng = np.random.default_rng(1)
    if path.suffix == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        for i in range(shape[0]):
            out[i] = rng.integers(0, 1000, shape[1:]).astype(dtype)
        out.flush()
        del out
    else:
        import zarr

        arr = zarr.open_array(path, mode="w", shape=shape, dtype=dtype, chunks=(4, shape[1], *shape[2:]))
        for i in range(0, shape[0], 4):
            arr[i : i + 4] = rng.integers(0, 1000, (min(4, shape[0] - i), *shape[1:])).astype(dtype)


def child(mode: str, path: str, cap: int) -> None:
    """One out-of-core measurement in this process; prints JSON. Imports are not timed."""
    import zarr

    from stemforge.datasets.io import read_datacube
    from stemforge.infer.virtual import virtual_images

    t0 = time.perf_counter()
    if mode == "numpy":
        arr = np.load(path, mmap_mode="r") if path.endswith(".npy") else zarr.open_array(path, mode="r")
        rows = max(1, cap // 4 // (arr.nbytes // arr.shape[0]))
        for i in range(0, arr.shape[0], rows):
            np.asarray(arr[i : i + rows]).sum(axis=(2, 3))
        nbytes = arr.nbytes
    else:
        cube = read_datacube(path, memory_budget=cap)
        assert cube.is_lazy, "the file should have opened lazily"
        virtual_images(cube, detectors(cube.shape[2]))
        nbytes = cube.nbytes
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "peak_rss": peak_rss(), "GB": nbytes / 1e9}))


def out_of_core(scratch: Path, cap: int, shape: tuple[int, ...], dtype: str) -> list[dict]:
    rows = []
    for suffix in (".npy", ".zarr"):
        path = scratch / f"cube{suffix}"
        write_cube(path, shape, dtype)
        for mode in ("numpy", "stemforge"):
            env = dict(os.environ, STEMFORGE_PROGRESS="0")
            cmd = [sys.executable, __file__, "--child", mode, str(path), str(cap)]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode:
                raise RuntimeError(f"{mode} on {path.name} failed:\n{run.stderr}")
            result = json.loads(run.stdout)
            rows.append({"format": suffix, "mode": mode, **result})
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return rows


def render(mem: list[dict], ooc: list[dict], cap: int, command: str) -> str:
    lines = [
        "## Virtual imaging throughput",
        "",
        f"Measured by `{command}` on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}. Two detectors (BF disk and ADF "
        "annulus) from one pass; NumPy baseline: `data.sum(axis=(2, 3))` on the same array in the same run.",
        "",
        "| data | size | NumPy GB/s | stemforge GB/s | ratio (target ≥ 0.8) | following the origin GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in mem:
        lines.append(
            f"| in memory {r['dtype']} {tuple(r['shape'])} | {r['GB']:.2f} GB | {r['numpy_GBps']:.2f} | "
            f"{r['stemforge_GBps']:.2f} | **{r['ratio']:.2f}** | {r['following_GBps']:.2f} |"
        )
    lines += [
        "",
        f"Out of core: memory cap {cap / 2**20:.0f} MiB given to stemforge as its memory budget; files at least "
        "4× the cap, opened lazily (Dask, chunked over scan rows); each run in a fresh process; peak RSS "
        "includes the Python interpreter and imported libraries. The file sits in the page cache, so "
        "this measures the software path, not the disk. The NumPy baseline streams blocks of scan rows "
        "(a memory map for .npy, whose touched pages count as resident; zarr block reads).",
        "",
        "| file | size | NumPy GB/s | NumPy peak RSS | stemforge GB/s | ratio | stemforge peak RSS | under the cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_format = {}
    for r in ooc:
        by_format.setdefault(r["format"], {})[r["mode"]] = r
    for fmt, runs in by_format.items():
        np_run, sf_run = runs["numpy"], runs["stemforge"]
        np_rate, sf_rate = np_run["GB"] / np_run["seconds"], sf_run["GB"] / sf_run["seconds"]
        lines.append(
            f"| {fmt} | {sf_run['GB']:.2f} GB | {np_rate:.2f} | {np_run['peak_rss'] / 2**20:.0f} MiB | "
            f"{sf_rate:.2f} | **{sf_rate / np_rate:.2f}** | {sf_run['peak_rss'] / 2**20:.0f} MiB | "
            f"{'yes' if sf_run['peak_rss'] < cap else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md update")
    parser.add_argument("--cap-mb", type=int, default=512, help="memory cap for the out-of-core runs")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "CAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    os.environ.setdefault("STEMFORGE_PROGRESS", "0")
    cap = (8 if args.quick else args.cap_mb) * 2**20
    q = 128
    mem_shape = (32, 32, q, q) if args.quick else (128, 128, q, q)
    mem = [in_memory(mem_shape, dtype) for dtype in ("uint16", "float32")]
    ry = 16 if args.quick else 128
    n_rows = int(np.ceil(4 * cap / (ry * q * q * 2)))  # at least 4× the cap, in uint16
    ooc_shape = (n_rows, ry, q, q)
    scratch = HERE / "_scratch"
    scratch.mkdir(exist_ok=True)
    try:
        ooc = out_of_core(scratch, cap, ooc_shape, "uint16")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "python benchmarks/virtual_imaging.py" + (" --quick" if args.quick else "")
    section = render(mem, ooc, cap, command)
    print(section)
    if not args.quick:
        update_results(SECTION, section)


if __name__ == "__main__":
    main()
