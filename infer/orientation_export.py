"""Orientation maps for other tools and for people: Euler angles, quaternions, EDAX ``.ang``
files and inverse-pole-figure (IPF) colours.

Conventions
-----------
- A rotation ``U`` (``(..., 3, 3)``) maps the crystal's Cartesian frame to the lab frame,
  ``g_lab = U @ g_crystal``. The crystal frame is that of the structure the matcher used
  (pymatgen ``lattice.matrix`` rows are a, b, c). Lab x is detector qx (pattern axis 0), y is
  qy (axis 1), z the beam (electrons travel along +z).
- The *orientation* is ``g = Uᵀ``: it takes sample (= lab) coordinates to crystal
  coordinates, ``v_crystal = g @ v_sample``. This is the Bunge convention of EDAX and orix
  (orix ``Orientation * v_sample`` is ``v_crystal``; checked against orix 0.15). MTEX reads
  the same Euler angles as the inverse rotation, crystal → specimen. Bunge Euler angles and
  quaternions below describe ``g``.
- The *standard crystal frame* of ``.ang`` files, orix and EDAX is x ∥ a, z ∥ c*, y = z × x.
  pymatgen's conventional cells do not always use it (hexagonal a at -60°, monoclinic a ∥ y),
  so :func:`standard_frame` gives the rotation ``F`` with ``v_standard = F @ v_crystal`` and
  the exported orientation is ``F @ Uᵀ``.
- Symmetry is given as the ``(K, 3, 3)`` proper rotations of the crystal's Laue group in the
  crystal frame; ``U`` and ``U @ S`` are the same orientation. Improper operations are
  accepted too (their proper part ``-S`` is used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError

_TWO_PI = 2.0 * math.pi
#: ``sin(Φ/2)`` (or ``cos(Φ/2)``) below which Φ counts as 0 (or π) and φ2 is set to 0; the
#: rotation moves by at most about twice this.
_GIMBAL = 1e-9
#: Positions per block in the IPF reduction (block × 48 operations × 3 doubles ≈ 19 MB).
_BLOCK = 16384
#: Euler angles EDAX writes for positions that are not indexed.
_NOT_INDEXED_EULER = 4.0 * math.pi
#: Å per µm: stemforge works in Å, ``.ang`` coordinates are in µm (orix and MTEX assume so).
_ANGSTROM_PER_MICRON = 1e4


# ---- rotations: Euler angles and quaternions -----------------------------------------------


def _as_rotations(rotations) -> np.ndarray:
    rotations = np.asarray(rotations, dtype=np.float64)
    if rotations.ndim < 2 or rotations.shape[-2:] != (3, 3):
        raise ShapeError(
            f"rotations have shape {rotations.shape}, expected (..., 3, 3)",
            "pass rotation matrices U (crystal → lab), one 3×3 matrix per position",
        )
    return rotations


def quaternions(rotations) -> np.ndarray:
    """Unit quaternions ``(w, x, y, z)``, ``w ≥ 0``, of the orientations ``g = Uᵀ``.

    The quaternion ``q`` rotates sample vectors into crystal coordinates,
    ``v_crystal = q v_sample q*``; it equals orix's ``Orientation.data`` for the same
    orientation (EDAX / Rowenhorst et al. 2015 convention, the scalar part first).

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` rotations ``U`` (crystal → lab). Slightly non-orthogonal matrices are
        replaced by the nearest rotation.

    Returns
    -------
    np.ndarray
        ``(..., 4)``; NaN where a rotation is not finite.
    """
    from scipy.spatial.transform import Rotation

    rotations = _as_rotations(rotations)
    flat = rotations.reshape(-1, 3, 3)
    q = np.full((len(flat), 4), np.nan)
    good = np.all(np.isfinite(flat), axis=(1, 2))
    if np.any(good):
        # scipy's R(q) = g acts actively: exactly g's action on sample vectors
        xyzw = Rotation.from_matrix(np.swapaxes(flat[good], -1, -2)).as_quat()
        q[good] = xyzw[:, [3, 0, 1, 2]]
    # one representative of ±q: the first non-zero component is positive (w ≥ 0)
    leading = np.argmax(q != 0, axis=1)
    sign = np.sign(q[np.arange(len(q)), leading])
    q *= np.where(sign < 0, -1.0, 1.0)[:, None]
    return q.reshape(*rotations.shape[:-2], 4)


def euler_bunge(rotations) -> np.ndarray:
    """Bunge ZXZ Euler angles ``(φ1, Φ, φ2)`` (radians) of the orientations ``g = Uᵀ``.

    ``g = R_z(φ2) · R_x(Φ) · R_z(φ1)`` with ``R`` the *passive* rotations of the frame: the
    sample (lab) frame is turned by φ1 about its z, then by Φ about the new x, then by φ2 about
    the new z, and lands on the crystal frame. Explicitly (c = cos, s = sin)::

        g = [[ c1 c2 - s1 s2 cΦ,   s1 c2 + c1 s2 cΦ,   s2 sΦ],
             [-c1 s2 - s1 c2 cΦ,  -s1 s2 + c1 c2 cΦ,   c2 sΦ],
             [ s1 sΦ,             -c1 sΦ,              cΦ   ]]

    and ``v_crystal = g @ v_sample``; the beam direction in crystal coordinates is
    ``g[:, 2] = (s2 sΦ, c2 sΦ, cΦ)``. These are the angles of EDAX ``.ang`` files, of orix
    (``Orientation.from_euler`` / ``to_euler``) and of MTEX's Bunge convention.

    Ranges: φ1, φ2 in ``[0, 2π)``, Φ in ``[0, π]``. At the gimbal lock (Φ = 0 or π, only
    ``φ1 ± φ2`` defined) φ2 is set to 0.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` rotations ``U`` (crystal → lab).

    Returns
    -------
    np.ndarray
        ``(..., 3)``; NaN where a rotation is not finite.
    """
    w, x, y, z = np.moveaxis(quaternions(rotations), -1, 0)
    # q = (cos(Φ/2) cos σ, -sin(Φ/2) cos δ, -sin(Φ/2) sin δ, -cos(Φ/2) sin σ) with
    # σ = (φ1 + φ2)/2, δ = (φ1 - φ2)/2: half angles keep both φ's accurate next to the lock.
    cos_half = np.hypot(w, z)
    sin_half = np.hypot(x, y)
    big_phi = 2.0 * np.arctan2(sin_half, cos_half)
    sigma = np.arctan2(-z, w)
    delta = np.arctan2(-y, -x)
    delta = np.where(sin_half < _GIMBAL, sigma, delta)  # Φ ≈ 0: φ1 = φ1 + φ2, φ2 = 0
    sigma = np.where(cos_half < _GIMBAL, delta, sigma)  # Φ ≈ π: φ1 = φ1 - φ2, φ2 = 0
    angles = np.stack([sigma + delta, big_phi, sigma - delta], axis=-1)
    angles[..., 0::2] = np.mod(angles[..., 0::2], _TWO_PI)
    # np.mod of a tiny negative number can round to exactly 2π
    angles[..., 0::2] = np.where(angles[..., 0::2] >= _TWO_PI, 0.0, angles[..., 0::2])
    return angles


def rotations_from_euler(euler) -> np.ndarray:
    """Rotations ``U`` (crystal → lab) from Bunge Euler angles; inverse of :func:`euler_bunge`.

    Parameters
    ----------
    euler
        ``(..., 3)`` angles ``(φ1, Φ, φ2)`` in radians, of the orientation ``g = Uᵀ``.

    Returns
    -------
    np.ndarray
        ``(..., 3, 3)`` ``U = gᵀ``.
    """
    euler = np.asarray(euler, dtype=np.float64)
    if euler.ndim < 1 or euler.shape[-1] != 3:
        raise ShapeError(f"Euler angles have shape {euler.shape}, expected (..., 3)")
    c1, c, c2 = np.moveaxis(np.cos(euler), -1, 0)
    s1, s, s2 = np.moveaxis(np.sin(euler), -1, 0)
    g = np.stack(
        [
            np.stack([c1 * c2 - s1 * s2 * c, s1 * c2 + c1 * s2 * c, s2 * s], axis=-1),
            np.stack([-c1 * s2 - s1 * c2 * c, -s1 * s2 + c1 * c2 * c, c2 * s], axis=-1),
            np.stack([s1 * s, -c1 * s, c], axis=-1),
        ],
        axis=-2,
    )
    return np.swapaxes(g, -1, -2)


def standard_frame(lattice) -> np.ndarray:
    """Rotation ``F`` from a crystal frame to the standard one (x ∥ a, z ∥ c*, y = z × x).

    Parameters
    ----------
    lattice
        ``(3, 3)`` lattice vectors a, b, c (rows) in the crystal frame, e.g. pymatgen
        ``structure.lattice.matrix``.

    Returns
    -------
    np.ndarray
        ``(3, 3)`` with ``v_standard = F @ v_crystal``; the orientation in the standard frame
        is ``F @ Uᵀ`` (rotation ``U @ Fᵀ``).
    """
    matrix = np.asarray(lattice, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ShapeError(f"lattice has shape {matrix.shape}, expected (3, 3) (rows a, b, c)")
    a, b, c = matrix
    normal = np.cross(a, b)
    if np.linalg.norm(a) == 0 or np.linalg.norm(normal) == 0 or np.dot(normal, c) <= 0:
        raise ConfigurationError(
            "lattice vectors are degenerate or left-handed", "pass rows a, b, c with (a×b)·c > 0"
        )
    e1 = a / np.linalg.norm(a)
    e3 = normal / np.linalg.norm(normal)  # c* ∥ a × b
    return np.stack([e1, np.cross(e3, e1), e3])


# ---- Laue groups and their fundamental sectors -----------------------------------------------

#: Point groups (Hermann–Mauguin, with or without the trigonal setting digit) → Laue group.
_LAUE = {
    **dict.fromkeys(["1", "-1"], "-1"),
    **dict.fromkeys(["2", "m", "2/m"], "2/m"),
    **dict.fromkeys(["222", "mm2", "m2m", "2mm", "mmm"], "mmm"),
    **dict.fromkeys(["4", "-4", "4/m"], "4/m"),
    **dict.fromkeys(["422", "4mm", "-42m", "-4m2", "4/mmm"], "4/mmm"),
    **dict.fromkeys(["3", "-3"], "-3"),
    **dict.fromkeys(["32", "321", "312", "3m", "3m1", "31m", "-3m", "-3m1", "-31m"], "-3m"),
    **dict.fromkeys(["6", "-6", "6/m"], "6/m"),
    **dict.fromkeys(["622", "6mm", "-6m2", "-62m", "6/mmm"], "6/mmm"),
    **dict.fromkeys(["23", "m-3", "m3"], "m-3"),
    **dict.fromkeys(["432", "-43m", "m-3m", "m3m"], "m-3m"),
}
#: Crystal system → its holohedral Laue group, used when only the system is known.
_HOLOHEDRY = {
    "triclinic": "-1",
    "monoclinic": "2/m",
    "orthorhombic": "mmm",
    "tetragonal": "4/mmm",
    "trigonal": "-3m",
    "rhombohedral": "-3m",
    "hexagonal": "6/mmm",
    "cubic": "m-3m",
}
_SYSTEM_OF_LAUE = {
    "-1": "triclinic",
    "2/m": "monoclinic",
    "mmm": "orthorhombic",
    "4/m": "tetragonal",
    "4/mmm": "tetragonal",
    "-3": "trigonal",
    "-3m": "trigonal",
    "6/m": "hexagonal",
    "6/mmm": "hexagonal",
    "m-3": "cubic",
    "m-3m": "cubic",
}
#: TSL symmetry code of each Laue group (the digits of its rotation group; orix reads 43 as
#: 432, 62 as 622, 42 as 422, 32 as 321, 22 as 222, 20 as 121 and 2 as 2/m with 2 ∥ z).
_TSL_CODE = {
    "-1": "1",
    "mmm": "22",
    "4/m": "4",
    "4/mmm": "42",
    "-3": "3",
    "-3m": "32",
    "6/m": "6",
    "6/mmm": "62",
    "m-3": "23",
    "m-3m": "43",
}
#: Point groups of the trigonal -31m setting (2-folds ⊥ a), which the TSL code 32 (321, 2 ∥ a)
#: cannot express.
_TRIGONAL_31M = {"312", "31m", "-31m"}


def laue_group_of(point_group: str) -> str:
    """Laue group (``'m-3m'``, ``'6/mmm'``, ...) of a point group or crystal system name."""
    key = str(point_group).strip().replace(" ", "")
    if key.lower() in _HOLOHEDRY:
        return _HOLOHEDRY[key.lower()]
    if key not in _LAUE:
        raise ConfigurationError(
            f"unknown point group {point_group!r}",
            "give a Hermann–Mauguin point group ('m-3m', '-43m', '6/mmm', '-3m1', '2/m', ...) "
            "or a crystal system ('cubic', 'hexagonal', ...)",
        )
    return _LAUE[key]


@dataclass(frozen=True)
class _Sector:
    """A Laue group's fundamental sector in the standard frame and its colour key."""

    laue: str
    frame: np.ndarray  # F: crystal → standard
    operations: np.ndarray  # (2K, 3, 3) proper ∪ -proper, standard frame
    pole: np.ndarray  # θ = 0 of the sector
    e1: np.ndarray  # azimuth 0
    e2: np.ndarray  # azimuth 90°
    start: float  # azimuth where the sector begins
    width: float  # azimuthal width
    # (red, green, blue) corners of the TSL key; None → generic HSV key
    corners: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    labels: tuple[str, ...]  # of the corners (or of the pole)


