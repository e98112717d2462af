"""Labelled Bragg peak lists: the training data of crystal identification.

A :class:`PeakLists` holds many patterns' spot lists (q in Å⁻¹ about the direct beam,
intensity), CSR by pattern, with per-pattern labels (structure id, crystal system, space
group, lattice a b c α β γ in the conventions of
:func:`stemforge.simulate.labels.lattice_parameters`, zone axis, thickness, source). They
come from kinematic simulation (:func:`kinematic_peak_lists`, thousands of patterns per
second) and from the factory's multislice shards (:func:`shard_peak_lists`: the exact
tables with dynamical disk intensities, or the peaks a detector finds in the patterns, see
:func:`stemforge.infer.identify.detected_peak_lists`), so models meet in training what
they meet at inference. Files are HDF5, written atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS, FIRST_SPACE_GROUP

FORMAT = "stemforge.peak_lists"
VERSION = 1


@dataclass(frozen=True)
class PeakLists:
    """Spot lists of N patterns with their labels.

    Attributes
    ----------
    q
        ``(P, 2)`` float32 spot positions (Å⁻¹) about the direct beam (not included).
    intensity
        ``(P,)`` float32 spot intensities (any scale; models normalise per pattern).
    offsets
        ``(N + 1,)`` int64: pattern i owns rows ``offsets[i]:offsets[i + 1]``.
    structure_id
        ``(N,)`` str.
    space_group
        ``(N,)`` int, 1..230.
    lattice
        ``(N, 6)`` float: a, b, c (Å), α, β, γ (degrees).
    zone_axis
        ``(N, 3)`` int, in the conventional standard cell.
    thickness
        ``(N,)`` float (Å).
    source
        ``(N,)`` str: ``kinematic``, ``multislice`` (exact table) or the detector's name.
    """

    q: np.ndarray
    intensity: np.ndarray
    offsets: np.ndarray
    structure_id: np.ndarray
    space_group: np.ndarray
    lattice: np.ndarray
    zone_axis: np.ndarray
    thickness: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def crystal_system(self) -> np.ndarray:
        """``(N,)`` int class index into :data:`CRYSTAL_SYSTEMS`."""
        return np.searchsorted(FIRST_SPACE_GROUP, self.space_group, side="right") - 1

    def select(self, index: np.ndarray | Sequence[int]) -> PeakLists:
        """The patterns at ``index`` (integer positions or a boolean mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        counts = np.diff(self.offsets)[index]
        rows = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in index])
            if len(index)
            else np.zeros(0, np.int64)
        )
        labels = {
            f.name: getattr(self, f.name)[index] for f in fields(self) if f.name not in _SPOT_FIELDS
        }
        return PeakLists(
            q=self.q[rows],
            intensity=self.intensity[rows],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            **labels,
        )

    @classmethod
    def concatenate(cls, parts: Iterable[PeakLists]) -> PeakLists:
        """One table of several, patterns in order."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(
            q=np.concatenate([p.q for p in parts]),
            intensity=np.concatenate([p.intensity for p in parts]),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in parts])
                for f in fields(cls)
                if f.name not in _SPOT_FIELDS
            },
        )


_SPOT_FIELDS = ("q", "intensity", "offsets")


def _labels(
    record: Any, count: int, zone_axes: np.ndarray, thickness: np.ndarray, source: str
) -> dict:
    from stemforge.simulate.labels import lattice_parameters

    lattice = lattice_parameters(record.structure.lattice, record.crystal_system)
    return {
        "structure_id": np.array([record.id] * count, dtype=object),
        "space_group": np.full(count, record.space_group, np.int16),
        "lattice": np.tile(lattice, (count, 1)),
        "zone_axis": np.asarray(zone_axes, np.int16).reshape(count, 3),
        "thickness": np.asarray(thickness, float),
        "source": np.array([source] * count, dtype=object),
    }


# ---- kinematic ------------------------------------------------------------------------------


def kinematic_peak_lists(
    records: Iterable[Any],
    *,
    seed: int,
    n_zone_axes: int = 10,
    thickness: Sequence[float] = (100.0, 300.0),
    semiangle: tuple[float, float] = (0.5, 2.0),
    max_mistilt: float = 5.0,
    energy: float = 300e3,
    q_max: float = 1.6,
    min_relative_intensity: float = 1e-3,
) -> PeakLists:
    """Kinematic spot lists of every structure along its low-index zone axes.

    Parameters
    ----------
    records
        :class:`~stemforge.simulate.structures.StructureRecord` s (conventional cells).
    seed
        Seeds the semiangle, mistilt and in-plane rotation of each pattern.
    n_zone_axes
        The ``n`` symmetry-distinct zone axes with the shortest periods (what one tilts to).
    thickness
        Thicknesses (Å); one pattern per zone axis and thickness.
    semiangle
        Range (mrad) the probe semiangle is drawn from, uniformly.
    max_mistilt
        Patterns are tilted off the zone axis by up to this angle (mrad), uniform on the cone.
    energy
        Electron energy (eV).
    q_max
        Detector reach (Å⁻¹).
    min_relative_intensity
        Spots weaker than this fraction of the pattern's strongest are not recorded.
    """
    from stemforge.simulate.kinematic import (
        in_plane_rotation,
        kinematic_spots,
        reciprocal_lattice,
        tilt_rotation,
    )
    from stemforge.simulate.orientation import low_index_zone_axes, zone_axis_rotation

    rng = np.random.default_rng(seed)
    parts = []
    for record in records:
        structure = record.structure
        crystal = reciprocal_lattice(structure, q_max * 1.05)
        axes = low_index_zone_axes(structure, n_zone_axes)
        spots_q, spots_i, counts, used_axes, used_t = [], [], [], [], []
        for axis in axes:
            base, _ = zone_axis_rotation(np.asarray(structure.lattice.matrix), axis)
            for t in thickness:
                radius = max_mistilt * np.sqrt(rng.random())
                phi = 2 * np.pi * rng.random()
                rotation = (
                    in_plane_rotation(2 * np.pi * rng.random())
                    @ tilt_rotation(radius * np.cos(phi), radius * np.sin(phi))
                    @ base
                )
                q, intensity, _ = kinematic_spots(
                    crystal,
                    rotation,
                    energy=energy,
                    thickness=t,
                    semiangle=rng.uniform(*semiangle),
                    q_max=q_max,
                    min_relative_intensity=min_relative_intensity,
                )
                spots_q.append(q)
                spots_i.append(intensity)
                counts.append(len(q))
                used_axes.append(axis)
                used_t.append(t)
        n = len(counts)
        parts.append(
            PeakLists(
                q=np.concatenate(spots_q).astype(np.float32),
                intensity=np.concatenate(spots_i).astype(np.float32),
                offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                **_labels(record, n, np.array(used_axes), np.array(used_t), "kinematic"),
            )
        )
    return PeakLists.concatenate(parts)


# ---- multislice shards ---------------------------------------------------------------------


def shard_labels(store: Any) -> dict[str, np.ndarray]:
    """Per-sample labels of an opened factory dataset, lattices in the system conventions."""
    from pymatgen.core import Lattice

    from stemforge.simulate.labels import lattice_parameters

    systems = store.column("crystal_system")
    lattice = np.array(
        [
            lattice_parameters(Lattice.from_parameters(*np.asarray(v, float)), str(s))
            for v, s in zip(store.column("lattice"), systems, strict=True)
        ]
    )
    return {
        "structure_id": np.asarray(store.column("structure_id"), dtype=object),
        "space_group": np.asarray(store.column("space_group"), np.int16),
        "lattice": lattice,
        "zone_axis": np.asarray(store.column("zone_axis"), np.int16).reshape(-1, 3),
        "thickness": np.asarray(store.column("thickness"), float),
    }


def exact_spots(reader: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact reflections of sample ``index`` (detector px) with dynamical intensities."""
    table = reader.peaks(index)
    return np.stack([table["qx"], table["qy"]], axis=1), table["intensity_dynamical"]


