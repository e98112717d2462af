"""The phase / orientation / amorphous test scan: layout, noise, and the orientation truth.

The module fixture simulates the standard scan (abTEM multislice, 8×8 positions, 128² px of
0.025 Å⁻¹, MgO and SrTiO₃ grains and amorphous Si): 28 s of CPU on one thread. The
orientation truth ``U`` is proved on every grain: kinematic spots of ``U`` land on the
Sample's exact peak table, on the centres of the bright disks of the simulated pattern
(fitted disk by disk), hold all its diffracted intensity, and for the mistilted grain the
tilt's sign is the one the dynamical intensities show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import spearmanr

from stemforge.core.errors import ConfigurationError, ShapeError
from stemforge.core.units import electron_wavelength
from stemforge.simulate.kinematic import (
    kinematic_spots,
    reciprocal_lattice,
    tilt_rotation,
)
from stemforge.simulate.labels import disk_intensities
from stemforge.simulate.orientation import conventional_standard_structure, zone_axis_rotation
from stemforge.simulate.phase_scan import (
    AMORPHOUS,
    DEFAULT_AMORPHOUS,
    DEFAULT_GRAINS,
    AmorphousRegion,
    Grain,
    PhaseScanTruth,
    default_candidates,
    default_layout,
    default_phase_scan,
    grain_orientation,
    mistilt_rotation,
    phase_test_scan,
    rocksalt_mgo,
)
from stemforge.simulate.sample import PEAK_DTYPE, Sample

ENERGY, SEMIANGLE, N, Q_PIXEL, DOSE = 300e3, 1.5, 128, 0.025, 1e5
RADIUS = SEMIANGLE * 1e-3 / electron_wavelength(ENERGY) / Q_PIXEL  # disk radius, px


@pytest.fixture(scope="module")
def scan():
    # One thread: on a shared 2-core machine abTEM's two FFTW threads ran 3-5x slower
    # (158-258 s against 46 s for the fixture at load average 4-6).
    return default_phase_scan(threads=1)


def _grain_view(truth: PhaseScanTruth, i: int):
    """Orientation, noise-free pattern and Sample of grain ``i``."""
    where = truth.grain == i
    return truth.orientation[where][0], truth.clean[truth.pattern[where][0]], truth.samples[i]


def _predicted_spots(truth: PhaseScanTruth, i: int):
    """Kinematic ZOLZ spots of grain ``i`` from its truth ``U``: (pixels, intensity, hkl)."""
    grain = truth.grains[i]
    u = truth.orientation[truth.grain == i][0]
    conventional = conventional_standard_structure(default_candidates()[grain.phase])
    q, intensity, hkl = kinematic_spots(
        reciprocal_lattice(conventional, 2.4),
        u,
        energy=ENERGY,
        thickness=grain.thickness,
        semiangle=SEMIANGLE,
        min_relative_intensity=0.0,
    )
    pixels = q / Q_PIXEL + N // 2  # calibration: q = (pixel - origin) · q_pixel_size
    keep = (hkl @ np.asarray(grain.zone_axis) == 0) & np.all(
        (pixels >= -0.5) & (pixels < N - 0.5), axis=1
    )
    return pixels[keep], intensity[keep], hkl[keep]


# ---- layout, calibration, noise ------------------------------------------------------------
def test_cube_shape_and_calibration(scan):
    cube, truth = scan
    assert cube.shape == (8, 8, N, N) and cube.data.dtype == np.float32
    cal = cube.calibration
    assert cal.q_pixel_size == pytest.approx(Q_PIXEL) and cal.q_units == "A^-1"
    assert cal.r_pixel_size == pytest.approx(10.0) and cal.r_units == "A"
    assert cal.energy == ENERGY and cal.convergence_semiangle == SEMIANGLE
    assert (cal.qx0, cal.qy0) == (64.0, 64.0)
    assert truth.scan_shape == (8, 8) and truth.step == 10.0
    # Disks of the closest reflections (SrTiO3 {100}) do not overlap.
    assert 1 / 3.905 / Q_PIXEL > 2 * RADIUS + 3
    # The vacuum probe is the disk at the origin.
    assert truth.probe.sum() == pytest.approx(1.0, rel=1e-4)
    centre = [(truth.probe * np.arange(N)[:, None]).sum(), (truth.probe * np.arange(N)).sum()]
    assert np.allclose(centre, 64.0, atol=1e-3)


def test_truth_layout(scan):
    _, truth = scan
    layout = default_layout()
    assert np.array_equal(truth.grain, layout)
    assert np.array_equal(truth.amorphous, layout == AMORPHOUS)
    assert truth.amorphous.sum() == 12
    assert [int((layout == i).sum()) for i in range(4)] == [13] * 4
    assert truth.names == ["MgO", "SrTiO3"]
    assert truth.grains == DEFAULT_GRAINS
    assert np.array_equal(truth.phase, np.choose(layout + 1, [-1, 0, 0, 1, 1]))
    assert np.isnan(truth.orientation[truth.amorphous]).all()
    rotations = truth.orientation[truth.crystalline]
    assert np.allclose(rotations @ np.swapaxes(rotations, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(rotations), 1.0)
    for i, grain in enumerate(DEFAULT_GRAINS):
        u = truth.orientation[layout == i]
        assert np.all(u == u[0])
        assert np.allclose(u[0], grain_orientation(default_candidates()[grain.phase], grain))
    # Four grains and four amorphous probe positions: eight simulations in all.
    assert truth.clean.shape == (8, N, N)
    assert sorted(np.unique(truth.pattern[truth.amorphous])) == [4, 5, 6, 7]


def test_counts_are_poisson_with_the_dose(scan):
    cube, truth = scan
    data = np.asarray(cube.data, np.float64)
    assert np.array_equal(data, np.round(data)) and data.min() >= 0
    expected = truth.clean[truth.pattern] * DOSE
    # Nearly every electron lands on the detector; the counts follow the dose.
    assert np.all((truth.clean.sum(axis=(1, 2)) > 0.9) & (truth.clean.sum(axis=(1, 2)) <= 1.0))
    totals = data.sum(axis=(2, 3))
    assert np.allclose(totals, expected.sum(axis=(2, 3)), rtol=0.02)
    assert totals.mean() == pytest.approx(
        DOSE * truth.clean[truth.pattern].sum((2, 3)).mean(), rel=0.003
    )
    # Pixel by pixel: mean 0 and variance 1 after removing the expectation.
    bright = expected > 20
    z = (data[bright] - expected[bright]) / np.sqrt(expected[bright])
    assert abs(z.mean()) < 0.02 and z.std() == pytest.approx(1.0, abs=0.03)


def test_positions_of_one_grain_differ_only_by_noise(scan):
    cube, truth = scan
    data = np.asarray(cube.data, np.float64)
    for i in range(len(truth.grains)):
        a, b = data[truth.grain == i][:2]
        assert not np.array_equal(a, b)  # independent noise
        both = a + b > 0
        # Given a + b = n, a is binomial(n, 1/2): (a - b) / sqrt(n) has mean 0, variance 1.
        z = (a - b)[both] / np.sqrt((a + b)[both])
        bound = 5 / np.sqrt(both.sum())
        assert abs(z.mean()) < bound and abs(z.std() - 1) < max(bound, 0.03)
    # Different grains differ by far more than noise.
    a, b = data[truth.grain == 0][0], data[truth.grain == 2][0]
    assert ((a - b) ** 2).sum() / (a + b).sum() > 100  # ≈ 1 for noise alone


def test_same_seed_same_cube_other_seed_other_noise(scan, monkeypatch):
    # Stand-in simulators hand back the fixture's noise-free patterns: the noise is seeded.
    cube, truth = scan
    again = _fake_scan(monkeypatch, truth, 0, default_layout())
    other = _fake_scan(monkeypatch, truth, 1, default_layout())
    assert np.array_equal(again[0].data, cube.data)
    assert not np.array_equal(other[0].data, cube.data)
    assert np.array_equal(again[1].pattern, truth.pattern)


def _fake_scan(monkeypatch, truth, seed, layout, grains=DEFAULT_GRAINS):
    """phase_test_scan with the multislice replaced by the fixture's noise-free patterns."""
    from types import SimpleNamespace

    import stemforge.simulate.multislice as multislice
    import stemforge.simulate.pattern as pattern

    calls = []

    def fake_patterns(structure, zone_axis, *, x_reflection=None, **kwargs):
        calls.append(tuple(zone_axis))
        for i, g in enumerate(DEFAULT_GRAINS):
            if g.zone_axis == tuple(zone_axis) and g.x_reflection == x_reflection:
                return [truth.samples[i]]
        raise AssertionError("unexpected grain")

    def fake_cbed(atoms, *, probe_position, **kwargs):
        k = DEFAULT_AMORPHOUS.probe_positions().index(probe_position)
        return SimpleNamespace(patterns=truth.clean[4 + k][None], probe=truth.probe)

    monkeypatch.setattr(pattern, "simulate_patterns", fake_patterns)
    monkeypatch.setattr(multislice, "simulate_cbed", fake_cbed)
    cube, fake_truth = phase_test_scan(
        default_candidates(), grains, layout, amorphous=DEFAULT_AMORPHOUS, seed=seed
    )
    return cube, fake_truth, calls


