"""ACOM orientation matching and phase mapping on kinematic spot lists with known truth.

Spot lists come from :func:`stemforge.simulate.kinematic.kinematic_spots` at known
orientations (exact zone axes, small mistilts, arbitrary in-plane angles), with position
noise (0.004 Å⁻¹ rms, a fifth of the comparison's spot width) and log-normal intensity
noise, so the matcher meets what a detector reports. Candidates: rocksalt MgO and cubic
perovskite SrTiO3, whose lattice parameters differ by 8 % (4.212 vs 3.905 Å).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.infer.orientation import (
    LibrarySettings,
    beam_rotations,
    build_library,
    laue_rotations,
    match_orientations,
    misorientation,
    reduce_directions,
    zone_axis_indices,
)
from stemforge.infer.phase import map_phases, phase_fractions
from stemforge.simulate.kinematic import in_plane_rotation, kinematic_spots, tilt_rotation
from stemforge.simulate.orientation import conventional_standard_structure

SETTINGS = LibrarySettings(q_max=1.5, angle_step=2.0)
POSITION_NOISE = 0.004


def _mgo() -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.212), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )


def _srtio3() -> Structure:
    return Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0]]
    )


@pytest.fixture(scope="module")
def libraries():
    return [build_library(_mgo(), SETTINGS), build_library(_srtio3(), SETTINGS)]


def _orientation(library, uvw, angle, tilt=(0.0, 0.0)) -> np.ndarray:
    beam = np.asarray(uvw, float) @ library.structure.lattice.matrix
    base = beam_rotations((beam / np.linalg.norm(beam))[None])[0]
    return tilt_rotation(*tilt) @ in_plane_rotation(angle) @ base


def _spot_lists(library, rotations, seed=0, thickness=150.0):
    """Noisy kinematic spot lists (CSR) of ``library``'s crystal at ``rotations``."""
    rng = np.random.default_rng(seed)
    qs, intensities, offsets = [], [], [0]
    for rotation in rotations:
        q, intensity, _ = kinematic_spots(
            library.crystal, rotation, energy=300e3, thickness=thickness, semiangle=1.0, q_max=1.5
        )
        keep = intensity > 1e-3 * intensity.max()
        q = q[keep] + rng.normal(0, POSITION_NOISE, (keep.sum(), 2))
        qs.append(q)
        intensities.append(intensity[keep] * rng.lognormal(0, 0.3, keep.sum()))
        offsets.append(offsets[-1] + len(q))
    return np.concatenate(qs), np.concatenate(intensities), np.array(offsets)


# ---- symmetry ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("structure", "order"),
    [
        (_mgo(), 24),  # m-3m: 432
        (
            Structure.from_spacegroup(
                "F-43m", Lattice.cubic(5.41), ["Zn", "S"], [[0, 0, 0], [0.25] * 3]
            ),
            24,
        ),  # -43m → m-3m
        (
            Structure(
                Lattice.hexagonal(3.21, 5.21),
                ["Mg"] * 2,
                [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]],
            ),
            12,
        ),
        (
            Structure.from_spacegroup(
                "P4_2/mnm",
                Lattice.tetragonal(4.59, 2.96),
                ["Ti", "O"],
                [[0, 0, 0], [0.305, 0.305, 0]],
            ),
            8,
        ),
        (Structure(Lattice.orthorhombic(3, 4, 5), ["Cu"], [[0, 0, 0]]), 4),
        (Structure(Lattice.monoclinic(3, 4, 5, 100), ["Cu"], [[0, 0, 0]]), 2),
    ],
)
def test_laue_rotations_have_the_order_of_the_laue_group(structure, order):
    rotations = laue_rotations(conventional_standard_structure(structure))
    assert len(rotations) == order
    assert np.allclose(np.linalg.det(rotations), 1)
    # A group: closed under composition.
    products = np.round(np.einsum("aij,bjk->abik", rotations, rotations).reshape(-1, 9), 5)
    assert set(map(tuple, products)) <= set(map(tuple, np.round(rotations.reshape(-1, 9), 5)))


