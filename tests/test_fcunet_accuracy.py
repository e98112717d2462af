"""benchmarks/fcunet_accuracy.py: which reflections of a peak table are scored."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from stemforge.simulate.labels import peak_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("fcunet_accuracy")


def test_scored_reflections_leave_out_the_central_beam_weak_and_edge_reflections(benchmark):
    n, radius = 64, 4.0  # the detectors' edge margin is R + 1 = 5 px
    hkl = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [0, 3, 0]])
    positions = np.array([[32.0, 32.0], [42.0, 32.0], [32.0, 42.0], [52.0, 32.0], [32.0, 59.0]])
    amplitude = np.array([10.0, 2.0, 0.09, 1.0, 2.0])  # 0.09 < 5 % of the strongest, 2.0
    table = peak_table(hkl, positions, amplitude**2, np.zeros(len(hkl)))
    truth, ignored = benchmark.scored_reflections(table, radius, n, min_amplitude=0.05)
    np.testing.assert_allclose(truth, [[42.0, 32.0], [52.0, 32.0]])
    # 59 + 5 > 63.5: the 030 disk is not wholly on the detector
    np.testing.assert_allclose(ignored, [[32.0, 32.0], [32.0, 42.0], [32.0, 59.0]])


def test_the_training_structures_come_from_the_model_record_without_the_data(benchmark, tmp_path):
    from omegaconf import OmegaConf

    from stemforge.datasets.commands import compose_config
    from stemforge.simulate.factory import plan_tasks

    config = OmegaConf.to_container(
        compose_config("fcunet_small", [f"out={tmp_path / 'gone'}", "n_patterns=64"]), resolve=True
    )
    planned = {task.structure_id for task in plan_tasks(config)}
    assert len(planned) >= 2
    listed = {"path": "/elsewhere/b", "structure_ids": ["aflow-proto:X", "pyxtal:Y"]}
    absent = {"path": str(tmp_path / "gone"), "config": config}  # an export before the ids
    metadata = {"data": {"datasets": [listed, absent]}}
    names, ids = benchmark.training_structures(None, metadata)
    assert names == f"/elsewhere/b, {tmp_path / 'gone'}"
    assert ids == {"aflow-proto:X", "pyxtal:Y"} | planned
    assert benchmark.training_structures("none", metadata) == ("none", set())
