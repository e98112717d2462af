"""Progress bars for long steps (rich), quiet when asked or when not on a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars show on a terminal unless ``STEMFORGE_PROGRESS=0``; ``=1`` forces them on."""
    flag = os.environ.get("STEMFORGE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no", "")
    return sys.stderr.isatty()


@contextmanager
def _bar(description: str, total: int | None) -> Iterator[tuple[Any, Any]]:
    """A rich Progress on stderr with one task; yields ``(progress, task_id)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield progress, progress.add_task(description, total=total)


def track(items: Iterable[T], total: int | None = None, description: str = "working") -> Iterator[T]:
    """Iterate over ``items`` with a progress bar.

    Parameters
    ----------
    items
        What to iterate over.
    total
        Number of items (taken from ``len(items)`` when possible).
    description
        Label shown next to the bar.
    """
    if not progress_enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _bar(description, total) as (progress, task):
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def dask_progress(description: str = "computing") -> Iterator[None]:
    """Show a progress bar over the tasks of the Dask computations run inside the block.

    Uses Dask's local-scheduler callbacks; on a ``dask.distributed`` client use its
    dashboard or ``distributed.progress`` instead (the block then runs without a bar).
    """
    if not progress_enabled():
        yield
        return
    from dask.callbacks import Callback

    with _bar(description, None) as (progress, task):

        class _Callback(Callback):
            def _start_state(self, dsk: Any, state: dict) -> None:
                total = sum(len(state[k]) for k in ("ready", "waiting", "running"))
                progress.update(task, total=total)

            def _posttask(self, key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
                progress.advance(task)

        with _Callback():
            yield