def test_equal_grains_share_one_simulation(scan, monkeypatch):
    _, truth = scan
    grains = (*DEFAULT_GRAINS, DEFAULT_GRAINS[1])
    layout = np.array([[0, 1, 4], [4, 1, 3]])
    cube, fake_truth, calls = _fake_scan(monkeypatch, truth, 0, layout, grains)
    assert calls == [(0, 0, 1), (0, 1, 1), (1, 1, 1)]  # grain 2 unused, grain 4 == grain 1
    assert fake_truth.samples[2] is None and fake_truth.samples[4] is fake_truth.samples[1]
    assert np.array_equal(fake_truth.pattern, [[0, 1, 1], [1, 1, 2]])
    assert np.allclose(fake_truth.orientation[0, 2], fake_truth.orientation[0, 1])
    assert not fake_truth.amorphous.any() and cube.shape == (2, 3, N, N)


# ---- the orientation truth -----------------------------------------------------------------
def test_mistilt_rotation_takes_the_beam_direction_to_z():
    for tilt in [(5.0, -3.0), (-2.0, 0.0), (0.0, 7.0)]:
        t = mistilt_rotation(tilt)
        d = np.array([math.tan(tilt[0] * 1e-3), math.tan(tilt[1] * 1e-3), 1.0])
        assert np.allclose(t @ d / np.linalg.norm(d), [0, 0, 1], atol=1e-15)
        assert np.allclose(t @ t.T, np.eye(3), atol=1e-15) and np.linalg.det(t) == pytest.approx(1)
        # to first order a rotation of θy about x and of -θx about y
        assert np.allclose(t, tilt_rotation(tilt[1], -tilt[0]), atol=2e-5)
        assert not np.allclose(t, tilt_rotation(*tilt), atol=1e-3)
    assert np.array_equal(mistilt_rotation(None), np.eye(3))


