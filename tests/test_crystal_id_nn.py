"""The neural crystal identifier: invariances of the set network, its data, a tiny real run."""

import json

import numpy as np
import pytest
import torch
from built_peak_lists import built_peak_lists

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.peak_list_datamodule import PeakListDataModule, pad_peak_lists
from stemforge.datasets.peak_lists import kinematic_peak_lists
from stemforge.models.crystal_id import aggregate
from stemforge.models.peak_set import PeakSetNet
from stemforge.models.zoo import load_model_file
from stemforge.simulate.structures import get_structure
from stemforge.train.crystal_id import identification_scores
from stemforge.train.run import compose_config, main

# Three crystal systems: cubic Cu, hexagonal Mg, tetragonal rutile TiO2.
PROTOTYPES = (
    "aflow-proto:A_cF4_225_a-Cu",
    "aflow-proto:A_hP2_194_c-Mg",
    "aflow-proto:A2B_tP6_136_f_a-TiO2",
)
TINY = {"width": 32, "depth": 2, "heads": 4, "pair_width": 8, "max_spots": 24}


@pytest.fixture(scope="module")
def lists():
    records = [get_structure(i) for i in PROTOTYPES]
    return kinematic_peak_lists(records, seed=0, n_zone_axes=4, thickness=(50.0, 150.0))


@pytest.fixture(scope="module")
def batch(lists):
    q, intensity, mask = pad_peak_lists(lists.q, lists.intensity, lists.offsets, 24)
    return torch.from_numpy(q), torch.from_numpy(intensity), torch.from_numpy(mask)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PeakSetNet(**TINY).eval()


def _outputs(net, q, intensity, mask):
    with torch.no_grad():
        return net(q, intensity, mask)


def _assert_same(a, b, atol=1e-5):
    for key in ("system", "group", "lattice"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_padding_keeps_the_strongest_spots_first(lists):
    q, intensity, mask = pad_peak_lists(lists.q, lists.intensity, lists.offsets, 5)
    counts = np.diff(lists.offsets)
    assert q.shape == (len(lists), 5, 2) and np.array_equal(mask.sum(1), np.minimum(counts, 5))
    first = lists.intensity[: counts[0]]
    np.testing.assert_array_equal(intensity[0][mask[0]], np.sort(first)[::-1][:5])
    assert np.all(np.diff(intensity, axis=1)[mask[:, 1:]] <= 0)


def test_output_is_invariant_to_spot_order_rotation_mirror_and_intensity_scale(net, batch):
    q, intensity, mask = batch
    reference = _outputs(net, q, intensity, mask)
    order = torch.randperm(q.shape[1], generator=torch.Generator().manual_seed(1))
    _assert_same(reference, _outputs(net, q[:, order], intensity[:, order], mask[:, order]))
    angle = torch.rand(len(q), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c, s = torch.cos(2 * np.pi * angle), torch.sin(2 * np.pi * angle)
    rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    rotated = torch.einsum("bij,bkj->bki", rotation, q.double()).float()
    _assert_same(reference, _outputs(net, rotated, intensity, mask))
    mirrored = q * torch.tensor([1.0, -1.0])
    _assert_same(reference, _outputs(net, mirrored, 7.5 * intensity, mask))


def test_padding_and_padded_values_do_not_change_the_output(net, batch):
    q, intensity, mask = batch
    reference = _outputs(net, q, intensity, mask)
    extra = 9
    noise = torch.randn(len(q), extra, 2, generator=torch.Generator().manual_seed(3))
    longer = _outputs(
        net,
        torch.cat([q, noise], 1),
        torch.cat([intensity, torch.full((len(q), extra), 1e3)], 1),
        torch.cat([mask, torch.zeros(len(q), extra, dtype=torch.bool)], 1),
    )
    _assert_same(reference, longer)
    empty = _outputs(net, q[:1] * 0, intensity[:1] * 0, mask[:1] & False)
    assert all(torch.isfinite(v).all() for v in empty.values())


def test_predictions_are_probabilities_and_aggregate(net, lists):
    predictions = net.predict_peaks(lists.q, lists.intensity, lists.offsets, batch_size=7)
    assert len(predictions) == len(lists)
    np.testing.assert_allclose(predictions.system_probability.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(predictions.group_probability.sum(1), 1.0, atol=1e-6)
    cubic = predictions.lattice[:, 6]
    np.testing.assert_allclose(cubic[:, 0], cubic[:, 2])
    np.testing.assert_allclose(cubic[:, 3:], 90.0)
    assert aggregate(predictions).n_patterns == len(lists)
    scores = identification_scores(net, lists, "val")
    assert 0 <= scores["val/aggregate_system_accuracy"] <= 1


def test_datamodule_splits_by_structure_and_augments_per_epoch(lists):
    augment = {"copies": 2, "position_noise": 0.003}
    data = PeakListDataModule(lists, max_spots=16, splits=[0.34, 0.33, 0.33], augment=augment)
    data.setup()
    names = [set(data.parts[s].structure_id) for s in ("train", "val", "test")]
    assert all(len(n) == 1 for n in names) and len(set.union(*names)) == 3
    train = data.datasets["train"]
    assert len(train) == 2 * len(data.parts["train"])
    first, again, later = train.arrays(0)["q"].clone(), train.arrays(0)["q"], train.arrays(1)["q"]
    assert torch.equal(first, again) and not torch.equal(first, later)
    item = train[(1, 3)]
    assert item["q"].shape == (16, 2) and item["group"] == data.parts["train"].space_group[3] - 1
    with pytest.raises(ConfigurationError, match="max_spots"):
        PeakListDataModule(lists, max_spots=0)


def test_experiment_trains_scores_and_exports(lists, tmp_path):
    cfg = compose_config(["experiment=crystal_id_nn"])
    assert cfg.task == "crystal_id_nn" and cfg.data.max_spots == cfg.model.max_spots
    path = built_peak_lists(cfg, lists, tmp_path)
    run = tmp_path / "run"
    main(
        [
            "experiment=crystal_id_nn",
            *(f"model.{key}={value}" for key, value in TINY.items()),
            f"data.path={path}",
            "data.splits=[0.34,0.33,0.33]",
            "data.batch_size=16",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"hydra.run.dir={run}",
        ]
    )
    description = json.loads((run / "model" / "model.json").read_text())
    assert description["model"] == "peak_set" and description["config"]["max_spots"] == 24
    metrics = description["metrics"]
    for key in (
        "val/loss",
        "val/system_accuracy",
        "test/group_top3",
        "test/aggregate_system_accuracy",
    ):
        assert 0 <= metrics[key] < 100
    assert next(run.glob("csv/version_*/metrics.csv")).read_text().count("train/loss")
    rebuilt = load_model_file(run / "model" / "model.safetensors")
    assert isinstance(rebuilt, PeakSetNet)
    predictions = rebuilt.predict_peaks(lists.q, lists.intensity, lists.offsets)
    assert predictions.group_probability.shape == (len(lists), 230)
