"""Dask arrays over files that reopen the file for every chunk.

Each source below holds only a path and a few numbers, so it pickles in a few bytes and
works on a ``dask.distributed`` cluster (an open memmap or h5py handle would either ship
its whole content or not pickle at all). Opening a file per chunk costs well under a
millisecond next to reading tens of MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.errors import FileFormatError
from stemforge.datasets.io.memory import CHUNK_BYTES, scan_chunks


def contiguous_selection(key: Any, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """``(first element, shape)`` when ``key`` picks one contiguous run of a C-ordered array.

    That holds for unit-step slices where every axis after the first partly selected one
    is taken whole (how scan chunks cut a datacube); otherwise None.
    """
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > len(shape) or not all(isinstance(k, slice) for k in key):
        return None
    ranges = [k.indices(n) for k, n in zip(key, shape, strict=False)] + [
        (0, n, 1) for n in shape[len(key) :]
    ]
    if any(step != 1 or stop < start for start, stop, step in ranges):
        return None
    out_shape = tuple(stop - start for start, stop, _ in ranges)
    if 0 in out_shape:
        return 0, out_shape
    partial = [i for i, (r, n) in enumerate(zip(out_shape, shape, strict=True)) if r != n]
    # contiguous: single indices, then one range, then whole axes
    if partial and any(out_shape[i] != 1 for i in range(partial[-1])):
        return None
    first = int(np.ravel_multi_index([start for start, _, _ in ranges], shape))
    return first, out_shape


@dataclass(frozen=True)
class NpySource:
    """Array-like view of a ``.npy`` file that reads each slice from disk when asked.

    Contiguous slices (scan chunks) are read with one ``readinto`` into a fresh array:
    no page faults and no mapped pages left counting against the process's memory. Other
    selections go through a short-lived memory map. ``offset`` is the byte offset of the
    data, None for Fortran-ordered files (always memory-mapped).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        run = None if self.offset is None else contiguous_selection(key, self.shape)
        if run is None:
            return np.array(np.load(self.path, mmap_mode="r")[key])
        first, out_shape = run
        out = np.empty(out_shape, self.dtype)
        if out.size == 0:
            return out
        with open(self.path, "rb") as f:
            f.seek(self.offset + first * self.dtype.itemsize)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise FileFormatError(
                    f"{self.path} ended early: it was truncated while open", "copy the file again"
                )
        return out


@dataclass(frozen=True)
class H5Source:
    """Array-like view of one HDF5 dataset, opened per slice.

    ``filters`` loads ``hdf5plugin`` first (in whichever process reads the slice), for
    data compressed with filters HDF5 does not ship, such as the Dectris bitshuffle/LZ4.
    """

    path: Path
    dataset: str
    shape: tuple[int, ...]
    dtype: np.dtype
    filters: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        import h5py

        if self.filters:
            import hdf5plugin  # noqa: F401 - registers the filters on import

        with h5py.File(self.path, "r") as f:
            return f[self.dataset][key]


def as_dask(source: Any, token: str, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """Wrap an array-like (``shape``, ``dtype``, ``__getitem__``) in a scan-chunked Dask array.

    Parameters
    ----------
    source
        :class:`NpySource`, :class:`H5Source`, a zarr array...
    token
        Identifies the content (path, dataset, modification time): equal tokens share
        Dask's cache and graph keys, different files never do.
    chunk_bytes
        Target bytes per chunk (:func:`~stemforge.datasets.io.memory.chunk_target`).
    """
    import dask.array as da
    from dask.base import tokenize

    chunks = scan_chunks(tuple(source.shape), np.dtype(source.dtype).itemsize, chunk_bytes)
    meta = np.empty((0,) * len(source.shape), dtype=source.dtype)  # spares a read to guess it
    name = f"stemforge-{tokenize(token, chunks)}"
    return da.from_array(source, chunks=chunks, name=name, meta=meta)


def file_token(path: Path, *parts: object) -> str:
    """A token that changes when the file is rewritten (path, size and mtime)."""
    stat = path.stat()
    return "|".join(str(p) for p in (path.resolve(), stat.st_size, stat.st_mtime_ns, *parts))


def rechunk_scan(data: Any, chunk_bytes: int = CHUNK_BYTES) -> Any:
    """Rechunk a Dask ``(..., Qx, Qy)`` array so that chunks split scan axes only."""
    target = scan_chunks(tuple(data.shape), data.dtype.itemsize, chunk_bytes)
    if data.chunksize == target:
        return data
    return data.rechunk(target)
