"""The simulation factory's plan: a configuration becomes a deterministic list of tasks.

A task is one multislice pass (a structure along a zone axis under one set of microscope
settings) that yields one sample per thickness of its series. Planning draws every random
choice from ``(seed, task index)``, so the same configuration and seed give the same
tasks, and each task simulates identically wherever it runs. Writing the samples is the
job of :mod:`stemforge.datasets.build`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError
from stemforge.simulate.sample import Sample

#: Zone-axis strategies of ``zone_axes.strategy``.
ZONE_AXIS_STRATEGIES = ("low_index", "max_index", "near")
#: Low-index zone axes offered per structure by the ``low_index`` and ``near`` strategies.
LOW_INDEX_COUNT = 3


@dataclass(frozen=True)
class SimulationTask:
    """One multislice pass: a structure along a zone axis, a thickness series."""

    index: int
    structure_id: str
    zone_axis: tuple[int, int, int]
    thicknesses: tuple[float, ...]
    energy: float
    semiangle: float
    defocus: float
    aberrations: tuple[tuple[str, float], ...]
    n_pixels: int
    q_pixel_size: float
    phonons: int
    mistilt: tuple[float, float] | None
    max_repetitions: int
    max_residual_strain: float
    device: str
    seed: int
    engine: str = "abtem"
    augment: Mapping[str, Any] | None = None

    @property
    def n_samples(self) -> int:
        """Samples this task yields: one per thickness."""
        return len(self.thicknesses)


def thickness_series(spec: Mapping[str, float]) -> tuple[float, ...]:
    """Thicknesses ``min, min + step, ... ≤ max`` in Å."""
    low, high, step = float(spec["min"]), float(spec["max"]), float(spec["step"])
    if not (0 < low <= high and step > 0):
        raise ConfigurationError(
            f"thickness range min={low}, max={high}, step={step} is empty or negative",
            "give 0 < thickness.min <= thickness.max and thickness.step > 0 (Å)",
        )
    return tuple(float(t) for t in np.arange(low, high + step / 2, step))


def _draw(rng: np.random.Generator, value: float | Sequence[float]) -> float:
    """A fixed number, or a uniform draw from ``[low, high]``."""
    if isinstance(value, int | float):
        return float(value)
    low, high = (float(v) for v in value)
    if low > high:
        raise ConfigurationError(f"range [{low}, {high}] is reversed", "give [low, high]")
    return float(rng.uniform(low, high))


def _candidate_axes(record: Any, strategy: str, max_index: int) -> list[tuple[int, int, int]]:
    from stemforge.simulate.orientation import low_index_zone_axes, zone_axes

    if strategy == "max_index":
        return zone_axes(max_index, record.structure)
    return low_index_zone_axes(record.structure, count=LOW_INDEX_COUNT)


def _feasible_axes(record: Any, cfg: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Zone axes of ``record`` whose orthogonal periodic cell meets the size and strain bounds."""
    from stemforge.simulate.orientation import orient

    za = cfg["zone_axes"]
    feasible = []
    for axis in _candidate_axes(record, za["strategy"], int(za["max_index"])):
        try:
            cell = orient(
                record.structure,
                axis,
                max_repetitions=int(za["max_repetitions"]),
                max_residual_strain=float(za["max_residual_strain"]),
            )
        except ConfigurationError:
            continue  # too large a cell for this axis, or too strained an approximation
        if len(cell.atoms) <= int(cfg["structures"]["max_atoms"]):
            feasible.append(axis)
    return feasible


def _structures(cfg: Mapping[str, Any], count: int) -> list[Any]:
    """Up to ``count`` records of the configured source, a random subset drawn by the seed."""
    from stemforge.simulate.structures import structure_source

    options = dict(cfg["structures"].get("options") or {})
    if cfg["structures"]["source"] == "random_crystals":
        options.setdefault("seed", int(cfg["seed"]))
    records = list(structure_source(cfg["structures"]["source"], **options))
    keep = np.random.default_rng([int(cfg["seed"]), 1]).permutation(len(records))[:count]
    return [records[i] for i in sorted(keep)]


