"""EMD 1.0 / py4DSTEM and Prismatic files: real files against h5py, round trips, calibration."""

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from stemforge.core import Calibration, DataCube
from stemforge.core.errors import FileFormatError, MissingFileError, ShapeError
from stemforge.datasets.io import read_datacube, write_calibration, write_datacube

DATA = Path(__file__).parent / "data" / "emd"


def test_py4dstem_file_matches_h5py_and_its_calibration():
    path = DATA / "py4DSTEM_size2x3x4x5.h5"
    cube = read_datacube(path)
    with h5py.File(path) as f:
        expected = f["datacube_root/datacube/data"][()]
    assert cube.shape == (2, 3, 4, 5) and cube.dtype == np.float32
    np.testing.assert_array_equal(cube.data, expected)
    cal = cube.calibration
    assert (cal.r_units, cal.q_units) == ("A", "A^-1")
    assert cal.r_pixel_size == pytest.approx(1.26796875)  # 0.126796875 nm in the file
    assert cal.q_pixel_size == pytest.approx(0.044251566616087125)
    assert cube.metadata["emd_path"] == "datacube_root/datacube"
    assert cube.metadata["py4dstem_calibration"]["R_pixel_units"] == "nm"


def test_calibration_written_by_py4dstem_is_read_in_full():
    """The file was saved by py4DSTEM 0.14.18 (see tests/data/README.md)."""
    cal = read_datacube(DATA / "py4dstem_0.14.18_calibrated.h5").calibration
    i = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(cal.qx0, 1.5 + 0.1 * i)
    np.testing.assert_allclose(cal.qy0, 2.5 - 0.05 * i)
    assert cal.r_pixel_size == pytest.approx(2.5) and cal.r_units == "A"
    assert cal.q_pixel_size == pytest.approx(0.02) and cal.q_units == "A^-1"
    assert cal.ellipse == pytest.approx((1.1, 1.0, 0.3))
    assert cal.qr_rotation == pytest.approx(math.radians(12.0)) and cal.qr_flip
    assert cal.convergence_semiangle == pytest.approx(2.5)


def test_prismatic_output_in_angstrom_with_simulation_parameters():
    path = DATA / "Si100_4D.emd"
    cube = read_datacube(path)
    group = "4DSTEM_simulation/data/datacubes/CBED_array_depth0000"
    with h5py.File(path) as f:
        np.testing.assert_array_equal(cube.data, f[f"{group}/datacube"][()])
        params = f["4DSTEM_simulation/metadata/metadata_0/original/simulation_parameters"].attrs
        step = float(params["rx"])
        cell = float(params["c"][0])
    assert cube.shape == (11, 11, 8, 8) and cube.dtype == np.float32
    cal = cube.calibration
    # values are Å and Å⁻¹ despite the "[n_m]" labels: the step is the probe step, 1/cell
    assert cal.r_pixel_size == pytest.approx(step) and cal.r_units == "A"
    assert cal.q_pixel_size == pytest.approx(1 / cell, rel=1e-5) and cal.q_units == "A^-1"
    assert cal.energy == pytest.approx(100e3) and cal.convergence_semiangle == pytest.approx(30.0)
    assert cal.mean_origin() == pytest.approx((4.0, 4.0))
    assert cube.metadata["emd_path"] == group and len(cube.metadata["datacubes_in_file"]) == 2
    second = read_datacube(f"{path}::CBED_array_depth0001")
    assert not np.array_equal(second.data, cube.data)


def _cube() -> DataCube:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**16, size=(4, 3, 7, 9), dtype=np.uint16)
    qx0 = 3.5 + rng.normal(0, 0.2, (4, 3))
    cal = Calibration(
        r_pixel_size=3.0,
        r_units="A",
        q_pixel_size=0.011,
        q_units="A^-1",
        energy=300e3,
        convergence_semiangle=1.2,
        qx0=qx0,
        qy0=qx0 + 1.0,
        ellipse=(1.04, 1.0, -0.7),
        qr_rotation=0.25,
        qr_flip=True,
    )
    return DataCube(data, cal, metadata={"sample": "Si"})