def test_library_covers_every_direction_once(libraries):
    mgo = libraries[0]
    # Size: the sector is 1/24 of the sphere; one direction per (2°)² plus the zone axes.
    expected = 4 * math.pi / 24 / math.radians(2.0) ** 2
    assert 0.8 * expected < len(mgo) < 1.4 * expected
    # Every direction of the sphere has an equivalent within the grid's reach.
    probes = Rotation.random(500, random_state=3).apply([0, 0, 1])
    reduced = reduce_directions(probes, mgo.symmetry)
    nearest = np.degrees(np.arccos(np.clip((reduced @ mgo.directions.T).max(axis=1), -1, 1)))
    assert nearest.max() < 2.0
    # The low-index zone axes are in it exactly.
    for uvw in ([0, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 2]):
        d = reduce_directions(np.array([uvw], float) / np.linalg.norm(uvw), mgo.symmetry)[0]
        assert (mgo.directions @ d).max() > 1 - 1e-9


def test_misorientation_is_symmetry_aware(libraries):
    symmetry = libraries[0].symmetry
    u = Rotation.random(20, random_state=1).as_matrix()
    equivalent = u @ symmetry[np.arange(20) % len(symmetry)]
    assert np.allclose(misorientation(u, equivalent, symmetry), 0, atol=1e-5)
    turned = Rotation.from_rotvec([0, 0, math.radians(7)]).as_matrix() @ u
    assert np.allclose(misorientation(u, turned, symmetry), 7.0, atol=1e-6)


# ---- orientation matching -------------------------------------------------------------------------

# [001] and [011] carry a two-fold axis along the beam; at [112] Friedel's law makes the
# zero-order pattern of U and of U turned half-way about the beam identical, and only the
# excitation errors of the small mistilt tell them apart.
AXES = [(0, 0, 1), (0, 1, 1), (1, 1, 2)]


@pytest.fixture(scope="module")
def zone_axis_truth(libraries):
    mgo = libraries[0]
    rng = np.random.default_rng(5)
    return np.stack(
        [
            _orientation(mgo, AXES[i % len(AXES)], rng.uniform(0, 2 * math.pi), rng.normal(0, 2, 2))
            for i in range(24)
        ]
    )


def test_zone_axis_patterns_give_their_orientation(libraries, zone_axis_truth):
    mgo = libraries[0]
    q, intensity, offsets = _spot_lists(mgo, zone_axis_truth)
    coarse = match_orientations(mgo, q, intensity, offsets, refine=False)
    refined = match_orientations(mgo, q, intensity, offsets)
    twin = in_plane_rotation(np.full(len(zone_axis_truth), np.pi)) @ zone_axis_truth
    coarse_error = np.minimum(
        misorientation(zone_axis_truth, coarse.rotation, mgo.symmetry),
        misorientation(twin, coarse.rotation, mgo.symmetry),
    )
    error = misorientation(zone_axis_truth, refined.rotation, mgo.symmetry)
    twin_error = misorientation(twin, refined.rotation, mgo.symmetry)
    # Grid of 2° (in-plane 2°, parabola-refined): the coarse answer is within a step, up to
    # the half-turn; refinement against the continuous kinematic model goes well below 1°.
    assert np.median(coarse_error) < 1.0 and coarse_error.max() < 2.0
    assert np.minimum(error, twin_error).max() < 0.6
    assert np.median(np.minimum(error, twin_error)) < 0.3
    two_fold = np.arange(len(zone_axis_truth)) % 3 < 2
    assert error[two_fold].max() < 0.6
    # A half-turn twin is reported as such: no reliability.
    assert np.all(refined.reliability[error > 1] < 0.05)
    assert np.all(refined.reliability[two_fold] > 0.05)
    assert np.all(refined.score >= coarse.score - 1e-9)
    axes = zone_axis_indices(refined.rotation, mgo)
    assert np.allclose(axes, zone_axis_indices(zone_axis_truth, mgo), atol=0.05)


