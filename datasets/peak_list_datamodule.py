"""Peak lists as padded tensors for set networks, split by structure, augmented per epoch.

:func:`pad_peak_lists` turns CSR spot lists into fixed-size ``(N, K, 2)`` positions,
``(N, K)`` intensities and a mask, keeping each pattern's ``K`` strongest spots (the weak
tail carries least and is the first a detector loses). :class:`PeakListDataModule` serves
a :class:`~stemforge.datasets.peak_lists.PeakLists` split by structure: the training
patterns get fresh measurement errors (:func:`~stemforge.datasets.peak_lists.augment`)
every epoch, drawn from ``(seed, epoch, copy)`` alone, so a resumed run sees the same data
as one never stopped; validation and test patterns are augmented once, with the draws the
random-forest run scores on (seed ``10000 + seed``), so the two models meet the same data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.datamodule import SplitDataModule
from stemforge.datasets.peak_lists import PeakLists, augment, read_peak_lists, split_by_structure

#: Offset of the seed of validation/test measurement errors (as in stemforge.train.crystal_id).
EVALUATION_SEED_OFFSET = 10_000


def pad_peak_lists(
    q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray, max_spots: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``max_spots`` strongest spots of every pattern, strongest first, zero-padded.

    Parameters
    ----------
    q, intensity, offsets
        CSR spot lists: ``(P, 2)`` positions, ``(P,)`` intensities, ``(N + 1,)`` offsets.
    max_spots
        Spots kept per pattern.

    Returns
    -------
    q, intensity, mask
        ``(N, max_spots, 2)`` and ``(N, max_spots)`` float32, ``(N, max_spots)`` bool
        (True: a real spot).
    """
    q = np.asarray(q, np.float32).reshape(-1, 2)
    intensity = np.asarray(intensity, np.float32).ravel()
    offsets = np.asarray(offsets, np.int64).ravel()
    n = len(offsets) - 1
    counts = np.diff(offsets)
    pattern = np.repeat(np.arange(n), counts)
    order = np.lexsort((-intensity, pattern))  # by pattern, strongest first
    rank = np.arange(len(order)) - np.repeat(offsets[:-1], counts)
    take = rank < max_spots
    rows, cols = pattern[order][take], rank[take]
    out_q = np.zeros((n, max_spots, 2), np.float32)
    out_i = np.zeros((n, max_spots), np.float32)
    mask = np.zeros((n, max_spots), bool)
    out_q[rows, cols] = q[order][take]
    out_i[rows, cols] = intensity[order][take]
    mask[rows, cols] = True
    return out_q, out_i, mask