@pytest.mark.parametrize("suffix", [".h5", ".emd"])
def test_round_trip_and_py4dstem_layout(tmp_path, suffix):
    cube = _cube()
    path = write_datacube(cube, tmp_path / f"cube{suffix}")
    back = read_datacube(path)
    np.testing.assert_array_equal(back.data, cube.data)
    assert back.dtype == np.uint16 and back.calibration == cube.calibration
    np.testing.assert_array_equal(back.calibration.qx0, cube.calibration.qx0)
    np.testing.assert_array_equal(back.calibration.qy0, cube.calibration.qy0)
    assert back.metadata["sample"] == "Si"
    with h5py.File(path) as f:  # what py4DSTEM.read needs to find
        assert f.attrs["emd_group_type"] == "file" and f.attrs["version_major"] == 1
        assert f["datacube_root/datacube"].attrs["python_class"] == "DataCube"
        cal = f["datacube_root/metadatabundle/calibration"]
        assert cal.attrs["python_class"] == "Calibration"
        assert cal["QR_rotation_degrees"][()] == pytest.approx(math.degrees(0.25))
        assert cal["Q_pixel_units"][()] == b"A^-1" and cal["qx0"].shape == (4, 3)


def test_nanometre_units_round_trip_to_the_same_physical_sizes(tmp_path):
    cal = Calibration(r_pixel_size=0.3, r_units="nm", q_pixel_size=0.15, q_units="nm^-1")
    back = read_datacube(
        write_datacube(DataCube(np.ones((1, 1, 2, 2)), cal), tmp_path / "nm.h5")
    ).calibration
    assert back.r_pixel_size_angstrom == pytest.approx(3.0)
    assert back.q_pixel_size_inv_angstrom == pytest.approx(0.015)


def test_lazy_read_is_chunked_over_scan_positions(tmp_path):
    cube = _cube()
    path = write_datacube(cube, tmp_path / "cube.h5")
    lazy = read_datacube(path, lazy=True)
    assert lazy.is_lazy and lazy.data.chunksize[2:] == (7, 9)
    np.testing.assert_array_equal(lazy.data.compute(), cube.data)
    assert read_datacube(path, memory_budget=10).is_lazy


def test_write_calibration_edits_the_file_in_place(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.h5")
    (tmp_path / "cube.h5.calibration.json").write_text(Calibration().to_json())  # stale sidecar
    new = Calibration(
        q_pixel_size=0.5,
        q_units="mrad",
        energy=200e3,
        qx0=np.full((4, 3), 3.0),
        qy0=np.full((4, 3), 4.0),
    )
    assert write_calibration(path, new) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.h5"]
    back = read_datacube(path)
    assert back.calibration == new and back.metadata["calibration_source"] == "file"
    np.testing.assert_array_equal(back.data, _cube().data)
    with h5py.File(path) as f:  # the previous ellipse is gone, not left behind
        assert "a" not in f["datacube_root/metadatabundle/calibration"]


def test_write_calibration_into_a_py4dstem_file_keeps_its_data(tmp_path):
    path = tmp_path / "p4d.h5"
    path.write_bytes((DATA / "py4DSTEM_size2x3x4x5.h5").read_bytes())
    before = read_datacube(path).data
    new = Calibration(r_pixel_size=2.0, r_units="A", qx0=1.5, qy0=2.0)
    write_calibration(path, new)
    back = read_datacube(path)
    assert back.calibration == new
    np.testing.assert_array_equal(back.data, before)


def test_write_calibration_refuses_origins_of_another_scan(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.h5")
    with pytest.raises(ShapeError, match="scan shape"):
        write_calibration(path, Calibration(qx0=np.zeros((2, 2)), qy0=np.zeros((2, 2))))
    assert read_datacube(path).calibration == _cube().calibration


def test_truncated_and_foreign_hdf5_files(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.h5")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        read_datacube(path)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros((2, 2, 2, 2))
    with pytest.raises(FileFormatError, match="holds no datacube stemforge knows"):
        read_datacube(tmp_path / "other.h5")
    with pytest.raises(MissingFileError):
        read_datacube(tmp_path / "absent.h5")


def test_group_selection(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.h5")
    assert read_datacube(f"{path}::datacube_root/datacube").shape == (4, 3, 7, 9)
    assert read_datacube(f"{path}::datacube_root").shape == (4, 3, 7, 9)
    with pytest.raises(FileFormatError, match="no group 'nothing'"):
        read_datacube(f"{path}::nothing")


def test_invalid_stored_calibration_warns_and_a_sidecar_can_fix_it(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.h5")
    with h5py.File(path, "r+") as f:  # a failed origin fit leaves NaN
        f["datacube_root/metadatabundle/calibration/qx0"][0, 0] = np.nan
    with pytest.warns(UserWarning, match="invalid and was ignored"):
        cube = read_datacube(path)
    assert not cube.calibration.has_origin and cube.calibration.r_pixel_size == pytest.approx(3.0)
    assert "NaN" in cube.metadata["calibration_problem"]
    (tmp_path / "cube.h5.calibration.json").write_text(Calibration(energy=300e3).to_json())
    with pytest.warns(UserWarning):
        assert read_datacube(path).calibration == Calibration(energy=300e3)