def test_rotating_the_detector_rotates_the_answer(libraries, zone_axis_truth):
    mgo = libraries[0]
    # Two-fold zone axes only: the answer at [112] may flip between half-turn twins.
    truth = zone_axis_truth[np.arange(len(zone_axis_truth)) % 3 < 2][:5]
    q, intensity, offsets = _spot_lists(mgo, truth)
    turn = math.radians(33.0)
    rotated = q @ np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
    before = match_orientations(mgo, q, intensity, offsets).rotation
    after = match_orientations(mgo, rotated, intensity, offsets).rotation
    assert np.allclose(
        misorientation(in_plane_rotation(np.full(5, turn)) @ before, after, mgo.symmetry),
        0,
        atol=0.3,
    )


def test_too_few_spots_give_nan_and_bad_input_is_refused(libraries):
    mgo = libraries[0]
    result = match_orientations(mgo, np.array([[0.3, 0.0]]), np.ones(1), np.array([0, 1, 1]))
    assert np.isnan(result.rotation).all() and np.isnan(result.score).all()
    assert list(result.n_spots) == [1, 0]
    with pytest.raises(ShapeError, match="offsets"):
        match_orientations(mgo, np.zeros((3, 2)), np.ones(3), np.array([0, 2]))
    with pytest.raises(ShapeError, match="finite"):
        match_orientations(mgo, np.full((1, 2), np.nan), np.ones(1), np.array([0, 1]))
    with pytest.raises(ConfigurationError, match="angle_step"):
        LibrarySettings(angle_step=0.0)


# ---- phase mapping --------------------------------------------------------------------------------


def test_phase_map_tells_rocksalt_from_perovskite(libraries):
    rng = np.random.default_rng(11)
    truth = np.arange(24).reshape(4, 6) % 2
    qs, intensities, offsets, rotations = [], [], [0], []
    for i, phase in enumerate(truth.ravel()):
        library = libraries[phase]
        u = _orientation(library, AXES[i % 2], rng.uniform(0, 2 * math.pi), rng.normal(0, 2, 2))
        q, intensity, _ = _spot_lists(library, [u], seed=i)
        rotations.append(u)
        qs.append(q)
        intensities.append(intensity)
        offsets.append(offsets[-1] + len(q))
    amorphous = np.zeros((4, 6), bool)
    amorphous[0, 0] = True
    result = map_phases(
        libraries,
        np.concatenate(qs),
        np.concatenate(intensities),
        np.array(offsets),
        (4, 6),
        amorphous=amorphous,
    )
    expected = np.where(amorphous, -1, truth)
    assert np.array_equal(result.phase, expected)
    crystalline = ~amorphous
    assert np.all(result.margin[crystalline] > 0.1)
    error = misorientation(
        np.stack(rotations).reshape(4, 6, 3, 3), result.orientation, libraries[0].symmetry
    )
    assert np.nanmedian(error[crystalline]) < 0.3
    assert np.isnan(result.orientation[0, 0]).all()
    # A single phase explains the whole spot image: its NNLS fraction dominates.
    own = np.take_along_axis(result.fractions, np.maximum(truth, 0)[..., None], axis=-1)[..., 0]
    assert np.all(own[crystalline] > 0.8)


def test_phase_fractions_of_a_superposition(libraries):
    mgo, sto = libraries
    u_mgo = _orientation(mgo, (0, 0, 1), 0.3)
    u_sto = _orientation(sto, (0, 1, 1), 1.1)
    sigma = SETTINGS.sigma_q
    spots = []
    for library, u in ((mgo, u_mgo), (sto, u_sto)):
        q, intensity, _ = kinematic_spots(
            library.crystal, u, energy=300e3, thickness=100.0, semiangle=1.0, q_max=1.5
        )
        weight = np.sqrt(intensity)
        spots.append((q, weight / np.linalg.norm(weight)))
    for share in (0.25, 0.5, 0.8):
        measured = (
            np.concatenate([spots[0][0], spots[1][0]]),
            np.concatenate([share * spots[0][1], (1 - share) * spots[1][1]]),
        )
        fractions = phase_fractions(measured, spots, sigma)
        # Shares of the fitted image norm, which is the weights' norm up to spot overlaps.
        assert fractions == pytest.approx([share, 1 - share], abs=0.05)
    assert phase_fractions((np.zeros((0, 2)), np.zeros(0)), spots, sigma) == pytest.approx(
        [0.0, 0.0]
    )


