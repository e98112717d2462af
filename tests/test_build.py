"""The dataset builder on real LocalClusters: determinism, resume after damage and kill -9.

The simulation is a stand-in (seeded random arrays, a short sleep); what is under test is
the store and the builder: real worker processes, real files, real SIGKILL.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import distributed
import numpy as np
import psutil
import pytest

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.build import build_dataset, plan_shards, shard_name
from stemforge.datasets.shards import open_dataset, read_manifest, sha256_file, write_shard
from stemforge.simulate.sample import PEAK_DTYPE, Sample

# worker processes cannot import test modules: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CONFIG = {"structures": ["Si", "GaN"], "q": 8}


def _tasks(n: int = 10) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, seed=100 + i, n_samples=1 + i % 3) for i in range(n)]


def _simulate(task: SimpleNamespace) -> list[Sample]:
    rng = np.random.default_rng(task.seed)
    samples = []
    for j in range(task.n_samples):
        images = rng.random((3, 8, 8), dtype=np.float32)
        peaks = np.zeros(int(rng.integers(0, 4)), PEAK_DTYPE)
        peaks["qx"] = rng.random(len(peaks))
        meta = {
            "structure_id": f"s{task.index % 4}",
            "thickness": 10.0 * (j + 1),
            "seed": task.seed,
        }
        samples.append(Sample(images[0], images[1], images[2], peaks, meta))
    return samples


def _fail_late(task: SimpleNamespace) -> list[Sample]:
    if task.index >= 6:
        return {"not": "samples"}
    return _simulate(task)


def _build(out, **kwargs):
    options = {
        "config": CONFIG,
        "seed": 3,
        "samples_per_shard": 4,
        "progress": False,
        "n_workers": 1,
    }
    return build_dataset(out, _tasks(), _simulate, **{**options, **kwargs})


def _shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.h5"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A dataset built once with one worker; tests copy it before changing anything."""
    return _build(tmp_path_factory.mktemp("built") / "ds")