def shard_peak_lists(
    folder: str | Path,
    spots: Callable[[Any, int], tuple[np.ndarray, np.ndarray]] = exact_spots,
    source: str = "multislice",
    direct_beam_radius: float = 0.5,
) -> PeakLists:
    """Spot lists of a factory dataset (multislice shards).

    Parameters
    ----------
    folder
        Dataset folder written by ``stemforge simulate``.
    spots
        ``spots(reader, i)`` → positions (detector px) and intensities of sample ``i`` of a
        :class:`~stemforge.datasets.shards.ShardReader`; default the exact tables with the
        integrated dynamical disk intensities (a disk detector gives detected lists).
    source
        Recorded in the lists' ``source``.
    direct_beam_radius
        Spots this close (px) to the exact 000 position are the direct beam, left out.

    Spots are put in Å⁻¹ about the exact 000 reflection of each sample's table.
    """
    from stemforge.datasets.shards import ShardReader, open_dataset

    store = open_dataset(folder)
    pixel = store.column("q_pixel_size")
    q_parts, i_parts, counts = [], [], []
    for j, info in enumerate(store.shards):
        reader = ShardReader(store.shard_path(j))
        try:
            for i in range(info.n):
                table = reader.peaks(i)
                direct = (table["h"] == 0) & (table["k"] == 0) & (table["l"] == 0)
                origin = np.array([table["qx"][direct][0], table["qy"][direct][0]])
                positions, intensity = spots(reader, i)
                offset = np.asarray(positions, float).reshape(-1, 2) - origin
                keep = np.hypot(offset[:, 0], offset[:, 1]) > direct_beam_radius
                q_parts.append(offset[keep] * pixel[store.offsets[j] + i])
                i_parts.append(np.asarray(intensity)[keep])
                counts.append(int(keep.sum()))
        finally:
            reader.close()
    n = len(counts)
    return PeakLists(
        q=np.concatenate(q_parts).astype(np.float32) if n else np.zeros((0, 2), np.float32),
        intensity=np.concatenate(i_parts).astype(np.float32) if n else np.zeros(0, np.float32),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        source=np.array([source] * n, dtype=object),
        **shard_labels(store),
    )


