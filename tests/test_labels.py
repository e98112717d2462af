"""Labels: Bragg positions against the reciprocal lattice, strain, extinctions, target, samples."""

import json
import pickle

import numpy as np
import pytest
from abtem.parametrizations import validate_parametrization
from pymatgen.core import Lattice, Structure

from stemforge.core.units import electron_wavelength
from stemforge.simulate.labels import KinematicLabels, render_target
from stemforge.simulate.multislice import DetectorGrid
from stemforge.simulate.orientation import apply_strain, conventional_standard_structure, orient
from stemforge.simulate.pattern import simulate_patterns
from stemforge.simulate.sample import METADATA_KEYS, PEAK_DTYPE

LOBATO = validate_parametrization("lobato")
DETECTOR = DetectorGrid.from_options(128, q_max=2.0)


def cubic(symbol, group, a, sites=((0, 0, 0),)):
    return Structure.from_spacegroup(group, Lattice.cubic(a), [symbol] * len(sites), list(sites))


@pytest.fixture(scope="module")
def si():
    return cubic("Si", "Fd-3m", 5.431)


@pytest.fixture(scope="module")
def gan():
    return Structure.from_spacegroup(
        "P6_3mc",
        Lattice.hexagonal(3.189, 5.185),
        ["Ga", "N"],
        [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]],
    )


def labels_of(structure, uvw, strain=None, **kwargs):
    cell = orient(structure, uvw, **kwargs)
    atoms = cell.atoms if strain is None else apply_strain(cell.atoms, strain)
    return cell, KinematicLabels(atoms, cell.supercell, DETECTOR, LOBATO)


def expected_pixels(structure, cell, hkl, strain=None):
    """g from the conventional reciprocal lattice, rotated to the lab, strained: independent of the cell."""
    lattice = conventional_standard_structure(structure).lattice.matrix
    g = (np.asarray(hkl) @ np.linalg.inv(lattice).T) @ cell.rotation.T
    if strain is not None:
        g = g @ np.linalg.inv(np.eye(3) + np.asarray(strain))
    return g[:, :2] / DETECTOR.q_pixel_size + DETECTOR.origin


@pytest.mark.parametrize(
    ("name", "uvw", "strain"),
    [
        ("si", (0, 0, 1), None),
        ("si", (1, 1, 0), None),
        ("si", (1, 1, 1), None),
        ("gan", (0, 0, 1), None),
        ("si", (0, 0, 1), [[0.012, 0.004, 0], [0.004, -0.007, 0], [0, 0, 0.003]]),
        (
            "si",
            (1, 1, 0),
            [[-0.02, 0.01, 0], [0.0, 0.015, 0], [0, 0, 0]],
        ),  # with an in-plane rotation
        ("gan", (1, 0, 0), [[0.01, 0, 0], [0, 0.01, 0], [0, 0, 0.01]]),
    ],
)
def test_spots_on_the_reciprocal_lattice(request, name, uvw, strain):
    structure = request.getfixturevalue(name)
    cell, labels = labels_of(structure, uvw, strain)
    table = labels.table(np.zeros((128, 128)), 3.0)
    assert len(table) > 8
    found = np.stack([table["qx"], table["qy"]], axis=1)
    hkl = np.stack([table["h"], table["k"], table["l"]], axis=1)
    assert np.all(hkl @ np.asarray(cell.zone_axis) == 0)  # Weiss zone law
    assert np.abs(found - expected_pixels(structure, cell, hkl, strain)).max() < 0.05


def test_one_percent_strain_moves_400_by_one_percent(si):
    _, plain = labels_of(si, (0, 0, 1))
    _, strained = labels_of(si, (0, 0, 1), strain=np.diag([0.01, 0.0, 0.0]))

    def distance(labels):
        table = labels.table(np.zeros((128, 128)), 3.0)
        row = table[(table["h"] == 4) & (table["k"] == 0) & (table["l"] == 0)][0]
        return np.hypot(row["qx"] - 64, row["qy"] - 64)

    assert distance(strained) / distance(plain) == pytest.approx(1 / 1.01, abs=1e-6)


def indices(labels):
    return {tuple(int(v) for v in row) for row in labels.hkl}


def test_extinction_rules(si):
    _, diamond = labels_of(si, (0, 0, 1))
    assert {(2, 2, 0), (4, 0, 0), (0, 0, 0)} <= indices(diamond)
    assert not {(1, 0, 0), (2, 0, 0), (1, 1, 0), (4, 2, 0)} & indices(
        diamond
    )  # (420): h+k+l = 4n+2
    _, diamond110 = labels_of(si, (1, 1, 0))
    assert {(1, -1, 1), (0, 0, 4), (2, -2, 0), (1, -1, 3)} <= indices(diamond110)
    assert not {(0, 0, 2), (0, 0, 1), (1, -1, 0), (2, -2, 2)} & indices(diamond110)
    _, fcc = labels_of(cubic("Cu", "Fm-3m", 3.615), (0, 0, 1))  # h, k, l all even or all odd
    assert {(2, 0, 0), (2, 2, 0)} <= indices(fcc) and not {
        (1, 0, 0),
        (1, 1, 0),
        (2, 1, 0),
    } & indices(fcc)
    _, bcc = labels_of(cubic("Fe", "Im-3m", 2.8665), (0, 0, 1))  # h + k + l even
    assert {(1, 1, 0), (2, 0, 0)} <= indices(bcc) and not {(1, 0, 0), (2, 1, 0)} & indices(bcc)


