"""Build a sharded training set on a ``dask.distributed`` cluster, resumably.

The tasks (one structure × orientation, say) are cut into consecutive groups, one group
per shard. Each task is simulated on a worker; a worker then writes each shard from the
results of its tasks, in task order, so a shard's bytes depend on the tasks and the seed
only — never on the number of workers or on which finished first. The driver records
each shard in the manifest as it lands; a rerun after a crash or ``kill -9`` checks the
recorded shards and computes only the missing or corrupt ones.

Workers write the shard files themselves (only checksums travel back), so with a remote
scheduler the output folder must be on a filesystem that the workers and the driver share.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from stemforge.core.cluster import connect, unpickle
from stemforge.core.errors import ConfigurationError, ShapeError, StemforgeError
from stemforge.core.progress import progress_enabled, track
from stemforge.datasets.io.jsonable import to_jsonable
from stemforge.datasets.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_FIELDS,
    MANIFEST_NAME,
    ShardInfo,
    read_manifest,
    write_manifest,
    write_shard,
)
from stemforge.simulate.sample import PEAK_DTYPE, Sample

logger = logging.getLogger(__name__)

#: What must match for a rerun to resume into an existing dataset folder.
RESUME_KEYS = ("version", "config", "seed", "n_tasks", "samples_per_shard")


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside the dataset folder."""
    return f"shard-{index:05d}.h5"


def plan_shards(tasks: Sequence[Any], samples_per_shard: int) -> list[tuple[int, int]]:
    """Cut the task list into consecutive ``(start, stop)`` groups, one per shard.

    A task may announce how many samples it yields with an ``n_samples`` attribute
    (default 1); groups fill up to ``samples_per_shard`` samples, and hold at least one
    task. The plan depends only on the tasks, so reruns and resumes agree on it.
    """
    if samples_per_shard < 1:
        raise ConfigurationError(f"samples_per_shard={samples_per_shard}", "give a positive number")
    plan: list[tuple[int, int]] = []
    start, filled = 0, 0
    for i, task in enumerate(tasks):
        n = int(getattr(task, "n_samples", 1))
        if i > start and filled + n > samples_per_shard:
            plan.append((start, i))
            start, filled = i, 0
        filled += n
    if len(tasks) > start:
        plan.append((start, len(tasks)))
    return plan


# ------------------------------------------------------------------ worker side


def _simulate(payload: bytes, task: Any, index: int) -> list[Sample]:
    """Run one task, checking that it returned samples."""
    samples = unpickle(payload)(task)
    if not isinstance(samples, list | tuple) or not all(isinstance(s, Sample) for s in samples):
        raise ConfigurationError(
            f"simulate_fn returned {type(samples).__name__} for task {index}",
            "return a list of stemforge.simulate.sample.Sample",
        )
    return list(samples)


def _write(path: str, *results: list[Sample]) -> dict[str, Any]:
    """Write one shard from its tasks' results (in task order); return what the manifest needs."""
    samples = [s for result in results for s in result]
    digest = write_shard(path, samples)
    shape = list(samples[0].cbed.shape) if samples else None
    return {"sha256": digest, "n": len(samples), "bytes": os.path.getsize(path), "shape": shape}


# ------------------------------------------------------------------ driver side


def _version() -> str:
    try:
        return f"stemforge {version('stemforge')}"
    except PackageNotFoundError:
        return "stemforge (not installed)"


def _new_manifest(
    config: Any, seed: Any, n_tasks: int, samples_per_shard: int, n_shards: int
) -> dict[str, Any]:
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_by": _version(),
        "complete": False,
        "config": to_jsonable(config),
        "seed": to_jsonable(seed),
        "n_tasks": n_tasks,
        "samples_per_shard": samples_per_shard,
        "n_shards": n_shards,
        "n": None,
        "arrays": None,
        "shards": [],
    }


def _arrays(shape: list[int]) -> dict[str, Any]:
    """Per-sample shapes and dtypes, for the manifest."""
    arrays: dict[str, Any] = {name: {"shape": shape, "dtype": "float32"} for name in IMAGE_FIELDS}
    arrays["peaks"] = {"shape": ["ragged"], "dtype": [list(field) for field in PEAK_DTYPE.descr]}
    return arrays


