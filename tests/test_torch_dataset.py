"""ShardDataset over a built dataset: lazy items, DataLoader workers, structure splits."""

import pickle
import sys
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.build import build_dataset
from stemforge.datasets.shards import open_dataset, read_shard
from stemforge.datasets.torch_dataset import ShardDataset, collate, split_by_structure
from stemforge.simulate.sample import PEAK_DTYPE, Sample

# worker processes cannot import test modules: send this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

STRUCTURES = [f"mp-{k}" for k in range(8)]


def _simulate(task: SimpleNamespace) -> list[Sample]:
    """Two thicknesses per task; the structure is in the pattern (cbed[0, 0] = task index)."""
    rng = np.random.default_rng(task.seed)
    samples = []
    for thickness in (50.0, 100.0):
        cbed, probe, target = rng.random((3, 10, 10), dtype=np.float32)
        cbed[0, 0] = task.index
        peaks = np.zeros(task.index % 3, PEAK_DTYPE)
        peaks["h"] = task.index
        meta = {"structure_id": STRUCTURES[task.index % 8], "thickness": thickness, "dose": None}
        samples.append(Sample(cbed, probe, target, peaks, meta))
    return samples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tasks = [SimpleNamespace(index=i, seed=i, n_samples=2) for i in range(24)]
    out = tmp_path_factory.mktemp("torch") / "ds"
    return build_dataset(
        out, tasks, _simulate, config={}, seed=0, samples_per_shard=6, n_workers=1, progress=False
    )


def _all_samples(folder) -> list[Sample]:
    store = open_dataset(folder)
    return [s for j in range(len(store.shards)) for s in read_shard(store.shard_path(j))]


def test_items_are_float32_tensors_read_lazily(folder):
    data = ShardDataset(folder, fields=("cbed", "target"))
    samples = _all_samples(folder)
    assert len(data) == 48 == len(samples)
    item = data[13]
    assert set(item) == {"cbed", "target", "index"} and item["index"] == 13
    assert item["cbed"].dtype == torch.float32 and item["cbed"].shape == (10, 10)
    np.testing.assert_array_equal(item["cbed"].numpy(), samples[13].cbed)
    np.testing.assert_array_equal(data[-1]["target"].numpy(), samples[-1].target)
    with pytest.raises(IndexError):
        data[48]
    assert len(data._readers) == 2  # shards opened on demand only
    state = pickle.loads(pickle.dumps(data))  # open files are not part of the state
    np.testing.assert_array_equal(state[13]["cbed"].numpy(), samples[13].cbed)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_two_workers_sees_every_sample_once(folder, context):
    data = ShardDataset(folder, metadata=True, peaks=True, max_open=2)
    data[0]  # a handle opened before the workers start must not leak into them
    loader = DataLoader(
        data, batch_size=5, num_workers=2, collate_fn=collate, multiprocessing_context=context
    )
    samples = _all_samples(folder)
    seen = []
    for batch in loader:
        assert batch["cbed"].shape[1:] == (10, 10) and batch["probe"].dtype == torch.float32
        for k, index in enumerate(batch["index"].tolist()):
            expected = samples[index]
            np.testing.assert_array_equal(batch["cbed"][k].numpy(), expected.cbed)
            np.testing.assert_array_equal(batch["peaks"][k], expected.peaks)
            assert batch["metadata"][k]["structure_id"] == expected.metadata["structure_id"]
            assert batch["metadata"][k]["dose"] is None
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(48))


def test_transform_sees_the_item(folder):
    data = ShardDataset(folder, fields=("cbed",), transform=lambda item: item["cbed"].sum())
    assert torch.isclose(data[3], torch.from_numpy(_all_samples(folder)[3].cbed).sum())


def test_subset_by_structure_ids(folder):
    data = ShardDataset(folder, structure_ids=["mp-1", "mp-6"])
    assert len(data) == 12 and set(data.structure_ids()) == {"mp-1", "mp-6"}
    assert all(int(data[i]["cbed"][0, 0]) % 8 in (1, 6) for i in range(len(data)))
    with pytest.raises(ConfigurationError, match=r"\['mp-99'\] are not in"):
        ShardDataset(folder, structure_ids=["mp-1", "mp-99"])
    with pytest.raises(ConfigurationError, match="unknown fields"):
        ShardDataset(folder, fields=("cbed", "labels"))


def test_split_by_structure_keeps_structures_apart(folder):
    data = ShardDataset(folder)
    splits = split_by_structure(data, (0.5, 0.25, 0.25), seed=1)
    assert [len(s) for s in splits] == [24, 12, 12]
    assert sorted(i for s in splits for i in s) == list(range(48))
    ids = data.structure_ids()
    groups = [set(ids[s]) for s in splits]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert split_by_structure(folder, (0.5, 0.25, 0.25), seed=1) == splits
    assert split_by_structure(data, (0.5, 0.25, 0.25), seed=2) != splits
    # indices refer to the dataset given, so they feed Subset directly
    subset = ShardDataset(folder, structure_ids=["mp-2", "mp-3", "mp-4"])
    part = Subset(subset, split_by_structure(subset, (0.5, 0.5), seed=0)[0])
    assert {part[i]["index"] for i in range(len(part))} <= set(subset.indices.tolist())


def test_split_refuses_impossible_fractions(folder):
    with pytest.raises(ConfigurationError, match="sum to 1"):
        split_by_structure(folder, (0.8, 0.1), seed=0)
    with pytest.raises(ConfigurationError, match="8 structures cannot fill"):
        split_by_structure(folder, (0.97, 0.01, 0.01, 0.01), seed=0)