def test_orientation_is_the_documented_composition():
    for grain in DEFAULT_GRAINS:
        conventional = conventional_standard_structure(default_candidates()[grain.phase])
        rz, _ = zone_axis_rotation(conventional.lattice.matrix, grain.zone_axis, grain.x_reflection)
        u = grain_orientation(default_candidates()[grain.phase], grain)
        assert np.allclose(u, mistilt_rotation(grain.mistilt) @ rz, atol=1e-12)
        # the zone axis runs along the beam, up to the mistilt
        axis = u @ (np.asarray(grain.zone_axis, float) @ conventional.lattice.matrix)
        tilt = math.atan(math.hypot(*np.tan(np.asarray(grain.mistilt or (0, 0)) * 1e-3)))
        assert math.acos(axis[2] / np.linalg.norm(axis)) == pytest.approx(tilt, abs=1e-9)


def test_kinematic_spots_of_the_truth_are_the_peak_table(scan):
    _, truth = scan
    for i in range(len(truth.grains)):
        pixels, _, hkl = _predicted_spots(truth, i)
        table = truth.samples[i].peaks
        table = table[(table["h"] != 0) | (table["k"] != 0) | (table["l"] != 0)]
        rows = {(int(r["h"]), int(r["k"]), int(r["l"])): (r["qx"], r["qy"]) for r in table}
        assert {tuple(int(v) for v in h) for h in hkl} == set(rows), f"grain {i}"
        position = np.array([rows[tuple(int(v) for v in h)] for h in hkl])
        # exact but for the mistilt's second-order foreshortening (< 0.002 px)
        assert np.abs(pixels - position).max() < 0.01, f"grain {i}"