# ---- augmentation ---------------------------------------------------------------------------


def augment(
    lists: PeakLists,
    seed: int,
    *,
    scale: float = 0.03,
    ellipticity: float = 0.01,
    position_noise: float = 0.003,
    intensity_noise: float = 0.3,
    drop_below: tuple[float, float] = (1e-3, 3e-2),
    reach: tuple[float, float] | None = None,
    sessions: np.ndarray | None = None,
) -> PeakLists:
    """Perturb spot lists as a measurement does (seeded, one draw per pattern).

    Parameters
    ----------
    scale
        Calibration error: q scaled by 1 + U(−scale, scale).
    ellipticity
        Elliptical distortion: q stretched by 1 + U(−e, e) along a random axis.
    position_noise
        Gaussian position error (Å⁻¹).
    intensity_noise
        Log-normal intensity spread (σ of log I): dynamical scattering reshuffles
        intensities.
    drop_below
        Spots weaker than a fraction drawn log-uniformly from this range of the pattern's
        strongest are lost (the detection threshold).
    reach
        The detector's edge: spots outside a square of half-width drawn uniformly from
        this range (Å⁻¹), its sides along the detector axes (the q frame), are lost. A
        128-pixel detector at 0.02 Å⁻¹ per pixel reaches 1.28 Å⁻¹. None: no edge.
    sessions
        ``(N,)`` labels of the patterns recorded in one session: they share one calibration
        error, one elliptical distortion and one reach (same camera length, same detector),
        while the crystal's in-plane rotation still differs per pattern. None: every
        pattern its own session.
    """
    rng = np.random.default_rng(seed)
    n = len(lists)
    counts = np.diff(lists.offsets)
    owner = np.repeat(np.arange(n), counts)
    session = np.arange(n) if sessions is None else np.unique(sessions, return_inverse=True)[1]
    n_sessions = int(session.max()) + 1 if n else 0
    s = 1 + rng.uniform(-scale, scale, n_sessions)[session]
    e = rng.uniform(-ellipticity, ellipticity, n_sessions)[session]
    axis = rng.uniform(0, np.pi, n_sessions)[session]
    c, si = np.cos(axis)[owner], np.sin(axis)[owner]
    q = lists.q.astype(float)
    along = q[:, 0] * c + q[:, 1] * si
    stretch = (s * e)[owner] * along
    q = q * s[owner, None] + stretch[:, None] * np.stack([c, si], axis=1)
    q += rng.normal(0, position_noise, q.shape)
    intensity = lists.intensity * np.exp(rng.normal(0, intensity_noise, len(q)))
    peak_max = np.zeros(n)
    np.maximum.at(peak_max, owner, intensity)
    threshold = np.exp(rng.uniform(*np.log(drop_below), n)) * peak_max
    keep = intensity >= threshold[owner]
    if reach is not None:
        edge = rng.uniform(*reach, n_sessions)[session]
        keep &= np.abs(q).max(axis=1) <= edge[owner]
    kept = np.bincount(owner[keep], minlength=n)
    return PeakLists(
        q=q[keep].astype(np.float32),
        intensity=intensity[keep].astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum(kept)]).astype(np.int64),
        **{f.name: getattr(lists, f.name) for f in fields(lists) if f.name not in _SPOT_FIELDS},
    )


# ---- split ----------------------------------------------------------------------------------