# ---- the command ---------------------------------------------------------------------------------


def test_phase_command_on_a_peak_file(libraries, tmp_path):
    import h5py
    from click.testing import CliRunner

    from stemforge.core.braggpeaks import BraggPeaks
    from stemforge.core.calibration import Calibration
    from stemforge.datasets.io import write_braggpeaks
    from stemforge.infer.phase_commands import phase

    # A 3×4 scan: MgO [001] left, SrTiO3 [011] right, one empty (amorphous-like) position;
    # raw pixel peaks with the direct beam, as `stemforge disks` writes them.
    pixel, centre = 0.02, 63.5
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, -1, 1, 1]])
    tables, rotations = [], []
    for i, phase_index in enumerate(truth.ravel()):
        if phase_index < 0:
            tables.append(np.array([[centre, centre, 100.0]]))
            rotations.append(np.full((3, 3), np.nan))
            continue
        library = libraries[phase_index]
        u = _orientation(library, [(0, 0, 1), (0, 1, 1)][phase_index], 0.2 + 0.1 * i, (1.0, -1.0))
        q, intensity, _ = _spot_lists(library, [u], seed=i)
        table = np.column_stack([centre + q / pixel, intensity / intensity.max() * 50])
        tables.append(np.vstack([[centre, centre, 100.0], table]))
        rotations.append(u)
    peaks = BraggPeaks.from_patterns(tables, (3, 4), (128, 128))
    calibration = Calibration(
        q_pixel_size=pixel, q_units="A^-1", qx0=centre, qy0=centre, r_pixel_size=5.0, r_units="A"
    )
    peak_file = write_braggpeaks(peaks, tmp_path / "peaks.h5", calibration=calibration)
    for structure, name in ((_mgo(), "MgO.cif"), (_srtio3(), "SrTiO3.cif")):
        structure.to(filename=str(tmp_path / name))
    out = tmp_path / "phase.h5"
    args = [str(peak_file), "--candidates", str(tmp_path / "MgO.cif"), str(tmp_path / "SrTiO3.cif")]
    runner = CliRunner()
    missing_energy = runner.invoke(phase, [*args, "--out", str(out)])
    assert missing_energy.exit_code != 0 and "--energy" in str(missing_energy.exception)
    result = runner.invoke(phase, [*args, "--energy", "300e3", "--q-max", "1.5", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "MgO (MgO.cif): 5 of 12" in result.output
    with h5py.File(out) as f:
        assert np.array_equal(f["phase"][()], truth)
        error = misorientation(
            np.stack(rotations).reshape(3, 4, 3, 3), f["orientation"][()], libraries[0].symmetry
        )
        assert np.nanmedian(error) < 0.3
        assert f["orientation"].shape == (3, 4, 3, 3) and f["euler"].shape == (3, 4, 3)
        assert f["scores"].shape == (3, 4, 2) and f["fractions"].shape == (3, 4, 2)
        assert json.loads(f.attrs["names"]) == ["MgO (MgO.cif)", "SrTiO3 (SrTiO3.cif)"]
    for suffix in (
        "_phase.png",
        "_score.png",
        "_ipf_MgO_MgO_cif.png",
        "_ipf_SrTiO3_SrTiO3_cif.png",
    ):
        assert (tmp_path / f"phase{suffix}").stat().st_size > 1000
    ang = (tmp_path / "phase.ang").read_text()
    assert (
        "MgO" in ang and len([line for line in ang.splitlines() if not line.startswith("#")]) == 12
    )
    again = runner.invoke(phase, [*args, "--energy", "300e3", "--out", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
