"""Scale: disk detection and strain on a dask.distributed LocalCluster (equal results, a worker
killed mid-job survived), resumable checkpoints, and bounded memory out of core.

The cluster is real: two single-threaded worker processes on 127.0.0.1, real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import dask
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stemforge.core.cli import cli
from stemforge.core.cluster import map_ordered, parse_scheduler
from stemforge.core.errors import ConfigurationError
from stemforge.datasets.io import read_datacube
from stemforge.infer import disks as disks_module
from stemforge.infer.checkpoint import checkpoint_path
from stemforge.infer.disks import find_bragg_disks, stream_peaks
from stemforge.infer.templates import make_kernel, synthetic_probe

# worker processes cannot import test modules: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

Q = 64
RADIUS = 4.0
G = np.array([[17.0, 3.0], [-4.0, 18.0]])  # two Bragg vectors, px
SCAN = (8, 6)
ROW_BYTES = SCAN[1] * Q * Q * 4
BUDGET = str(4 * ROW_BYTES)  # blocks of one scan row (a quarter of the budget): 8 blocks


def lattice_patterns(n: int, gradient: float = 0.002) -> np.ndarray:
    """``n`` float32 patterns: a direct beam and the eight nearest disks of ``G`` scaled by
    ``1 + gradient · i`` in pattern ``i`` (a strain ramp)."""
    hk = np.array([(h, k) for h in (-1, 0, 1) for k in (-1, 0, 1)], float)
    patterns = np.zeros((n, Q, Q), np.float32)
    for i in range(n):
        for h, k in hk:
            centre = np.array([Q / 2, Q / 2]) + (1 + gradient * i) * (h * G[0] + k * G[1])
            amplitude = 1.0 if h == k == 0 else 0.3
            patterns[i] += amplitude * synthetic_probe((Q, Q), RADIUS, center=tuple(centre))
    return patterns


@pytest.fixture(scope="module")
def cube_file(tmp_path_factory) -> Path:
    """An (8, 6, 64, 64) float32 ``.npy``: the lattice strained along rx."""
    path = tmp_path_factory.mktemp("scale") / "cube.npy"
    rows = lattice_patterns(SCAN[0])
    np.save(path, np.repeat(rows[:, None], SCAN[1], axis=1))
    return path


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as local:
        yield local


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def columns(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f["braggpeaks"][name][:] for name in ("rx", "ry", "qx", "qy", "intensity")}


def maps(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f[name][:] for name in ("e_xx", "e_yy", "e_xy", "theta", "mask")}


# ---- cluster ------------------------------------------------------------------------------
def test_disks_strain_and_virtual_on_a_cluster_equal_one_process(cube_file, cluster, tmp_path):
    common = ["--probe-radius", str(RADIUS), "--memory-budget", BUDGET, "--backend", "numpy"]
    here, there = tmp_path / "here", tmp_path / "there"
    for out, extra in ((here, []), (there, ["--scheduler", cluster.scheduler_address])):
        out.mkdir()
        run("disks", str(cube_file), *common, *extra, "--out", str(out / "peaks.h5"))
        run("strain", str(cube_file), *common, *extra, "--out", str(out / "strain.h5"))
        virtual = ["-d", "annulus:8,20", "--memory-budget", BUDGET, "--lazy", *extra]
        run("virtual", str(cube_file), *virtual, "--out", str(out / "adf.npy"))
    np.testing.assert_array_equal(np.load(here / "adf.npy"), np.load(there / "adf.npy"))
    one, two = columns(here / "peaks.h5"), columns(there / "peaks.h5")
    assert len(one["rx"]) == 9 * SCAN[0] * SCAN[1]
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    strain_one, strain_two = maps(here / "strain.h5"), maps(there / "strain.h5")
    assert strain_one["mask"].all()
    for name in strain_one:
        np.testing.assert_array_equal(strain_one[name], strain_two[name], err_msg=name)
    # the ramp: 0.2 % per scan row, relative to the median lattice
    np.testing.assert_allclose(np.diff(strain_one["e_xx"][:, 0]), -0.002 / 1.008, rtol=0.1)
    assert not any(p.name.endswith(".partial") for p in there.iterdir())


class KillOnce:
    """A disk detector that kills its own worker process the first time it sees ``start``."""

    def __init__(self, detect, marker: Path, start: int) -> None:
        self.detect, self.marker, self.start = detect, marker, start

    def __call__(self, stack: np.ndarray, start: int) -> list[np.ndarray]:
        if start == self.start and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.detect(stack, start=start)


def test_a_worker_killed_mid_job_changes_nothing(cube_file, cluster, tmp_path):
    cube = read_datacube(cube_file, lazy=True)
    kernel = make_kernel(synthetic_probe((Q, Q), RADIUS))
    reference = find_bragg_disks(cube, kernel, max_bytes=BUDGET, backend="numpy", workers=1)
    detector = disks_module._Detector(kernel, (Q, Q), None, "numpy", 1)
    marker = tmp_path / "killed"
    killer = KillOnce(detector, marker, start=3 * SCAN[1])  # the fourth of eight blocks
    peaks = stream_peaks(cube, killer, BUDGET, scheduler=cluster.scheduler_address)
    assert marker.exists()  # a worker did die
    for name, column in reference.columns().items():
        np.testing.assert_array_equal(column, getattr(peaks, name), err_msg=name)


def square(x: int) -> int:
    return x * x


def test_map_ordered_keeps_order_and_reports_each_result(cluster):
    seen: dict[int, int] = {}
    out = map_ordered(square, range(20), cluster.scheduler_address, on_result=seen.__setitem__)
    assert out == [x * x for x in range(20)] and seen == dict(enumerate(out))
    assert map_ordered(square, [3, 1], None) == [9, 1]
    assert (
        parse_scheduler(" 3 ") == 3 and parse_scheduler("tcp://127.0.0.1:1") == "tcp://127.0.0.1:1"
    )
    with pytest.raises(ConfigurationError, match="no workers"):
        parse_scheduler("0")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ConfigurationError, match="cannot reach a dask scheduler.*LocalCluster"),
    ):
        map_ordered(square, [1], "tcp://127.0.0.1:1")


# ---- checkpoints --------------------------------------------------------------------------
def test_disks_resumes_after_a_crash_skipping_finished_blocks(cube_file, tmp_path, monkeypatch):
    args = ["--probe-radius", str(RADIUS), "--memory-budget", BUDGET, "--backend", "numpy"]
    clean = tmp_path / "clean.h5"
    run("disks", str(cube_file), *args, "--out", str(clean))
    out = tmp_path / "peaks.h5"
    real = disks_module.load_block
    reads: list[int] = []

    def crash_on_the_fourth_block(data, rows, name=None):
        if len(reads) == 3:
            raise RuntimeError("killed")
        reads.append(rows.start)
        return real(data, rows, name)

    monkeypatch.setattr(disks_module, "load_block", crash_on_the_fourth_block)
    result = CliRunner().invoke(cli, ["disks", str(cube_file), *args, "--out", str(out)])
    assert result.exit_code != 0 and "rerun the same command to resume" in result.output
    partial = checkpoint_path(out)
    assert not out.exists() and len(list(partial.glob("block-*.npz"))) == 3

    def count(data, rows, name=None):
        reads.append(rows.start)
        return real(data, rows, name)

    monkeypatch.setattr(disks_module, "load_block", count)
    reads.clear()
    run("disks", str(cube_file), *args, "--out", str(out))
    assert reads == [3, 4, 5, 6, 7]  # only the blocks the crash left
    assert not partial.exists()
    for name, column in columns(clean).items():
        np.testing.assert_array_equal(column, columns(out)[name], err_msg=name)
    # a checkpoint of other settings is discarded, not mixed in
    monkeypatch.setattr(disks_module, "load_block", crash_on_the_fourth_block)
    reads.clear()
    other = tmp_path / "other.h5"
    CliRunner().invoke(cli, ["disks", str(cube_file), *args, "--out", str(other)])
    monkeypatch.setattr(disks_module, "load_block", count)
    reads.clear()
    run("disks", str(cube_file), *args, "--max-peaks", "3", "--out", str(other))
    assert len(reads) == SCAN[0] and columns(other)["rx"].size == 3 * SCAN[0] * SCAN[1]


# ---- memory -------------------------------------------------------------------------------
PEAK_RSS = textwrap.dedent(
    """
    import sys
    from stemforge.core.cli import cli
    try:
        cli.main(sys.argv[1:], standalone_mode=False)
    finally:
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
        print("PEAK_RSS", int(hwm[0].split()[1]) * 1024)
    """
)


def peak_rss(*args: str) -> int:
    """Peak resident memory (bytes) of ``stemforge ARGS`` in a fresh process."""
    env = {**os.environ, "STEMFORGE_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stdout.rsplit("PEAK_RSS", 1)[1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_strain_out_of_core_stays_within_the_memory_budget(tmp_path):
    """A .npy 4× the budget: peak RSS beyond the interpreter and libraries stays under it.

    The baseline is the same command on a tiny cube (same imports, lazily read too).
    """
    budget = 32 * 2**20
    rows = lattice_patterns(128, gradient=0.0001)
    big, tiny = tmp_path / "big.npy", tmp_path / "tiny.npy"
    out = np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(128, 64, Q, Q))
    for i, pattern in enumerate(rows):
        out[i] = pattern
    out.flush()
    del out
    np.save(tiny, np.repeat(rows[:4, None], 2, axis=1))
    assert big.stat().st_size >= 4 * budget
    common = ["--probe-radius", str(RADIUS), "--memory-budget", str(budget), "--backend", "numpy"]
    baseline = peak_rss("strain", str(tiny), *common, "--lazy", "--out", str(tmp_path / "t.h5"))
    peak = peak_rss("strain", str(big), *common, "--out", str(tmp_path / "s.h5"))
    assert maps(tmp_path / "s.h5")["mask"].all()
    assert peak - baseline <= budget, (peak / 2**20, baseline / 2**20)
