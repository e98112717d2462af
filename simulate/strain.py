"""Homogeneous strain, strain-field truth maps, and the synthetic strained 4D-STEM scan.

Conventions (DESIGN.md): beam along z; x is scan axis Rx and detector axis -2, y is scan
axis Ry and detector axis -1 (no scan–detector rotation). Strain ``e_xx, e_yy, e_xy`` is
the symmetric small-strain tensor, tensile positive; ``theta`` is a lattice rotation in
rad, counter-clockwise (from x toward y); both relative to a stated reference lattice.
The deformation gradient is ``F = R(θ)(I + ε)``: a real-space lattice vector ``a`` becomes
``F a`` and a reciprocal-lattice vector ``g`` becomes ``F⁻ᵀ g``, so a tensile strain moves
diffraction spots toward the origin.

Truth generators return a :class:`StrainTruth`: per scan position the strain relative to
the reference (what a strain map should measure), the strain along the beam ``e_zz``
(invisible in a zone-axis pattern but needed to build the crystal), and a material index.
:func:`strained_scan` turns a truth into a :class:`~stemforge.core.DataCube`, calling the
pattern simulator once per distinct state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, NamedTuple

import numpy as np

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.core.progress import track

# ---- material constants -------------------------------------------------------------------
#: Si lattice parameter, Å (CODATA 2018: 543.1020511 pm at 22.5 °C).
A_SI = 5.431020511
#: Ge lattice parameter, Å (room temperature, as usually tabulated).
A_GE = 5.6579
#: Si elastic stiffnesses C11, C12 in GPa at 25 °C (McSkimin & Andreatch, J. Appl. Phys. 35, 2161 (1964)).
C_SI = (165.77, 63.93)
#: Ge elastic stiffnesses C11, C12 in GPa at 25 °C (McSkimin & Andreatch, J. Appl. Phys. 34, 651 (1963)).
C_GE = (128.53, 48.26)

STRAIN_COMPONENTS = ("e_xx", "e_yy", "e_xy", "theta", "e_zz")


@dataclass(frozen=True)
class Material:
    """A cubic crystal: what a simulator needs to build it, relaxed.

    Parameters
    ----------
    name
        Label, e.g. ``'Si'`` or ``'Si0.70Ge0.30'``.
    a
        Relaxed cubic lattice parameter, Å.
    composition
        ``((element, site fraction), ...)``; a random alloy for more than one element.
    structure
        Prototype of the conventional cell, e.g. ``'diamond'``.
    """

    name: str
    a: float
    composition: tuple[tuple[str, float], ...]
    structure: str = "diamond"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "a": self.a,
            "composition": [list(c) for c in self.composition],
            "structure": self.structure,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Material:
        return cls(d["name"], float(d["a"]), tuple((str(e), float(f)) for e, f in d["composition"]), d["structure"])


def _check_fraction(x_ge: float) -> float:
    if not (isinstance(x_ge, Real) and 0 <= x_ge <= 1):
        raise ConfigurationError(f"Ge fraction must be in [0, 1], got {x_ge!r}", "give x in Si(1-x)Ge(x), e.g. 0.3")
    return float(x_ge)


def sige_lattice_parameter(x_ge: float) -> float:
    """Relaxed lattice parameter of Si₁₋ₓGeₓ by Vegard's law, Å.

    Vegard's linear interpolation ``a_Si + x (a_Ge − a_Si)``; the measured bowing
    (Dismukes et al., J. Phys. Chem. 68, 3021 (1964)) is below 0.01 Å at any x.
    """
    x = _check_fraction(x_ge)
    return A_SI + x * (A_GE - A_SI)


def sige_elastic_constants(x_ge: float) -> tuple[float, float]:
    """``(C11, C12)`` of Si₁₋ₓGeₓ in GPa, linearly interpolated between Si and Ge."""
    x = _check_fraction(x_ge)
    return C_SI[0] + x * (C_GE[0] - C_SI[0]), C_SI[1] + x * (C_GE[1] - C_SI[1])


def silicon_germanium(x_ge: float) -> Material:
    """The relaxed Si₁₋ₓGeₓ random alloy (``'Si'`` and ``'Ge'`` at the ends)."""
    x = _check_fraction(x_ge)
    name = "Si" if x == 0 else "Ge" if x == 1 else f"Si{1 - x:.2f}Ge{x:.2f}"
    composition = tuple((el, f) for el, f in (("Si", 1 - x), ("Ge", x)) if f > 0)
    return Material(name, sige_lattice_parameter(x), composition)


SILICON = silicon_germanium(0.0)


def pseudomorphic_strain(x_ge: float, a_substrate: float = A_SI) -> tuple[float, float]:
    """Strain of a Si₁₋ₓGeₓ layer grown pseudomorphically on a (001) substrate.

    The layer takes the substrate's lattice parameter in the growth plane,
    ``ε∥ = (a_sub − a_layer) / a_layer``, and, free of stress along the growth direction
    (σ⊥ = C12 ε∥ + C12 ε∥ + C11 ε⊥ = 0), relaxes tetragonally: ``ε⊥ = −2 (C12/C11) ε∥``.
    Both are relative to the layer's own relaxed lattice.

    Returns
    -------
    eps_par, eps_perp : float
    """
    if not (math.isfinite(a_substrate) and a_substrate > 0):
        raise ConfigurationError(f"substrate lattice parameter must be positive, got {a_substrate!r}", "give it in Å")
    a_layer = sige_lattice_parameter(x_ge)
    c11, c12 = sige_elastic_constants(x_ge)
    eps_par = (a_substrate - a_layer) / a_layer
    return eps_par, -2 * c12 / c11 * eps_par


# ---- homogeneous strain -------------------------------------------------------------------
def deformation_gradient(e_xx: Any, e_yy: Any, e_xy: Any, theta: Any = 0.0, e_zz: Any = 0.0) -> np.ndarray:
    """``F = R_z(θ)(I + ε)``, vectorised: arrays of any common shape give ``(..., 3, 3)``."""
    values = (np.asarray(v, dtype=np.float64) for v in (e_xx, e_yy, e_xy, theta, e_zz))
    e_xx, e_yy, e_xy, theta, e_zz = np.broadcast_arrays(*values)
    stretch = np.zeros(e_xx.shape + (3, 3))
    stretch[..., 0, 0] = 1 + e_xx
    stretch[..., 1, 1] = 1 + e_yy
    stretch[..., 2, 2] = 1 + e_zz
    stretch[..., 0, 1] = stretch[..., 1, 0] = e_xy
    c, s = np.cos(theta), np.sin(theta)
    rot = np.zeros_like(stretch)
    rot[..., 0, 0], rot[..., 0, 1], rot[..., 1, 0], rot[..., 1, 1], rot[..., 2, 2] = c, -s, s, c, 1.0
    return rot @ stretch


class HomogeneousStrain(NamedTuple):
    """One homogeneous strain state in the detector frame."""

    tensor: np.ndarray
    """Symmetric small-strain tensor ε, 3×3."""
    F: np.ndarray
    """Deformation gradient ``R(θ)(I + ε)``, 3×3: lattice vectors ``a → F a``."""
    displacement_gradient: np.ndarray
    """``F − I``, 3×3: apply to a crystal as ``cell @ (I + H).T`` (rows are lattice
    vectors); equal to ``tensor`` when θ = 0. This is the ``strain_3x3`` that
    :func:`strained_scan` hands to the simulator."""
    reciprocal: np.ndarray
    """``F₂⁻ᵀ``, 2×2: how in-plane reciprocal vectors (and spot offsets from the origin) move."""


def homogeneous_strain(e_xx: float, e_yy: float, e_xy: float, theta: float = 0.0, e_zz: float = 0.0) -> HomogeneousStrain:
    """A homogeneous strain and rotation as tensor, deformation gradient and its reciprocal action.

    Parameters
    ----------
    e_xx, e_yy, e_xy
        In-plane strain (x along detector axis -2, y along -1), tensile positive.
    theta
        Lattice rotation about the beam, rad, counter-clockwise.
    e_zz
        Strain along the beam.
    """
    values = (e_xx, e_yy, e_xy, theta, e_zz)
    if not all(isinstance(v, Real) and math.isfinite(v) for v in values):
        raise ConfigurationError(f"strain components must be finite numbers, got {values!r}", "give plain floats")
    f = deformation_gradient(*values)
    tensor = np.array([[e_xx, e_xy, 0.0], [e_xy, e_yy, 0.0], [0.0, 0.0, e_zz]], dtype=np.float64)
    return HomogeneousStrain(tensor, f, f - np.eye(3), reciprocal_transform(f))


def reciprocal_transform(F: Any) -> np.ndarray:
    """``F₂⁻ᵀ`` of the in-plane block of ``F`` (``(..., 2, 2)`` or ``(..., 3, 3)``).

    With no shear between the beam and the plane (``F`` block-diagonal, as here) the
    in-plane block of ``F⁻ᵀ`` is exactly ``F₂⁻ᵀ``.
    """
    f = np.asarray(F, dtype=np.float64)[..., :2, :2]
    if not np.isfinite(f).all() or (np.abs(np.linalg.det(f)) < 1e-12).any():
        raise InvalidDataError("deformation gradient is singular or not finite", "check the strain values (|ε| ≪ 1)")
    return np.swapaxes(np.linalg.inv(f), -1, -2)


def strain_peaks(qx: Any, qy: Any, F: Any, center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Move diffraction spots (pixels) by the strain ``F``: ``q' = c + F₂⁻ᵀ (q − c)``.

    Pixels are square, so the map applies to pixel offsets as to Å⁻¹.

    Parameters
    ----------
    qx, qy
        Spot positions of the reference lattice, pixels, any shape.
    F
        Deformation gradient ``(2, 2)`` or ``(3, 3)``.
    center
        Origin ``(qx0, qy0)``, pixels (``(n // 2, n // 2)`` on the simulation grid).
    """
    r = reciprocal_transform(F)
    if r.shape != (2, 2):
        raise ShapeError(f"F has shape {np.shape(F)}", "pass one deformation gradient, 2×2 or 3×3")
    dx = np.asarray(qx, dtype=np.float64) - center[0]
    dy = np.asarray(qy, dtype=np.float64) - center[1]
    return center[0] + r[0, 0] * dx + r[0, 1] * dy, center[1] + r[1, 0] * dx + r[1, 1] * dy