def plan_tasks(cfg: Mapping[str, Any]) -> list[SimulationTask]:
    """The tasks that produce ``cfg['n_patterns']`` samples.

    Structures are a random subset of the configured source (as many as there are tasks, at
    most),
    each with the zone axes its strategy offers that fit the cell bounds; tasks cycle
    through them in an order shuffled by the seed. The last task's thickness series is cut
    so that exactly ``n_patterns`` samples come out.

    Raises
    ------
    ConfigurationError
        For an unknown strategy, empty ranges, or when no structure has a feasible axis.
    """
    seed = int(cfg["seed"])
    n_patterns = int(cfg["n_patterns"])
    if n_patterns < 1:
        raise ConfigurationError(f"n_patterns is {n_patterns}", "ask for at least one pattern")
    strategy = cfg["zone_axes"]["strategy"]
    if strategy not in ZONE_AXIS_STRATEGIES:
        raise ConfigurationError(
            f"unknown zone-axis strategy {strategy!r}", f"use one of {ZONE_AXIS_STRATEGIES}"
        )
    series = thickness_series(cfg["thickness"])
    n_tasks = math.ceil(n_patterns / len(series))

    pairs = [
        (record.id, axis)
        for record in _structures(cfg, n_tasks)
        for axis in _feasible_axes(record, cfg)
    ]
    if not pairs:
        raise ConfigurationError(
            "no structure of the source fits the cell bounds along any zone axis",
            "raise structures.max_atoms or zone_axes.max_repetitions, or choose other structures",
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    micro, detector = cfg["microscope"], cfg["detector"]
    tasks = []
    for index in range(n_tasks):
        rng = np.random.default_rng([seed, index])
        structure_id, axis = pairs[order[index % len(pairs)]]
        mistilt = None
        if strategy == "near" and float(cfg["zone_axes"]["mistilt"]) > 0:
            # uniform over the cone of half-angle `mistilt` (mrad)
            radius = float(cfg["zone_axes"]["mistilt"]) * math.sqrt(rng.random())
            phi = 2 * math.pi * rng.random()
            mistilt = (radius * math.cos(phi), radius * math.sin(phi))
        left = n_patterns - index * len(series)
        tasks.append(
            SimulationTask(
                index=index,
                structure_id=structure_id,
                zone_axis=tuple(int(v) for v in axis),
                thicknesses=series[: min(len(series), left)],
                energy=float(micro["energy"]),
                semiangle=_draw(rng, micro["semiangle"]),
                defocus=_draw(rng, micro["defocus"]),
                aberrations=tuple(
                    sorted((str(k), float(v)) for k, v in dict(micro["aberrations"]).items())
                ),
                n_pixels=int(detector["n_pixels"]),
                q_pixel_size=float(detector["q_pixel_size"]),
                phonons=int(cfg["phonons"]),
                mistilt=mistilt,
                max_repetitions=int(cfg["zone_axes"]["max_repetitions"]),
                max_residual_strain=float(cfg["zone_axes"]["max_residual_strain"]),
                device=str(cfg["device"]),
                seed=int(rng.integers(2**31)),
                engine=str(cfg.get("engine", "abtem")),
                augment=dict(cfg["augment"]) if cfg.get("augment") else None,
            )
        )
    return tasks


def run_task(task: SimulationTask) -> list[Sample]:
    """Simulate one task: one sample per thickness (runs on a Dask worker).

    With ``task.augment`` the samples are augmented at generation (dose, background,
    distortion...; see :class:`~stemforge.simulate.augment.Augmenter`), seeded by the task.
    """
    from stemforge.simulate.augment import Augmenter
    from stemforge.simulate.pattern import simulate_patterns
    from stemforge.simulate.structures import get_structure

    record = get_structure(task.structure_id)
    samples = simulate_patterns(
        record,
        task.zone_axis,
        thicknesses=task.thicknesses,
        energy=task.energy,
        semiangle=task.semiangle,
        n_pixels=task.n_pixels,
        q_pixel_size=task.q_pixel_size,
        defocus=task.defocus,
        aberrations=dict(task.aberrations),
        phonons=task.phonons,
        mistilt=task.mistilt,
        max_repetitions=task.max_repetitions,
        max_residual_strain=task.max_residual_strain,
        seed=task.seed,
        device=task.device,
        engine=task.engine,
    )
    if task.augment is None:
        return samples
    augmenter = Augmenter(task.augment, seed=task.seed)
    return [augmenter(sample, index) for index, sample in enumerate(samples)]
