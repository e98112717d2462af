"""Phase and orientation maps of a scan from its Bragg spot lists and candidate structures.

Every candidate's orientation library (:mod:`stemforge.infer.orientation`) is matched to
every pattern; the phase of a position is the candidate whose best orientation explains its
spots best, with the margin over the runner-up. Positions where two phases overlap are
also fitted as a non-negative combination of the candidates' best templates (NNLS on the
images of Gaussian spots), giving phase fractions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.infer.orientation import (
    OrientationLibrary,
    check_spot_lists,
    match_orientations,
    spot_overlap,
    template_spots,
    zone_axis_indices,
)

#: Default: the best candidate must explain its spots at least this well (cosine score).
MIN_SCORE = 0.3
#: No phase at positions with fewer spots than this within the libraries' q_max.
MIN_SPOTS = 3


@dataclass(frozen=True)
class PhaseMap:
    """Best phase and orientation per scan position.

    Attributes
    ----------
    names
        Candidate names, in the order given (``phase`` indexes them).
    phase
        ``(Rx, Ry)`` int: index of the best candidate; −1 where none fits (too few spots,
        score below the threshold, or a position marked amorphous).
    score, margin
        ``(Rx, Ry)``: the best candidate's score and how much it beats the runner-up.
    scores
        ``(Rx, Ry, C)`` every candidate's score at its best orientation.
    orientation
        ``(Rx, Ry, 3, 3)`` crystal → lab rotation of the best candidate (NaN where −1).
    candidate_orientations
        ``(Rx, Ry, C, 3, 3)`` every candidate's best orientation.
    reliability
        ``(Rx, Ry)`` orientation reliability of the best candidate (``1 − s₂/s₁``).
    zone_axis
        ``(Rx, Ry, 3)`` beam direction ``[uvw]`` of the best candidate (largest index 1).
    fractions
        ``(Rx, Ry, C)`` non-negative phase fractions of the spot image (sum 1 where fitted).
    n_spots
        ``(Rx, Ry)`` spots within the libraries' reach.
    amorphous
        ``(Rx, Ry)`` bool: positions given as amorphous (their phase is −1).
    """

    names: list[str]
    phase: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    scores: np.ndarray
    orientation: np.ndarray
    candidate_orientations: np.ndarray
    reliability: np.ndarray
    zone_axis: np.ndarray
    fractions: np.ndarray
    n_spots: np.ndarray
    amorphous: np.ndarray


def _gram(spots: Sequence[tuple[np.ndarray, np.ndarray]], sigma: float) -> np.ndarray:
    """Inner products of images of Gaussian spots, ``spots[i] = (q, weight)``."""
    n = len(spots)
    gram = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = spot_overlap(*spots[i], *spots[j], sigma)
    return gram


def phase_fractions(
    measured: tuple[np.ndarray, np.ndarray],
    templates: Sequence[tuple[np.ndarray, np.ndarray]],
    sigma: float,
) -> np.ndarray:
    """Non-negative fractions of ``templates`` whose sum best reproduces ``measured``.

    All are spot lists ``(q (n, 2), weight (n,))`` drawn as Gaussians of width ``sigma``;
    the least-squares fit of the images is solved as NNLS on the Cholesky factor of the
    templates' Gram matrix. Fractions are each template's share of the fitted image's norm
    (zeros when nothing fits).
    """
    from scipy.optimize import nnls

    gram_all = _gram([measured, *templates], sigma)
    gram, rhs = gram_all[1:, 1:], gram_all[0, 1:]
    norms = np.sqrt(np.maximum(np.diag(gram), 0))
    usable = norms > 0
    out = np.zeros(len(templates))
    if not usable.any():
        return out
    # Scale to unit templates so the factorisation is well conditioned.
    scale = norms[usable]
    g = gram[np.ix_(usable, usable)] / np.outer(scale, scale)
    b = rhs[usable] / scale
    factor = np.linalg.cholesky(g + 1e-9 * np.eye(len(g))).T  # gᵀ = RᵀR
    coefficients, _ = nnls(factor, np.linalg.solve(factor.T, b))
    if coefficients.sum() > 0:
        out[usable] = coefficients / coefficients.sum()
    return out


def map_phases(
    libraries: Sequence[OrientationLibrary],
    q: Any,
    intensity: Any,
    offsets: Any,
    scan_shape: tuple[int, int],
    *,
    amorphous: np.ndarray | None = None,
    min_score: float = MIN_SCORE,
    min_spots: int = MIN_SPOTS,
    refine: bool = True,
) -> PhaseMap:
    """Phase, orientation and phase fractions at every scan position.

    Parameters
    ----------
    libraries
        One per candidate (built with the same :class:`~stemforge.infer.orientation.LibrarySettings`
        comparison settings, so their scores compare).
    q, intensity, offsets
        CSR spot lists in Å⁻¹ about the direct beam (left out), row-major over the scan.
    scan_shape
        ``(Rx, Ry)``.
    amorphous
        Optional ``(Rx, Ry)`` mask of positions known to be amorphous (phase −1).
    min_score, min_spots
        A position gets a phase when its best score reaches ``min_score`` with at least
        ``min_spots`` spots.
    refine
        Refine orientations off the library grid.
    """
    if not libraries:
        raise ConfigurationError("no candidate structures", "give at least one candidate")
    sigmas = {lib.settings.sigma_q for lib in libraries}
    powers = {lib.settings.intensity_power for lib in libraries}
    if len(sigmas) > 1 or len(powers) > 1:
        raise ConfigurationError(
            "the candidate libraries compare spots differently (sigma_q / intensity_power)",
            "build every library with the same LibrarySettings",
        )
    q, intensity, offsets = check_spot_lists(q, intensity, offsets)
    rx, ry = scan_shape
    n = rx * ry
    if len(offsets) != n + 1:
        raise ShapeError(f"{len(offsets) - 1} spot lists for a {rx}×{ry} scan")
    if amorphous is None:
        amorphous = np.zeros(scan_shape, bool)
    elif np.shape(amorphous) != tuple(scan_shape):
        raise ShapeError(
            f"amorphous mask {np.shape(amorphous)} does not match the scan {scan_shape}"
        )
    amorphous = np.asarray(amorphous, bool)

    matches = [
        match_orientations(lib, q, intensity, offsets, refine=refine, min_spots=min_spots)
        for lib in libraries
    ]
    scores = np.stack([np.nan_to_num(m.score, nan=-np.inf) for m in matches], axis=1)
    best = np.argmax(scores, axis=1)
    rows = np.arange(n)
    top = scores[rows, best]
    runner = np.sort(scores, axis=1)[:, -2] if len(libraries) > 1 else np.zeros(n)
    n_spots = np.max([m.n_spots for m in matches], axis=0)
    phase = np.where((top >= min_score) & (n_spots >= min_spots) & ~amorphous.ravel(), best, -1)
    rotations = np.stack([m.rotation for m in matches], axis=1)  # (n, C, 3, 3)
    orientation = np.full((n, 3, 3), np.nan)
    orientation[phase >= 0] = rotations[rows, best][phase >= 0]
    reliability = np.full(n, np.nan)
    zone_axis = np.full((n, 3), np.nan)
    for c, (lib, match) in enumerate(zip(libraries, matches, strict=True)):
        here = phase == c
        reliability[here] = match.reliability[here]
        zone_axis[here] = zone_axis_indices(match.rotation[here], lib)
    fractions = _fractions(libraries, rotations, q, intensity, offsets, phase >= 0)
    shape2 = tuple(scan_shape)
    finite = np.isfinite(top)
    return PhaseMap(
        names=[lib.name for lib in libraries],
        phase=phase.reshape(shape2),
        score=np.where(finite, top, np.nan).reshape(shape2),
        margin=np.where(finite, top - np.where(np.isfinite(runner), runner, 0.0), np.nan).reshape(
            shape2
        ),
        scores=np.where(np.isfinite(scores), scores, np.nan).reshape(*shape2, -1),
        orientation=orientation.reshape(*shape2, 3, 3),
        candidate_orientations=rotations.reshape(*shape2, len(libraries), 3, 3),
        reliability=reliability.reshape(shape2),
        zone_axis=zone_axis.reshape(*shape2, 3),
        fractions=fractions.reshape(*shape2, -1),
        n_spots=n_spots.reshape(shape2),
        amorphous=amorphous,
    )


def phases_from_peaks(
    peaks: Any,
    calibration: Any,
    libraries: Sequence[OrientationLibrary],
    *,
    cube: Any = None,
    find_amorphous: bool = True,
    max_bytes: int | str | None = None,
    **options: Any,
) -> PhaseMap:
    """:func:`map_phases` of a Bragg peak table, with amorphous positions found in ``cube``.

    Parameters
    ----------
    peaks, calibration
        :class:`~stemforge.core.braggpeaks.BraggPeaks` (raw pixels) and their calibration
        (Q in Å⁻¹ or mrad with energy, origin).
    libraries
        The candidates' libraries.
    cube
        The datacube the peaks came from: with ``find_amorphous`` its patterns are
        classified (:class:`~stemforge.infer.amorphous.AmorphousMapper`) and the amorphous
        ones get phase −1 whatever spots were found in their diffuse rings.
    max_bytes
        Memory budget of the amorphous pass.
    options
        Passed to :func:`map_phases` (``min_score``, ``refine`` ...).
    """
    from stemforge.infer.lattice import spot_lists

    q, intensity, offsets = spot_lists(peaks, calibration)
    mask = None
    if cube is not None and find_amorphous:
        from stemforge.infer.amorphous import AmorphousMapper

        mapper = AmorphousMapper(cube.with_calibration(calibration), None, max_bytes)
        for _ in mapper.blocks():
            pass
        mask = ~mapper.summary().maps["crystalline"]
    return map_phases(libraries, q, intensity, offsets, peaks.scan_shape, amorphous=mask, **options)


def phase_scores(result: PhaseMap, truth: Any, symmetries: Sequence[np.ndarray]) -> dict[str, Any]:
    """How well ``result`` reproduces a simulated scan's truth.

    ``truth`` has ``phase`` (−1 amorphous), ``orientation``, ``amorphous`` and ``grain``
    maps (:class:`~stemforge.simulate.phase_scan.PhaseScanTruth`); ``symmetries`` are the
    candidates' Laue rotations. Returns the phase accuracy on crystalline positions, the
    amorphous precision and recall, and orientation errors (degrees) on the positions whose
    phase is right: median, 90th percentile, and the median per grain; and the same with
    the half-turn twin about the beam counted as right.
    """
    from stemforge.infer.orientation import misorientation
    from stemforge.simulate.kinematic import in_plane_rotation

    crystalline = truth.phase >= 0
    unindexed = result.phase < 0
    true_amorphous = np.asarray(truth.amorphous, bool)
    hits = int((unindexed & true_amorphous).sum())
    right = crystalline & (result.phase == truth.phase)
    error = np.full(truth.phase.shape, np.nan)
    twin_error = np.full(truth.phase.shape, np.nan)
    # Friedel's law makes U and U turned half-way about the beam give the same zero-order
    # spots; only excitation errors tell them apart, so both errors are reported.
    half_turn = in_plane_rotation(np.pi)
    for index, symmetry in enumerate(symmetries):
        here = right & (truth.phase == index)
        measured = result.orientation[here]
        error[here] = misorientation(truth.orientation[here], measured, symmetry)
        twin = misorientation(half_turn @ truth.orientation[here], measured, symmetry)
        twin_error[here] = np.minimum(error[here], twin)
    per_grain = {
        int(g): round(float(np.nanmedian(error[truth.grain == g])), 3)
        for g in np.unique(truth.grain[crystalline])
        if np.isfinite(error[truth.grain == g]).any()
    }
    return {
        "phase accuracy (crystalline positions)": round(float(right.sum() / crystalline.sum()), 4),
        "amorphous precision": round(hits / max(int(unindexed.sum()), 1), 4),
        "amorphous recall": round(hits / max(int(true_amorphous.sum()), 1), 4),
        "orientation error median (deg)": round(float(np.nanmedian(error)), 3),
        "orientation error p90 (deg)": round(float(np.nanpercentile(error, 90)), 3),
        "orientation error median per grain (deg)": per_grain,
        "orientation error median, half-turn twins allowed (deg)": round(
            float(np.nanmedian(twin_error)), 3
        ),
        "orientation error p90, half-turn twins allowed (deg)": round(
            float(np.nanpercentile(twin_error, 90)), 3
        ),
    }


def _fractions(
    libraries: Sequence[OrientationLibrary],
    rotations: np.ndarray,
    q: np.ndarray,
    intensity: np.ndarray,
    offsets: np.ndarray,
    where: np.ndarray,
) -> np.ndarray:
    """NNLS phase fractions at the positions ``where`` (zeros elsewhere)."""
    settings = libraries[0].settings
    out = np.zeros((len(where), len(libraries)))
    for i in np.flatnonzero(where):
        lo, hi = offsets[i], offsets[i + 1]
        rho = np.hypot(q[lo:hi, 0], q[lo:hi, 1])
        keep = rho <= settings.q_max
        weight = np.clip(intensity[lo:hi][keep], 0, None) ** settings.intensity_power
        templates = []
        for lib, rotation in zip(libraries, rotations[i], strict=True):
            if np.isfinite(rotation).all():
                spots, strength = template_spots(lib, rotation)
                templates.append((spots, strength**settings.intensity_power))
            else:
                templates.append((np.zeros((0, 2)), np.zeros(0)))
        out[i] = phase_fractions((q[lo:hi][keep], weight), templates, settings.sigma_q)
    return out


def write_phase_map(
    result: PhaseMap,
    path: str | Path,
    libraries: Sequence[OrientationLibrary],
    *,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``result`` to HDF5 (datasets named as the contract of ``stemforge phase``).

    Datasets: ``phase`` (Rx, Ry) int (−1: none/amorphous), ``score``, ``margin``,
    ``orientation`` (Rx, Ry, 3, 3) crystal → lab, ``euler`` (Bunge, rad, sample → crystal),
    ``zone_axis``, ``reliability``, ``scores`` and ``fractions`` (Rx, Ry, C),
    ``candidate_orientations``, ``n_spots``, ``amorphous``; group ``candidates/<i>`` with
    each candidate's name, formula, lattice and library settings.
    """
    import json

    import h5py

    from stemforge.infer.orientation_export import euler_bunge

    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        for name in (
            "phase",
            "score",
            "margin",
            "orientation",
            "zone_axis",
            "reliability",
            "scores",
            "fractions",
            "candidate_orientations",
            "n_spots",
            "amorphous",
        ):
            f.create_dataset(name, data=getattr(result, name), compression="gzip")
        f.create_dataset("euler", data=euler_bunge(result.orientation), compression="gzip")
        f.attrs["names"] = json.dumps(result.names)
        f.attrs["convention"] = (
            "orientation: crystal (conventional standard cell, Cartesian) -> lab rotation, "
            "g_lab = U g; lab x = detector qx, y = qy, z = beam. euler: Bunge ZXZ (rad) of "
            "the sample -> crystal rotation U^T"
        )
        if provenance:
            f.attrs["provenance"] = json.dumps(provenance, default=str)
        group = f.create_group("candidates")
        for i, lib in enumerate(libraries):
            lattice = lib.structure.lattice
            g = group.create_group(str(i))
            g.attrs["name"] = lib.name
            g.attrs["formula"] = lib.structure.composition.reduced_formula
            g.attrs["crystal_system"] = lib.crystal_system
            g.attrs["lattice"] = np.array([*lattice.abc, *lattice.angles])
            g.attrs["library_size"] = len(lib)
            g.attrs["settings"] = json.dumps(lib.settings.__dict__)
    return path


def phase_summary(result: PhaseMap) -> str:
    """One line per phase: positions and median score; plus the unindexed count."""
    lines = []
    total = result.phase.size
    for i, name in enumerate(result.names):
        here = result.phase == i
        median = float(np.median(result.score[here])) if here.any() else math.nan
        lines.append(f"{name}: {int(here.sum())} of {total} positions (median score {median:.2f})")
    lines.append(f"none: {int((result.phase < 0).sum())} (amorphous {int(result.amorphous.sum())})")
    return "\n".join(lines)
