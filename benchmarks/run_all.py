"""Run the benchmark suite with one command; every script writes its own section of RESULTS.md.

The scripts run one after the other, each in its own process (``STEMFORGE_PROGRESS=0``);
a failing one is reported and the others still run. This script then writes the header
section of RESULTS.md: the machine (CPU, cores, memory, load, library versions, commit),
the date, and which sections this run refreshed. Each section gives its figures as ratios
to a baseline measured in the same run where one exists (NumPy streaming, naive abTEM,
py4DSTEM, correlation, the published random forest, the in-memory run, one worker).

Usage::

    python benchmarks/run_all.py                 # everything at full size (hours: factory, fcunet)
    python benchmarks/run_all.py --skip-long     # without the factory and FCU-Net runs
    python benchmarks/run_all.py --skip-py4dstem # without the runs that need py4DSTEM's venv
    python benchmarks/run_all.py --only scale virtual
    python benchmarks/run_all.py --quick         # smoke run of every script's quick mode;
                                                 # results go to a temporary file
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from results_table import RESULTS, update_results

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    """One script: what it measures, its RESULTS.md sections, and how it runs."""

    script: str
    title: str
    sections: tuple[str, ...]
    quick: tuple[str, ...] | None = ("--quick",)  # its smoke-run flags; None: none
    long: bool = False  # an hour or more at full size
    py4dstem: bool = False  # needs the py4DSTEM venv (benchmarks/py4dstem_env.py)


BENCHMARKS = {
    "virtual": Benchmark(
        "virtual_imaging.py", "virtual imaging GB/s vs NumPy, out of core", ("virtual-imaging",)
    ),
    "factory": Benchmark(
        "factory.py", "factory patterns/min vs naive abTEM", ("factory",), long=True
    ),
    "disks": Benchmark(
        "disks_vs_py4dstem.py",
        "disk detection patterns/s and strain vs py4DSTEM",
        ("disks",),
        quick=None,
        py4dstem=True,
    ),
    "interop": Benchmark(
        "braggpeaks_interop.py",
        "Bragg peak files with py4DSTEM",
        ("interop",),
        quick=None,
        py4dstem=True,
    ),
    "orientation": Benchmark(
        "orientation_speed.py",
        "orientation matching positions/s and misorientation vs py4DSTEM",
        ("orientation",),
        py4dstem=True,
    ),
    "phase": Benchmark(
        "phase_accuracy.py",
        "phase / orientation / amorphous maps of the simulated test scan vs truth",
        ("phase",),
    ),
    "fcunet": Benchmark(
        "fcunet_accuracy.py", "FCU-Net vs correlation accuracy", ("fcunet",), long=True
    ),
    "fcunet-strain": Benchmark(
        "fcunet_strain.py", "FCU-Net vs correlation strain RMSE at 40 nm", ("fcunet-strain",)
    ),
    "fcunet-throughput": Benchmark(
        "fcunet_throughput.py",
        "FCU-Net patterns/s by device and batch (the CPU; a GPU where present)",
        ("fcunet-throughput",),
        quick=("--dry-run", "--n", "32", "--n-cpu", "32"),
    ),
    "identify": Benchmark(
        "identify_accuracy.py",
        "crystal identification accuracy vs the published random forest",
        ("identify",),
        quick=None,
    ),
    "scale": Benchmark(
        "scale.py",
        "strain out of core (wall time, peak RSS); cluster scaling 1 → 2 workers",
        ("scale-strain", "scale-cluster"),
    ),
}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return ", ".join(done.stdout.split("\n")).strip(", ") if done.returncode == 0 else "none"


def _commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" with uncommitted changes" if git("status", "--porcelain") else "")


def machine_lines(load_start: float) -> list[str]:
    """The machine and software, one Markdown bullet each."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(
        f"{name} {_version(name)}"
        for name in ("numpy", "scipy", "dask", "distributed", "torch", "abtem")
    )
    return [
        f"- CPU: {_cpu_model()} ({platform.machine()}), {cores} cores available "
        f"({os.cpu_count()} online)",
        f"- memory: {psutil.virtual_memory().total / 2**30:.1f} GiB; GPU: {_gpu()}",
        f"- OS: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"- libraries: {versions}",
        f"- stemforge commit {_commit()}",
        f"- load average (1 min) at the start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
        "(other work on the machine slows every figure; ratios to in-run baselines less so)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every script's smoke run")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run just these")
    parser.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="leave out")
    parser.add_argument("--skip-long", action="store_true", help="leave out factory and fcunet")
    parser.add_argument(
        "--skip-py4dstem", action="store_true", help="leave out the runs needing py4DSTEM"
    )
    parser.add_argument("--results", type=Path, help="write here instead of benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.results is not None:
        results = args.results.resolve()
    elif args.quick:
        results = Path(tempfile.mkdtemp(prefix="stemforge-bench-")) / "RESULTS.md"
    else:
        results = RESULTS
    env = dict(os.environ, STEMFORGE_PROGRESS="0", STEMFORGE_BENCH_RESULTS=str(results))
    load_start = os.getloadavg()[0]
    started = datetime.now(UTC)
    rows, failed = [], 0
    for name, bench in BENCHMARKS.items():
        reason = None
        if args.only is not None and name not in args.only:
            reason = "not asked for (--only)"
        elif name in args.skip:
            reason = "skipped (--skip)"
        elif bench.long and args.skip_long:
            reason = "skipped (--skip-long)"
        elif bench.py4dstem and args.skip_py4dstem:
            reason = "skipped (--skip-py4dstem)"
        elif args.quick and bench.quick is None:
            reason = "no quick mode"
        command = [sys.executable, bench.script, *((bench.quick or ()) if args.quick else ())]
        shown = "python benchmarks/" + " ".join(command[1:])
        if reason is not None:
            rows.append((name, bench, shown, reason, None))
            continue
        print(f"\n=== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=HERE, env=env)
        seconds = time.perf_counter() - t0
        if done.returncode:
            failed += 1
            status = f"FAILED (exit {done.returncode})"
        else:
            status = "smoke run (quick)" if args.quick else "refreshed"
        rows.append((name, bench, shown, status, seconds))
        print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)

    lines = [
        "## Machine and run",
        "",
        f"Written by `python benchmarks/run_all.py{' ' if sys.argv[1:] else ''}"
        f"{' '.join(sys.argv[1:])}` on {started:%Y-%m-%d %H:%M} UTC. Sections this run did "
        "not refresh keep the figures (and the machine line) of the run that wrote them.",
        "",
        *machine_lines(load_start),
        "",
        "| benchmark | measures | command | sections | this run | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for name, bench, shown, status, seconds in rows:
        wall = "—" if seconds is None else f"{seconds:.0f} s"
        sections = ", ".join(bench.sections)
        lines.append(f"| {name} | {bench.title} | `{shown}` | {sections} | {status} | {wall} |")
    update_results("machine", "\n".join(lines), results, first=True)
    print(f"\nwrote {results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
