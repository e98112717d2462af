"""A torch ``Dataset`` over a sharded training set, read lazily one sample at a time.

Each process opens the shard files it needs on first use (a few at a time, least recently
used closed first); open HDF5 handles are never pickled, so the dataset works with
``DataLoader(num_workers=...)`` under both the fork and the spawn start methods.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.shards import IMAGE_FIELDS, ShardReader, ShardStore, open_dataset

#: Item keys that hold one ragged or free-form value per sample; :func:`collate` keeps
#: them as lists.
LIST_KEYS = ("metadata", "peaks")


class ShardDataset(Dataset):
    """All samples of a dataset folder (or those of chosen structures), indexable.

    An item is a dict: each requested image field as a ``(Q, Q)`` float32 tensor,
    ``index`` (the sample's number in the whole dataset), and on request ``metadata``
    (dict of plain Python values, None where not applicable) and ``peaks`` (structured
    NumPy array of ``PEAK_DTYPE``, detector pixels). With either of those, batch with
    :func:`collate` instead of the default.

    Parameters
    ----------
    folder
        The dataset folder (``manifest.json`` and shards).
    fields
        Image fields to load, from ``("cbed", "probe", "target")``.
    transform
        Called on each item dict; its return value is the item (augmentation goes here).
    metadata, peaks
        Add the sample's metadata / Bragg peak table to each item.
    structure_ids
        Keep only the samples of these structures (split by structure).
    verify
        Check every shard's SHA-256 on opening (reads the whole dataset once).
    max_open
        Shard files each process keeps open.
    """

    def __init__(
        self,
        folder: str | Path,
        fields: Sequence[str] = IMAGE_FIELDS,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        *,
        metadata: bool = False,
        peaks: bool = False,
        structure_ids: Iterable[str] | None = None,
        verify: bool = False,
        max_open: int = 8,
    ) -> None:
        unknown = [f for f in fields if f not in IMAGE_FIELDS]
        if unknown:
            raise ConfigurationError(f"unknown fields {unknown}", f"choose from {IMAGE_FIELDS}")
        self.store: ShardStore = open_dataset(folder, verify=verify)
        self.fields = tuple(fields)
        self.transform = transform
        self.with_metadata = metadata
        self.with_peaks = peaks
        self.max_open = max_open
        self.indices = np.arange(len(self.store))
        if structure_ids is not None:
            self.indices = self._select(set(structure_ids))
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._pid = os.getpid()

    def _select(self, wanted: set[str]) -> np.ndarray:
        ids = self.store.column("structure_id")
        missing = wanted - set(ids.tolist())
        if missing:
            raise ConfigurationError(
                f"structure ids {sorted(missing)} are not in {self.store.folder}",
                "choose ids from the dataset (ShardDataset(...).structure_ids())",
            )
        return np.flatnonzero(np.isin(ids, list(wanted)))

    def structure_ids(self) -> np.ndarray:
        """The structure id of each item, in item order."""
        return self.store.column("structure_id")[self.indices]

    @property
    def n_samples(self) -> int:
        """Samples in the whole dataset folder (the range of the items' ``index``)."""
        return len(self.store)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open h5py files do not pickle
        return state

    def _reader(self, shard: int) -> ShardReader:
        if self._pid != os.getpid():  # forked: the parent's HDF5 handles are not ours to use
            self._readers, self._pid = OrderedDict(), os.getpid()
        reader = self._readers.pop(shard, None)
        if reader is None:
            reader = ShardReader(self.store.shard_path(shard))
        self._readers[shard] = reader  # most recently used last
        while len(self._readers) > self.max_open:
            self._readers.popitem(last=False)[1].close()
        return reader

    def __getitem__(self, item: int) -> Any:
        if not -len(self) <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} samples")
        index = int(self.indices[item])
        shard, local = self.store.locate(index)
        reader = self._reader(shard)
        out: dict[str, Any] = {
            name: torch.from_numpy(reader.image(name, local)) for name in self.fields
        }
        out["index"] = index
        if self.with_metadata:
            out["metadata"] = reader.metadata(local)
        if self.with_peaks:
            out["peaks"] = reader.peaks(local)
        return self.transform(out) if self.transform is not None else out


class ConcatShardDataset(Dataset):
    """Several :class:`ShardDataset` as one: items and ``index`` run on from part to part.

    ``index`` of a part's sample is offset by the sizes of the folders before it, so it
    stays unique (augmentation draws are keyed on it); a single part is unchanged. A part's
    own ``transform`` sees its local ``index``: augment after joining.
    """

    def __init__(self, parts: Sequence[ShardDataset]) -> None:
        if not parts:
            raise ConfigurationError("no datasets to join", "give at least one dataset folder")
        self.parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])
        self._offsets = np.cumsum([0] + [p.n_samples for p in self.parts])

    def structure_ids(self) -> np.ndarray:
        """The structure id of each item, in item order."""
        return np.concatenate([p.structure_ids() for p in self.parts])

    @property
    def n_samples(self) -> int:
        """Samples in all the folders together."""
        return int(self._offsets[-1])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, item: int) -> Any:
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} samples")
        part = int(np.searchsorted(self._starts, item, side="right")) - 1
        out = self.parts[part][item - int(self._starts[part])]
        out["index"] += int(self._offsets[part])
        return out


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of :class:`ShardDataset`: tensors stacked, ``metadata``/``peaks`` as lists."""
    lists = {key: [item[key] for item in batch] for key in LIST_KEYS if key in batch[0]}
    rest = [{k: v for k, v in item.items() if k not in lists} for item in batch]
    return {**default_collate(rest), **lists}


def split_by_structure(
    dataset: ShardDataset | ConcatShardDataset | str | Path, fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Split item indices so that no structure appears in two splits.

    Structures are shuffled with ``seed`` and dealt out in that order, each to the split
    whose share of the samples its samples' midpoint falls in; split sizes thus match
    ``fractions`` up to one structure's samples.

    Parameters
    ----------
    dataset
        A :class:`ShardDataset` or :class:`ConcatShardDataset` (indices refer to its items,
        for ``torch.utils.data.Subset``) or a dataset folder (indices of all its samples).
    fractions
        Share of the samples in each split, e.g. ``(0.8, 0.1, 0.1)``; positive, sum 1.
    seed
        Shuffles the structures; the same seed gives the same split.

    Returns
    -------
    list of list of int
        Sorted item indices per split.
    """
    fractions = np.asarray(fractions, dtype=float)
    if (
        fractions.ndim != 1
        or len(fractions) == 0
        or (fractions <= 0).any()
        or not np.isclose(fractions.sum(), 1)
    ):
        raise ConfigurationError(
            f"split fractions {fractions.tolist()}", "give positive fractions that sum to 1"
        )
    ids = (
        dataset.structure_ids()
        if isinstance(dataset, ShardDataset | ConcatShardDataset)
        else open_dataset(dataset).column("structure_id")
    )
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    midpoints = (np.cumsum(counts[order]) - counts[order] / 2) / len(ids)
    split_of = np.empty(len(unique), dtype=int)
    split_of[order] = np.searchsorted(np.cumsum(fractions)[:-1], midpoints, side="right")
    splits = [np.flatnonzero(split_of[inverse] == k).tolist() for k in range(len(fractions))]
    empty = [k for k, split in enumerate(splits) if not split]
    if empty:
        raise ConfigurationError(
            f"{len(unique)} structures cannot fill {len(fractions)} splits of fractions {fractions.tolist()} "
            f"(split {empty} would be empty)",
            "simulate more structures or use fewer or more even splits",
        )
    return splits
