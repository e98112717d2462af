""".npy datacubes: round trips, stacks, lazy memory maps, truncated and bad files."""

import numpy as np
import pytest

from stemforge.core import Calibration, DataCube
from stemforge.core.errors import ConfigurationError, FileFormatError, ShapeError
from stemforge.datasets.io import read_calibration_sidecar, read_datacube, write_datacube


def _calibrated_cube() -> DataCube:
    rng = np.random.default_rng(1)
    data = rng.poisson(5.0, size=(3, 4, 8, 6)).astype(np.float32)
    qx0 = 4.0 + rng.normal(0, 0.2, (3, 4))
    cal = Calibration(
        r_pixel_size=2.5,
        r_units="A",
        q_pixel_size=0.015,
        q_units="A^-1",
        energy=200e3,
        convergence_semiangle=1.8,
        qx0=qx0,
        qy0=qx0 - 1.0,
        ellipse=(1.03, 1.0, 0.4),
        qr_rotation=-0.1,
        qr_flip=True,
    )
    return DataCube(data, cal)


def test_round_trip_keeps_data_and_calibration_in_a_sidecar(tmp_path):
    cube = _calibrated_cube()
    path = write_datacube(cube, tmp_path / "cube.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.npy", "cube.npy.calibration.json"]
    back = read_datacube(path)
    np.testing.assert_array_equal(back.data, cube.data)
    assert back.dtype == cube.dtype and back.name == "cube" and back.source == path
    assert back.calibration == cube.calibration
    np.testing.assert_array_equal(back.calibration.qx0, cube.calibration.qx0)
    np.testing.assert_array_equal(back.calibration.qy0, cube.calibration.qy0)
    assert read_calibration_sidecar(path) == cube.calibration


def test_uncalibrated_write_leaves_no_sidecar_and_removes_a_stale_one(tmp_path):
    path = write_datacube(_calibrated_cube(), tmp_path / "cube.npy")
    write_datacube(DataCube(np.zeros((2, 2, 3, 3))), path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["cube.npy"]
    assert read_datacube(path).calibration == Calibration()


def test_stack_becomes_a_scan_column_or_the_given_scan(tmp_path):
    stack = np.arange(6 * 5 * 4, dtype=np.uint16).reshape(6, 5, 4)
    np.save(tmp_path / "stack.npy", stack)
    assert read_datacube(tmp_path / "stack.npy").shape == (6, 1, 5, 4)
    cube = read_datacube(tmp_path / "stack.npy", scan_shape=(2, 3))
    np.testing.assert_array_equal(cube.data[1, 2], stack[5])  # ry runs fastest
    with pytest.raises(ShapeError, match="6 patterns"):
        read_datacube(tmp_path / "stack.npy", scan_shape=(4, 2))


def test_lazy_is_a_memory_map_chunked_over_scan_positions(tmp_path):
    data = np.random.default_rng(0).random((7, 5, 16, 16)).astype(np.float32)
    np.save(tmp_path / "big.npy", data)
    cube = read_datacube(tmp_path / "big.npy", memory_budget=1000)  # over budget → lazy
    assert cube.is_lazy
    assert cube.data.chunksize[2:] == (16, 16)
    np.testing.assert_array_equal(cube.data.compute(), data)
    assert not read_datacube(tmp_path / "big.npy").is_lazy
    small_chunks = read_datacube(tmp_path / "big.npy", lazy=True)
    assert small_chunks.is_lazy and small_chunks.data.chunks[2:] == ((16,), (16,))


def test_truncated_npy_is_reported_as_truncated(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.ones((4, 4, 8, 8), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    for lazy in (False, True):
        with pytest.raises(FileFormatError, match=r"cut\.npy is truncated"):
            read_datacube(path, lazy=lazy)
    path.write_bytes(raw[:40])  # cut inside the header
    with pytest.raises(FileFormatError, match="corrupt or truncated"):
        read_datacube(path)


def test_wrong_dimensions_and_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "image.npy", np.zeros((8, 8)))
    with pytest.raises(ShapeError, match="2D"):
        read_datacube(tmp_path / "image.npy")
    np.save(tmp_path / "objects.npy", np.array([[[None]]], dtype=object), allow_pickle=True)
    with pytest.raises(FileFormatError, match="Python objects"):
        read_datacube(tmp_path / "objects.npy")


def test_existing_file_is_kept_without_overwrite(tmp_path):
    path = tmp_path / "cube.npy"
    np.save(path, np.ones((1, 1, 2, 2)))
    with pytest.raises(ConfigurationError, match="overwrite"):
        write_datacube(DataCube(np.zeros((1, 1, 2, 2))), path)
    np.testing.assert_array_equal(np.load(path), np.ones((1, 1, 2, 2)))


def test_failed_write_leaves_nothing_behind(tmp_path):
    class Exploding:
        shape, dtype, ndim = (2, 2, 3, 3), np.dtype(np.float32), 4

        def __getitem__(self, key):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_datacube(DataCube(Exploding()), tmp_path / "cube.npy")
    assert list(tmp_path.iterdir()) == []


def test_lazy_reads_match_numpy_for_any_slice(tmp_path):
    """Contiguous slices are read with one readinto, others through a memory map: both exact."""
    from stemforge.datasets.io.lazy import NpySource, contiguous_selection
    from stemforge.datasets.io.npy import read_npy_header

    a = np.arange(4 * 3 * 5 * 6, dtype=">u2").reshape(4, 3, 5, 6)  # big-endian on purpose
    np.save(tmp_path / "a.npy", a)
    shape, dtype, _, offset = read_npy_header(tmp_path / "a.npy")
    source = NpySource(tmp_path / "a.npy", shape, dtype, offset)
    rng = np.random.default_rng(0)
    contiguous = 0
    for _ in range(500):
        key = []
        for axis in range(rng.integers(1, 5)):
            start = rng.integers(0, shape[axis] + 1)
            key.append(slice(start, rng.integers(start, shape[axis] + 1), rng.choice([None, 1, 2])))
        key = tuple(key)
        got = source[key]
        assert got.dtype == a.dtype
        np.testing.assert_array_equal(got, a[key])
        contiguous += contiguous_selection(key, shape) is not None
    assert 100 < contiguous < 400  # both paths exercised
    assert contiguous_selection((slice(None), slice(1, 3)), shape) is None
    assert contiguous_selection((slice(2, 3), slice(1, 3)), shape) == (2 * 90 + 30, (1, 2, 5, 6))