def _clear(out: Path) -> None:
    """Remove the files of a previous dataset in ``out`` (and nothing else)."""
    for path in [out / MANIFEST_NAME, *out.glob("shard-*.h5")]:
        path.unlink(missing_ok=True)


def _remove_temporaries(out: Path) -> None:
    """Remove the half-written files an interrupted writer leaves (``atomic_output`` names)."""
    for path in out.glob(".*.tmp"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _resume(
    out: Path, manifest: dict[str, Any], overwrite: bool, progress: bool
) -> dict[int, ShardInfo]:
    """The intact shards of a previous run into ``out``, by shard index; updates ``manifest``."""
    if not (out / MANIFEST_NAME).exists():
        return {}
    if overwrite:
        _clear(out)
        return {}
    old = read_manifest(out)
    differs = [key for key in RESUME_KEYS if old.get(key) != manifest[key]]
    if differs:
        raise ConfigurationError(
            f"{out} holds a dataset built with a different {', '.join(differs)}; resuming would mix two datasets",
            "choose a new output folder, or pass overwrite=True to replace it",
        )
    manifest["arrays"] = old.get("arrays")
    done: dict[int, ShardInfo] = {}
    names = {shard_name(i): i for i in range(manifest["n_shards"])}
    entries = [ShardInfo.from_json(e) for e in old["shards"]]
    for info in track(entries, description="verifying shards") if progress else entries:
        try:
            info.check(out, checksum=True)
        except StemforgeError as err:
            logger.warning("recomputing a shard: %s", err.problem)
            continue
        done[names[info.path]] = info
    return done


def _record(manifest: dict[str, Any], done: dict[int, ShardInfo], out: Path) -> None:
    manifest["shards"] = [done[i].to_json() for i in sorted(done)]
    write_manifest(out, manifest)


@contextmanager
def _connect(client: Any, n_workers: int | None) -> Iterator[Any]:
    """The client to run on: the given one, one for a scheduler address, or a LocalCluster."""
    if client is not None and n_workers is not None:
        raise ConfigurationError(
            "n_workers was given with a client", "size the cluster where it is created"
        )
    with connect(client if client is not None else n_workers or "local") as connected:
        yield connected


@contextmanager
def _progress_bar(show: bool, total: int) -> Iterator[Callable[[int], None] | None]:
    """A bar over tasks with a patterns/s column; yields ``advance(n_patterns)`` or None."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class PatternRate(ProgressColumn):
        def render(self, task: Any) -> Text:
            patterns, elapsed = task.fields["patterns"], task.elapsed
            return Text(
                f"{patterns / elapsed:.1f} patterns/s" if elapsed and patterns else "", style="cyan"
            )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        PatternRate(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("simulating (tasks)", total=total, patterns=0)

        def advance(n: int) -> None:
            bar.update(task, advance=1, patterns=bar.tasks[task].fields["patterns"] + n)

        yield advance


def _run(
    client: Any,
    out: Path,
    tasks: Sequence[Any],
    plan: list[tuple[int, int]],
    todo: list[int],
    simulate_fn: Callable[[Any], list[Sample]],
    on_shard: Callable[[int, dict[str, Any]], None],
    advance: Callable[[int], None] | None,
) -> None:
    """Simulate and write the shards ``todo``; call ``on_shard`` as each lands.

    Tasks are submitted shard by shard, a bounded number at a time; each shard's write
    task follows its simulations, and earlier submissions run first, so shards complete
    roughly in order and finished results wait on the workers only until their shard is
    written. The workers write the files; only checksums come back.
    """
    import cloudpickle
    from distributed import as_completed

    # cloudpickle, not distributed's pickling, so that functions from modules registered
    # with cloudpickle.register_pickle_by_value reach the workers too; sent once per worker
    payload = client.scatter(cloudpickle.dumps(simulate_fn), broadcast=True)
    # outstanding tasks: enough to keep every thread busy (and a cluster still scaling up
    # fed) while the scheduler's graph stays small
    window = max(4 * sum(client.nthreads().values()), 32)
    queue = iter(todo)
    futures = as_completed()
    writes: dict[str, int] = {}
    outstanding = 0

    def submit(i: int) -> None:
        nonlocal outstanding
        start, stop = plan[i]
        results = [
            client.submit(_simulate, payload, tasks[t], t, pure=False) for t in range(start, stop)
        ]
        for result in results:
            futures.add(client.submit(len, result, pure=False))
        write = client.submit(_write, str(out / shard_name(i)), *results, pure=False)
        writes[write.key] = i
        futures.add(write)
        outstanding += len(results)

    def refill() -> None:
        while outstanding < window and (i := next(queue, None)) is not None:
            submit(i)

    refill()
    try:
        for future in futures:
            result = future.result()  # re-raises a worker's exception here
            if future.key in writes:
                on_shard(writes.pop(future.key), result)
            else:
                outstanding -= 1
                if advance is not None:
                    advance(result)
                refill()
    except BaseException as err:
        client.cancel(list(futures.futures))
        if isinstance(err, Exception):
            err.add_note(f"the finished shards are kept in {out}: rerun the same build to resume")
        raise


def build_dataset(
    out_dir: str | Path,
    tasks: Sequence[Any],
    simulate_fn: Callable[[Any], list[Sample]],
    *,
    config: Any,
    seed: Any,
    samples_per_shard: int,
    client: Any = None,
    n_workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Simulate ``tasks`` into a sharded dataset folder, resuming an interrupted build.

    Parameters
    ----------
    out_dir
        The dataset folder (created if needed).
    tasks
        Picklable task objects in a deterministic order, each carrying its own index and
        seed; an optional ``n_samples`` attribute says how many samples it yields (see
        :func:`plan_shards`).
    simulate_fn
        ``simulate_fn(task) -> list[Sample]``, pure (same task, same samples); runs on the
        workers. It travels with cloudpickle: by reference from importable modules, by
        value from ``__main__`` or from modules registered with
        ``cloudpickle.register_pickle_by_value``.
    config
        The resolved configuration (dict or OmegaConf), stored in the manifest.
    seed
        The dataset seed, stored in the manifest (the tasks carry the derived seeds).
    samples_per_shard
        Target number of samples per shard file.
    client
        A ``distributed.Client``, a scheduler address, or None for a LocalCluster with
        one single-threaded worker process per available core.
    n_workers
        Worker processes of the LocalCluster (only without ``client``).
    progress
        Show a progress bar (also subject to ``STEMFORGE_PROGRESS``).
    overwrite
        Delete a previous dataset in ``out_dir`` and start afresh instead of resuming.

    Returns
    -------
    Path
        The dataset folder, its manifest marked complete.

    Raises
    ------
    ConfigurationError
        ``out_dir`` holds a dataset of another config, seed or task list (and not
        ``overwrite``), or ``simulate_fn`` returned something other than samples.
    ShapeError
        Shards came out with different pattern shapes.
    """
    out = Path(out_dir)
    tasks = list(tasks)
    if not tasks:
        raise ConfigurationError(
            "build_dataset got no tasks", "check the structure and orientation selection"
        )
    plan = plan_shards(tasks, samples_per_shard)
    show = progress and progress_enabled()
    manifest = _new_manifest(config, seed, len(tasks), samples_per_shard, len(plan))
    out.mkdir(parents=True, exist_ok=True)
    done = _resume(out, manifest, overwrite, show)
    _remove_temporaries(out)
    _record(manifest, done, out)

    def on_shard(i: int, result: dict[str, Any]) -> None:
        if result["shape"] is not None:
            arrays = _arrays(result["shape"])
            if manifest["arrays"] is None:
                manifest["arrays"] = arrays
            elif manifest["arrays"] != arrays:
                raise ShapeError(
                    f"shard {i} holds patterns of shape {result['shape']}, earlier shards "
                    f"{manifest['arrays']['cbed']['shape']}",
                    "simulate every pattern of a dataset on the same detector grid",
                )
        path = shard_name(i)
        done[i] = ShardInfo(path, result["sha256"], result["n"], result["bytes"], plan[i])
        _record(manifest, done, out)

    todo = [i for i in range(len(plan)) if i not in done]
    if todo:
        n_todo = sum(plan[i][1] - plan[i][0] for i in todo)
        with _connect(client, n_workers) as connected, _progress_bar(show, n_todo) as advance:
            _run(connected, out, tasks, plan, todo, simulate_fn, on_shard, advance)
    manifest["complete"] = True
    manifest["n"] = sum(info.n for info in done.values())
    _record(manifest, done, out)
    return out