def _rotation_axes(ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation orders and unit axes of proper rotations ``(K, 3, 3)``."""
    cosine = np.clip((np.trace(ops, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cosine)
    order = np.where(angle < 1e-6, 1, np.rint(_TWO_PI / np.maximum(angle, 1e-6))).astype(int)
    axes = np.stack(
        [ops[:, 2, 1] - ops[:, 1, 2], ops[:, 0, 2] - ops[:, 2, 0], ops[:, 1, 0] - ops[:, 0, 1]],
        axis=-1,
    )
    # a half turn has no antisymmetric part: its axis is a column of (R + I)/2 = n nᵀ
    half = order == 2
    if np.any(half):
        sym = (ops[half] + np.eye(3)) / 2.0
        column = np.argmax(np.einsum("kii->ki", sym), axis=1)
        axes[half] = sym[np.arange(len(sym)), :, column]
    norms = np.linalg.norm(axes, axis=1, keepdims=True)
    axes = np.divide(axes, norms, out=np.zeros_like(axes), where=norms > 1e-12)
    return order, axes


def _miller_label(direction: np.ndarray, matrix_standard: np.ndarray) -> str:
    """``uvw`` of a lattice direction (rounded to small integers) for key labels."""
    uvw = np.linalg.solve(matrix_standard.T, direction)
    uvw = uvw / np.max(np.abs(uvw))
    for scale in (1, 2, 3, 4, 6):
        scaled = uvw * scale
        if np.allclose(scaled, np.rint(scaled), atol=1e-3):
            return "".join(str(int(v)) for v in np.rint(scaled))
    return "".join(f"{v:.2f}" for v in uvw)


def _sector(symmetry, crystal_system: str, lattice=None) -> _Sector:
    ops = np.asarray(symmetry, dtype=np.float64)
    if ops.ndim == 2:
        ops = ops[None]
    if ops.ndim != 3 or ops.shape[1:] != (3, 3) or len(ops) == 0:
        raise ShapeError(f"symmetry has shape {ops.shape}, expected (K, 3, 3)")
    proper = ops * np.sign(np.linalg.det(ops))[:, None, None]  # proper part of improper ones
    _, first = np.unique(np.round(proper, 5), axis=0, return_index=True)  # drop duplicates
    proper = proper[np.sort(first)]
    frame = np.eye(3) if lattice is None else standard_frame(lattice)
    matrix_standard = np.eye(3) if lattice is None else np.asarray(lattice, float) @ frame.T
    proper = np.einsum("ij,kjl,ml->kim", frame, proper, frame)
    order, axes = _rotation_axes(proper)
    k = len(proper)
    z = np.array([0.0, 0.0, 1.0])
    x = np.array([1.0, 0.0, 0.0])
    problem = f"symmetry with {k} rotations (orders {sorted(set(order.tolist()))})"
    fix = "pass the proper rotations of the Laue group in the crystal frame of `lattice`"

    if np.count_nonzero(order == 3) == 8:  # 23 or 432: four 3-fold axes
        if k not in (12, 24) or not np.any((order == 2) & (np.abs(axes @ z) > 1 - 1e-6)):
            raise ConfigurationError(f"{problem} is not cubic with a 2-fold along c", fix)
        laue = "m-3m" if k == 24 else "m-3"
        pole, e1, start = z, x, 0.0
        width = math.pi / 4 if k == 24 else math.pi / 2
    else:
        n = int(order.max())
        if n not in (1, 2, 3, 4, 6) or k not in (n, 2 * n):
            raise ConfigurationError(f"{problem} is not a crystallographic rotation group", fix)
        dihedral = k == 2 * n and n > 1
        laue = {1: "-1", 2: "2/m", 3: "-3", 4: "4/m", 6: "6/m"}[n]
        if dihedral:
            laue = {2: "mmm", 3: "-3m", 4: "4/mmm", 6: "6/mmm"}[n]
        if n == 1:
            pole = z
        else:
            principal = axes[order == n]
            pole = principal[np.argmax(np.abs(principal @ z))]  # mmm: the 2-fold along c
            # sign: towards +c*, else the largest component positive
            ref = z if abs(pole @ z) > 1e-6 else np.eye(3)[np.argmax(np.abs(pole))]
            pole = pole if pole @ ref > 0 else -pole
        e1 = x - (x @ pole) * pole
        if np.linalg.norm(e1) < 1e-6:
            e1 = z - (z @ pole) * pole
        e1 = e1 / np.linalg.norm(e1)
        width = (math.pi if dihedral else _TWO_PI) / n
        start = 0.0
        if dihedral:
            # mirror planes of the Laue group are normal to the 2-folds ⊥ pole
            perpendicular = axes[(order == 2) & (np.abs(axes @ pole) < 1e-6)]
            two_fold = perpendicular[0]
            e2_ = np.cross(pole, e1)
            azimuth = math.atan2(two_fold @ e2_, two_fold @ e1) + math.pi / 2
            start = float(np.mod(azimuth, width))
            start = 0.0 if start > width - 1e-9 else start
    e2 = np.cross(pole, e1)

    if crystal_system.lower() not in _HOLOHEDRY:
        raise ConfigurationError(
            f"unknown crystal system {crystal_system!r}", f"use one of {sorted(_HOLOHEDRY)}"
        )
    system = crystal_system.lower().replace("rhombohedral", "trigonal")
    if _SYSTEM_OF_LAUE[laue] != system:
        raise ConfigurationError(
            f"{problem} form the Laue group {laue}, not one of a {crystal_system} crystal",
            "pass the symmetry of the same phase",
        )

    def equator(azimuth: float) -> np.ndarray:
        return math.cos(azimuth) * e1 + math.sin(azimuth) * e2

    corners = None
    if laue == "m-3m":
        corners = (z, np.array([1.0, 0, 1]) / math.sqrt(2), np.ones(3) / math.sqrt(3))
        labels = ("001", "101", "111")
    elif laue in ("6/mmm", "4/mmm", "mmm"):
        corners = (pole, equator(start), equator(start + width))
        if laue == "6/mmm":  # start = 0: x ∥ a is ⟨2-1-10⟩, 30° from it ⟨10-10⟩
            labels = ("0001", "2-1-10", "10-10")
        else:
            labels = tuple(_miller_label(v, matrix_standard) for v in corners)
    elif laue == "m-3":
        labels = ("001", "101", "111", "011")
    else:
        labels = {"-3": ("0001",), "-3m": ("0001",), "6/m": ("0001",), "-1": ("(001)",)}.get(
            laue, (_miller_label(pole, matrix_standard),)
        )
    operations = np.concatenate([proper, -proper])
    return _Sector(laue, frame, operations, pole, e1, e2, start, width, corners, labels)


def _reduce(directions: np.ndarray, sector: _Sector) -> np.ndarray:
    """Symmetry equivalents ``(N, 3)`` inside the sector of unit directions in the standard frame.

    The equivalent closest to the pole, then the one with the smallest azimuth from the
    sector's start: this is the sector for every Laue group (axial: upper hemisphere and an
    azimuthal wedge; cubic: the triangle / quadrilateral next to [001]).
    """
    out = np.empty_like(directions)
    for lo in range(0, len(directions), _BLOCK):
        block = directions[lo : lo + _BLOCK]
        orbit = np.einsum("kij,nj->nki", sector.operations, block)
        height = orbit @ sector.pole
        near_pole = height >= height.max(axis=1, keepdims=True) - 1e-9
        azimuth = np.arctan2(orbit @ sector.e2, orbit @ sector.e1) - sector.start
        azimuth = np.mod(azimuth + 1e-12, _TWO_PI)  # a point on the start edge stays there
        azimuth = np.where(near_pole, azimuth, np.inf)
        out[lo : lo + _BLOCK] = orbit[np.arange(len(block)), np.argmin(azimuth, axis=1)]
    return out


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    h6 = np.mod(h, 1.0) * 6.0
    i = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack(c, axis=-1)
            for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
        ]
    )
    return table[i, np.arange(len(i))]


def _colour(reduced: np.ndarray, sector: _Sector) -> np.ndarray:
    """RGB ``(N, 3)`` of directions already inside the sector."""
    if sector.corners is not None:
        # TSL key: each channel is the angular distance from the opposite edge, relative to
        # its corner's; scaled so the strongest channel is 1 (white near the centre)
        weights = []
        for i in range(3):
            corner, b, c = (
                sector.corners[i],
                sector.corners[(i + 1) % 3],
                sector.corners[(i + 2) % 3],
            )
            normal = np.cross(b, c)
            normal = normal / np.linalg.norm(normal)
            normal = normal if normal @ corner > 0 else -normal
            height = np.arcsin(np.clip(reduced @ normal, -1.0, 1.0))
            weights.append(np.clip(height / math.asin(normal @ corner), 0.0, 1.0))
        rgb = np.stack(weights, axis=-1)
        return rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 1e-12)
    # generic key: hue from the azimuth across the sector, saturation from the polar angle
    theta = np.arccos(np.clip(reduced @ sector.pole, -1.0, 1.0))
    azimuth = np.arctan2(reduced @ sector.e2, reduced @ sector.e1) - sector.start
    azimuth = np.clip(np.mod(azimuth + 1e-12, _TWO_PI), 0.0, sector.width)
    if sector.laue == "m-3":  # the sector ends on the planes z = x and z = y
        theta_max = np.arctan2(1.0, np.maximum(np.cos(azimuth), np.sin(azimuth)))
    else:
        theta_max = np.full_like(theta, math.pi / 2)
    saturation = np.clip(theta / theta_max, 0.0, 1.0)
    return _hsv_to_rgb(azimuth / sector.width, saturation, np.ones_like(theta))


def _crystal_directions(rotations, direction) -> tuple[np.ndarray, np.ndarray, tuple]:
    rotations = _as_rotations(rotations)
    lab = np.asarray(direction, dtype=np.float64)
    if lab.shape != (3,) or not np.linalg.norm(lab) > 0:
        raise ConfigurationError(f"direction {direction!r} is not a non-zero 3-vector")
    lab = lab / np.linalg.norm(lab)
    flat = rotations.reshape(-1, 3, 3)
    d = np.einsum("nji,j->ni", flat, lab)  # d = Uᵀ direction
    good = np.all(np.isfinite(d), axis=1) & (np.linalg.norm(d, axis=1) > 0)
    d[good] /= np.linalg.norm(d[good], axis=1, keepdims=True)
    return d, good, rotations.shape[:-2]


def ipf_directions(
    rotations, symmetry, crystal_system: str, direction=(0.0, 0.0, 1.0), *, lattice=None
) -> np.ndarray:
    """The crystal direction along a lab ``direction``, in the fundamental sector.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` rotations ``U`` (crystal → lab); NaN entries give NaN.
    symmetry
        ``(K, 3, 3)`` proper rotations of the Laue group, crystal frame.
    crystal_system
        ``'cubic'``, ``'hexagonal'``, ``'trigonal'``, ``'tetragonal'``, ``'orthorhombic'``,
        ``'monoclinic'`` or ``'triclinic'``; checked against ``symmetry``.
    direction
        Lab direction (default the beam, z).
    lattice
        ``(3, 3)`` lattice vectors (rows) in the crystal frame. The sector is placed in the
        standard frame (x ∥ a, z ∥ c*); without ``lattice`` the crystal frame is taken to be
        that frame already (true for pymatgen's cubic, tetragonal and orthorhombic cells).

    Returns
    -------
    np.ndarray
        ``(..., 3)`` unit vectors in the crystal frame (that of ``rotations``). Sectors: m-3m
        the triangle [001]-[101]-[111]; m-3 [001]-[101]-[111]-[011]; axial groups the upper
        hemisphere about c* (monoclinic: about the 2-fold axis) cut to an azimuthal wedge that
        starts at a (or at the first mirror plane from a): 6/mmm [0001]-[2-1-10]-[10-10],
        4/mmm [001]-[100]-[110], mmm [001]-[100]-[010].
    """
    sector = _sector(symmetry, crystal_system, lattice)
    d, good, shape = _crystal_directions(rotations, direction)
    out = np.full_like(d, np.nan)
    out[good] = _reduce(d[good] @ sector.frame.T, sector) @ sector.frame
    return out.reshape(*shape, 3)


def ipf_colors(
    rotations, symmetry, crystal_system: str, direction=(0.0, 0.0, 1.0), *, lattice=None
) -> np.ndarray:
    """Inverse-pole-figure colours: RGB in ``[0, 1]`` of the crystal direction along ``direction``.

    The lab ``direction`` is taken into crystal coordinates (``d = Uᵀ direction``), reduced
    into the fundamental sector of the Laue group (``symmetry`` ∪ ``-symmetry``, see
    :func:`ipf_directions`) and coloured by the standard TSL key where the sector is a
    triangle with inequivalent corners: m-3m [001] red, [101] green, [111] blue; 6/mmm [0001]
    red, [2-1-10] green, [10-10] blue; 4/mmm [001] red, [100] green, [110] blue; mmm [001]
    red, [100] green, [010] blue (as orix places them). Each channel is the angular
    distance from the edge opposite its corner, relative to the corner's, the strongest
    scaled to 1.

    Other Laue groups (m-3, 6/m, -3m, -3, 4/m, 2/m, -1) get a generic HSV key: hue from the
    azimuth across the sector's wedge (one full turn of hue), saturation from the polar angle
    (white at the pole: c*, or the 2-fold axis of a monoclinic crystal; full at the sector's
    rim), value 1. It is unambiguous inside the sector but not continuous everywhere across
    its rim (e.g. the equator of -3 and -3m).

    Parameters
    ----------
    rotations, symmetry, crystal_system, direction, lattice
        As in :func:`ipf_directions`; pass ``lattice`` for hexagonal, trigonal and monoclinic
        pymatgen cells, whose frames are not the standard one.

    Returns
    -------
    np.ndarray
        ``(..., 3)``; NaN where the rotation is not finite.
    """
    sector = _sector(symmetry, crystal_system, lattice)
    d, good, shape = _crystal_directions(rotations, direction)
    out = np.full_like(d, np.nan)
    out[good] = _colour(_reduce(d[good] @ sector.frame.T, sector), sector)
    return out.reshape(*shape, 3)


def _key_grid(sector: _Sector, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stereographic x, y pixel centres covering the sector."""
    n = 4000  # golden-spiral sample of the sphere, plus the edges' special points
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    sphere = np.stack(
        [np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], axis=1
    )
    ring = np.linspace(0, _TWO_PI, 721)
    special = np.array(
        [[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if a or b or c],
        float,
    )
    special /= np.linalg.norm(special, axis=1, keepdims=True)
    points = np.concatenate(
        [sphere, np.outer(np.cos(ring), sector.e1) + np.outer(np.sin(ring), sector.e2), special]
    )
    reduced = _reduce(points, sector)
    px, py = _project(reduced, sector)
    x0, x1, y0, y1 = px.min(), px.max(), py.min(), py.max()
    scale = max(x1 - x0, y1 - y0)
    nx = max(2, round(size * (x1 - x0) / scale))
    ny = max(2, round(size * (y1 - y0) / scale))
    return np.linspace(x0, x1, nx), np.linspace(y1, y0, ny)  # rows run downwards


def _project(v: np.ndarray, sector: _Sector) -> tuple[np.ndarray, np.ndarray]:
    denominator = 1.0 + v @ sector.pole
    return (v @ sector.e1) / denominator, (v @ sector.e2) / denominator


def ipf_key(symmetry, crystal_system: str, size: int = 256, *, lattice=None) -> np.ndarray:
    """RGBA image ``(H, W, 4)`` of the colour key of :func:`ipf_colors`, for insets.

    The fundamental sector in stereographic projection about its pole (the pole at the
    sector's corner or centre, azimuth 0 — the green corner of the TSL keys — to the right);
    pixels outside the sector are transparent white. The longer side has ``size`` pixels.
    """
    sector = _sector(symmetry, crystal_system, lattice)
    xs, ys = _key_grid(sector, size)
    x, y = np.meshgrid(xs, ys)
    r2 = x**2 + y**2
    v = (
        np.multiply.outer(2 * x / (1 + r2), sector.e1)
        + np.multiply.outer(2 * y / (1 + r2), sector.e2)
        + np.multiply.outer((1 - r2) / (1 + r2), sector.pole)
    ).reshape(-1, 3)
    reduced = _reduce(v, sector)
    # tolerance of a fraction of a pixel: edge pixels count as inside
    inside = np.max(np.abs(reduced - v), axis=1) < 1e-3 / size
    image = np.ones((len(v), 4))
    image[:, :3] = np.where(inside[:, None], _colour(reduced, sector), 1.0)
    image[:, 3] = inside
    return image.reshape(len(ys), len(xs), 4)


def ipf_key_labels(
    symmetry, crystal_system: str, size: int = 256, *, lattice=None
) -> list[tuple[str, tuple[float, float]]]:
    """Labels of the key's corners (TSL keys) or pole (generic keys) as ``(text, (row, col))``.

    Pixel coordinates in the image :func:`ipf_key` returns for the same arguments.
    """
    sector = _sector(symmetry, crystal_system, lattice)
    xs, ys = _key_grid(sector, size)
    if sector.corners is not None:
        points = np.stack(sector.corners)
    elif sector.laue == "m-3":
        points = np.array([[0, 0, 1.0], [1, 0, 1], [1, 1, 1], [0, 1, 1]])
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    else:
        points = sector.pole[None]
    px, py = _project(points, sector)
    cols = (px - xs[0]) / (xs[-1] - xs[0]) * (len(xs) - 1)
    rows = (ys[0] - py) / (ys[0] - ys[-1]) * (len(ys) - 1)
    return [
        (label, (float(r), float(c))) for label, r, c in zip(sector.labels, rows, cols, strict=True)
    ]


# ---- EDAX .ang files ---------------------------------------------------------------------------


def _space_group_point_group(symbol: str) -> str:
    """Oriented point group of a Hermann–Mauguin space-group symbol ('P-31c' → '-31m')."""
    body = symbol.replace(" ", "").split(":")[0][1:]  # drop the lattice letter and setting
    body = "".join(ch for i, ch in enumerate(body) if not (i and body[i - 1] == "_"))
    body = body.replace("_", "")
    return "".join("m" if ch in "abcnde" else ch for ch in body)


@dataclass(frozen=True, eq=False)
class AngPhase:
    """One phase of an ``.ang`` file.

    Attributes
    ----------
    name
        Material name (written in ASCII: Greek letters spelled out, other characters ``_``).
    formula
        Chemical formula without spaces (orix names phases after it).
    point_group
        Point group (``'m-3m'``, ``'-43m'``, ``'6/mmm'``, ``'-3m1'``, ``'2/m'``, ...) or crystal
        system (``'cubic'`` = its holohedry). The file stores the TSL code of its Laue group.
    lattice
        ``(a, b, c, α, β, γ)`` in Å and degrees.
    matrix
        ``(3, 3)`` lattice vectors (rows) in the crystal frame of the rotations written for
        this phase (pymatgen ``structure.lattice.matrix``), or None when that frame already is
        the standard one (x ∥ a, z ∥ c*). Rotations are turned into the standard frame.
    """

    name: str
    formula: str
    point_group: str
    lattice: tuple[float, float, float, float, float, float]
    matrix: np.ndarray | None = None

    @classmethod
    def from_structure(cls, structure, *, name: str | None = None, symprec: float = 1e-3):
        """The phase of a pymatgen ``Structure``, in the frame of that very structure.

        Pass the structure whose Cartesian frame the rotations use (the conventional
        standard cell); the point group comes from its space-group symbol, with the setting.
        """
        from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

        from stemforge.simulate.orientation import quiet_spglib

        with quiet_spglib():
            symbol = SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_symbol()
        formula = structure.composition.reduced_formula
        return cls(
            name=name or formula,
            formula=formula,
            point_group=_space_group_point_group(symbol),
            lattice=tuple(float(v) for v in structure.lattice.parameters),
            matrix=np.asarray(structure.lattice.matrix, dtype=np.float64),
        )

    def tsl_symmetry(self) -> str:
        """The TSL ``Symmetry`` code written for this phase.

        Monoclinic: 20 (2-fold ∥ b) when β ≠ 90°, 2 (2-fold ∥ c) when γ ≠ 90°. Trigonal
        groups of the -31m setting (2-folds ⊥ a) are written as 3 (-3): code 32 would put
        the 2-folds along a, so the lower symmetry is the one that stays true.
        """
        laue = laue_group_of(self.point_group)
        if laue == "2/m":
            alpha, beta, gamma = self.lattice[3:]
            if abs(alpha - 90) > 1e-3:
                raise ConfigurationError(
                    f"phase {self.name!r} is monoclinic with unique axis a (α = {alpha}°)",
                    "set the cell up with b unique (β ≠ 90°) or c unique (γ ≠ 90°)",
                )
            return "2" if abs(gamma - 90) > 1e-3 else "20"
        if laue == "-3m" and self.point_group.strip() in _TRIGONAL_31M:
            return "3"
        return _TSL_CODE[laue]

    def frame(self) -> np.ndarray:
        """Rotation ``F`` from the crystal frame of the rotations to the standard frame."""
        return np.eye(3) if self.matrix is None else standard_frame(self.matrix)


def _as_phase(phase: AngPhase | Mapping) -> AngPhase:
    if isinstance(phase, AngPhase):
        result = phase
    else:
        fields = dict(phase)
        if "crystal_system" in fields and "point_group" not in fields:
            fields["point_group"] = fields.pop("crystal_system")
        try:
            result = AngPhase(**fields)
        except TypeError as error:
            raise ConfigurationError(
                f"phase {phase!r} is not a valid .ang phase ({error})",
                "give name, formula, point_group (or crystal_system), lattice and "
                "optionally matrix",
            ) from error
    lattice = np.asarray(result.lattice, dtype=np.float64)
    if lattice.shape != (6,) or not np.all(lattice > 0) or not np.all(lattice[3:] < 180):
        raise ConfigurationError(
            f"phase {result.name!r} has lattice {result.lattice!r}",
            "give (a, b, c, alpha, beta, gamma) in Å and degrees",
        )
    if result.matrix is not None:
        from_matrix = _lattice_parameters(np.asarray(result.matrix, dtype=np.float64))
        if not np.allclose(from_matrix, lattice, rtol=1e-3, atol=1e-2):
            raise ConfigurationError(
                f"phase {result.name!r}: matrix has parameters {np.round(from_matrix, 4)}, "
                f"lattice says {result.lattice}",
                "pass the lattice vectors of the same cell",
            )
    laue_group_of(result.point_group)  # raises on unknown symbols
    return result


def _lattice_parameters(matrix: np.ndarray) -> np.ndarray:
    lengths = np.linalg.norm(matrix, axis=1)

    def angle(i: int, j: int) -> float:
        return math.degrees(math.acos(matrix[i] @ matrix[j] / (lengths[i] * lengths[j])))

    return np.array([*lengths, angle(1, 2), angle(0, 2), angle(0, 1)])


def _ascii(text: str, fallback: str, keep: str) -> str:
    """ASCII text that orix's and MTEX's header parsers take (first character alphanumeric)."""
    import unicodedata

    def letter(ch: str) -> str:
        if ch.isascii():
            return ch if ch.isalnum() or ch in keep else "_"
        name = unicodedata.name(ch, "")  # α-Fe → alpha-Fe
        return name.split()[-1].lower() if name.startswith("GREEK") else "_"

    cleaned = "".join(letter(ch) for ch in text).strip().lstrip("".join(set(keep + "_")))
    return cleaned if cleaned else fallback


def write_ang(
    path: str | Path,
    rotations,
    phase,
    *,
    phases: Sequence[AngPhase | Mapping],
    score,
    reliability,
    step: tuple[float, float] = (1.0, 1.0),
    overwrite: bool = True,
) -> Path:
    """Write an orientation map as an EDAX/TSL ``.ang`` file (EDAX OIM layout; read back and
    checked with orix 0.15).

    Grid: the scan is a square grid with **scan x (array axis 0) down the rows** of the
    file's map and **scan y (axis 1) across them**: ``.ang`` column x = scan y · step[1] and
    ``.ang`` column y = scan x · step[0], rows in C order of the ``(Rx, Ry)`` arrays. orix's
    ``CrystalMap.shape`` is therefore ``(Rx, Ry)``, its ``get_map_data`` arrays index like
    ours and its plots look like stemforge's PNG maps.

    Euler angles (Bunge, radians, see :func:`euler_bunge`) are those of the orientation in
    the lab frame (x = detector qx, y = qy, z = beam) and the phase's standard crystal frame
    (x ∥ a, z ∥ c*). With the scan axes parallel to the detector axes, the map's x/y and the
    Euler frame's x/y are swapped (a 180° turn about x + y) — the same mismatch EDAX files
    have, which MTEX fixes on request (``'convertSpatial2EulerReferenceFrame'``).

    Columns: φ1 Φ φ2 x y IQ CI phase detector-signal fit (the ten columns of EDAX OIM files,
    which orix and MTEX read as such). Not-indexed positions (``phase == -1``): Euler angles
    4π, IQ 0, CI -1 (orix's not-indexed test), phase 0 (MTEX's not-indexed id), fit 180.

    Parameters
    ----------
    path
        Output ``.ang`` file, written atomically.
    rotations
        ``(Rx, Ry, 3, 3)`` rotations ``U`` (crystal → lab); ignored where ``phase == -1``.
    phase
        ``(Rx, Ry)`` int: index into ``phases``, ``-1`` for none. Written as index + 1, the
        ``# Phase`` number of its header block.
    phases
        :class:`AngPhase` objects or dicts with the same fields (``crystal_system`` may stand
        for ``point_group``).
    score
        ``(Rx, Ry)`` match score, written as IQ (non-finite → 0).
    reliability
        ``(Rx, Ry)`` reliability, written as CI; clipped at 0 for indexed positions so that
        none reads as not indexed (non-finite → 0).
    step
        Scan step (scan x, scan y) in Å; written in µm, the unit orix and MTEX assume.
    overwrite
        If False and ``path`` exists, refuse.

    Returns
    -------
    Path
        ``path``.
    """
    rotations = _as_rotations(rotations)
    phase = np.asarray(phase)
    if phase.ndim != 2 or rotations.shape != (*phase.shape, 3, 3):
        raise ShapeError(
            f"phase has shape {phase.shape} and rotations {rotations.shape}",
            "pass phase (Rx, Ry) and rotations (Rx, Ry, 3, 3)",
        )
    if not np.issubdtype(phase.dtype, np.integer):
        raise ConfigurationError(f"phase has dtype {phase.dtype}", "pass integer phase indices")
    rx, ry = phase.shape
    values = {}
    for name, array in (("score", score), ("reliability", reliability)):
        array = np.asarray(array, dtype=np.float64)
        if array.shape != phase.shape:
            raise ShapeError(f"{name} has shape {array.shape}, expected {phase.shape}")
        values[name] = np.where(np.isfinite(array), array, 0.0)
    phase_list = [_as_phase(p) for p in phases]
    if not phase_list:
        raise ConfigurationError("no phases given", "pass at least one phase")
    if phase.size and (phase.min() < -1 or phase.max() >= len(phase_list)):
        raise ConfigurationError(
            f"phase indices run from {phase.min()} to {phase.max()} with {len(phase_list)} phases",
            "use -1 for none and 0 … len(phases) - 1 for the phases",
        )
    step_x, step_y = (float(s) for s in step)
    if not (step_x > 0 and step_y > 0):
        raise ConfigurationError(f"step {step!r} is not positive", "give the scan step in Å")

    flat_phase = phase.reshape(-1)
    indexed = flat_phase >= 0
    flat_rot = rotations.reshape(-1, 3, 3)
    if not np.all(np.isfinite(flat_rot[indexed])):
        raise InvalidDataError(
            "an indexed position has a non-finite rotation", "set its phase to -1"
        )
    euler = np.full((rx * ry, 3), _NOT_INDEXED_EULER)
    for p, entry in enumerate(phase_list):
        rows = flat_phase == p
        if np.any(rows):
            # orientation in the standard frame: g' = F g = F Uᵀ, i.e. U' = U Fᵀ
            euler[rows] = euler_bunge(flat_rot[rows] @ entry.frame().T)

    i, j = np.divmod(np.arange(rx * ry), ry)
    columns = np.column_stack(
        [
            euler,
            j * step_y / _ANGSTROM_PER_MICRON,  # .ang x: across a row = scan y
            i * step_x / _ANGSTROM_PER_MICRON,  # .ang y: down the rows = scan x
            np.where(indexed, values["score"].reshape(-1), 0.0),
            np.where(indexed, np.maximum(values["reliability"].reshape(-1), 0.0), -1.0),
            flat_phase + 1,  # 1 … N; not indexed → 0
            np.zeros(rx * ry),  # detector signal
            np.where(indexed, 0.0, 180.0),  # fit (°)
        ]
    )
    header = _ang_header(phase_list, rx, ry, step_x, step_y)
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="ascii", newline="\n") as handle:
            handle.write(header)
            np.savetxt(
                handle,
                columns,
                fmt=["%.5f", "%.5f", "%.5f", "%.7f", "%.7f", "%.6f", "%.6f", "%d", "%.1f", "%.1f"],
                delimiter=" ",
            )
    return path


def _ang_header(phases: list[AngPhase], rx: int, ry: int, step_x: float, step_y: float) -> str:
    lines = [
        "TEM_PIXperUM          1.000000",
        "x-star                0.000000",
        "y-star                0.000000",
        "z-star                0.000000",
        "WorkingDistance       0.000000",
        "",
    ]
    for number, entry in enumerate(phases, start=1):
        name = _ascii(entry.name, f"phase{number}", keep=" _-.()")
        formula = _ascii(entry.formula.replace(" ", ""), name.replace(" ", "_"), keep="_-.()")
        a, b, c, alpha, beta, gamma = (float(v) for v in entry.lattice)
        lines += [
            f"Phase {number}",
            f"MaterialName  \t{name}",
            f"Formula       \t{formula}",
            "Info          \t",
            f"Symmetry              {entry.tsl_symmetry()}",
            f"LatticeConstants      {a:.4f} {b:.4f} {c:.4f}  {alpha:.3f}  {beta:.3f}  {gamma:.3f}",
            "NumberFamilies        0",
            "",
        ]
    lines += [
        "GRID: SqrGrid",
        f"XSTEP: {step_y / _ANGSTROM_PER_MICRON:.7f}",
        f"YSTEP: {step_x / _ANGSTROM_PER_MICRON:.7f}",
        f"NCOLS_ODD: {ry}",
        f"NCOLS_EVEN: {ry}",
        f"NROWS: {rx}",
        "",
        "OPERATOR: stemforge",
        "",
        "SAMPLEID:",
        "",
        "SCANID:",
        "",
        "COLUMN_COUNT: 10",
        "COLUMN_HEADERS: phi1, PHI, phi2, x, y, IQ, CI, Phase index, SEM, Fit",
        "COLUMN_UNITS: radians, radians, radians, microns, microns, , , , , degrees",
        "",
    ]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)