def test_plan_groups_consecutive_tasks_by_announced_samples():
    assert plan_shards(_tasks(6), 4) == [
        (0, 2),
        (2, 4),
        (4, 5),
        (5, 6),
    ]  # samples 1 2 | 3 1 | 2 | 3
    assert plan_shards([object()] * 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert plan_shards([SimpleNamespace(n_samples=9)], 4) == [(0, 1)]
    with pytest.raises(ConfigurationError, match="samples_per_shard"):
        plan_shards(_tasks(), 0)


def test_output_depends_on_tasks_only_not_on_worker_count(built, tmp_path):
    two = _build(tmp_path / "two", n_workers=2)
    assert read_manifest(two) == read_manifest(built)
    assert _shard_bytes(two) == _shard_bytes(built)
    manifest = read_manifest(built)
    assert (
        manifest["complete"]
        and manifest["n"] == 19
        and manifest["arrays"]["cbed"]["shape"] == [8, 8]
    )
    # each shard is exactly its tasks' samples in task order
    tasks = _tasks()
    for entry in manifest["shards"]:
        start, stop = entry["tasks"]
        expected = write_shard(
            tmp_path / "x.h5", [s for t in tasks[start:stop] for s in _simulate(t)]
        )
        assert entry["sha256"] == expected
    open_dataset(built, verify=True)


def test_resume_recomputes_only_missing_and_corrupt_shards(built, tmp_path, monkeypatch):
    out = shutil.copytree(built, tmp_path / "ds")
    before = _shard_bytes(out)
    (out / shard_name(1)).unlink()
    broken = bytearray((out / shard_name(3)).read_bytes())
    broken[-50] ^= 1  # same size: only the checksum tells
    (out / shard_name(3)).write_bytes(bytes(broken))
    untouched = {
        p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5") if p.name != shard_name(3)
    }
    _build(out)
    assert _shard_bytes(out) == before and read_manifest(out) == read_manifest(built)
    assert all(
        (out / name).stat().st_mtime_ns == t
        for name, t in untouched.items()
        if name != shard_name(1)
    )

    def no_cluster(*args, **kwargs):
        raise AssertionError("a complete dataset needs no workers")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    assert _build(out) == out


def test_refuses_to_mix_datasets_unless_overwriting(built, tmp_path):
    out = shutil.copytree(built, tmp_path / "ds")
    with pytest.raises(ConfigurationError, match="different seed.*new output folder.*overwrite"):
        _build(out, seed=4)
    with pytest.raises(ConfigurationError, match="different config, samples_per_shard"):
        _build(out, config={"q": 16}, samples_per_shard=5)
    _build(out, seed=4, overwrite=True)
    assert read_manifest(out)["seed"] == 4 and read_manifest(out)["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *sorted(_shard_bytes(built))]


def test_worker_errors_surface_and_finished_shards_stay_valid(tmp_path):
    with pytest.raises(
        ConfigurationError, match="returned dict for task 6.*list of .*Sample"
    ) as info:
        build_dataset(
            tmp_path, _tasks(), _fail_late, config=CONFIG, seed=3, samples_per_shard=4, n_workers=1
        )
    assert any("rerun the same build to resume" in note for note in info.value.__notes__)
    manifest = read_manifest(tmp_path)
    assert not manifest["complete"] and all(e["tasks"][1] <= 6 for e in manifest["shards"])
    open_dataset(tmp_path, verify=True, allow_incomplete=True)
    with pytest.raises(ConfigurationError, match="no tasks"):
        build_dataset(tmp_path / "none", [], _simulate, config=CONFIG, seed=3, samples_per_shard=4)


SCRIPT = """
import sys, time
from types import SimpleNamespace
import numpy as np
from stemforge.datasets.build import build_dataset
from stemforge.simulate.sample import PEAK_DTYPE, Sample

def simulate(task):
    time.sleep(0.12)  # the physics would take longer
    rng = np.random.default_rng(task.seed)
    images = rng.random((3, 16, 16), dtype=np.float32)
    peaks = np.zeros(int(rng.integers(0, 6)), PEAK_DTYPE)
    peaks["qy"] = rng.random(len(peaks))
    return [Sample(images[0], images[1], images[2], peaks, {"structure_id": f"s{task.index % 5}", "seed": task.seed})]

if __name__ == "__main__":
    tasks = [SimpleNamespace(index=i, seed=7 * i + 1) for i in range(32)]
    build_dataset(sys.argv[1], tasks, simulate, config={"kind": "stand-in"}, seed=11,
                  samples_per_shard=2, n_workers=int(sys.argv[2]))
"""


def _run_script(script, out, workers):
    """Start the build script in its own process group (the dask workers die with it);
    stderr goes to ``out``.log."""
    with open(f"{out}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), str(out), str(workers)],
            env={**os.environ, "STEMFORGE_PROGRESS": "1"},
            stderr=log,
            start_new_session=True,
        )


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _wait_for_shards(out, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= n:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"no {n} shards in {out} after {timeout} s")


def test_kill_9_mid_build_then_rerun_completes_bit_identically(tmp_path):
    script = tmp_path / "build_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    victim = _run_script(script, killed, 2)
    _wait_for_shards(killed, 3)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    deadline = time.monotonic() + 10
    while _group_alive(victim.pid):
        assert time.monotonic() < deadline, "dask workers outlived the killed build"
        time.sleep(0.05)
    manifest = read_manifest(killed)
    assert not manifest["complete"] and 3 <= len(manifest["shards"]) < manifest["n_shards"] == 16

    # what else a crash can leave: a half-written shard under its temporary name, a
    # listed shard damaged afterwards
    first = killed / manifest["shards"][0]["path"]
    partial = killed / f".{shard_name(15)}.x1y2.tmp"
    partial.mkdir()
    (partial / shard_name(15)).write_bytes(first.read_bytes()[:1000])
    (killed / manifest["shards"][1]["path"]).write_bytes(b"\0" * 64)

    resumed = _run_script(script, killed, 2)
    fresh = _run_script(script, reference, 1)
    assert resumed.wait(timeout=60) == 0, Path(f"{killed}.log").read_text()
    assert fresh.wait(timeout=60) == 0, Path(f"{reference}.log").read_text()
    assert "patterns/s" in Path(f"{reference}.log").read_text()

    names = sorted(p.name for p in killed.iterdir())  # one file per shard, no leftovers
    assert names == ["manifest.json", *(shard_name(i) for i in range(16))]
    assert read_manifest(killed) == read_manifest(reference)
    assert _shard_bytes(killed) == _shard_bytes(reference)
    store = open_dataset(killed, verify=True)
    assert len(store) == 32 and all(sha256_file(killed / s.path) == s.sha256 for s in store.shards)
