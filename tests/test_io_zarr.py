""".zarr datacubes: stemforge's own stores, plain arrays (zarr v2 and v3 formats), selection."""

import numpy as np
import pytest
import zarr

from stemforge.core import Calibration, DataCube
from stemforge.core.errors import ConfigurationError, FileFormatError
from stemforge.datasets.io import read_datacube, write_calibration, write_datacube


def _cube() -> DataCube:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 4000, size=(5, 3, 10, 12)).astype(np.uint16)
    qx0 = 5.0 + rng.normal(0, 0.3, (5, 3))
    cal = Calibration(
        r_pixel_size=0.8,
        r_units="nm",
        q_pixel_size=0.21,
        q_units="mrad",
        energy=80e3,
        qx0=qx0,
        qy0=qx0 + 0.5,
        ellipse=(1.0, 0.97, 1.2),
        qr_rotation=0.05,
    )
    return DataCube(data, cal, metadata={"detector": "test", "numbers": np.arange(3)})


def test_round_trip_keeps_data_calibration_and_metadata(tmp_path):
    cube = _cube()
    path = write_datacube(cube, tmp_path / "cube.zarr")
    assert [p.name for p in tmp_path.iterdir()] == ["cube.zarr"]
    back = read_datacube(path)
    np.testing.assert_array_equal(back.data, cube.data)
    assert back.dtype == np.uint16 and back.name == "cube"
    assert back.calibration == cube.calibration
    np.testing.assert_array_equal(back.calibration.qx0, cube.calibration.qx0)
    np.testing.assert_array_equal(back.calibration.qy0, cube.calibration.qy0)
    assert back.metadata["detector"] == "test" and back.metadata["numbers"] == [0, 1, 2]


def test_scalar_origin_and_lazy_read(tmp_path):
    cube = DataCube(_cube().data, Calibration(qx0=4.5, qy0=5.5))
    path = write_datacube(cube, tmp_path / "cube.zarr")
    lazy = read_datacube(path, lazy=True)
    assert lazy.is_lazy and lazy.data.chunksize[2:] == (10, 12)
    np.testing.assert_array_equal(lazy.data.compute(), cube.data)
    assert lazy.calibration.qx0 == 4.5 and lazy.calibration.qy0 == 5.5


def test_overwrite_replaces_a_store_and_refuses_without_flag(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.zarr")
    with pytest.raises(ConfigurationError, match="overwrite"):
        write_datacube(DataCube(np.zeros((1, 1, 2, 2))), path)
    write_datacube(DataCube(np.ones((1, 2, 2, 2))), path, overwrite=True)
    assert read_datacube(path).shape == (1, 2, 2, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["cube.zarr"]


def test_sidecar_calibration_wins_over_the_stored_one(tmp_path):
    path = write_datacube(_cube(), tmp_path / "cube.zarr")
    new = Calibration(q_pixel_size=0.01, q_units="A^-1", energy=300e3)
    assert write_calibration(path, new) == tmp_path / "cube.zarr.calibration.json"
    cube = read_datacube(path)
    assert cube.calibration == new and cube.metadata["detector"] == "test"
    assert cube.metadata["calibration_source"].endswith("cube.zarr.calibration.json")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_arrays_in_both_store_formats(tmp_path, zarr_format):
    data = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    arr = zarr.open_array(
        str(tmp_path / "stack.zarr"),
        mode="w",
        shape=data.shape,
        dtype=data.dtype,
        zarr_format=zarr_format,
    )
    arr[...] = data
    cube = read_datacube(tmp_path / "stack.zarr", scan_shape=(2, 2))
    np.testing.assert_array_equal(cube.data, data.reshape(2, 2, 6, 6))
    assert cube.calibration == Calibration()


def test_group_selection_by_name(tmp_path):
    group = zarr.open_group(str(tmp_path / "many.zarr"), mode="w")
    for name, value in (("a", 1), ("b", 2)):
        group.create_array(name, shape=(2, 2, 3, 3), dtype="i4")[...] = value
    group.create_array("image", shape=(5, 5), dtype="f4")
    first = read_datacube(tmp_path / "many.zarr")
    assert first.data.max() == 1 and first.metadata["zarr_arrays"] == ["a", "b"]
    assert read_datacube(f"{tmp_path / 'many.zarr'}::b").data.max() == 2
    with pytest.raises(FileFormatError, match="no array 'c'"):
        read_datacube(f"{tmp_path / 'many.zarr'}::c")


def test_folder_that_is_not_a_store_is_a_format_error(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(FileFormatError, match="empty.zarr"):
        read_datacube(tmp_path / "empty.zarr")
