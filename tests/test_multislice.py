"""Multislice CBED: grids, the probe on the detector, resampling, and agreement with naive abTEM."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from stemforge.core.errors import ConfigurationError
from stemforge.core.units import electron_wavelength
from stemforge.simulate.multislice import (
    DetectorGrid,
    Rebinner,
    SimulationGrid,
    fft_friendly,
    oblique_rebin_operator,
    overlap_weights,
    plan_grid,
    reference_cbed,
    simulate_cbed,
)
from stemforge.simulate.orientation import apply_strain, orient
from stemforge.simulate.pattern import simulate_patterns

ENERGY = 300e3


@pytest.fixture(scope="module")
def si001():
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    return orient(si, (0, 0, 1)).atoms


@pytest.fixture(scope="module")
def si110():
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    return orient(si, (1, 1, 0)).atoms


def relative_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fft_friendly():
    assert [fft_friendly(n) for n in (1, 11, 13, 97, 121, 128)] == [1, 12, 14, 98, 125, 128]


def test_detector_options():
    assert DetectorGrid.from_options(128).q_pixel_size == pytest.approx(2.0 / 64)
    assert DetectorGrid.from_options(64, q_max=1.0).q_pixel_size == pytest.approx(1 / 32)
    assert DetectorGrid.from_options(64, q_pixel_size=0.02).origin == 32
    with pytest.raises(ConfigurationError, match="both"):
        DetectorGrid.from_options(64, q_max=1.0, q_pixel_size=0.02)
    with pytest.raises(ConfigurationError, match="positive"):
        DetectorGrid.from_options(64, q_pixel_size=-1.0)


def test_grid_plan_follows_detector_and_cutoff(si110):
    detector = DetectorGrid.from_options(128, q_max=2.0)
    grid = plan_grid(si110, detector, oversampling=2, min_cutoff=1.0)
    assert grid.antialias_cutoff >= detector.q_reach
    assert np.all(np.diag(grid.reciprocal_steps) <= detector.q_pixel_size / 2)
    assert all(fft_friendly(n) == n for n in grid.gpts)
    assert grid.slices_per_period == 4  # [110] of the conventional cell: 7.68 Å period, ~2 Å slices
    assert plan_grid(si110, detector, min_cutoff=6.0).antialias_cutoff >= 6.0


def test_overlap_weights_conserve_intensity():
    detector = DetectorGrid(32, 0.05)
    w = overlap_weights(0.0173, 200, detector)
    k = np.fft.fftfreq(200, 1 / 200) * 0.0173
    inside = np.abs(k) < 0.05 * 15
    np.testing.assert_allclose(w.sum(axis=0)[inside], 1.0, atol=1e-12)


def test_oblique_operator_matches_exact_rebinning_on_a_rectangular_grid():
    detector = DetectorGrid(32, 0.05)
    grid = SimulationGrid(np.diag([5.0, 6.0]), 4.0, (30, 36), (7, 6), 2)
    kx, ky = (
        np.fft.fftfreq(n, 1 / n) * step
        for n, step in zip(grid.gpts, np.diag(grid.reciprocal_steps), strict=True)
    )
    intensity = np.exp(-((kx[:, None] - 0.1) ** 2 + ky[None, :] ** 2) / 0.02) + np.exp(
        -(kx[:, None] ** 2) / 0.3
    )
    exact = Rebinner(grid, detector)(intensity)
    approx = (oblique_rebin_operator(grid, detector) @ intensity.ravel()).reshape(32, 32)
    # the same weights inside the cutoff (the operator leaves the rest out)
    ring = (
        np.hypot(*np.meshgrid(*(2 * [np.arange(32) - 16]), indexing="ij")) * 0.05
        < 0.8 * grid.antialias_cutoff
    )
    np.testing.assert_allclose(approx[ring], exact[ring], rtol=1e-5)


def test_vacuum_probe_on_the_detector(si001):
    detector = DetectorGrid.from_options(128, q_max=2.0)
    series = simulate_cbed(
        si001, energy=ENERGY, semiangle=2.0, detector=detector, thicknesses=[5.0]
    )
    probe = series.probe
    assert probe.sum() == pytest.approx(1.0, abs=1e-6)
    ix, iy = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    assert (probe * ix).sum() == pytest.approx(64, abs=1e-4)
    assert (probe * iy).sum() == pytest.approx(64, abs=1e-4)
    expected = 2.0e-3 / electron_wavelength(ENERGY) / detector.q_pixel_size  # 3.25 px
    interior = probe[np.hypot(ix - 64, iy - 64) < expected - 1.5].mean()
    assert np.sqrt(1 / (np.pi * interior)) == pytest.approx(expected, rel=0.005)
    # against the exact pixel-integrated disk (16× supersampled)
    fine = (np.arange(128 * 16) + 0.5) / 16 - 0.5 - 64
    disk = (
        (np.hypot(fine[:, None], fine[None, :]) <= expected)
        .reshape(128, 16, 128, 16)
        .sum(axis=(1, 3))
    )
    assert relative_l2(probe, disk / disk.sum()) < 0.04


@pytest.fixture(scope="module")
def naive_si001():
    """Si [001], 300 kV, 3 mrad, 4.9 nm, 64²: both engines at one k-sample per pixel, naive abTEM."""
    detector = DetectorGrid.from_options(64, q_max=1.0)
    periods = 9
    kwargs = dict(
        energy=ENERGY,
        semiangle=3.0,
        detector=detector,
        thicknesses=[periods * 5.431],
        oversampling=1,
        aperture_edge="amplitude",
    )
    atoms = orient(
        Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]), (0, 0, 1)
    ).atoms
    series = {engine: simulate_cbed(atoms, engine=engine, **kwargs) for engine in ("abtem", "fast")}
    reference = reference_cbed(
        atoms,
        energy=ENERGY,
        semiangle=3.0,
        detector=detector,
        periods=periods,
        tiling=series["fast"].grid.tiling,
    )
    return series, reference


@pytest.mark.parametrize("engine", ["abtem", "fast"])
def test_matches_naive_abtem_on_the_same_sampling(naive_si001, engine):
    """Coarse grid, ~2 Å slices, one period repeated vs abTEM at 0.05 Å, full supercell, 1 Å slices.

    Same box, so the same k-samples, and abTEM's aperture edge: what differs is the physics.
    """
    series, reference = naive_si001
    result = series[engine]
    assert result.engine == engine
    assert result.grid.tiling == (6, 6)
    assert relative_l2(result.patterns[0], reference) <= 0.03
    assert result.patterns[0].sum() == pytest.approx(reference.sum(), abs=0.005)


def test_engines_agree(naive_si001):
    series, _ = naive_si001
    assert relative_l2(series["abtem"].patterns, series["fast"].patterns) <= 0.03


def test_abtem_thickness_series_from_one_pass_equals_single_runs(si110):
    detector = DetectorGrid.from_options(64, q_max=1.5)
    kwargs = dict(energy=ENERGY, semiangle=2.0, detector=detector, oversampling=1, engine="abtem")
    series = simulate_cbed(si110, thicknesses=[40.0, 11.0, 25.0], **kwargs)
    single = simulate_cbed(si110, thicknesses=[25.0], **kwargs)
    assert series.engine == "abtem"
    np.testing.assert_allclose(series.thicknesses, [40.32, 11.52, 24.96], atol=0.01)
    assert relative_l2(series.patterns[2], single.patterns[0]) <= 1e-4
    assert not np.allclose(series.patterns[0], series.patterns[1])


def test_abtem_frozen_phonons_are_seeded(si110):
    detector = DetectorGrid.from_options(64, q_max=1.5)
    kwargs = dict(
        energy=ENERGY,
        semiangle=2.0,
        detector=detector,
        thicknesses=[30.0],
        oversampling=1,
        phonons=2,
        engine="abtem",
    )
    a = simulate_cbed(si110, seed=1, **kwargs).patterns
    np.testing.assert_array_equal(a, simulate_cbed(si110, seed=1, **kwargs).patterns)
    b = simulate_cbed(si110, seed=2, **kwargs).patterns
    static = simulate_cbed(si110, **{**kwargs, "phonons": 0}).patterns
    fast = simulate_cbed(si110, seed=1, **{**kwargs, "engine": "fast"}).patterns
    assert 0 < relative_l2(a, b) < 0.05
    assert 1e-3 < relative_l2(a, static) < 0.3
    assert relative_l2(a, fast) < 0.03


def test_abtem_engine_falls_back_to_fast_for_sheared_cells():
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    kwargs = dict(thicknesses=[20.0], n_pixels=64, q_max=1.5, oversampling=1)
    sheared = simulate_patterns(si, (0, 0, 1), strain=[[0.0, 0.01], [0.01, 0.0]], **kwargs)
    plain = simulate_patterns(si, (0, 0, 1), **kwargs)
    assert sheared[0].metadata["engine"] == "fast"
    assert plain[0].metadata["engine"] == "abtem"
    assert sheared[0].cbed.sum() == pytest.approx(plain[0].cbed.sum(), abs=0.01)


def test_thickness_series_from_one_pass_equals_single_runs(si110):
    detector = DetectorGrid.from_options(64, q_max=1.5)
    kwargs = dict(energy=ENERGY, semiangle=2.0, detector=detector, oversampling=1, engine="fast")
    series = simulate_cbed(si110, thicknesses=[40.0, 11.0, 25.0], **kwargs)
    single = simulate_cbed(si110, thicknesses=[25.0], **kwargs)
    np.testing.assert_allclose(
        series.thicknesses, [40.32, 11.52, 24.96], atol=0.01
    )  # whole 1.92 Å slices
    np.testing.assert_array_equal(series.patterns[2], single.patterns[0])
    assert not np.allclose(series.patterns[0], series.patterns[1])
    assert np.all(series.patterns.sum(axis=(1, 2)) <= 1.0)


def test_frozen_phonons_are_seeded(si110):
    detector = DetectorGrid.from_options(64, q_max=1.5)
    kwargs = dict(
        energy=ENERGY,
        semiangle=2.0,
        detector=detector,
        thicknesses=[30.0],
        oversampling=1,
        phonons=2,
        engine="fast",
    )
    a = simulate_cbed(si110, seed=1, **kwargs).patterns
    np.testing.assert_array_equal(a, simulate_cbed(si110, seed=1, **kwargs).patterns)
    b = simulate_cbed(si110, seed=2, **kwargs).patterns
    static = simulate_cbed(si110, **{**kwargs, "phonons": 0}).patterns
    assert 0 < relative_l2(a, b) < relative_l2(a, static) * 2
    assert 1e-3 < relative_l2(a, static) < 0.3


def test_strained_oblique_cell_conserves_intensity(si001):
    detector = DetectorGrid.from_options(64, q_max=1.5)
    kwargs = dict(
        energy=ENERGY, semiangle=2.0, detector=detector, thicknesses=[20.0], oversampling=1
    )
    sheared = apply_strain(si001, [[0.01, 0.01, 0], [0.01, 0, 0], [0, 0, 0]])
    a = simulate_cbed(sheared, **kwargs)
    b = simulate_cbed(si001, **kwargs)
    assert not a.grid.is_rectangular
    assert (a.engine, b.engine) == ("fast", "abtem")
    assert a.patterns.sum() == pytest.approx(b.patterns.sum(), abs=0.01)
    assert a.probe.sum() == pytest.approx(1.0, abs=1e-6)


def test_bad_options_are_refused(si001):
    detector = DetectorGrid.from_options(64, q_max=1.0)
    with pytest.raises(ConfigurationError, match="thicknesses"):
        simulate_cbed(si001, energy=ENERGY, semiangle=2.0, detector=detector, thicknesses=[-1.0])
    with pytest.raises(ConfigurationError, match="unknown aberration"):
        simulate_cbed(
            si001,
            energy=ENERGY,
            semiangle=2.0,
            detector=detector,
            thicknesses=[5.0],
            aberrations={"C99": 1},
        )
    with pytest.raises(ConfigurationError, match="device"):
        simulate_cbed(
            si001, energy=ENERGY, semiangle=2.0, detector=detector, thicknesses=[5.0], device="tpu"
        )
    with pytest.raises(ConfigurationError, match="engine"):
        simulate_cbed(
            si001, energy=ENERGY, semiangle=2.0, detector=detector, thicknesses=[5.0], engine="x"
        )


@pytest.mark.slow
@pytest.mark.parametrize(("uvw", "semiangle", "periods"), [("si110", 10.0, 26), ("si001", 2.0, 74)])
def test_matches_naive_abtem_bigger(request, uvw, semiangle, periods):
    """Si [110] 10 mrad 10 nm and Si [001] 2 mrad 40 nm, 128² (each reference takes minutes)."""
    atoms = request.getfixturevalue(uvw)
    detector = DetectorGrid.from_options(128, q_max=2.0)
    thickness = periods * atoms.cell[2, 2]
    fast = simulate_cbed(
        atoms,
        energy=ENERGY,
        semiangle=semiangle,
        detector=detector,
        thicknesses=[thickness],
        oversampling=1,
        aperture_edge="amplitude",
        engine="fast",
    )
    reference = reference_cbed(
        atoms,
        energy=ENERGY,
        semiangle=semiangle,
        detector=detector,
        periods=periods,
        tiling=fast.grid.tiling,
    )
    assert relative_l2(fast.patterns[0], reference) <= 0.03


def test_abtem_engine_handles_a_one_slice_period():
    """bcc Fe [001] repeats every 2.87 Å, one ~2 Å slice: abTEM 1.0.11 miscounted its exit
    planes (IndexError) until the unit was doubled along the beam."""
    fe = Structure(Lattice.cubic(2.8665), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    kwargs = dict(thicknesses=[20.0, 40.0], semiangle=2.0, n_pixels=32, q_pixel_size=0.08)
    abtem_samples = simulate_patterns(fe, (0, 0, 1), engine="abtem", **kwargs)
    fast_samples = simulate_patterns(fe, (0, 0, 1), engine="fast", **kwargs)
    for a, f in zip(abtem_samples, fast_samples, strict=True):
        assert a.metadata["engine"] == "abtem" and a.metadata["thickness"] == f.metadata["thickness"]
        assert np.linalg.norm(a.cbed - f.cbed) / np.linalg.norm(f.cbed) < 0.03
