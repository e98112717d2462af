"""Amorphous / short-range-order analysis: kernels on analytic inputs, physics on abTEM scans.

The simulated scan (module fixture, abTEM multislice, 300 kV, 2 mrad, 64² px of 0.045 Å⁻¹):
16 positions of a random dense packing of Si (20×20×40 Å, 2.28 g/cm³, hard-sphere
diameter 2.2 Å) and 16 of crystalline Si ([110] and [001], 4 and 10 nm), Poisson noise at
1e5 electrons per pattern.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from stemforge.core.calibration import Calibration
from stemforge.core.datacube import DataCube
from stemforge.core.errors import CalibrationError, ConfigurationError, ShapeError
from stemforge.infer.amorphous import (
    AmorphousSettings,
    FEMSums,
    PolarGrid,
    bragg_fraction,
    d_spacing_table,
    fem_variance,
    fit_halo,
    index_d_spacings,
    map_amorphous,
    polar_transform,
    reduced_pdf,
    ring_statistics,
)
from stemforge.infer.ellipse import ellipse_correction
from stemforge.simulate.amorphous import crystal_grains, random_dense_packing

ENERGY, SEMIANGLE, N_PIXELS, Q_PIXEL = 300e3, 2.0, 64, 0.045
BOX, DENSITY, D_MIN = (20.0, 20.0, 40.0), 2.28, 2.2
DOSE = 1e5
POSITIONS = [(x, y) for x in (0.0, 5.0, 10.0, 15.0) for y in (0.0, 5.0, 10.0, 15.0)]


# ---- analytic checks of the kernels -----------------------------------------------------------
def _ring_image(shape, centre, radius, ellipse, width=1.0):
    """A Gaussian ring of ``radius`` (corrected px) drawn through the distortion ``ellipse``."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = ellipse_correction(x, y, centre, *ellipse)
    r = np.hypot(cx - centre[0], cy - centre[1])
    return np.exp(-0.5 * ((r - radius) / width) ** 2)


def _ring_radius(polar, radii):
    """Centroid radius of a ring at every angle of a polar image ``(n_r, n_phi)``."""
    return (polar * radii[:, None]).sum(0) / polar.sum(0)


def test_polar_transform_undoes_the_ellipse():
    ellipse = (1.08, 1.0, math.radians(30))
    image = _ring_image((96, 96), (47.3, 48.6), 25.0, ellipse, width=2.0)
    grid = PolarGrid.build(40, 0.1, 360)
    window = (grid.radii > 15) & (grid.radii < 35)
    corrected = polar_transform(image[None], 47.3, 48.6, grid, ellipse)[0][window]
    raw = polar_transform(image[None], 47.3, 48.6, grid)[0][window]
    radius = _ring_radius(corrected, grid.radii[window])
    # Corrected: a circle of radius 25 at every angle (bilinear resampling: < 0.05 px).
    assert np.abs(radius - 25.0).max() <= 0.05
    # Uncorrected it is the ellipse, whose radius spans 25·b/a .. 25.
    raw_radius = _ring_radius(raw, grid.radii[window])
    assert raw_radius.max() - raw_radius.min() == pytest.approx(25 * (1 - 1 / 1.08), abs=0.1)


def test_polar_transform_follows_each_patterns_origin():
    images = np.stack(
        [_ring_image((64, 64), c, 12.0, (1.0, 1.0, 0.0)) for c in [(30, 33), (34, 29)]]
    )
    grid = PolarGrid.build(20, 0.1, 90)
    polar = polar_transform(images, [30, 34], [33, 29], grid)
    for image in polar:
        assert np.allclose(_ring_radius(image, grid.radii), 12.0, atol=0.05)
    with pytest.raises(ShapeError):
        polar_transform(images[0], 30, 33, grid)


def test_ring_statistics_of_known_rings():
    # A ring covered over a fraction p at level 1 (0 elsewhere): V = (1 - p)/p.
    polar = np.zeros((1, 3, 100))
    polar[0, 0] = 2.0
    polar[0, 1, :25] = 1.0
    polar[0, 2, :50] = np.nan  # half off the detector: no statistics
    stats = ring_statistics(polar)
    assert stats.normalized_variance[0, 0] == pytest.approx(0.0)
    assert stats.normalized_variance[0, 1] == pytest.approx(3.0)
    assert stats.mean[0, 1] == pytest.approx(0.25)
    assert np.isnan(stats.mean[0, 2])


