"""Memory budget and chunking: when a reader goes lazy, how it chunks, how writers stream.

Lazy arrays are chunked over scan positions only (every chunk holds whole patterns), so
analyses that map over chunks never have to stitch a pattern back together.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from stemforge.core.datacube import DataCube, is_lazy
from stemforge.core.errors import ConfigurationError
from stemforge.core.progress import track

#: Environment variable that overrides :func:`default_memory_budget`.
MEMORY_BUDGET_ENV = "STEMFORGE_MEMORY_BUDGET"

#: Target size of one lazy chunk: a few tens of MB keeps Dask's overhead per chunk small
#: while many chunks still fit in memory at once.
CHUNK_BYTES = 32 * 2**20

_MIN_BUDGET = 64 * 2**20
_MAX_BUDGET = 16 * 2**30
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``"2GB"``, ``"512MiB"``, ``"1.5 gb"`` or ``"1000000"``.

    Decimal prefixes (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024.

    Raises
    ------
    ConfigurationError
        If the text is not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ConfigurationError(
                f"cannot read {text!r} as a memory size", "give bytes or a size like 512MB or 2GB"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigurationError(
            f"memory size {text!r} is not positive", "give a size like 512MB or 2GB"
        )
    return size


def default_memory_budget() -> int:
    """Largest array, in bytes, that readers load into memory when ``lazy`` is not given.

    ``STEMFORGE_MEMORY_BUDGET`` (e.g. ``"2GB"``, ``"512MB"`` or a byte count) overrides the
    default, which is a quarter of the currently available RAM, kept between 64 MiB and
    16 GiB so that neither a loaded machine nor a very large one gives an absurd value.
    """
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env:
        try:
            return parse_size(env)
        except ConfigurationError as err:
            raise ConfigurationError(
                f"{MEMORY_BUDGET_ENV}={env!r}: {err.problem}",
                f"set {MEMORY_BUDGET_ENV} to e.g. 2GB or unset it",
            ) from None
    import psutil

    available = psutil.virtual_memory().available
    return int(min(max(available // 4, _MIN_BUDGET), _MAX_BUDGET))


def budget_share(memory_budget: int | str | None, share: int, cap: int) -> int:
    """``1/share`` of the memory budget, in bytes, at most ``cap``.

    ``memory_budget`` is bytes, a size such as ``"256MB"``, or None for
    :func:`default_memory_budget`. Analyses size their blocks and batches with it, so that
    their working memory follows the budget rather than the data.
    """
    budget = default_memory_budget() if memory_budget is None else parse_size(memory_budget)
    return max(1, min(cap, budget // share))


def chunk_target(memory_budget: int | None) -> int:
    """Bytes per lazy chunk: :data:`CHUNK_BYTES`, or 1/16 of a smaller given budget.

    A block of an analysis is read chunk by chunk, each chunk whole, so chunks must be
    small next to the budget for the reading to stay within it.
    """
    return CHUNK_BYTES if memory_budget is None else budget_share(memory_budget, 16, CHUNK_BYTES)


def want_lazy(nbytes: int, lazy: bool | None, memory_budget: int | None) -> bool:
    """Resolve ``lazy=None`` to: lazy iff the array is larger than the memory budget."""
    if lazy is not None:
        return bool(lazy)
    budget = default_memory_budget() if memory_budget is None else memory_budget
    return nbytes > budget


def scan_chunks(
    shape: tuple[int, ...], itemsize: int, target: int = CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunk shape for a ``(..., Qx, Qy)`` array split over the leading (scan) axes only.

    Whole scan rows are grouped while they fit in ``target`` bytes; a row larger than that
    is split along the last scan axis. Detector axes are never split.
    """
    *scan, qx, qy = (int(s) for s in shape)
    pattern = max(qx * qy * itemsize, 1)
    chunks = [1] * len(scan)
    budget = max(target // pattern, 1)  # patterns per chunk
    for axis in reversed(range(len(scan))):
        take = min(scan[axis], budget)
        chunks[axis] = take
        if take < scan[axis]:
            break
        budget = max(budget // max(take, 1), 1)
    return (*chunks, qx, qy)


def copy_scan_rows(cube: DataCube, target: Any, rows: int, description: str) -> None:
    """Copy ``cube.data`` into ``target[...] = block`` slab by slab of ``rows`` scan rows.

    Only one slab is in memory at a time, so lazy and memory-mapped cubes of any size can
    be written; a progress bar shows on a terminal.
    """
    total = cube.shape[0]
    starts = range(0, total, rows)
    for start in track(starts, total=len(starts), description=description):
        sl = slice(start, min(start + rows, total))
        block = cube.data[sl]
        target[sl] = np.asarray(block.compute() if is_lazy(block) else block)