def test_structure_factors_are_intrinsic(si):
    """|V_g| in volts does not depend on the cell that was simulated."""
    values = {}
    for uvw in [(0, 0, 1), (1, 1, 0), (1, 1, 1)]:
        _, labels = labels_of(si, uvw)
        for hkl, v in zip(labels.hkl, labels.amplitudes, strict=True):
            values.setdefault(tuple(sorted(np.abs(hkl))), []).append(v)
    for family in [(0, 0, 0), (0, 2, 2)]:
        assert np.ptp(values[family]) < 1e-9 * max(values[family])
    assert values[(0, 0, 0)][0] == pytest.approx(
        13.95, abs=0.05
    )  # Si mean inner potential (Lobato)
    assert values[(0, 2, 2)][0] > values[(0, 0, 4)][0]


def test_target_peaks_have_height_and_position():
    image = render_target(np.array([[20.3, 40.7], [100.0, 64.0]]), np.array([2.0, 5.0]), 128)
    assert image[100, 64] == pytest.approx(5.0)
    window = image[15:26, 35:47]
    ix, iy = np.meshgrid(np.arange(15, 26), np.arange(35, 47), indexing="ij")
    assert (window * ix).sum() / window.sum() == pytest.approx(20.3, abs=1e-3)
    assert (window * iy).sum() / window.sum() == pytest.approx(40.7, abs=1e-3)
    assert window.max() == pytest.approx(2.0, rel=0.2)


@pytest.fixture(scope="module")
def thin_si(si):
    return simulate_patterns(
        si, (0, 0, 1), thicknesses=[20.0, 200.0], n_pixels=128, q_max=2.0, semiangle=2.0
    )


def test_disk_centroids_land_on_table(thin_si):
    """Bright disks of a thin crystal centre on the table's positions.

    Tolerance: a disk's intensity varies as sinc²(π s t) with the excitation error
    s(K) = λ (g²/2 + K·g); to lowest order its relative slope across the disk is
    (π t)² λ² g³ / 3, which shifts the centroid of a disk of radius R by slope·R²/4;
    plus 0.01 px for the pixel grid.
    """
    sample = thin_si[0]
    table, radius = sample.peaks, sample.metadata["disk_radius"]
    wavelength = electron_wavelength(sample.metadata["energy"])
    ix, iy = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    for row in table[np.argsort(-table["intensity_dynamical"])[:9]]:
        mask = np.hypot(ix - row["qx"], iy - row["qy"]) <= radius + 1.5
        w = sample.cbed * mask
        centroid = np.array([(w * ix).sum(), (w * iy).sum()]) / w.sum()
        g = np.hypot(row["qx"] - 64, row["qy"] - 64) * sample.metadata["q_pixel_size"]
        t = sample.metadata["thickness"]
        slope = (np.pi * t) ** 2 * wavelength**2 * g**3 / 3 * sample.metadata["q_pixel_size"]
        tolerance = slope * radius**2 / 4 + 0.01
        assert np.hypot(*(centroid - [row["qx"], row["qy"]])) <= tolerance


def test_samples_are_complete_and_deterministic(si, thin_si):
    thin, thick = thin_si
    assert set(METADATA_KEYS) <= thin.metadata.keys()
    json.dumps(thin.metadata)
    assert thin.metadata["space_group"] == 227 and thin.metadata["crystal_system"] == "cubic"
    assert thin.metadata["thickness"] == pytest.approx(11 * 5.431 / 3)
    assert thick.metadata["thickness"] == pytest.approx(110 * 5.431 / 3)  # whole 1.81 Å slices
    for sample in (thin, thick):
        assert sample.cbed.shape == sample.probe.shape == sample.target.shape == (128, 128)
        assert sample.cbed.dtype == sample.probe.dtype == sample.target.dtype == np.float32
        assert sample.peaks.dtype == PEAK_DTYPE
        assert 0.98 < sample.cbed.sum() <= 1.0
        assert sample.probe.sum() == pytest.approx(1.0, abs=1e-6)
    # the dynamical intensities account for the pattern's intensity (isolated 2 mrad disks)
    assert thin.peaks["intensity_dynamical"].sum() == pytest.approx(thin.cbed.sum(), rel=0.01)
    assert thin.peaks[0]["intensity_dynamical"] > thick.peaks[0]["intensity_dynamical"]
    assert pickle.loads(pickle.dumps(simulate_patterns)) is simulate_patterns  # dask-shippable
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(thick)).peaks, thick.peaks)
    again = simulate_patterns(
        si, (0, 0, 1), thicknesses=[20.0, 200.0], n_pixels=128, q_max=2.0, semiangle=2.0
    )
    np.testing.assert_array_equal(again[1].cbed, thick.cbed)
    np.testing.assert_array_equal(again[1].peaks, thick.peaks)


def test_records_and_strain_metadata(si):
    record = {"structure": si, "structure_id": "mp-149"}
    strain = [[0.01, 0], [0, 0]]
    (sample,) = simulate_patterns(
        record,
        (0, 0, 1),
        thicknesses=[10.0],
        n_pixels=64,
        q_max=1.5,
        strain=strain,
        mistilt=(1.0, 0.0),
    )
    assert sample.metadata["structure_id"] == "mp-149"
    assert sample.metadata["strain"] == [[0.01, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert sample.metadata["mistilt"] == (1.0, 0.0)