def test_fem_variances_of_a_two_position_scan():
    # Two positions; pixel 0 is 1 then 3 (V = <I²>/<I>² - 1 = 5/4 - 1), pixel 1 is 2 twice.
    polar = np.array([[[1.0, 2.0]], [[3.0, 2.0]]])
    sums = FEMSums.zeros((1, 2))
    sums.add(polar)
    annular, ensemble = fem_variance(sums)
    assert annular[0] == pytest.approx((0.25 + 0.0) / 2)
    assert ensemble[0] == pytest.approx((1 + 4 + 9 + 4) / 4 / 2.0**2 - 1)


def test_fit_halo_recovers_a_gaussian_on_a_screened_background():
    q = np.arange(64) * 0.025
    background = 3.0 + 400.0 / (1 + (q / 0.3) ** 2) ** 2
    profiles = np.stack(
        [
            background + a * np.exp(-0.5 * ((q - q0) / 0.06) ** 2)
            for a, q0 in [(2.0, 0.5), (1.0, 0.62)]
        ]
    )
    fit = fit_halo(profiles, q, (0.2, 1.5))
    assert np.allclose(fit.q, [0.5, 0.62], atol=0.003)
    assert np.allclose(fit.fwhm, 0.06 * 2.3548, rtol=0.05)
    assert np.allclose(fit.d, 1 / fit.q)
    # No halo: the Gaussian is not positive, or sits at the window edge.
    assert np.isnan(
        fit_halo(background - 0.5 * np.exp(-0.5 * ((q - 0.5) / 0.06) ** 2), q, (0.2, 1.5)).q[0]
    )
    with pytest.raises(ConfigurationError, match="window"):
        fit_halo(profiles, q, (0.2, 0.3))


def test_reduced_pdf_of_one_coordination_shell():
    # S(q) = 1 + N sin(2π q r0)/(2π q r0) is a shell of N neighbours at r0 (Debye).
    r0, q = 2.5, np.arange(1, 400) * 0.005
    f2 = 1 / (1 + (q / 0.4) ** 2) ** 2
    s = 1 + 0.8 * np.sin(2 * np.pi * q * r0) / (2 * np.pi * q * r0) * np.exp(
        -0.5 * (0.1 * 2 * np.pi * q) ** 2
    )
    pdf = reduced_pdf(q, 5.0 * f2 * s, (0.1, 1.9))
    first = pdf.r[np.argmax(pdf.g)]
    # Resolution of a transform to q_max: about 1/(2 q_max).
    assert abs(first - r0) <= 1 / (2 * 1.9)


def test_bragg_fraction_separates_spots_from_exponential_speckle():
    rng = np.random.default_rng(0)
    grid = PolarGrid.build(30, 1.0, 192)
    # Speckle: exponential intensity, grains of about 3 px (smoothed white noise, squared).
    field = rng.normal(size=(4, 64, 64)) + 1j * rng.normal(size=(4, 64, 64))
    from scipy import ndimage

    speckle = (
        np.abs(
            ndimage.gaussian_filter(field.real, (0, 1.5, 1.5))
            + 1j * ndimage.gaussian_filter(field.imag, (0, 1.5, 1.5))
        )
        ** 2
    )
    x, y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    spots = sum(
        np.exp(-0.5 * ((x - 32 - 14 * np.cos(a)) ** 2 + (y - 32 - 14 * np.sin(a)) ** 2) / 1.5**2)
        for a in np.arange(6) * np.pi / 3
    )
    stack = np.concatenate([speckle, (spots + 0.001)[None]])
    fraction = bragg_fraction(polar_transform(stack, 32, 32, grid), grid.radii, (5, 28), smooth=1.0)
    assert fraction[:4].max() < 0.02
    assert fraction[4] > 0.5


def test_d_spacings_are_indexed_against_silicon():
    from pymatgen.core import Lattice, Structure

    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    rng = np.random.default_rng(1)
    d111, d220 = 5.431 / math.sqrt(3), 5.431 / math.sqrt(8)
    q = np.concatenate(
        [1 / d111 + rng.normal(0, 0.005, 40), 1 / d220 + rng.normal(0, 0.005, 20), [0.9]]
    )
    table = d_spacing_table(q, np.ones_like(q), tolerance=0.04)
    assert len(table) == 2 and table["count"].tolist() == [40, 20]
    indexed = index_d_spacings(table, {"Si": si}, tolerance=0.04)
    assert [h.decode() for h in indexed["hkl"]] == ["{111}", "{220}"]
    assert np.allclose(indexed["d_reference"], [d111, d220])
    assert np.all(np.abs(indexed["error"]) < 0.01)