def _fit_disk(pattern: np.ndarray, start: np.ndarray, radius: float) -> np.ndarray:
    """Centre (px) of one Bragg disk: a disk of ``radius`` (8×8 supersampled pixel coverage)
    times a quadratic interior, least squares on the pixels within ``radius + 2`` of
    ``start``. The interior absorbs the dynamical contrast inside the disk, which biases
    plain centroids by up to a pixel."""
    half = math.ceil(radius) + 3
    ix = np.arange(round(start[0]) - half, round(start[0]) + half + 1)
    iy = np.arange(round(start[1]) - half, round(start[1]) + half + 1)
    x, y = np.meshgrid(ix, iy, indexing="ij")
    inside = np.hypot(x - start[0], y - start[1]) <= radius + 2
    image = pattern[np.ix_(ix, iy)][inside].astype(float)
    image /= image.max()
    u, v = (x[inside] - start[0]) / radius, (y[inside] - start[1]) / radius
    basis = np.stack([u**a * v**b for a in range(3) for b in range(3 - a)], axis=-1)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    xs = x[inside][:, None, None] + sub[:, None]
    ys = y[inside][:, None, None] + sub[None, :]

    def cost(shift: np.ndarray) -> float:
        p = start + shift
        cover = ((xs - p[0]) ** 2 + (ys - p[1]) ** 2 <= radius**2).mean(axis=(1, 2))
        design = basis * cover[:, None]
        coef, *_ = np.linalg.lstsq(design, image, rcond=None)
        return float(np.sum((design @ coef - image) ** 2))

    simplex = [[0.0, 0.0], [0.3, 0.0], [0.0, 0.3]]
    result = minimize(
        cost,
        [0.0, 0.0],
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-14},
    )
    return start + result.x


def test_kinematic_spots_of_the_truth_are_the_bright_disks(scan):
    _, truth = scan
    for i in range(len(truth.grains)):
        _, pattern, _ = _grain_view(truth, i)
        pixels, _, _ = _predicted_spots(truth, i)
        # The predicted disks (and the direct beam) hold all the scattered intensity ...
        disks = np.concatenate([[[64.0, 64.0]], pixels])
        captured = disk_intensities(pattern, disks, RADIUS + 1.0).sum()
        assert captured / pattern.sum() > 0.995, f"grain {i}"
        # ... and the brightest ones sit where U puts them.
        measured = disk_intensities(pattern, pixels, RADIUS + 1.0)
        inner = np.all((pixels > 10) & (pixels < N - 11), axis=1)
        brightest = np.flatnonzero(inner)[np.argsort(-measured[inner])[:10]]
        assert measured[brightest].min() > 1e-3 * pattern.sum()
        errors = [np.hypot(*(_fit_disk(pattern, pixels[j], RADIUS) - pixels[j])) for j in brightest]
        assert max(errors) <= 0.3, f"grain {i}: {np.round(errors, 3)}"
        assert np.median(errors) <= 0.1