def split_by_structure(
    structure_id: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Boolean masks of patterns, one per fraction; no structure falls in two of them."""
    fractions = np.asarray(fractions, float)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ConfigurationError(
            f"split fractions {list(fractions)}", "give non-negative fractions summing to 1"
        )
    ids = np.unique(structure_id)
    order = np.random.default_rng(seed).permutation(len(ids))
    bounds = np.rint(np.cumsum(fractions) * len(ids)).astype(int)
    part = np.searchsorted(bounds, np.arange(len(ids)), side="right")
    group = dict(zip(ids[order], part, strict=True))
    which = np.array([group[i] for i in structure_id])
    return [which == k for k in range(len(fractions))]


def one_per_zone_axis(lists: PeakLists, seed: int) -> np.ndarray:
    """Sorted rows of one pattern (a random thickness) per zone axis of every structure.

    The aggregate of a crystal is scored on what a tilt series records: each zone axis
    once (ten patterns for the kinematic tables, not their thirty).
    """
    order = np.random.default_rng(seed).permutation(len(lists))
    ids = np.unique(lists.structure_id, return_inverse=True)[1]
    keys = np.column_stack([ids, lists.zone_axis])[order]
    return np.sort(order[np.unique(keys, axis=0, return_index=True)[1]])


# ---- files ----------------------------------------------------------------------------------


def write_peak_lists(
    path: str | Path, lists: PeakLists, attrs: dict[str, Any] | None = None
) -> Path:
    """Write an HDF5 file (temporary name, then rename); ``attrs`` are stored as JSON."""
    import json

    import h5py

    from stemforge.core.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        f.attrs["config"] = json.dumps(attrs or {})
        for field in fields(lists):
            value = getattr(lists, field.name)
            if value.dtype == object:
                value = value.astype("S")
            f.create_dataset(field.name, data=value, compression="gzip", shuffle=True)
    return path


def read_peak_lists(path: str | Path) -> tuple[PeakLists, dict[str, Any]]:
    """Read a file of :func:`write_peak_lists`; returns the lists and the stored config."""
    import json

    import h5py

    path = Path(path)
    if not path.is_file():
        raise InvalidDataError(
            f"no peak-list file at {path}",
            "build it first (see stemforge train experiment=crystal_id_rf)",
        )
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise InvalidDataError(
                f"{path} is not a stemforge peak-list file",
                "pass a file written by write_peak_lists",
            )
        values = {}
        for field in fields(PeakLists):
            data = f[field.name][()]
            values[field.name] = data.astype(str).astype(object) if data.dtype.kind == "S" else data
        config = json.loads(f.attrs["config"])
    return PeakLists(**values), config


__all__ = [
    "CRYSTAL_SYSTEMS",
    "PeakLists",
    "augment",
    "kinematic_peak_lists",
    "read_peak_lists",
    "split_by_structure",
    "write_peak_lists",
]


# ---- building -------------------------------------------------------------------------------


def identification_structures(
    *, aflow_prototypes: bool = True, random_seed: int | None = 1, per_system: int = 100
) -> list[Any]:
    """Structures for crystal identification, balanced over the seven crystal systems.

    Parameters
    ----------
    aflow_prototypes
        Include the 288 AFLOW prototypes shipped with pymatgen.
    random_seed
        Seed of the pyxtal random crystals (None: none).
    per_system
        About this many random crystals per crystal system, spread evenly over its space
        groups (at least one per group), so that the two triclinic groups get as many
        structures as the 36 cubic ones together.
    """
    from stemforge.simulate.structures import structure_source
    from stemforge.simulate.structures.random_crystals import random_crystals
    from stemforge.simulate.structures.record import space_group_range

    records = list(structure_source("aflow_prototypes")) if aflow_prototypes else []
    if random_seed is not None:
        for system in CRYSTAL_SYSTEMS:
            per_group = max(1, -(-per_system // len(space_group_range(system))))
            records += list(
                random_crystals(seed=random_seed, crystal_system=system, n_per_group=per_group)
            )
    return records


def build_kinematic_peak_lists(
    path: str | Path, structures: dict[str, Any], kinematic: dict[str, Any], seed: int
) -> Path:
    """Build (or reuse, when its config matches) a kinematic peak-list file at ``path``."""
    config = {"structures": dict(structures), "kinematic": dict(kinematic), "seed": seed}
    path = Path(path)
    if path.is_file():
        _, stored = read_peak_lists(path)
        if stored == json_ready(config):
            return path
        raise ConfigurationError(
            f"{path} was built with another configuration ({stored})",
            "delete it, or point the data path at a new file",
        )
    lists = kinematic_peak_lists(identification_structures(**structures), seed=seed, **kinematic)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_peak_lists(path, lists, config)


def json_ready(value: Any) -> Any:
    """``value`` as it comes back from JSON (tuples → lists)."""
    import json

    return json.loads(json.dumps(value))
