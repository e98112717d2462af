"""A separate virtual environment with py4DSTEM 0.14.18, for interoperability checks.

py4DSTEM is never a stemforge dependency: its pins (NumPy < 2, scikit-learn < 1.5) clash
with stemforge's. Benchmarks that compare with it run scripts in this environment instead,
through :func:`run_in_py4dstem`, and exchange files with stemforge.

The environment lives at ``$STEMFORGE_PY4DSTEM_VENV`` (default
``~/.cache/stemforge/py4dstem-venv``). It is built once from PyPI and reused while its
stamp file records the same requirements.

Pins: py4DSTEM 0.14.18 itself declares ``numpy<2.0`` (its ``Crystal`` uses ``np.float_``,
gone in NumPy 2) and ``scikit-learn<1.5``; pip then resolves a working set (verified with
NumPy 1.26.4, SciPy 1.17, h5py 3.16, emdfile 0.0.16 on Python 3.11). ``numpy<2.0`` is
repeated in :data:`REQUIREMENTS` so the constraint is visible here.

Usage::

    python benchmarks/py4dstem_env.py            # build (or check) the environment
    python benchmarks/py4dstem_env.py --rebuild  # start from scratch
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

PY4DSTEM_VERSION = "0.14.18"
REQUIREMENTS = (f"py4DSTEM=={PY4DSTEM_VERSION}", "numpy<2.0")
ENV_VAR = "STEMFORGE_PY4DSTEM_VENV"
STAMP = ".stemforge-requirements"
#: Run after installing: py4DSTEM, the classes the benchmarks use, and one small disk search.
SMOKE_TEST = """
import numpy, py4DSTEM
from py4DSTEM.braggvectors import BraggVectors, find_Bragg_disks
from py4DSTEM.process.diffraction import Crystal
q = numpy.arange(16.0)
disk = numpy.exp(-((q[:, None] - 8) ** 2 + (q[None, :] - 8) ** 2) / 4)
cube = py4DSTEM.DataCube(numpy.broadcast_to(disk, (1, 2, 16, 16)).copy())
kernel = numpy.fft.ifftshift(disk)
found = find_Bragg_disks(cube, kernel, edgeBoundary=1, minPeakSpacing=2, subpixel="poly")
assert isinstance(found, BraggVectors) and len(found.raw[0, 1].qx) == 1
print(py4DSTEM.__version__, numpy.__version__)
"""


def venv_path() -> Path:
    """Where the environment lives (``$STEMFORGE_PY4DSTEM_VENV`` or the user cache)."""
    default = Path.home() / ".cache" / "stemforge" / "py4dstem-venv"
    return Path(os.environ.get(ENV_VAR, default)).expanduser()


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_py4dstem_env(rebuild: bool = False) -> Path:
    """Build the environment if it is missing or stale; return its Python interpreter.

    A build ends with :data:`SMOKE_TEST`; the stamp file is written only when it passes, so
    a broken build is rebuilt next time.

    Raises
    ------
    RuntimeError
        If pip cannot install py4DSTEM (e.g. PyPI is unreachable), it does not work, or the
        path holds something other than a virtual environment (never deleted).
    """
    venv = venv_path()
    stamp = venv / STAMP
    wanted = "\n".join(REQUIREMENTS)
    if not rebuild and stamp.is_file() and stamp.read_text() == wanted:
        return _python(venv)
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").is_file():
        raise RuntimeError(
            f"{venv} is not empty and not a virtual environment; point ${ENV_VAR} elsewhere"
        )
    shutil.rmtree(venv, ignore_errors=True)  # a stale or broken environment
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = str(_python(venv))
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [python, "-m", "pip", "install", "--quiet", *REQUIREMENTS],
        [python, "-c", SMOKE_TEST],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"building the py4DSTEM environment at {venv} failed at {' '.join(cmd[:4])}:\n"
                f"{done.stderr[-2000:]}"
            )
    stamp.write_text(wanted)
    return _python(venv)


def run_in_py4dstem(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the Python source ``script`` with py4DSTEM's interpreter; ``args`` become ``sys.argv[1:]``.

    Returns the completed process (text stdout and stderr captured); the caller checks
    ``returncode``.
    """
    python = ensure_py4dstem_env()
    return subprocess.run(
        [str(python), "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="delete and rebuild the venv")
    options = parser.parse_args()
    python = ensure_py4dstem_env(rebuild=options.rebuild)
    check = subprocess.run([str(python), "-c", SMOKE_TEST], capture_output=True, text=True)
    print(f"py4DSTEM environment: {python.parent.parent}")
    print(f"py4DSTEM, NumPy: {check.stdout.strip() or check.stderr[-2000:]}")
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