def _epoch_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class PeakListDataset(Dataset):
    """Padded patterns with their labels; augmented afresh per epoch, or fixed.

    An item is a dict of ``q`` ``(K, 2)``, ``intensity`` ``(K,)``, ``mask`` ``(K,)``,
    ``system`` and ``group`` (int64 class indices: crystal system, space group − 1) and
    ``lattice`` ``(6,)``. Items are addressed by an int (epoch 0) or an ``(epoch, item)``
    key as :class:`~stemforge.datasets.datamodule.EpochSampler` yields them.

    Parameters
    ----------
    lists
        The patterns.
    max_spots
        Spots kept per pattern (the strongest).
    augment_settings
        Keyword arguments of :func:`~stemforge.datasets.peak_lists.augment` plus
        ``copies`` (augmented views of every pattern per epoch, default 1); None: the
        patterns as they are, every epoch.
    seed
        With the epoch and copy, seeds the augmentation.
    """

    def __init__(
        self,
        lists: PeakLists,
        max_spots: int,
        augment_settings: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.lists = lists
        self.max_spots = int(max_spots)
        settings = dict(augment_settings) if augment_settings is not None else None
        self.copies = int(settings.pop("copies", 1)) if settings is not None else 1
        self.settings = settings
        self.seed = int(seed)
        self._epoch: int | None = None
        self._arrays: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.copies * len(self.lists)

    def arrays(self, epoch: int = 0) -> dict[str, torch.Tensor]:
        """All items of ``epoch`` as stacked tensors (built once per epoch, vectorised)."""
        if self._epoch != epoch or not self._arrays:
            if self.settings is None:
                views = [self.lists]
            else:
                views = [
                    augment(self.lists, _epoch_seed(self.seed, epoch, copy), **self.settings)
                    for copy in range(self.copies)
                ]
            lists = PeakLists.concatenate(views)
            q, intensity, mask = pad_peak_lists(
                lists.q, lists.intensity, lists.offsets, self.max_spots
            )
            self._arrays = {
                "q": torch.from_numpy(q),
                "intensity": torch.from_numpy(intensity),
                "mask": torch.from_numpy(mask),
                "system": torch.from_numpy(lists.crystal_system.astype(np.int64)),
                "group": torch.from_numpy(lists.space_group.astype(np.int64) - 1),
                "lattice": torch.from_numpy(lists.lattice.astype(np.float32)),
            }
            self._epoch = epoch
        return self._arrays

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, item = key if isinstance(key, tuple) else (0, key)
        return {name: value[item] for name, value in self.arrays(epoch).items()}


class PeakListDataModule(SplitDataModule):
    """Train/validation/test loaders of padded peak lists, split by structure.

    Parameters
    ----------
    lists
        The patterns, or peak-list files (:func:`~stemforge.datasets.peak_lists.read_peak_lists`)
        to concatenate.
    max_spots
        Spots kept per pattern (the strongest).
    splits
        Fractions of the structures for train, validation and (optionally) test.
    split_seed
        Seed of the split (:func:`~stemforge.datasets.peak_lists.split_by_structure`).
    batch_size
        Patterns per batch.
    augment
        Keyword arguments of :func:`~stemforge.datasets.peak_lists.augment` plus ``copies``
        (augmented views of every training pattern per epoch); None: no measurement errors.
    seed
        Seeds the order and augmentation of training patterns (with the epoch) and the
        one draw of validation/test errors.
    num_workers
        DataLoader worker processes (0: load in the main process).
    """

    def __init__(
        self,
        lists: PeakLists | Sequence[str | Path],
        max_spots: int = 48,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        batch_size: int = 128,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.check_loader_settings(splits, batch_size)
        if not isinstance(max_spots, int) or max_spots < 1:
            raise ConfigurationError(
                f"max_spots={max_spots!r} is not a positive integer", "e.g. max_spots=48"
            )
        if not isinstance(lists, PeakLists):
            lists = PeakLists.concatenate(read_peak_lists(path)[0] for path in lists)
        self.lists = lists
        self.max_spots = max_spots
        self.splits = [float(f) for f in splits]
        self.split_seed = int(split_seed)
        self.batch_size = batch_size
        self.augment = dict(augment) if augment is not None else None
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.parts: dict[str, PeakLists] = {}
        self.datasets: dict[str, PeakListDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Split (once; every stage shares it) and fix the validation/test errors.

        ``parts`` keeps the patterns of each split as served (validation and test with
        their measurement errors), for scoring outside the loaders.
        """
        if self.datasets:
            return
        masks = split_by_structure(self.lists.structure_id, self.splits, self.split_seed)
        evaluation = dict(self.augment or {})
        evaluation.pop("copies", None)
        for name, mask in zip(("train", "val", "test"), masks, strict=False):
            part = self.lists.select(mask)
            if name == "train":
                self.datasets[name] = PeakListDataset(part, self.max_spots, self.augment, self.seed)
            else:
                if self.augment is not None:
                    part = augment(part, EVALUATION_SEED_OFFSET + self.seed, **evaluation)
                self.datasets[name] = PeakListDataset(part, self.max_spots)
            self.parts[name] = part