# ---- the random dense packing --------------------------------------------------------------
@pytest.fixture(scope="module")
def packing():
    return random_dense_packing(BOX, density=DENSITY, min_distance=D_MIN, seed=1)


def _structure_factor(atoms, q, per_shell=400):
    """Spherically averaged S(q) of a periodic cell: a seeded sample of ``per_shell``
    reciprocal-lattice vectors of each shell ``|k| = q ± step/2`` (S(k) of one vector is
    exponentially distributed, so 400 give the mean to 5 %)."""
    box = np.diag(atoms.cell)
    step = q[1] - q[0]
    reach = [int((q.max() + step) * length) + 1 for length in box]
    m = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1)
    k = m.reshape(-1, 3) / box
    length = np.linalg.norm(k, axis=1)
    rng = np.random.default_rng(0)
    out = []
    for value in q:
        shell = k[np.abs(length - value) < step / 2]
        shell = shell[rng.permutation(len(shell))[:per_shell]]
        phases = np.exp(-2j * np.pi * atoms.positions @ shell.T).sum(0)
        out.append(np.mean(np.abs(phases) ** 2) / len(atoms))
    return np.array(out)


def test_random_dense_packing_is_a_hard_sphere_glass(packing):
    again = random_dense_packing(BOX, density=DENSITY, min_distance=D_MIN, seed=1)
    assert np.array_equal(packing.positions, again.positions)  # bit for bit per seed
    box = np.diag(packing.cell)
    mass = packing.get_masses().sum() / 6.02214076e23 / (np.prod(box) * 1e-24)
    assert mass == pytest.approx(DENSITY, rel=0.01)
    tree = cKDTree(packing.positions, boxsize=box)
    distances, _ = tree.query(packing.positions, k=2)
    assert distances[:, 1].min() >= D_MIN * (1 - 1e-9)
    # First peak of S(q) of a dense hard-sphere liquid/glass: Qσ ≈ 7 (2π q d ≈ 7, q d ≈ 1.1-1.2).
    q = np.arange(0.3, 0.8, 0.02)
    q1 = q[np.argmax(_structure_factor(packing, q))]
    assert 1.1 <= q1 * D_MIN <= 1.25


def test_packing_refuses_impossible_densities():
    with pytest.raises(ConfigurationError, match="packing fraction"):
        random_dense_packing(BOX, density=8.0, min_distance=2.5)
    with pytest.raises(ConfigurationError, match="box"):
        random_dense_packing((20, -1, 5), density=2.0, min_distance=2.0)


# ---- simulated scan ----------------------------------------------------------------------------
def _simulate(atoms, positions):
    from stemforge.simulate.multislice import DetectorGrid, simulate_cbed

    detector = DetectorGrid(N_PIXELS, Q_PIXEL)
    # min_cutoff 2 Å⁻¹: beyond the detector's 2.06 Å⁻¹ corner reach, and the probe's 0.1.
    return np.stack(
        [
            simulate_cbed(
                atoms,
                energy=ENERGY,
                semiangle=SEMIANGLE,
                detector=detector,
                thicknesses=[float(atoms.cell[2, 2])],
                probe_position=p,
                min_cutoff=2.0,
                threads=2,
            ).patterns[0]
            for p in positions
        ]
    )


@pytest.fixture(scope="module")
def scan(packing):
    """(cube, truth): rows 0-3 crystalline Si, rows 4-7 amorphous; truth True = amorphous."""
    from stemforge.datasets.factory import diamond_cell
    from stemforge.simulate.pattern import simulate_patterns
    from stemforge.simulate.strain import SILICON

    crystal = []
    for axis in ((1, 1, 0), (0, 0, 1)):
        samples = simulate_patterns(
            diamond_cell(SILICON),
            axis,
            thicknesses=[40.0, 100.0],
            energy=ENERGY,
            semiangle=SEMIANGLE,
            n_pixels=N_PIXELS,
            q_pixel_size=Q_PIXEL,
            threads=2,
        )
        crystal += [s.cbed for s in samples]
    amorphous = _simulate(packing, POSITIONS)
    clean = np.concatenate([np.repeat(np.stack(crystal), 4, axis=0), amorphous])
    counts = np.random.default_rng(7).poisson(clean * DOSE).astype(np.float32)
    calibration = Calibration(
        q_pixel_size=Q_PIXEL, q_units="A^-1", energy=ENERGY, qx0=32.0, qy0=32.0
    )
    truth = np.arange(32).reshape(8, 4) >= 16
    return DataCube(counts.reshape(8, 4, N_PIXELS, N_PIXELS), calibration), truth, clean