def test_the_mistilt_sign(scan):
    _, truth = scan
    (i,) = [i for i, g in enumerate(truth.grains) if g.mistilt]
    grain = truth.grains[i]
    u, pattern, sample = _grain_view(truth, i)
    conventional = conventional_standard_structure(default_candidates()[grain.phase])
    crystal = reciprocal_lattice(conventional, 2.4)
    opposite = (
        mistilt_rotation(tuple(-t for t in grain.mistilt)) @ mistilt_rotation(grain.mistilt).T @ u
    )
    # Centroid of the diffracted intensity (direct beam masked): the Laue circle's side.
    x, y = np.meshgrid(np.arange(N) - 64.0, np.arange(N) - 64.0, indexing="ij")
    outside = np.hypot(x, y) > RADIUS + 2
    weight = pattern * outside
    measured = np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()
    # A beam tilted toward +x, +y moves the intensity toward -qx, -qy.
    assert np.dot(measured, grain.mistilt) < -0.9 * np.linalg.norm(measured) * np.hypot(
        *grain.mistilt
    )
    table = sample.peaks[1:]  # 000 first
    hkl = np.stack([table["h"], table["k"], table["l"]], axis=1)
    scores = []
    for rotation in (u, opposite):
        q, intensity, spots = kinematic_spots(
            crystal,
            rotation,
            energy=ENERGY,
            thickness=grain.thickness,
            semiangle=SEMIANGLE,
            min_relative_intensity=0.0,
        )
        centroid = (q * intensity[:, None]).sum(0) / intensity.sum() / Q_PIXEL
        by_hkl = {tuple(h): v for h, v in zip(spots.tolist(), intensity, strict=True)}
        kinematic = np.array([by_hkl.get(tuple(h), 0.0) for h in hkl.tolist()])
        rank = spearmanr(kinematic, table["intensity_dynamical"]).statistic
        scores.append(
            (np.dot(centroid, measured) / np.linalg.norm(centroid) / np.linalg.norm(measured), rank)
        )
    (cos_u, rank_u), (cos_opposite, rank_opposite) = scores
    assert cos_u > 0.95 and cos_opposite < -0.95
    assert rank_u > rank_opposite + 0.05


# ---- amorphous region ----------------------------------------------------------------------
def test_amorphous_positions_have_no_bragg_disks(scan):
    from stemforge.infer.amorphous import AmorphousSettings, map_amorphous

    cube, truth = scan
    summary = map_amorphous(cube, AmorphousSettings())[1]
    found = ~summary.maps["crystalline"]
    tp = int((found & truth.amorphous).sum())
    assert tp / found.sum() >= 0.95 and tp / truth.amorphous.sum() >= 0.95
    fraction = summary.maps["bragg_fraction"]
    assert fraction[truth.amorphous].max() < 0.05 and fraction[truth.crystalline].min() > 0.3
    # four distinct speckle patterns, none a repeat of a crystal's
    amorphous = truth.clean[4:]
    assert all(not np.allclose(amorphous[0], other, rtol=0.1) for other in amorphous[1:])


# ---- saving --------------------------------------------------------------------------------
def test_truth_round_trip(scan, tmp_path):
    _, truth = scan
    back = PhaseScanTruth.from_dict(truth.to_dict())
    path = truth.save(tmp_path / "truth.h5")
    loaded = PhaseScanTruth.load(path)
    for other in (back, loaded):
        for name in ("phase", "amorphous", "grain", "pattern", "clean", "probe"):
            assert np.array_equal(getattr(other, name), getattr(truth, name)), name
        assert np.array_equal(other.orientation, truth.orientation, equal_nan=True)
        assert other.names == truth.names and other.grains == truth.grains
        assert other.step == truth.step and other.description == truth.description
    assert "g_lab = U @ g" in truth.to_dict()["attrs"]["convention"]
    assert not list(tmp_path.glob(".*tmp"))


# ---- validation ----------------------------------------------------------------------------
def test_bad_layouts_and_grains_are_refused():
    candidates = [rocksalt_mgo()]
    grains = [Grain(0, (0, 0, 1))]
    with pytest.raises(ConfigurationError, match="layout value 1 at \\(rx=0, ry=1\\)"):
        phase_test_scan(candidates, grains, [[0, 1]])
    with pytest.raises(ConfigurationError, match="layout value -2"):
        phase_test_scan(candidates, grains, [[0, -2]])
    with pytest.raises(ShapeError, match="2D"):
        phase_test_scan(candidates, grains, [0, 0, 0])
    with pytest.raises(ConfigurationError, match="not grain indices"):
        phase_test_scan(candidates, grains, [[0.5, 0.0]])
    with pytest.raises(ConfigurationError, match="phase 1, but there are 1 candidates"):
        phase_test_scan(candidates, [Grain(1, (0, 0, 1))], [[0]])
    with pytest.raises(ConfigurationError, match="not a pymatgen Structure"):
        phase_test_scan(["MgO"], grains, [[0]])
    with pytest.raises(ConfigurationError, match="not a Grain"):
        phase_test_scan(candidates, [((0, 0, 1), 0)], [[0]])
    with pytest.raises(ConfigurationError, match="dose"):
        phase_test_scan(candidates, grains, [[0]], dose=-1.0)
    with pytest.raises(ConfigurationError, match="zone axis"):
        Grain(0, (0, 0, 0))
    with pytest.raises(ConfigurationError, match="zone axis"):
        Grain(0, (1, 0))
    with pytest.raises(ConfigurationError, match="mistilt"):
        Grain(0, (0, 0, 1), mistilt=(1.0, float("nan")))
    with pytest.raises(ConfigurationError, match="thickness"):
        Grain(0, (0, 0, 1), thickness=0.0)
    with pytest.raises(ConfigurationError, match="phase"):
        Grain(-1, (0, 0, 1))
    with pytest.raises(ConfigurationError, match="n_probes"):
        AmorphousRegion(n_probes=0)
    assert Grain(0, [0, 1, 1], mistilt=(0, 0)).mistilt is None


