"""abTEM ``to_zarr`` output, generated here by a tiny abTEM scan (a few seconds, mostly import)."""

import json

import numpy as np
import pytest
import zarr

from stemforge.core.errors import FileFormatError
from stemforge.datasets.io import read_datacube


@pytest.fixture(scope="module")
def abtem_files(tmp_path_factory):
    abtem = pytest.importorskip("abtem")
    import ase.build

    abtem.config.set({"diagnostics.progress_bar": False, "fft": "numpy"})
    atoms = ase.build.bulk("Si", "diamond", a=5.43, cubic=True)
    potential = abtem.Potential(atoms, gpts=(24, 24), projection="infinite", slice_thickness=5.43)
    probe = abtem.Probe(energy=100e3, semiangle_cutoff=20)
    scan = abtem.GridScan(start=(0, 0), end=(2.0, 1.5), gpts=(3, 2), potential=potential)
    patterns = probe.scan(
        potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=30)
    ).compute()
    images = patterns.integrate_radial(10, 30)  # a dark-field image: abTEM Images
    folder = tmp_path_factory.mktemp("abtem")
    patterns.to_zarr(str(folder / "patterns.zarr"))
    images.to_zarr(str(folder / "images.zarr"))
    return folder, patterns, scan


def test_diffraction_patterns_open_with_abtem_calibration(abtem_files):
    folder, patterns, scan = abtem_files
    for lazy in (False, True):
        cube = read_datacube(folder / "patterns.zarr", lazy=lazy)
        assert cube.shape == patterns.shape and cube.dtype == np.float32
        np.testing.assert_array_equal(cube.compute().data, patterns.array)
    cal = cube.calibration
    assert (cal.r_units, cal.q_units) == ("A", "A^-1")
    assert cal.r_pixel_size == pytest.approx(scan.sampling[0])
    assert cal.q_pixel_size == pytest.approx(patterns.sampling[0])
    assert cal.energy == 100e3 and cal.convergence_semiangle == 20
    # abTEM puts zero frequency at index n // 2 of an fftshifted pattern
    assert cal.mean_origin() == pytest.approx((patterns.shape[2] // 2, patterns.shape[3] // 2))
    assert cube.metadata["abtem_type"] == "DiffractionPatterns"


def test_images_are_not_a_datacube(abtem_files):
    folder, _, _ = abtem_files
    with pytest.raises(FileFormatError, match="abTEM Images"):
        read_datacube(folder / "images.zarr")


def test_extra_ensemble_axes_take_their_first_entry(abtem_files, tmp_path):
    """A thickness series (an extra leading axis) reads as its first thickness, and says so."""
    folder, patterns, _ = abtem_files
    meta = json.loads(
        json.dumps(dict(zarr.open_group(str(folder / "patterns.zarr"), mode="r").attrs))
    )["metadata0"]
    meta["axes"] = {
        f"axis_{i + 1}": axis for i, (_, axis) in enumerate(sorted(meta["axes"].items()))
    }
    meta["axes"]["axis_0"] = {"label": "z", "units": "Å", "type": "ThicknessAxis"}
    series = np.stack([patterns.array, 2 * patterns.array])
    group = zarr.open_group(str(tmp_path / "series.zarr"), mode="w")
    group.attrs["metadata0"] = meta
    group.create_array("array0", shape=series.shape, dtype=series.dtype)[...] = series
    cube = read_datacube(tmp_path / "series.zarr")
    np.testing.assert_array_equal(cube.data, patterns.array)
    assert cube.metadata["abtem_selected"] == {"axis_0 (z)": 0}
