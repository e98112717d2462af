"""Run work on a ``dask.distributed`` cluster: connect to one, map a function over items.

The analyses (disk detection, strain) and the dataset factory run the same code in one
process or on a cluster; this module holds what they share: how a ``scheduler`` setting
becomes a client (:func:`connect`) and an ordered, fault-tolerant map (:func:`map_ordered`).
``distributed`` is imported only when a cluster is asked for.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from stemforge.core.errors import ConfigurationError
from stemforge.core.progress import track

T = TypeVar("T")
R = TypeVar("R")

#: glibc malloc settings of LocalCluster workers. Distributed sets MALLOC_TRIM_THRESHOLD_ to
#: 64 KiB, which also pins the mmap threshold at 128 KiB, so every FFT batch maps fresh pages
#: and faults them in: disk detection ran 35 % slower. These are glibc's own dynamic ceilings.
WORKER_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}

#: How often a task is rerun after it raised; a task whose worker died is rescheduled by
#: Dask on its own (up to ``distributed.scheduler.allowed-failures`` deaths).
RETRIES = 2


def parse_scheduler(text: str | int | None) -> str | int | None:
    """A ``--scheduler`` value: None, ``"local"``, a worker count, or a scheduler address.

    Raises
    ------
    ConfigurationError
        For an empty value or a worker count below one.
    """
    if text is None or isinstance(text, int):
        value = text
    else:
        value = text.strip()
        if value.isdigit():
            value = int(value)
        elif not value:
            raise ConfigurationError(
                "empty --scheduler", "give 'local', a worker count or tcp://HOST:PORT"
            )
    if isinstance(value, int) and value < 1:
        raise ConfigurationError(f"--scheduler {value}: no workers", "give at least 1 worker")
    return value


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def connect(scheduler: Any) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler``, closed (with any cluster it started) on exit.

    Parameters
    ----------
    scheduler
        A ``distributed.Client`` (used as is, not closed); ``"local"`` or a worker count: a
        LocalCluster on 127.0.0.1 of single-threaded worker processes (one per available
        core for ``"local"``); any other string: the address of a running scheduler.
    """
    from distributed import Client, LocalCluster

    scheduler = parse_scheduler(scheduler) if isinstance(scheduler, str | int) else scheduler
    if scheduler is None:
        raise ConfigurationError("no scheduler given", "pass 'local', a worker count or an address")
    if isinstance(scheduler, str) and scheduler != "local":
        try:
            client = Client(scheduler)
        except OSError as err:
            raise ConfigurationError(
                f"cannot reach a dask scheduler at {scheduler!r} ({err})",
                "start one (`dask scheduler`, then `dask worker ADDRESS`) and give its address, "
                "or use --scheduler local for a LocalCluster on this machine",
            ) from None
        with client:
            yield client
    elif isinstance(scheduler, str | int):
        n_workers = available_cores() if scheduler == "local" else scheduler
        # one single-threaded process per core: NumPy/FFT code holds the GIL between calls
        # and abTEM scaled 1.9x on 2 cores this way, where threads contend
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=":0",  # a free port: concurrent jobs never fight over 8787
                silence_logs=logging.ERROR,
                env=WORKER_MALLOC,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    else:
        yield scheduler


@functools.lru_cache(maxsize=4)
def unpickle(payload: bytes) -> Any:
    """An object from its cloudpickle bytes, once per worker process (cached by value)."""
    import cloudpickle

    return cloudpickle.loads(payload)


def _call(payload: bytes, item: Any) -> Any:
    return unpickle(payload)(item)


def map_ordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    scheduler: Any = None,
    *,
    on_result: Callable[[int, R], None] | None = None,
    description: str = "working",
    retries: int = RETRIES,
) -> list[R]:
    """``[fn(item) for item in items]``, in this process or on a cluster.

    Parameters
    ----------
    fn
        The work; on a cluster it travels once to each worker (with cloudpickle, so
        closures and functions of unimportable modules work), so whatever it holds, such as
        a lazy datacube, should be small: workers should read their data from files.
    items
        Small picklable arguments, one task each (e.g. slices of scan rows).
    scheduler
        None: run here, in order. Otherwise a cluster (see :func:`connect`); tasks that
        raise are retried ``retries`` times and tasks of a worker that died are rerun on
        another, so a lost worker costs time, not results.
    on_result
        Called here as ``on_result(index, result)`` as each item finishes (in completion
        order on a cluster), e.g. to checkpoint results.
    description
        Label of the progress bar.

    Returns
    -------
    list
        The results in the order of ``items``.
    """
    if scheduler is None:
        results = []
        for i, item in enumerate(track(items, len(items), description)):
            results.append(fn(item))
            if on_result is not None:
                on_result(i, results[-1])
        return results
    import cloudpickle
    from distributed import as_completed

    with connect(scheduler) as client:
        # a task, not scattered data: if every worker holding it dies, it is recomputed;
        # on every worker, so that data locality does not pile the tasks onto one of them
        payload = client.submit(bytes, cloudpickle.dumps(fn), pure=False)
        client.replicate([payload])
        # a bounded number of tasks in flight keeps the scheduler's graph small
        window = max(4 * sum(client.nthreads().values()), 16)
        queue = iter(enumerate(items))
        futures = as_completed()
        index: dict[str, int] = {}
        results: dict[int, R] = {}

        def refill() -> None:
            while futures.count() < window and (next_item := next(queue, None)) is not None:
                i, item = next_item
                future = client.submit(_call, payload, item, retries=retries, pure=False)
                index[future.key] = i
                futures.add(future)

        refill()
        try:
            for future in track(futures, len(items), description):
                i = index.pop(future.key)
                results[i] = future.result()  # re-raises a task's exception here
                future.release()
                if on_result is not None:
                    on_result(i, results[i])
                refill()
        except BaseException:
            client.cancel(list(futures.futures))
            raise
        return [results[i] for i in range(len(items))]