def test_truth_refuses_inconsistent_maps():
    shape = (2, 2)
    good = dict(
        phase=[[0, -1], [0, 0]],
        orientation=np.where(np.array([[1, 0], [1, 1]], bool)[..., None, None], np.eye(3), np.nan),
        amorphous=[[False, True], [False, False]],
        names=["MgO"],
        grain=[[0, -1], [0, 0]],
    )
    PhaseScanTruth(**good)
    with pytest.raises(ConfigurationError, match="amorphous map"):
        PhaseScanTruth(**{**good, "amorphous": np.zeros(shape, bool)})
    with pytest.raises(ConfigurationError, match="phase indices"):
        PhaseScanTruth(**{**good, "phase": [[1, -1], [0, 0]]})
    with pytest.raises(ShapeError, match="orientation"):
        PhaseScanTruth(**{**good, "orientation": np.zeros((2, 2, 2, 2))})
    with pytest.raises(ConfigurationError, match="NaN"):
        PhaseScanTruth(**{**good, "orientation": np.zeros((2, 2, 3, 3))})


def test_sample_table_dtype_is_what_the_tests_read():
    # the fake simulator above hands back real Samples; guard the fields the tests read
    assert {"h", "k", "l", "qx", "qy", "intensity_dynamical"} <= set(PEAK_DTYPE.names)
    assert Sample.__dataclass_fields__.keys() >= {"cbed", "probe", "peaks", "metadata"}


def test_phase_command_maps_the_scan(scan, tmp_path):
    """`stemforge phase` on the scan as a bare .npy stack: calibration from the options,
    origin measured, disks by correlation, amorphous region from the diffuse-ring classifier."""
    import h5py
    from click.testing import CliRunner

    from stemforge.infer.orientation import laue_rotations, misorientation
    from stemforge.infer.phase_commands import phase

    cube, truth = scan
    np.save(tmp_path / "scan.npy", np.asarray(cube.data))
    np.save(tmp_path / "probe.npy", truth.probe)
    names = []
    for structure, name in zip(default_candidates(), ("MgO.cif", "SrTiO3.cif"), strict=True):
        structure.to(filename=str(tmp_path / name))
        names.append(str(tmp_path / name))
    out = tmp_path / "phase.h5"
    result = CliRunner().invoke(
        phase,
        [
            str(tmp_path / "scan.npy"),
            "--candidates",
            *names,
            "--probe",
            str(tmp_path / "probe.npy"),
            "--q-pixel-size",
            str(cube.calibration.q_pixel_size),
            "--energy",
            "300e3",
            "--semiangle",
            "1.5",
            "--q-max",
            "1.55",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    with h5py.File(out) as f:
        found, orientation = f["phase"][()], f["orientation"][()]
    crystalline = truth.phase >= 0
    assert np.mean(found[crystalline] == truth.phase[crystalline]) >= 0.98
    assert np.array_equal(found < 0, truth.amorphous)
    # Grains on two-fold zone axes or mistilted (0-2): well under a degree.
    symmetry = laue_rotations(conventional_standard_structure(default_candidates()[0]))
    two_fold = crystalline & (truth.grain < 3)
    error = misorientation(truth.orientation[two_fold], orientation[two_fold], symmetry)
    assert np.median(error) < 0.5