def strain_from_deformation(F: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`deformation_gradient` in the plane: polar decomposition ``F₂ = R U``.

    Closed form in 2D: ``θ = atan2(F₁₀ − F₀₁, F₀₀ + F₁₁)``, ``ε = Rᵀ F₂ − I``.

    Returns
    -------
    e_xx, e_yy, e_xy, theta : numpy.ndarray
        With the leading shape of ``F``; ``e_xy`` is the mean of the off-diagonal terms
        (exactly symmetric when ``F`` is a rotated symmetric stretch).
    """
    f = np.asarray(F, dtype=np.float64)[..., :2, :2]
    theta = np.arctan2(f[..., 1, 0] - f[..., 0, 1], f[..., 0, 0] + f[..., 1, 1])
    c, s = np.cos(theta), np.sin(theta)
    u00 = c * f[..., 0, 0] + s * f[..., 1, 0]
    u11 = -s * f[..., 0, 1] + c * f[..., 1, 1]
    u01 = c * f[..., 0, 1] + s * f[..., 1, 1]
    u10 = -s * f[..., 0, 0] + c * f[..., 1, 0]
    return u00 - 1, u11 - 1, (u01 + u10) / 2, theta


# ---- truth maps ---------------------------------------------------------------------------
@dataclass
class StrainTruth:
    """Exact strain of every scan position of a synthetic specimen.

    Parameters
    ----------
    e_xx, e_yy, e_xy, theta
        ``(Rx, Ry)`` maps relative to ``reference``: what a strain map should report.
    e_zz
        ``(Rx, Ry)`` strain along the beam relative to ``reference`` (used to build the
        crystal; not measurable from a zone-axis pattern).
    material
        ``(Rx, Ry)`` integer index into ``materials``.
    materials
        The relaxed materials present.
    reference
        The reference lattice the maps are relative to.
    step
        Scan step, Å.
    description
        What the specimen is, for reports.
    """

    e_xx: np.ndarray
    e_yy: np.ndarray
    e_xy: np.ndarray
    theta: np.ndarray
    e_zz: np.ndarray
    material: np.ndarray
    materials: tuple[Material, ...]
    reference: Material
    step: float
    description: str = ""

    def __post_init__(self) -> None:
        shape = np.shape(self.e_xx)
        for name in (*STRAIN_COMPONENTS, "material"):
            value = np.asarray(getattr(self, name), dtype=np.int64 if name == "material" else np.float64)
            if value.shape != shape or value.ndim != 2:
                raise ShapeError(
                    f"truth map {name} has shape {value.shape}, e_xx {shape}",
                    "give every map with the scan shape (Rx, Ry)",
                )
            if not np.isfinite(value).all():
                raise InvalidDataError(f"truth map {name} contains NaN or inf", "give finite strain values")
            setattr(self, name, value)
        if self.material.min() < 0 or self.material.max() >= len(self.materials):
            raise ShapeError(
                f"material indices {self.material.min()}..{self.material.max()} for {len(self.materials)} materials",
                "index into the materials tuple",
            )
        if not (math.isfinite(self.step) and self.step > 0):
            raise ConfigurationError(f"scan step must be positive, got {self.step!r}", "give the step in Å")
        self.materials = tuple(self.materials)

    @property
    def scan_shape(self) -> tuple[int, int]:
        return self.e_xx.shape  # type: ignore[return-value]

    def deformation(self) -> np.ndarray:
        """``(Rx, Ry, 3, 3)`` deformation gradient of each position relative to the reference."""
        return deformation_gradient(self.e_xx, self.e_yy, self.e_xy, self.theta, self.e_zz)

    def applied_strain(self) -> np.ndarray:
        """``(Rx, Ry, 3, 3)`` displacement gradient ``H`` relative to each position's own
        relaxed material: the crystal there is ``cell @ (I + H).T``.

        The lattice there is ``F`` times the reference lattice, i.e.
        ``(a_ref / a_material) F`` times its own relaxed one.
        """
        a = np.array([m.a for m in self.materials])[self.material]
        return (self.reference.a / a)[..., None, None] * self.deformation() - np.eye(3)


def _scan_grid(scan_shape: Sequence[int], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (x, y) in Å of the scan points, ``(Rx, 1)`` and ``(1, Ry)``."""
    if len(scan_shape) != 2 or not all(isinstance(n, int | np.integer) and n >= 1 for n in scan_shape):
        raise ShapeError(f"scan shape {scan_shape!r} is not two positive integers", "give (Rx, Ry), e.g. (32, 8)")
    if not (isinstance(step, Real) and math.isfinite(step) and step > 0):
        raise ConfigurationError(f"scan step must be a positive number of Å, got {step!r}", "e.g. step=5.0")
    return np.arange(scan_shape[0])[:, None] * float(step), np.arange(scan_shape[1])[None, :] * float(step)


def _zeros(scan_shape: Sequence[int]) -> dict[str, np.ndarray]:
    return {name: np.zeros(tuple(scan_shape)) for name in STRAIN_COMPONENTS}


#: Si spacers and pseudomorphic SiGe layers of rising Ge content (thickness Å, x_Ge).
DEFAULT_LAYERS: tuple[tuple[float, float], ...] = (
    (60.0, 0.0),
    (40.0, 0.2),
    (60.0, 0.0),
    (40.0, 0.3),
    (60.0, 0.0),
    (40.0, 0.4),
)


def sige_multilayer(
    scan_shape: Sequence[int],
    step: float,
    layers: Sequence[tuple[float, float]] = DEFAULT_LAYERS,
    substrate_x_ge: float = 0.0,
) -> StrainTruth:
    """Cross-section of a (001) Si / SiGe multilayer, growth direction along x.

    The layers, listed from scan row 0 along +x as ``(thickness Å, x_Ge)``, are all
    pseudomorphic to the substrate (positions past the stack are substrate): in the
    growth plane (y and the beam direction z) every layer has the substrate's lattice
    parameter; along x a layer of relaxed parameter ``a`` has ``a (1 + ε⊥)`` with ε⊥ from
    :func:`pseudomorphic_strain`. Relative to the substrate, the reference lattice of the
    maps: ``e_yy = e_zz = 0`` and ``e_xx = a (1 + ε⊥) / a_sub − 1``; no shear, no rotation.
    (A thin TEM lamella relaxes partly along z near its surfaces; that is not modelled.)

    The simulator must build each crystal with its growth axis [001] along x; any zone
    axis in the growth plane ([100], [110]) sees the same strain, since the in-plane
    strain is isotropic.

    Parameters
    ----------
    scan_shape
        ``(Rx, Ry)``.
    step
        Scan step, Å.
    layers
        ``(thickness, x_Ge)`` pairs; thickness in Å.
    substrate_x_ge
        Ge fraction of the substrate (0: a Si wafer; >0: a relaxed SiGe virtual substrate).

    Returns
    -------
    StrainTruth
        Material index per position into ``materials`` (one per distinct composition, the
        substrate first).
    """
    x, _ = _scan_grid(scan_shape, step)
    substrate = silicon_germanium(substrate_x_ge)
    maps = _zeros(scan_shape)
    material = np.zeros(tuple(scan_shape), dtype=np.int64)
    fractions = [substrate_x_ge]
    top = 0.0
    for layer in layers:
        if len(layer) != 2:
            raise ConfigurationError(f"layer {layer!r} is not (thickness, x_Ge)", "e.g. layers=[(60.0, 0.0), (40.0, 0.3)]")
        thickness, x_ge = float(layer[0]), _check_fraction(layer[1])
        if not (math.isfinite(thickness) and thickness > 0):
            raise ConfigurationError(f"layer thickness must be positive, got {thickness!r}", "give it in Å")
        rows = ((x >= top) & (x < top + thickness))[:, 0]
        top += thickness
        if x_ge not in fractions:
            fractions.append(x_ge)
        material[rows] = fractions.index(x_ge)
        _, eps_perp = pseudomorphic_strain(x_ge, substrate.a)
        # e_yy = e_zz = 0: in the growth plane the layer has the substrate's parameter.
        maps["e_xx"][rows] = sige_lattice_parameter(x_ge) * (1 + eps_perp) / substrate.a - 1
    return StrainTruth(
        **maps,
        material=material,
        materials=tuple(silicon_germanium(f) for f in fractions),
        reference=substrate,
        step=float(step),
        description=f"(001) SiGe multilayer on {substrate.name}, growth along x: "
        + ", ".join(f"{t:g} Å {silicon_germanium(f).name}" for t, f in layers),
    )


def _components(values: Mapping[str, float] | None, name: str) -> dict[str, float]:
    values = dict(values or {})
    unknown = set(values) - set(STRAIN_COMPONENTS)
    if unknown:
        raise ConfigurationError(f"unknown strain component(s) {sorted(unknown)} in {name}", f"use {list(STRAIN_COMPONENTS)}")
    out = {k: float(values.get(k, 0.0)) for k in STRAIN_COMPONENTS}
    if not all(math.isfinite(v) for v in out.values()):
        raise ConfigurationError(f"{name} has non-finite strain values {values!r}", "give finite numbers")
    return out


def linear_gradient(
    scan_shape: Sequence[int],
    step: float,
    start: Mapping[str, float],
    end: Mapping[str, float],
    axis: int = 0,
    material: Material = SILICON,
) -> StrainTruth:
    """Strain varying linearly along one scan axis, like the surface of a bent beam.

    Parameters
    ----------
    scan_shape, step
        ``(Rx, Ry)`` and the scan step in Å.
    start, end
        Components (``e_xx``, ``e_yy``, ``e_xy``, ``theta``, ``e_zz``; missing ones are 0)
        at the first and last position along ``axis``, relative to ``material``.
    axis
        0 (along x, rows) or 1 (along y, columns).
    material
        The one material, also the reference.
    """
    if axis not in (0, 1):
        raise ConfigurationError(f"axis must be 0 or 1, got {axis!r}", "0 varies along x (rows), 1 along y")
    x, y = _scan_grid(scan_shape, step)
    a, b = _components(start, "start"), _components(end, "end")
    coord = (x if axis == 0 else y) / step
    t = np.broadcast_to(coord / max(scan_shape[axis] - 1, 1), tuple(scan_shape))
    maps = {k: a[k] + (b[k] - a[k]) * t for k in STRAIN_COMPONENTS}
    return StrainTruth(
        **maps,
        material=np.zeros(tuple(scan_shape), dtype=np.int64),
        materials=(material,),
        reference=material,
        step=float(step),
        description=f"linear strain gradient along {'xy'[axis]} in {material.name}: {a} → {b}",
    )


def rotated_grain(
    scan_shape: Sequence[int],
    step: float,
    theta: float,
    radius: float,
    center: tuple[float, float] | None = None,
    strain: Mapping[str, float] | None = None,
    material: Material = SILICON,
) -> StrainTruth:
    """A disk-shaped grain rotated by ``theta`` about the beam inside an unrotated matrix.

    Parameters
    ----------
    scan_shape, step
        ``(Rx, Ry)`` and the scan step in Å.
    theta
        Rotation of the grain, rad, counter-clockwise.
    radius
        Grain radius, Å.
    center
        Grain centre ``(x, y)`` in Å; default the middle of the scan.
    strain
        Optional strain components inside the grain as well (see :func:`linear_gradient`).
    material
        Grain and matrix material, also the reference.
    """
    x, y = _scan_grid(scan_shape, step)
    if not (math.isfinite(theta) and math.isfinite(radius) and radius > 0):
        raise ConfigurationError(f"grain needs a finite theta and positive radius, got {theta!r}, {radius!r}", "give rad and Å")
    cx, cy = center if center is not None else ((scan_shape[0] - 1) * step / 2, (scan_shape[1] - 1) * step / 2)
    inside = np.hypot(x - cx, y - cy) <= radius
    values = {**_components(strain, "strain"), "theta": float(theta)}
    maps = {k: np.where(inside, values[k], 0.0) for k in STRAIN_COMPONENTS}
    return StrainTruth(
        **maps,
        material=np.zeros(tuple(scan_shape), dtype=np.int64),
        materials=(material,),
        reference=material,
        step=float(step),
        description=f"{material.name} grain of radius {radius:g} Å rotated by {theta:g} rad",
    )


# ---- the scan -----------------------------------------------------------------------------
SimulateFn = Callable[[np.ndarray, Material], np.ndarray]


def strained_scan(
    truth: StrainTruth,
    simulate_fn: SimulateFn,
    *,
    q_pixel_size: float,
    energy: float,
    semiangle: float | None = None,
    quantum: float | None = None,
    dtype: Any = np.float32,
) -> tuple[DataCube, StrainTruth]:
    """Synthetic 4D-STEM scan of a strain truth, one simulation per distinct state.

    Positions with the same material and strain share one pattern, so a multilayer costs
    a simulation per layer composition, not per position.

    Parameters
    ----------
    truth
        From :func:`sige_multilayer`, :func:`linear_gradient`, :func:`rotated_grain`, or
        built by hand.
    simulate_fn
        ``simulate_fn(strain_3x3, material) -> (Q, Q) pattern`` on the stemforge detector
        grid (origin at pixel ``Q // 2``, ``q_pixel_size`` Å⁻¹ per pixel). ``strain_3x3``
        is the displacement gradient relative to ``material``'s relaxed lattice (see
        :meth:`StrainTruth.applied_strain`); build the crystal as ``cell @ (I + H).T``.
    q_pixel_size
        Detector pixel size of the simulated patterns, Å⁻¹.
    energy
        Beam energy, eV.
    semiangle
        Probe convergence semiangle, mrad, for the calibration (optional).
    quantum
        If given, every strain component and θ is rounded to a multiple of it before
        grouping (e.g. 1e-4), so a smooth field needs fewer simulations; the returned
        truth is then the rounded one, i.e. exactly what was simulated.
    dtype
        Data type of the datacube.

    Returns
    -------
    datacube : DataCube
        ``(Rx, Ry, Q, Q)``, calibrated (pixel sizes, energy, origin at ``Q // 2``).
    truth : StrainTruth
        The truth of the scan (``truth`` itself unless ``quantum`` rounded it).
    """
    if not callable(simulate_fn):
        raise ConfigurationError("simulate_fn is not callable", "pass a function (strain_3x3, material) -> pattern")
    if quantum is not None:
        if not (isinstance(quantum, Real) and math.isfinite(quantum) and quantum > 0):
            raise ConfigurationError(f"quantum must be a positive number, got {quantum!r}", "e.g. quantum=1e-4, or None")
        rounded = {k: np.round(getattr(truth, k) / quantum) * quantum for k in STRAIN_COMPONENTS}
        truth = StrainTruth(
            **rounded,
            material=truth.material,
            materials=truth.materials,
            reference=truth.reference,
            step=truth.step,
            description=f"{truth.description} (strain rounded to {quantum:g})",
        )
    rows = np.stack([truth.material.astype(np.float64)] + [getattr(truth, k) for k in STRAIN_COMPONENTS], axis=-1)
    states, first, inverse = np.unique(rows.reshape(-1, rows.shape[-1]), axis=0, return_index=True, return_inverse=True)
    applied = truth.applied_strain().reshape(-1, 3, 3)
    materials = truth.material.ravel()

    patterns: list[np.ndarray] = []
    for i in track(range(len(states)), description="simulating strain states"):
        pattern = np.asarray(simulate_fn(applied[first[i]].copy(), truth.materials[materials[first[i]]]))
        if pattern.ndim != 2 or (patterns and pattern.shape != patterns[0].shape):
            raise ShapeError(
                f"simulate_fn returned shape {pattern.shape}"
                + (f" after {patterns[0].shape}" if patterns else ""),
                "return one 2D pattern (Q, Q) on the same detector grid for every state",
            )
        if not np.isfinite(pattern).all():
            raise InvalidDataError("simulate_fn returned NaN or inf", "check the simulation of this strain state")
        patterns.append(pattern.astype(dtype))
    data = np.stack(patterns)[inverse.ravel()].reshape(*truth.scan_shape, *patterns[0].shape)
    qx, qy = patterns[0].shape
    calibration = Calibration(
        r_pixel_size=truth.step,
        r_units="A",
        q_pixel_size=q_pixel_size,
        q_units="A^-1",
        energy=energy,
        convergence_semiangle=semiangle,
        qx0=float(qx // 2),
        qy0=float(qy // 2),
    )
    metadata = {"strain_states": len(states), "reference": truth.reference.name, "description": truth.description}
    return DataCube(data, calibration, name="strained_scan", metadata=metadata), truth


def truth_to_dict(truth: StrainTruth) -> dict[str, Any]:
    """The truth for saving: ``(Rx, Ry)`` arrays under their names, and ``attrs``, a
    JSON-ready dict of everything else (materials, reference, step, conventions)."""
    out: dict[str, Any] = {name: getattr(truth, name) for name in (*STRAIN_COMPONENTS, "material")}
    out["attrs"] = {
        "materials": [m.to_dict() for m in truth.materials],
        "reference": truth.reference.to_dict(),
        "step": truth.step,
        "step_units": "A",
        "description": truth.description,
        "convention": "e_xx, e_yy, e_xy symmetric strain (tensile positive), theta rad counter-clockwise "
        "from x (scan/detector axis -2) toward y, relative to the reference lattice; e_zz along the beam; "
        "material indexes materials",
    }
    return out


def truth_from_dict(d: Mapping[str, Any]) -> StrainTruth:
    """Inverse of :func:`truth_to_dict`."""
    missing = {*STRAIN_COMPONENTS, "material", "attrs"} - set(d)
    if missing:
        raise ConfigurationError(f"strain truth is missing {sorted(missing)}", "save it with truth_to_dict")
    attrs = d["attrs"]
    return StrainTruth(
        **{name: np.asarray(d[name]) for name in (*STRAIN_COMPONENTS, "material")},
        materials=tuple(Material.from_dict(m) for m in attrs["materials"]),
        reference=Material.from_dict(attrs["reference"]),
        step=float(attrs["step"]),
        description=attrs.get("description", ""),
    )