@pytest.fixture(scope="module")
def analysis(scan):
    cube, _, _ = scan
    return map_amorphous(cube, AmorphousSettings(), max_bytes=8 * 64 * 64 * 4 * 3)


def test_classifier_finds_the_amorphous_region(scan, analysis):
    _, truth, _ = scan
    amorphous = ~analysis[1].maps["crystalline"]
    tp = int((amorphous & truth).sum())
    precision, recall = tp / amorphous.sum(), tp / truth.sum()
    assert precision >= 0.95 and recall >= 0.95
    fraction = analysis[1].maps["bragg_fraction"]
    # Margin: every crystal pattern well above the 0.1 threshold, every amorphous one below.
    assert fraction[~truth].min() > 0.2 and fraction[truth].max() < 0.05


def test_halo_matches_kinematic_theory_of_the_packing(scan, analysis, packing):
    from abtem.parametrizations import validate_parametrization

    profiles, summary = analysis
    q = summary.q
    # Kinematic expectation: f(q)² S(q) of the very atoms simulated, fitted alike.
    f = np.asarray(
        validate_parametrization("lobato").projected_scattering_factor(14)(np.float32(q[1:] ** 2)),
        float,
    )
    kinematic = np.concatenate([[np.nan], f**2 * _structure_factor(packing, q[1:])])
    expected = fit_halo(kinematic, q, summary.settings["q_range"])
    measured = summary.halo
    # Probe convolution (0.1 Å⁻¹ disk) and bilinear resampling move it by well under a pixel.
    assert abs(measured.q[0] - expected.q[0]) <= Q_PIXEL
    assert abs(measured.fwhm[0] - expected.fwhm[0]) <= 2 * Q_PIXEL
    # The intensity halo sits on the falling f², below S(q)'s peak at q d ≈ 1.1-1.25.
    assert 0.9 <= measured.q[0] * D_MIN <= 1.25
    # Per position: a single nano-diffraction pattern is speckle, and its halo may drown in
    # it; most amorphous positions have one, near the mean halo.
    _, truth, _ = scan
    per_position = summary.maps["halo_q"][truth]
    assert np.isfinite(per_position).mean() >= 0.8
    assert np.nanmedian(np.abs(per_position - measured.q[0])) <= 2 * Q_PIXEL


def test_pdf_first_peak_at_the_contact_distance(analysis):
    _, summary = analysis
    pdf = summary.pdf
    near = (pdf.r > 1.5) & (pdf.r < 3.5)
    first = pdf.r[near][np.argmax(pdf.g[near])]
    q_max = summary.settings["q_range"][1]
    # g(r) of the packing peaks at contact (2.2-2.3 Å); resolution about 1/(2 q_max).
    assert abs(first - D_MIN) <= 1 / (2 * q_max) + 0.1


def test_results_do_not_depend_on_the_block_size(scan, analysis):
    cube, _, _ = scan
    profiles, summary = map_amorphous(cube, AmorphousSettings(), max_bytes=64 * 64 * 4 * 4)
    assert np.allclose(profiles["radial_mean"], analysis[0]["radial_mean"], equal_nan=True)
    for name in ("halo_q", "bragg_fraction", "crystalline"):
        assert np.array_equal(
            summary.maps[name], analysis[1].maps[name], equal_nan=name != "crystalline"
        )


def test_missing_q_calibration_names_the_option(scan):
    cube, _, _ = scan
    bare = cube.with_calibration(Calibration())
    with pytest.raises(CalibrationError, match="--q-pixel-size"):
        map_amorphous(bare)


