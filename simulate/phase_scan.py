"""A synthetic 4D-STEM scan with known phases, orientations and an amorphous region.

The test specimen of phase, orientation and amorphous mapping: crystal grains of a few
candidate phases, each along a known zone axis with a known in-plane angle (and optionally a
small mistilt), next to a region of amorphous material (a random dense packing). Every grain
is simulated once by abTEM multislice
(:func:`~stemforge.simulate.pattern.simulate_patterns`) and repeated, with independent
Poisson noise, at each of its scan positions; the amorphous region is a few probe positions
over one packing (:func:`~stemforge.simulate.multislice.simulate_cbed` on
:func:`~stemforge.simulate.amorphous.random_dense_packing`), cycled over its scan positions.

:func:`default_phase_scan` is the standard case: rocksalt MgO and cubic perovskite SrTiO₃,
two grains each, and amorphous Si, on an 8 × 8 scan.

Orientation convention
----------------------
``truth.orientation[rx, ry]`` is the rotation ``U`` from the Cartesian frame of the
candidate's conventional standard cell
(:func:`~stemforge.simulate.orientation.conventional_standard_structure`, pymatgen's
``lattice.matrix`` rows) to the lab frame of the detector: lab x = detector qx = pattern
axis -2, lab y = qy = axis -1, z = the beam. A reciprocal-lattice vector ``g`` of the
crystal appears at ``g_lab = U @ g``: its Bragg disk lies at pixel
``(qx0 + g_lab[0] / q_pixel_size, qy0 + g_lab[1] / q_pixel_size)`` and its excitation
error is that of :func:`~stemforge.simulate.kinematic.excitation_errors`, so
``kinematic_spots(reciprocal_lattice(conventional, q), U, ...)`` predicts the pattern. It is
``U = T R_p R_z`` (:func:`grain_orientation`):

- ``R_z`` puts the zone axis ``[uvw]`` along +z and ``g(x_reflection)`` along +x
  (:func:`~stemforge.simulate.orientation.zone_axis_rotation`);
- ``R_p`` is the rigid rotation (polar decomposition) of the deformation that closing the
  orthogonal periodic cell applied (the identity for the low-index cubic axes used here);
- ``T`` is the mistilt. ``mistilt = (θx, θy)`` (mrad) of the simulation shifts the wave by
  ``dz (tan θx, tan θy)`` per slice: the beam runs along ``d ∝ (tan θx, tan θy, 1)`` of the
  crystal, and ``T`` is the smallest rotation that takes ``d`` onto +z (about the in-plane
  axis ``d × z``, angle ``atan |tan θ|``). To first order
  ``T ≈ tilt_rotation(θy, -θx)`` of :mod:`stemforge.simulate.kinematic` (whose arguments
  are rotations *about* x and y): a beam tilted toward +x makes the Laue circle's centre
  move toward -qx. The detector coordinates of the multislice are the crystal's transverse
  wave vectors, which differ from those of a detector normal to the tilted beam by
  ``O(θ²)`` (about 0.001 px here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.core.progress import track
from stemforge.simulate.orientation import (
    MAX_RESIDUAL_STRAIN,
    conventional_standard_structure,
    orient,
)

#: MgO lattice parameter, Å (rocksalt, room temperature).
A_MGO = 4.212
#: SrTiO₃ lattice parameter, Å (cubic perovskite, room temperature).
A_SRTIO3 = 3.905

#: Label of amorphous positions in the phase and grain maps.
AMORPHOUS = -1

ORIENTATION_CONVENTION = (
    "orientation[rx, ry] = U maps Cartesian vectors of the candidate's conventional standard "
    "cell (pymatgen lattice.matrix rows) to the detector lab frame: g_lab = U @ g, lab x = "
    "detector qx (pattern axis -2), lab y = qy (axis -1), z = beam; NaN where amorphous. "
    "phase indexes names (-1 = amorphous); grain indexes grains (-1 = amorphous)."
)


# ---- specimen description -----------------------------------------------------------------
def _integer_triple(value: Any, what: str) -> tuple[int, int, int]:
    try:
        values = [float(v) for v in value]
    except TypeError:
        values = []
    if len(values) != 3 or not all(v == int(v) for v in values) or not any(values):
        raise ConfigurationError(
            f"{what} must be three integers, not all zero, got {value!r}",
            "give it as e.g. (0, 1, 1)",
        )
    return tuple(int(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Grain:
    """One crystal grain of the specimen.

    Parameters
    ----------
    phase
        Index of its structure in the candidates list.
    zone_axis
        ``[uvw]`` along the beam, in the conventional standard cell.
    x_reflection
        ``(hkl)`` of the zero-order Laue zone that points along detector +qx (sets the
        in-plane angle); None: the shortest one
        (:func:`~stemforge.simulate.orientation.shortest_zolz_reflection`).
    mistilt
        ``(θx, θy)`` mrad: the beam tilted toward +x, +y of the zone-axis frame (see the
        module's orientation convention); None: exactly on the zone axis.
    thickness
        Specimen thickness, Å (rounded to whole slices of about 2 Å by the simulation).
    """

    phase: int
    zone_axis: tuple[int, int, int]
    x_reflection: tuple[int, int, int] | None = None
    mistilt: tuple[float, float] | None = None
    thickness: float = 200.0

    def __post_init__(self) -> None:
        if not isinstance(self.phase, Integral) or isinstance(self.phase, bool) or self.phase < 0:
            raise ConfigurationError(
                f"a grain's phase must be an index ≥ 0 into the candidates, got {self.phase!r}",
                "give the position of its structure in the candidates list, e.g. 0",
            )
        object.__setattr__(self, "phase", int(self.phase))
        object.__setattr__(self, "zone_axis", _integer_triple(self.zone_axis, "zone axis [uvw]"))
        if self.x_reflection is not None:
            hkl = _integer_triple(self.x_reflection, "x_reflection (hkl)")
            object.__setattr__(self, "x_reflection", hkl)
        if self.mistilt is not None:
            tilt = tuple(float(v) for v in np.ravel(self.mistilt))
            if len(tilt) != 2 or not all(math.isfinite(v) and abs(v) < 100 for v in tilt):
                raise ConfigurationError(
                    f"mistilt must be two finite angles (θx, θy) in mrad, got {self.mistilt!r}",
                    "give e.g. (3.0, -2.0), or None for an exact zone axis",
                )
            object.__setattr__(self, "mistilt", None if not any(tilt) else tilt)
        if not (isinstance(self.thickness, Real) and math.isfinite(self.thickness)):
            raise ConfigurationError(
                f"grain thickness must be a number of Å, got {self.thickness!r}", "e.g. 200.0"
            )
        if self.thickness <= 0:
            raise ConfigurationError(
                f"grain thickness must be positive, got {self.thickness} Å", "e.g. 200.0"
            )
        object.__setattr__(self, "thickness", float(self.thickness))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "phase": self.phase,
            "zone_axis": list(self.zone_axis),
            "x_reflection": None if self.x_reflection is None else list(self.x_reflection),
            "mistilt": None if self.mistilt is None else list(self.mistilt),
            "thickness": self.thickness,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grain:
        """Inverse of :meth:`to_dict`."""
        return cls(
            int(d["phase"]),
            tuple(d["zone_axis"]),
            None if d.get("x_reflection") is None else tuple(d["x_reflection"]),
            None if d.get("mistilt") is None else tuple(d["mistilt"]),
            float(d.get("thickness", 200.0)),
        )


@dataclass(frozen=True)
class AmorphousRegion:
    """The amorphous material: a random dense packing of one element.

    Parameters
    ----------
    symbol
        Element (amorphous Si by default).
    density
        Mass density, g/cm³ (a-Si: 2.28).
    min_distance
        Hard-sphere diameter, Å (a-Si: 2.2, below the 2.35 Å bond length).
    thickness
        Specimen thickness (box height), Å.
    size
        Lateral box size, Å (the box repeats laterally; a few probe diameters). The
        simulation tiles it until the box is ``2 / q_pixel_size`` wide: 27 Å takes three
        tiles at 0.025 Å⁻¹ per pixel, where 25 Å would take four.
    n_probes
        Probe positions simulated over the packing (distinct speckle patterns), spread on a
        grid over the box; the amorphous scan positions cycle through them.
    """

    symbol: str = "Si"
    density: float = 2.28
    min_distance: float = 2.2
    thickness: float = 150.0
    size: float = 27.0
    n_probes: int = 4

    def __post_init__(self) -> None:
        for name in ("density", "min_distance", "thickness", "size"):
            value = getattr(self, name)
            if not (isinstance(value, Real) and math.isfinite(value) and value > 0):
                raise ConfigurationError(
                    f"amorphous {name} must be a positive number, got {value!r}",
                    "e.g. AmorphousRegion(symbol='Si', density=2.28, min_distance=2.2)",
                )
        if not isinstance(self.n_probes, Integral) or self.n_probes < 1:
            raise ConfigurationError(
                f"n_probes must be a whole number ≥ 1, got {self.n_probes!r}", "e.g. 4"
            )

    def probe_positions(self) -> list[tuple[float, float]]:
        """Probe positions (Å) in the box: the first ``n_probes`` of a square grid over it."""
        k = math.ceil(math.sqrt(self.n_probes))
        grid = [(i * self.size / k, j * self.size / k) for i in range(k) for j in range(k)]
        return grid[: self.n_probes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "symbol": self.symbol,
            "density": self.density,
            "min_distance": self.min_distance,
            "thickness": self.thickness,
            "size": self.size,
            "n_probes": int(self.n_probes),
        }


# ---- truth ----------------------------------------------------------------------------------
@dataclass
class PhaseScanTruth:
    """What a phase / orientation / amorphous map of the scan should find.

    Parameters
    ----------
    phase
        ``(Rx, Ry)`` int: index into ``names`` (the candidates list), -1 where amorphous.
    orientation
        ``(Rx, Ry, 3, 3)``: rotation ``U`` with ``g_lab = U @ g`` from the candidate's
        conventional standard Cartesian frame to the detector frame (module docstring);
        NaN where amorphous.
    amorphous
        ``(Rx, Ry)`` bool.
    names
        Phase names, one per candidate.
    grain
        ``(Rx, Ry)`` int: index into ``grains``, -1 where amorphous.
    grains
        The grains of the specimen.
    step
        Scan step, Å.
    description
        What the specimen is, for reports.
    pattern
        ``(Rx, Ry)`` int: index into ``clean`` of each position's noise-free pattern.
    clean
        ``(K, Qx, Qy)`` float32 noise-free patterns (fractions of the beam): one per
        simulated grain, then one per amorphous probe position.
    probe
        ``(Qx, Qy)`` float32 vacuum probe on the detector grid (sum 1): a disk template.
    samples
        Per grain the :class:`~stemforge.simulate.sample.Sample` that was simulated (with its
        exact Bragg peak table), None for a grain the layout does not use. Not saved.
    """

    phase: np.ndarray
    orientation: np.ndarray
    amorphous: np.ndarray
    names: list[str]
    grain: np.ndarray
    grains: tuple[Grain, ...] = ()
    step: float = 1.0
    description: str = ""
    pattern: np.ndarray | None = None
    clean: np.ndarray | None = None
    probe: np.ndarray | None = None
    samples: tuple[Any, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        self.phase = np.asarray(self.phase, dtype=np.int64)
        self.grain = np.asarray(self.grain, dtype=np.int64)
        self.amorphous = np.asarray(self.amorphous, dtype=bool)
        self.orientation = np.asarray(self.orientation, dtype=np.float64)
        self.names = [str(n) for n in self.names]
        self.grains = tuple(self.grains)
        shape = self.phase.shape
        if len(shape) != 2:
            raise ShapeError(f"the phase map has shape {shape}", "give it as (Rx, Ry)")
        for name in ("grain", "amorphous"):
            if getattr(self, name).shape != shape:
                raise ShapeError(
                    f"truth map {name} has shape {getattr(self, name).shape}, phase {shape}",
                    "give every map with the scan shape (Rx, Ry)",
                )
        if self.orientation.shape != (*shape, 3, 3):
            raise ShapeError(
                f"orientation has shape {self.orientation.shape}, expected {(*shape, 3, 3)}",
                "give one 3×3 rotation per scan position",
            )
        if not np.array_equal(self.amorphous, self.phase == AMORPHOUS) or not np.array_equal(
            self.amorphous, self.grain == AMORPHOUS
        ):
            raise ConfigurationError(
                "the amorphous map does not match phase == -1 and grain == -1",
                "mark amorphous positions -1 in both the phase and the grain map",
            )
        if self.phase.min(initial=0) < AMORPHOUS or self.phase.max(initial=-1) >= len(self.names):
            raise ConfigurationError(
                f"phase indices {self.phase.min()}..{self.phase.max()} for {len(self.names)} names",
                "index into names, -1 for amorphous",
            )
        if self.grains and self.grain.max(initial=-1) >= len(self.grains):
            raise ConfigurationError(
                f"grain indices up to {self.grain.max()} for {len(self.grains)} grains",
                "index into grains, -1 for amorphous",
            )
        crystal = self.orientation[~self.amorphous]
        if not np.isfinite(crystal).all() or not np.isnan(self.orientation[self.amorphous]).all():
            raise ConfigurationError(
                "orientation must be finite at crystalline positions and NaN at amorphous ones",
                "set NaN where amorphous",
            )
        if not (math.isfinite(self.step) and self.step > 0):
            raise ConfigurationError(
                f"scan step must be positive, got {self.step!r}", "give the step in Å"
            )
        if self.pattern is not None:
            self.pattern = np.asarray(self.pattern, dtype=np.int64)
            if self.pattern.shape != shape:
                raise ShapeError(
                    f"pattern index map has shape {self.pattern.shape}, phase {shape}",
                    "give it with the scan shape",
                )

    @property
    def scan_shape(self) -> tuple[int, int]:
        """``(Rx, Ry)``."""
        return self.phase.shape  # type: ignore[return-value]

    @property
    def crystalline(self) -> np.ndarray:
        """``(Rx, Ry)`` bool: not amorphous."""
        return ~self.amorphous

    def to_dict(self) -> dict[str, Any]:
        """The truth for saving: arrays under their names and ``attrs``, a JSON-ready dict.

        Arrays: ``phase``, ``orientation``, ``amorphous``, ``grain`` and, where present,
        ``pattern``, ``clean`` and ``probe``. ``samples`` are not saved.
        """
        out: dict[str, Any] = {
            "phase": self.phase,
            "orientation": self.orientation,
            "amorphous": self.amorphous,
            "grain": self.grain,
        }
        for name in ("pattern", "clean", "probe"):
            if getattr(self, name) is not None:
                out[name] = np.asarray(getattr(self, name))
        out["attrs"] = {
            "names": list(self.names),
            "grains": [g.to_dict() for g in self.grains],
            "step": self.step,
            "step_units": "A",
            "description": self.description,
            "convention": ORIENTATION_CONVENTION,
        }
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseScanTruth:
        """Inverse of :meth:`to_dict` (``attrs`` may also be a JSON string)."""
        missing = {"phase", "orientation", "amorphous", "grain", "attrs"} - set(d)
        if missing:
            raise ConfigurationError(
                f"phase-scan truth is missing {sorted(missing)}", "save it with to_dict or save"
            )
        attrs = d["attrs"]
        if isinstance(attrs, str | bytes):
            attrs = json.loads(attrs)
        optional = {k: np.asarray(d[k]) for k in ("pattern", "clean", "probe") if k in d}
        return cls(
            phase=np.asarray(d["phase"]),
            orientation=np.asarray(d["orientation"]),
            amorphous=np.asarray(d["amorphous"]),
            names=list(attrs["names"]),
            grain=np.asarray(d["grain"]),
            grains=tuple(Grain.from_dict(g) for g in attrs.get("grains", [])),
            step=float(attrs.get("step", 1.0)),
            description=str(attrs.get("description", "")),
            **optional,
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to HDF5: arrays as datasets, ``attrs`` as JSON in the
        file's attribute ``attrs``. Written to a temporary name, then renamed."""
        import h5py

        from stemforge.core.atomic import atomic_output

        path = Path(path)
        d = self.to_dict()
        with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
            for name, value in d.items():
                if name != "attrs":
                    f.create_dataset(name, data=value)
            f.attrs["attrs"] = json.dumps(d["attrs"])
        return path

    @classmethod
    def load(cls, path: str | Path) -> PhaseScanTruth:
        """Read a file written by :meth:`save`."""
        import h5py

        from stemforge.core.errors import MissingFileError

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no phase-scan truth file {path}", "check the path")
        with h5py.File(path, "r") as f:
            d: dict[str, Any] = {name: f[name][...] for name in f}
            d["attrs"] = f.attrs.get("attrs", "{}")
        return cls.from_dict(d)


# ---- orientation ----------------------------------------------------------------------------
def mistilt_rotation(mistilt: Sequence[float] | None) -> np.ndarray:
    """The rotation ``T`` of a simulation mistilt ``(θx, θy)`` (mrad).

    The multislice shifts the wave by ``dz (tan θx, tan θy)`` per slice, i.e. the beam runs
    along ``d ∝ (tan θx, tan θy, 1)`` in the zone-axis frame; ``T`` is the smallest rotation
    with ``T d = ẑ`` (axis ``d × ẑ``). ``T ≈ tilt_rotation(θy, -θx)`` to first order.
    """
    if mistilt is None or not any(mistilt):
        return np.eye(3)
    tx, ty = (math.tan(float(v) * 1e-3) for v in mistilt)
    d = np.array([tx, ty, 1.0]) / math.sqrt(1.0 + tx * tx + ty * ty)
    axis = np.cross(d, [0.0, 0.0, 1.0])
    sine = float(np.linalg.norm(axis))
    axis /= sine
    cosine = float(d[2])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + sine * k + (1 - cosine) * (k @ k)


def _rigid_part(deformation: np.ndarray) -> np.ndarray:
    """``R`` of the polar decomposition ``F = R S``."""
    w, v = np.linalg.eigh(deformation.T @ deformation)
    stretch = (v * np.sqrt(w)) @ v.T
    return deformation @ np.linalg.inv(stretch)


def grain_orientation(
    candidate: Any,
    grain: Grain,
    *,
    max_repetitions: int = 8,
    max_residual_strain: float = MAX_RESIDUAL_STRAIN,
) -> np.ndarray:
    """The rotation ``U`` (``g_lab = U @ g``) of a grain as :func:`phase_test_scan` simulates it.

    Parameters
    ----------
    candidate
        pymatgen ``Structure`` of the grain's phase; ``U`` acts on the Cartesian frame of
        its conventional standard cell
        (:func:`~stemforge.simulate.orientation.conventional_standard_structure`).
    grain
        Zone axis, x reflection and mistilt.
    max_repetitions, max_residual_strain
        As for :func:`~stemforge.simulate.orientation.orient` (the same cell is built).

    Returns
    -------
    np.ndarray
        ``(3, 3)`` proper rotation ``T R_p R_z`` (see the module docstring).
    """
    conventional = conventional_standard_structure(candidate)
    oriented = orient(
        conventional,
        grain.zone_axis,
        x_reflection=grain.x_reflection,
        max_repetitions=max_repetitions,
        max_residual_strain=max_residual_strain,
        standardize=False,
    )
    return mistilt_rotation(grain.mistilt) @ _rigid_part(oriented.deformation) @ oriented.rotation


# ---- the scan -------------------------------------------------------------------------------
def _check_candidates(candidates: Sequence[Any], names: Sequence[str] | None) -> list[str]:
    from pymatgen.core import Structure

    if isinstance(candidates, Structure) or not isinstance(candidates, Sequence):
        raise ConfigurationError(
            "candidates must be a list of pymatgen Structures",
            "pass e.g. [rocksalt_mgo(), perovskite_srtio3()]",
        )
    for i, c in enumerate(candidates):
        if not isinstance(c, Structure):
            raise ConfigurationError(
                f"candidate {i} is a {type(c).__name__}, not a pymatgen Structure",
                "pass pymatgen Structures (e.g. Structure.from_file('phase.cif'))",
            )
    if names is None:
        names = [c.composition.reduced_formula for c in candidates]
        if len(set(names)) < len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
    names = [str(n) for n in names]
    if len(names) != len(candidates):
        raise ConfigurationError(
            f"{len(names)} names for {len(candidates)} candidates", "give one name per candidate"
        )
    return names


def _check_layout(layout: Any, n_grains: int) -> np.ndarray:
    grid = np.asarray(layout)
    if grid.ndim != 2 or grid.size == 0:
        raise ShapeError(
            f"the layout must be a 2D (Rx, Ry) array of grain indices, got shape {grid.shape}",
            "give e.g. default_layout() or an integer array with -1 for amorphous",
        )
    if grid.dtype.kind not in "iu" and not (
        grid.dtype.kind == "f" and np.all(np.isfinite(grid)) and np.all(grid == np.round(grid))
    ):
        raise ConfigurationError(
            f"the layout holds {grid.dtype} values, not grain indices",
            "give integers: the index into grains, -1 for amorphous",
        )
    grid = grid.astype(np.int64)
    bad = (grid < AMORPHOUS) | (grid >= n_grains)
    if bad.any():
        rx, ry = np.argwhere(bad)[0]
        raise ConfigurationError(
            f"layout value {grid[rx, ry]} at (rx={rx}, ry={ry}) is not a grain index "
            f"(there are {n_grains} grains, -1 = amorphous)",
            f"use 0..{n_grains - 1} for grains and -1 for amorphous",
        )
    return grid


def _positive(name: str, value: Any, fix: str) -> float:
    if not (isinstance(value, Real) and math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number, got {value!r}", fix)
    return float(value)


def phase_test_scan(
    candidates: Sequence[Any],
    grains: Sequence[Grain],
    layout: Any,
    *,
    amorphous: AmorphousRegion | None = None,
    names: Sequence[str] | None = None,
    energy: float = 300e3,
    semiangle: float = 1.5,
    n_pixels: int = 128,
    q_pixel_size: float = 0.025,
    dose: float | None = 1e5,
    step: float = 10.0,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    engine: str = "abtem",
    description: str = "",
) -> tuple[DataCube, PhaseScanTruth]:
    """Synthetic 4D-STEM scan of crystal grains and amorphous material with its truth.

    Each distinct grain the layout uses is simulated once (one multislice pass, static
    lattice) and repeated at each of its positions with independent Poisson noise; the
    amorphous region is ``amorphous.n_probes`` probe positions over one random dense packing,
    cycled over the amorphous positions in raster order.

    Parameters
    ----------
    candidates
        pymatgen ``Structure`` of each phase; a grain's ``phase`` indexes this list.
    grains
        The grains.
    layout
        ``(Rx, Ry)`` integers: the grain index at each scan position, -1 = amorphous.
    amorphous
        The amorphous material (default :class:`AmorphousRegion`: a-Si, 15 nm).
    names
        Phase names (default: reduced formulas).
    energy, semiangle
        Beam energy (eV) and convergence semiangle (mrad).
    n_pixels, q_pixel_size
        Detector: ``n_pixels²`` pixels of ``q_pixel_size`` Å⁻¹, q = 0 at pixel ``n // 2``.
    dose
        Electrons per pattern (Poisson noise on ``dose ×`` the pattern, float32 counts);
        None: noise-free fractions of the beam.
    step
        Scan step, Å.
    seed
        Seed of the packing and of the noise: the same arguments give the same cube.
    threads, device, engine
        Passed to the simulation (mistilted grains always run on the 'fast' engine).
    description
        For reports; a default one lists the grains.

    Returns
    -------
    cube : DataCube
        ``(Rx, Ry, n, n)`` float32, calibrated (Å, Å⁻¹, energy, semiangle, origin).
    truth : PhaseScanTruth
        Phase, orientation and amorphous maps, the grains, the noise-free patterns, the
        probe and each grain's simulated :class:`~stemforge.simulate.sample.Sample`.

    Raises
    ------
    ConfigurationError
        For a bad layout, grain, candidate or option.
    """
    from stemforge.simulate.amorphous import random_dense_packing
    from stemforge.simulate.multislice import DetectorGrid, simulate_cbed
    from stemforge.simulate.pattern import simulate_patterns

    names = _check_candidates(candidates, names)
    grains = tuple(grains)
    for i, g in enumerate(grains):
        if not isinstance(g, Grain):
            raise ConfigurationError(
                f"grain {i} is a {type(g).__name__}, not a Grain",
                "give Grain(phase, zone_axis, x_reflection, mistilt, thickness)",
            )
        if g.phase >= len(candidates):
            raise ConfigurationError(
                f"grain {i} has phase {g.phase}, but there are {len(candidates)} candidates",
                f"use a phase index 0..{len(candidates) - 1}",
            )
    grid = _check_layout(layout, len(grains))
    amorphous = AmorphousRegion() if amorphous is None else amorphous
    if not isinstance(amorphous, AmorphousRegion):
        raise ConfigurationError(
            f"amorphous must be an AmorphousRegion, got {type(amorphous).__name__}",
            "give AmorphousRegion(symbol=..., density=..., ...) or None",
        )
    if dose is not None:
        dose = _positive("dose", dose, "give electrons per pattern, e.g. 1e5, or None")
    step = _positive("scan step", step, "give the step in Å, e.g. 10.0")
    if not isinstance(seed, Integral) or seed < 0:
        raise ConfigurationError(f"seed must be an integer ≥ 0, got {seed!r}", "e.g. seed=0")
    detector = DetectorGrid.from_options(n_pixels, q_pixel_size=q_pixel_size)

    # one noise-free pattern per used grain, then one per amorphous probe position
    used = sorted(int(g) for g in np.unique(grid) if g != AMORPHOUS)
    clean: list[np.ndarray] = []
    slot: dict[Grain, int] = {}
    samples: list[Any] = [None] * len(grains)
    rotation = np.full((len(grains), 3, 3), np.nan)
    probe = None
    simulated: dict[Grain, Any] = {}
    for i in track(used, description="simulating grains"):
        g = grains[i]
        rotation[i] = grain_orientation(candidates[g.phase], g)
        if g not in simulated:  # equal grains share one simulation
            simulated[g] = simulate_patterns(
                candidates[g.phase],
                g.zone_axis,
                thicknesses=[g.thickness],
                energy=energy,
                semiangle=semiangle,
                n_pixels=detector.n,
                q_pixel_size=detector.q_pixel_size,
                mistilt=g.mistilt,
                x_reflection=g.x_reflection,
                seed=int(seed),
                device=device,
                threads=threads,
                engine=engine,
            )[0]
            slot[g] = len(clean)
            clean.append(simulated[g].cbed)
        samples[i] = simulated[g]
        probe = simulated[g].probe
    index = np.full(grid.shape, -1, dtype=np.int64)
    for i in used:
        index[grid == i] = slot[grains[i]]
    where_amorphous = grid == AMORPHOUS
    if where_amorphous.any():
        box = (amorphous.size, amorphous.size, amorphous.thickness)
        atoms = random_dense_packing(
            box,
            density=amorphous.density,
            min_distance=amorphous.min_distance,
            symbol=amorphous.symbol,
            seed=int(seed),
        )
        first = len(clean)
        for position in track(amorphous.probe_positions(), description="simulating amorphous"):
            series = simulate_cbed(
                atoms,
                energy=energy,
                semiangle=semiangle,
                detector=detector,
                thicknesses=[amorphous.thickness],
                probe_position=position,
                device=device,
                threads=threads,
                engine=engine,
            )
            clean.append(series.patterns[0])
            probe = series.probe
        order = np.arange(int(where_amorphous.sum())) % amorphous.n_probes
        index[where_amorphous] = first + order
    stack = np.stack(clean).astype(np.float32)
    data = np.empty((*grid.shape, *stack.shape[1:]), dtype=np.float32)
    rng = np.random.default_rng(int(seed))
    for rx in range(grid.shape[0]):  # row by row: no float64 copy of the whole cube
        expected = stack[index[rx]]
        data[rx] = expected if dose is None else rng.poisson(expected.astype(np.float64) * dose)

    phase = np.full(grid.shape, AMORPHOUS, dtype=np.int64)
    orientation = np.full((*grid.shape, 3, 3), np.nan)
    for i in used:
        phase[grid == i] = grains[i].phase
        orientation[grid == i] = rotation[i]
    if not description:
        parts = [
            f"{names[g.phase]} [{''.join(map(str, g.zone_axis))}]"
            + (f" tilt {g.mistilt} mrad" if g.mistilt else "")
            for g in (grains[i] for i in used)
        ]
        if where_amorphous.any():
            parts.append(f"amorphous {amorphous.symbol}")
        description = "phase test scan: " + ", ".join(parts)
    truth = PhaseScanTruth(
        phase=phase,
        orientation=orientation,
        amorphous=where_amorphous,
        names=names,
        grain=grid,
        grains=grains,
        step=step,
        description=description,
        pattern=index,
        clean=stack,
        probe=None if probe is None else np.asarray(probe, np.float32),
        samples=tuple(samples),
    )
    calibration = Calibration(
        r_pixel_size=step,
        r_units="A",
        q_pixel_size=detector.q_pixel_size,
        q_units="A^-1",
        energy=float(energy),
        convergence_semiangle=float(semiangle),
        qx0=float(detector.origin),
        qy0=float(detector.origin),
    )
    metadata = {
        "description": description,
        "names": names,
        "grains": [g.to_dict() for g in grains],
        "amorphous": amorphous.to_dict() if where_amorphous.any() else None,
        "dose": dose,
        "seed": int(seed),
        "simulations": len(clean),
    }
    return DataCube(data, calibration, name="phase_test_scan", metadata=metadata), truth


# ---- the standard case ----------------------------------------------------------------------
def rocksalt_mgo(a: float = A_MGO) -> Any:
    """Rocksalt MgO (Fm-3m), conventional cubic cell of lattice parameter ``a`` (Å)."""
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(a), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def perovskite_srtio3(a: float = A_SRTIO3) -> Any:
    """Cubic perovskite SrTiO₃ (Pm-3m), Sr at the origin, Ti at the body centre."""
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup(
        "Pm-3m",
        Lattice.cubic(a),
        ["Sr", "Ti", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0]],
    )


#: Grains of the standard scan (phase 0 = MgO, 1 = SrTiO₃). In-plane angles: the x axis
#: along (210), (21-1), (110) and (11-2), i.e. 26.6°, 35.3°, 45° and 30° from the default
#: (shortest) reflection; the SrTiO₃ [001] grain is mistilted by 5.8 mrad (0.33°).
DEFAULT_GRAINS: tuple[Grain, ...] = (
    Grain(0, (0, 0, 1), x_reflection=(2, 1, 0), thickness=200.0),
    Grain(0, (0, 1, 1), x_reflection=(2, 1, -1), thickness=160.0),
    Grain(1, (0, 0, 1), x_reflection=(1, 1, 0), mistilt=(5.0, -3.0), thickness=120.0),
    Grain(1, (1, 1, 1), x_reflection=(1, 1, -2), thickness=180.0),
)

#: Layout of the standard 8 × 8 scan (rows = Rx): four grains of 13 positions around a
#: 12-position amorphous region ('.'); MgO meets SrTiO₃ along the same [001] zone axis.
_DEFAULT_LAYOUT = (
    "00001111",
    "00001111",
    "000..111",
    "00....11",
    "22....33",
    "222..333",
    "22223333",
    "22223333",
)

#: The standard amorphous region: a-Si, 15 nm, four probe positions.
DEFAULT_AMORPHOUS = AmorphousRegion()


def default_layout() -> np.ndarray:
    """``(8, 8)`` grain indices of the standard scan, -1 = amorphous."""
    return np.array([[AMORPHOUS if c == "." else int(c) for c in row] for row in _DEFAULT_LAYOUT])


def default_candidates() -> list[Any]:
    """``[MgO, SrTiO₃]``: the phases of the standard scan."""
    return [rocksalt_mgo(), perovskite_srtio3()]


def default_phase_scan(**options: Any) -> tuple[DataCube, PhaseScanTruth]:
    """The standard phase / orientation / amorphous test scan.

    Rocksalt MgO (a = 4.212 Å) and cubic perovskite SrTiO₃ (a = 3.905 Å), two grains each
    (:data:`DEFAULT_GRAINS`: MgO [001] and [011], SrTiO₃ [001] mistilted by (5, -3) mrad and
    [111], 12-20 nm thick), and 12 positions of amorphous Si (15 nm) on an 8 × 8 scan
    (:func:`default_layout`), 10 Å steps. 300 kV, 1.5 mrad, 128² pixels of 0.025 Å⁻¹
    (±1.6 Å⁻¹ at the edges; disk radius 3.05 px, the closest disks, SrTiO₃ {100}, 10 px
    apart), 1e5 electrons per pattern. About 30 s of CPU time with ``threads=1`` (eight
    multislice runs of 3-5 s, the mistilted grain's about 1 s); on a busy shared machine
    ``threads=1`` is also the fastest in wall time.

    Parameters
    ----------
    **options
        Keyword arguments of :func:`phase_test_scan` to override (``seed``, ``threads``,
        ``dose``, ``device``, ...).
    """
    settings: dict[str, Any] = {"amorphous": DEFAULT_AMORPHOUS}
    settings.update(options)
    return phase_test_scan(default_candidates(), DEFAULT_GRAINS, default_layout(), **settings)
