"""The training data of FCU-Net-style models: splits, on-the-fly augmentation, normalisation.

:func:`normalize_inputs` is the one normalisation of (pattern, probe) pairs, shared by
training and inference; every exported model records :data:`NORMALIZATION`, the version
that inference must apply. :class:`FCUNetDataModule` serves a shard dataset split by
structure, each training sample augmented afresh every epoch, yet reproducibly: the
order of an epoch depends only on ``(seed, epoch)``, the augmentation of a sample only on
``(seed, epoch, sample index)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.shards import open_dataset
from stemforge.datasets.torch_dataset import ConcatShardDataset, ShardDataset, split_by_structure
from stemforge.simulate.augment import Augmenter
from stemforge.simulate.sample import Sample

#: What an exported model records as its ``normalization``; inference applies
#: :func:`normalize_inputs` only to models whose record equals this.
NORMALIZATION: dict[str, Any] = {
    "function": "stemforge.datasets.datamodule.normalize_inputs",
    "version": 2,
    "inputs": "sqrt(I / mean(I)) per image, negatives clipped",
    "target": "sqrt(target / max(target))",
    "output": "max(prediction, 0) ** 2",
}

Image = TypeVar("Image", torch.Tensor, np.ndarray)


def _sqrt_relative(image: Image) -> Image:
    """``sqrt(I / mean(I))`` over the last two axes; an all-zero image stays zero."""
    if isinstance(image, torch.Tensor):
        x = (image if image.is_floating_point() else image.float()).clamp_min(0)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return torch.sqrt(x / mean.clamp_min(torch.finfo(x.dtype).tiny))
    x = np.asarray(image)
    x = np.clip(x if x.dtype.kind == "f" else x.astype(np.float32), 0, None)
    mean = x.mean(axis=(-2, -1), keepdims=True)
    return np.sqrt(x / np.maximum(mean, np.finfo(x.dtype).tiny))


def normalize_inputs(pattern: Image, probe: Image) -> tuple[Image, Image]:
    """Normalise a diffraction pattern and its vacuum probe for the network.

    Each image is divided by its own mean over the detector and square-rooted:
    ``sqrt(I / mean(I))`` (negative values, e.g. from background subtraction, count as 0).

    - Dividing by the total makes the input independent of the dose, of the detector gain
      and of whether the pattern is in counts or in fractions of the beam; dividing by the
      mean rather than the sum keeps values near 1 at any detector size.
    - The square root compresses the dynamic range (the central disk outshines weak
      reflections by orders of magnitude) and stabilises Poisson noise (Anscombe). A
      pattern of non-overlapping disks stays a sum of probe-shaped disks, which the
      Fourier correlation with the (equally transformed) probe relies on.

    Parameters
    ----------
    pattern, probe
        Torch tensors or NumPy arrays whose last two axes are the detector ``(Qx, Qy)``;
        any leading axes (batch, channel) are kept. The probe may have fewer leading axes.

    Returns
    -------
    pattern, probe
        Same types and shapes; floating inputs keep their dtype, integer ones become float32.
    """
    return _sqrt_relative(pattern), _sqrt_relative(probe)


def normalize_target(target: Image) -> Image:
    """What the network learns from a structure-factor target image: ``sqrt(t / max(t))``.

    Dividing by the maximum, the central beam's ``|V_0|``, makes peak heights fractions of
    the forward-scattered amplitude, comparable across structures. The square root lifts
    the weak reflections: the strongest diffracted ``|V_g|`` is typically 0.1–0.5 of
    ``|V_0|`` and reflections worth finding go down to 5 % of that, so on the linear scale a
    missed weak peak cost the mean-squared loss ~0.2 % of an image's total and the
    network left 18 % of the benchmark's reflections out; under the root it costs ~30 times
    more. :func:`structure_factor_image` maps outputs back. An all-zero target stays zero.
    """
    if isinstance(target, torch.Tensor):
        peak = target.amax(dim=(-2, -1), keepdim=True)
        return torch.sqrt(target.clamp_min(0) / peak.clamp_min(torch.finfo(target.dtype).tiny))
    peak = np.max(target, axis=(-2, -1), keepdims=True)
    tiny = np.finfo(np.asarray(target).dtype).tiny
    return np.sqrt(np.clip(target, 0, None) / np.maximum(peak, tiny))


def structure_factor_image(output: Image) -> Image:
    """A network output (or normalised target) as ``|V_g| / |V_0|`` peaks: ``max(y, 0)²``,
    the inverse of :func:`normalize_target`."""
    if isinstance(output, torch.Tensor):
        return output.clamp_min(0).square()
    return np.square(np.clip(output, 0, None))


class PatternDataset(Dataset):
    """Samples of chosen items of a :class:`ShardDataset`, augmented and normalised.

    An item is a dict of ``pattern``, ``probe``, ``target`` (float32 ``(1, Q, Q)``) and
    ``index`` (the sample's number in the whole dataset). Items are addressed by an int
    (epoch 0) or by an ``(epoch, item)`` key as :class:`EpochSampler` yields them; the
    augmentation of a key depends on nothing else, so it is the same in any worker
    process, order or rerun.

    Parameters
    ----------
    shards
        The dataset, opened with ``metadata=True, peaks=True`` (the augmenter moves peaks
        and needs the Q pixel size).
    items
        Indices into ``shards`` that form this split.
    augmenter
        Applied to every sample with index ``epoch * shards.n_samples + sample index``;
        None: clean samples.
    """

    def __init__(
        self,
        shards: ShardDataset | ConcatShardDataset,
        items: Sequence[int],
        augmenter: Augmenter | None,
    ) -> None:
        self.shards = shards
        self.items = list(items)
        self.augmenter = augmenter
        self.n_total = shards.n_samples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, item = key if isinstance(key, tuple) else (0, key)
        raw = self.shards[self.items[item]]
        index = int(raw["index"])
        cbed, probe, target = (raw[name].numpy() for name in ("cbed", "probe", "target"))
        if self.augmenter is not None:
            sample = Sample(cbed, probe, target, raw["peaks"], raw["metadata"])
            sample = self.augmenter(sample, index=epoch * self.n_total + index)
            cbed, probe, target = sample.cbed, sample.probe, sample.target
        pattern, probe = normalize_inputs(torch.from_numpy(cbed), torch.from_numpy(probe))
        return {
            "pattern": pattern[None],
            "probe": probe[None],
            "target": normalize_target(torch.from_numpy(np.ascontiguousarray(target)))[None],
            "index": index,
        }


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` (shuffled with ``seed + epoch``) that yields
    ``(epoch, item)`` keys, so that the dataset knows the epoch in any worker process,
    persistent or not.

    Lightning calls :meth:`set_epoch` before every training epoch and leaves a
    ``DistributedSampler`` in place under DDP, so order and augmentation follow the epoch
    alone: a run resumed from a checkpoint sees the same data as one never stopped.
    """

    def __iter__(self):  # noqa: ANN204 - an iterator of (epoch, item) pairs
        return ((self.epoch, item) for item in super().__iter__())


class SplitDataModule(pl.LightningDataModule):
    """The loaders every stemforge data module shares: ``datasets`` (filled by the
    subclass's ``setup``) split into train / val[ / test] by ``splits``; training batches
    reshuffled every epoch by an :class:`EpochSampler` (seed + epoch, sharded across DDP
    ranks), validation and test in a fixed order."""

    datasets: dict[str, Any]
    splits: Sequence[float]
    batch_size: int
    num_workers: int
    seed: int
    pin_memory: bool = False

    @staticmethod
    def check_loader_settings(splits: Sequence[float], batch_size: Any) -> None:
        """Refuse split fractions other than [train, val(, test)] and non-positive batches."""
        if len(splits) not in (2, 3):
            raise ConfigurationError(
                f"data.splits has {len(splits)} fractions",
                "give [train, val] or [train, val, test] fractions, e.g. [0.8, 0.1, 0.1]",
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(
                f"batch_size={batch_size!r} is not a positive integer", "e.g. batch_size=16"
            )

    @property
    def has_test(self) -> bool:
        """Whether the splits include a test split."""
        return len(self.splits) == 3

    def _loader(self, name: str, sampler: EpochSampler | None = None) -> DataLoader:
        if name not in self.datasets:
            self.setup()
        if name not in self.datasets:
            raise ConfigurationError(
                "the data splits have no test split",
                "give three fractions, e.g. data.splits=[0.8,0.1,0.1], or set test=false",
            )
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled anew each epoch (with ``seed + epoch``), sharded across DDP ranks."""
        if "train" not in self.datasets:
            self.setup()
        trainer = self.trainer
        sampler = EpochSampler(
            self.datasets["train"],
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            shuffle=True,
            seed=self.seed,
        )
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation samples in a fixed order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test samples in a fixed order (needs a third split fraction)."""
        return self._loader("test")


class FCUNetDataModule(SplitDataModule):
    """Train/validation/test loaders over a shard dataset, split by structure.

    Parameters
    ----------
    path
        A dataset folder written by ``stemforge simulate`` (``manifest.json`` and shards),
        or a list of folders simulated for the same detector, served as one dataset (e.g. a
        run on AFLOW prototypes and one on random crystals).
    splits
        Fractions of the samples for train, validation and (optionally) test, e.g.
        ``(0.8, 0.1, 0.1)``; no structure lands in two splits
        (:func:`~stemforge.datasets.torch_dataset.split_by_structure`).
    split_seed
        Seed of the split; keep it fixed to compare runs on the same split.
    batch_size
        Samples per batch (per process under DDP).
    num_workers
        DataLoader worker processes (0: load in the main process).
    augment
        Sections of :data:`stemforge.simulate.augment.DEFAULT_CONFIG` to override (``{}``:
        the defaults); None switches augmentation off.
    seed
        With the epoch, fixes the order of the training samples; with the epoch and the
        sample index, every augmentation.
    augment_val
        Also augment validation and test samples, with the draws of epoch 0 every time, so
        they look like experimental data yet stay the same from epoch to epoch.
    pin_memory
        Pin batches in page-locked memory (faster copies to a GPU).
    verify
        Check every shard's SHA-256 when the dataset is opened.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        augment_val: bool = True,
        pin_memory: bool = False,
        verify: bool = False,
    ) -> None:
        super().__init__()
        self.check_loader_settings(splits, batch_size)
        self.paths = [Path(p) for p in ([path] if isinstance(path, str | Path) else path)]
        if not self.paths:
            raise ConfigurationError(
                "data.path is an empty list", "give a dataset folder or a list of folders"
            )
        # opened here to fail early on a bad folder
        self.stores = [open_dataset(p, verify=verify) for p in self.paths]
        grids = {
            str(p): (s.manifest["arrays"]["cbed"]["shape"][-2:], s.config.get("detector"))
            for p, s in zip(self.paths, self.stores, strict=True)
        }
        if len({json.dumps(grid) for grid in grids.values()}) > 1:
            raise ConfigurationError(
                f"the dataset folders have different detectors (pattern shape, detector): {grids}",
                "join only folders simulated with the same detector settings",
            )
        self.splits = [float(f) for f in splits]
        self.split_seed = int(split_seed)
        self.batch_size = batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.augmenter = Augmenter(dict(augment), seed) if augment is not None else None
        self.seed = int(seed)
        self.augment_val = bool(augment_val)
        self.verify = bool(verify)
        self.datasets: dict[str, PatternDataset] = {}

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """The detector grid ``(Qx, Qy)`` of the dataset's patterns."""
        return tuple(self.stores[0].manifest["arrays"]["cbed"]["shape"][-2:])

    def setup(self, stage: str | None = None) -> None:
        """Split the dataset (once; every stage shares the split)."""
        if self.datasets:
            return
        shards = ConcatShardDataset(
            [ShardDataset(p, metadata=True, peaks=True) for p in self.paths]
        )
        parts = split_by_structure(shards, self.splits, self.split_seed)
        eval_augmenter = self.augmenter if self.augment_val else None
        for name, items in zip(("train", "val", "test"), parts, strict=False):
            augmenter = self.augmenter if name == "train" else eval_augmenter
            self.datasets[name] = PatternDataset(shards, items, augmenter)