@pytest.mark.slow
def test_fem_variance_grows_with_medium_range_order():
    from ase.build import bulk

    # A thinner cell (24 Å), pure or seeded with two 7 Å Si grains (27 % of the volume) whose
    # [001] lies along the beam (in-plane orientations random): grains near a zone axis
    # scatter coherently, so the speckle of the seeded cell is stronger (measured: V_Ω peak
    # 1.0 against 0.65, 1.4-1.6x over seeds; the fast engine gives the same).
    box = (20.0, 20.0, 24.0)
    grains = crystal_grains(
        bulk("Si", "diamond", a=5.431), box, n_grains=2, radius=7.0, seed=3, rotation="in-plane"
    )
    cells = [
        random_dense_packing(box, density=DENSITY, min_distance=D_MIN, seed=1, fixed=fixed)
        for fixed in (None, grains)
    ]
    grid = PolarGrid.build(31, 1.0)
    q = grid.radii * Q_PIXEL
    band = (q > 0.25) & (q < 1.0)
    peaks = []
    for atoms in cells:
        sums = FEMSums.zeros((len(grid.radii), len(grid.angles)))
        sums.add(polar_transform(_simulate(atoms, POSITIONS), 32, 32, grid))
        peaks.append(np.nanmax(fem_variance(sums)[0][band]))
    assert peaks[1] > 1.25 * peaks[0]


def _distort(patterns, centre, ellipse):
    """Patterns as a detector with the elliptical distortion ``ellipse`` records them."""
    from scipy import ndimage

    x, y = np.meshgrid(*[np.arange(n) for n in patterns.shape[-2:]], indexing="ij")
    cx, cy = ellipse_correction(x, y, centre, *ellipse)
    return np.stack([ndimage.map_coordinates(p, [cx, cy], order=1) for p in patterns])


def test_cli_on_a_distorted_detector(scan, analysis, tmp_path, monkeypatch):
    import h5py
    from click.testing import CliRunner
    from pymatgen.core import Lattice, Structure

    from stemforge.infer.amorphous_commands import amorphous

    monkeypatch.setenv("STEMFORGE_CACHE", str(tmp_path / "cache"))
    cube, truth, _ = scan
    ellipse = (1.05, 1.0, math.radians(20))
    stack = _distort(np.asarray(cube.data).reshape(-1, N_PIXELS, N_PIXELS), (32, 32), ellipse)
    np.save(tmp_path / "scan.npy", stack.reshape(cube.shape))
    cif = tmp_path / "Si.cif"
    Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]).to(str(cif))
    out = tmp_path / "amorph.h5"
    args = [str(tmp_path / "scan.npy"), "--out", str(out), "--q-pixel-size", str(Q_PIXEL)]
    args += ["--origin", "32,32", "--ellipse", "1.05,1.0,20", "--memory-budget", "100KB"]
    args += ["--probe-radius", "2.2", "--candidate", str(cif)]
    result = CliRunner().invoke(amorphous, args)
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        crystalline = f["maps/crystalline"][...]
        assert f["profiles/radial_mean"].shape == (8, 4, len(analysis[1].q))
        halo = json.loads(f.attrs["halo"])
        table = f["d_spacings"][...]
        assert set(f["rpdf"]) >= {"r", "g", "reduced_structure"}
        assert np.all(np.isfinite(f["fem/amorphous_annular_mean"][5:25]))
    # With the ellipse undone, the distorted detector gives the undistorted results.
    assert np.array_equal(crystalline, ~truth)
    assert halo["q"] == pytest.approx(analysis[1].halo.q[0], abs=Q_PIXEL / 4)
    assert halo["d"] == pytest.approx(1 / halo["q"])
    # The crystal reflections: Si {111} and {220}. Correlation peaks of 2.2 px disks a few
    # disk radii from the direct beam sit up to 0.4 px off (the disk detector's bias, not
    # the table's), so |q - q_ref| is checked against half a detector pixel.
    indexed = {row["hkl"].decode(): row for row in table if row["candidate"]}
    assert {"{111}", "{220}"} <= set(indexed)
    for hkl in ("{111}", "{220}"):
        row = indexed[hkl]
        assert abs(1 / row["d"] - 1 / row["d_reference"]) <= Q_PIXEL / 2, table
    assert (tmp_path / "amorph_crystalline.png").exists()
    assert "amorphous halo" in result.output


def test_cli_refuses_an_uncalibrated_file(tmp_path):
    from click.testing import CliRunner

    from stemforge.infer.amorphous_commands import amorphous

    np.save(tmp_path / "x.npy", np.ones((2, 2, 16, 16), np.float32))
    result = CliRunner().invoke(amorphous, [str(tmp_path / "x.npy"), "-o", str(tmp_path / "a.h5")])
    assert result.exit_code != 0
    assert "--q-pixel-size" in str(result.exception)
    assert not (tmp_path / "a.h5").exists()
