"""The factory end to end: presets → plan → abTEM multislice → shards / strain scan on disk."""

import dataclasses
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stemforge.core.cli import cli
from stemforge.core.errors import ConfigurationError
from stemforge.datasets.commands import compose_config
from stemforge.datasets.io import read_datacube
from stemforge.datasets.shards import open_dataset
from stemforge.datasets.torch_dataset import ShardDataset
from stemforge.simulate.factory import plan_tasks, thickness_series

A_SI = 5.431020511  # Å, the substrate of the SiGe preset

SMALL = [
    "n_patterns=6",
    "seed=3",
    "samples_per_shard=2",
    "thickness={min:50.0,max:150.0,step:50.0}",
    "detector.n_pixels=48",
    "detector.q_pixel_size=0.03",
    "structures.max_atoms=16",
    "cluster.n_workers=1",
]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("STEMFORGE_PROGRESS", "0")


def test_plan_is_deterministic_and_exact(tmp_path):
    cfg = compose_config("fcunet_small", [f"out={tmp_path}", "n_patterns=20", "seed=5"])
    tasks = plan_tasks(cfg)
    assert tasks == plan_tasks(cfg)
    # 8 thicknesses per pass: 3 tasks, the last cut to 4 → exactly 20 samples
    assert [t.n_samples for t in tasks] == [8, 8, 4]
    assert all(1.0 <= t.semiangle <= 4.0 for t in tasks)
    other = plan_tasks(compose_config("fcunet_small", [f"out={tmp_path}", "n_patterns=20", "seed=6"]))
    assert [t.seed for t in other] != [t.seed for t in tasks]
    assert thickness_series({"min": 50, "max": 400, "step": 50}) == tuple(range(50, 401, 50))
    with pytest.raises(ConfigurationError, match="thickness"):
        thickness_series({"min": 100, "max": 50, "step": 10})
    with pytest.raises(ConfigurationError, match="strategy"):
        plan_tasks(compose_config("fcunet_small", [f"out={tmp_path}", "zone_axes.strategy=sideways"]))


def test_simulate_builds_shards_then_resumes_without_work(tmp_path):
    out = tmp_path / "small"
    result = CliRunner().invoke(cli, ["simulate", "fcunet_small", f"out={out}", *SMALL])
    assert result.exit_code == 0, result.output
    store = open_dataset(out, verify=True)
    assert len(store) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    # tasks of 3 thicknesses never split across shards: 2 shards of 3 samples
    assert manifest["complete"] and manifest["seed"] == 3 and [s["n"] for s in manifest["shards"]] == [3, 3]

    ds = ShardDataset(out, metadata=True, peaks=True)
    for i in range(len(ds)):
        item = ds[i]
        meta, peaks, cbed = item["metadata"], item["peaks"], item["cbed"].numpy()
        assert cbed.shape == (48, 48) and 0.5 < cbed.sum() <= 1.0  # fractions of the beam
        assert item["probe"].sum().item() == pytest.approx(1.0, abs=0.02)
        # the direct beam sits at pixel n // 2, where the target has its tallest peak (|V_0|)
        assert np.unravel_index(item["target"].numpy().argmax(), (48, 48)) == (24, 24)
        central = peaks[(peaks["h"] == 0) & (peaks["k"] == 0) & (peaks["l"] == 0)]
        assert (central["qx"][0], central["qy"][0]) == (24.0, 24.0)
        assert meta["structure_id"].startswith("aflow-proto:") and meta["q_pixel_size"] == 0.03
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.h5"))]
    again = CliRunner().invoke(cli, ["simulate", "fcunet_small", f"out={out}", *SMALL])
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.h5"))] == mtimes


def test_sige_strain_scan_spots_follow_the_truth(tmp_path):
    out = tmp_path / "sige"
    args = [
        "simulate",
        "sige_strain_scan",
        f"out={out}",
        "n_patterns=8",
        "scan_shape=[8,1]",
        "scan_step=12.0",
        # thin and a small probe (disk radius 2.5 px): disks are uniform and clear of the
        # higher-order Laue zone spots, so centroids are geometric centres
        "thickness={min:20.0,max:20.0,step:10.0}",
        "microscope.semiangle=0.5",
        "detector.n_pixels=96",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    cube = read_datacube(out / "scan.h5")
    with h5py.File(out / "truth.h5") as f:
        e_xx, e_yy = f["e_xx"][:], f["e_yy"][:]
    assert cube.shape == (8, 1, 96, 96) and cube.calibration.q_pixel_size == 0.01
    assert len(np.unique(e_xx.round(8))) == 3 and np.all(e_yy == 0)
    data = np.asarray(cube.data)
    n, c0 = 96, 48
    qx, qy = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    gx, gy = 1 / A_SI / 0.01, np.sqrt(2) / A_SI / 0.01  # (±1 ∓1 ±1) of Si [110], [001] along x
    for rx in range(8):
        for sx in (1, -1):
            for sy in (1, -1):
                x0, y0 = c0 + sx * gx / (1 + e_xx[rx, 0]), c0 + sy * gy
                w = data[rx, 0] * (np.hypot(qx - x0, qy - y0) < 4)
                cx, cy = (w * qx).sum() / w.sum(), (w * qy).sum() / w.sum()
                # strain moves these spots by 0.27 and 0.46 px; centroids agree to 0.005 px
                assert abs(cx - x0) < 0.02 and abs(cy - y0) < 0.02, (rx, sx, sy, cx - x0, cy - y0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["simulations"] == 3  # one per layer material, not per position


def test_simulate_refuses_bad_presets_and_overrides(tmp_path):
    runner = CliRunner()
    assert "unknown simulation preset" in str(runner.invoke(cli, ["simulate", "nope", f"out={tmp_path}"]).exception)
    assert "no output folder" in str(runner.invoke(cli, ["simulate", "fcunet_small"]).exception)
    bad = runner.invoke(cli, ["simulate", "fcunet_small", f"out={tmp_path}", "detector.pixles=3"])
    assert "bad override" in str(bad.exception)
    shown = runner.invoke(cli, ["simulate", "crystal_id", "--cfg"])
    assert shown.exit_code == 0 and "random_crystals" in shown.output
    assert not any(Path(tmp_path).iterdir()) and os.path.isdir(tmp_path)


def test_augmentation_at_generation_is_seeded(tmp_path):
    from stemforge.simulate.factory import run_task

    cfg = compose_config(
        "fcunet_small",
        [f"out={tmp_path}", *SMALL[:2], "thickness={min:50.0,max:50.0,step:50.0}", "detector.n_pixels=48",
         "detector.q_pixel_size=0.03", "structures.max_atoms=16",
         "augment={dose: {p: 1.0, log10_dose: [6, 6]}, affine: null, background: null, blur: null, defects: null}"],
    )
    task = plan_tasks(cfg)[0]
    clean = run_task(dataclasses.replace(task, augment=None))[0]
    noisy = run_task(task)[0]
    assert noisy.metadata["dose"] == pytest.approx(1e6)
    assert np.array_equal(noisy.cbed, np.round(noisy.cbed))  # electron counts
    # Poisson: total counts = dose × transmitted fraction within 5σ
    expected = 1e6 * clean.cbed.sum()
    assert abs(noisy.cbed.sum() - expected) < 5 * np.sqrt(expected)
    assert np.array_equal(run_task(task)[0].cbed, noisy.cbed)
    np.testing.assert_array_equal(noisy.target, clean.target)
