"""DataCube and Calibration: validation, views, serialisation, chunked access."""

import json
import math

import numpy as np
import pytest

from stemforge.core import Calibration, DataCube
from stemforge.core.atomic import atomic_output
from stemforge.core.errors import (
    CalibrationError,
    ConfigurationError,
    InvalidDataError,
    ShapeError,
    StemforgeError,
)


def test_error_message_names_problem_and_fix():
    err = ShapeError("bad shape (3,)", "reshape it")
    assert str(err) == "bad shape (3,). Fix: reshape it"
    assert isinstance(err, ValueError) and isinstance(err, StemforgeError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q_pixel_size": -0.01, "q_units": "A^-1"},
        {"r_pixel_size": 0.0, "r_units": "A"},
        {"energy": -300e3},
        {"q_pixel_size": float("nan")},
        {"qx0": 1.0},
        {"ellipse": (1.0, -1.0, 0.0)},
        {"q_units": "parsecs"},
    ],
)
def test_impossible_calibration_is_rejected(kwargs):
    with pytest.raises(CalibrationError):
        Calibration(**kwargs)


def test_calibration_unit_views():
    cal = Calibration(q_pixel_size=0.25, q_units="mrad", energy=300e3, r_pixel_size=0.5, r_units="nm")
    assert cal.r_pixel_size_angstrom == pytest.approx(5.0)
    assert cal.q_pixel_size_inv_angstrom == pytest.approx(0.25e-3 / 0.0196875, rel=1e-4)
    assert cal.q_pixel_size_mrad == pytest.approx(0.25)
    assert "mrad" in cal.summary()["Q pixel size"]


def test_calibration_json_round_trip_keeps_origin_arrays():
    qx0 = np.arange(6.0).reshape(2, 3) + 30.25
    cal = Calibration(
        q_pixel_size=0.02, q_units="A^-1", energy=200e3, qx0=qx0, qy0=qx0 + 1, ellipse=(1.02, 1.0, 0.3)
    )
    back = Calibration.from_json(cal.to_json())
    assert back == cal
    np.testing.assert_array_equal(back.qx0, qx0)
    np.testing.assert_array_equal(back.qy0, qx0 + 1)
    assert back.mean_origin() == pytest.approx((qx0.mean(), qx0.mean() + 1))
    with pytest.raises(CalibrationError, match="unknown calibration fields"):
        Calibration.from_dict({**json.loads(cal.to_json()), "q_pixle_size": 1})


def test_datacube_shapes_and_stack():
    stack = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
    cube = DataCube.from_stack(stack, (2, 3))
    assert cube.shape == (2, 3, 4, 5) and cube.scan_shape == (2, 3) and cube.detector_shape == (4, 5)
    np.testing.assert_array_equal(cube.data[1, 2], stack[5])  # C order: ry runs fastest
    assert DataCube.from_stack(stack).scan_shape == (6, 1)
    with pytest.raises(ShapeError, match="does not hold 6 patterns"):
        DataCube.from_stack(stack, (4, 2))
    with pytest.raises(ShapeError, match="4D"):
        DataCube(stack)
    with pytest.raises(ShapeError, match="origin"):
        DataCube(np.zeros((2, 3, 4, 5)), Calibration(qx0=np.zeros((3, 2)), qy0=np.zeros((3, 2))))


def test_iter_blocks_covers_scan_and_names_bad_frames():
    data = np.random.default_rng(0).random((7, 3, 8, 8)).astype(np.float32)
    cube = DataCube(data)
    blocks = list(cube.iter_blocks(max_bytes=2 * 3 * 8 * 8 * 4))
    assert [b.shape[0] for _, b in blocks] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), data)
    data[5, 1, 2, 2] = np.nan
    with pytest.raises(InvalidDataError, match=r"rx=5, ry=1"):
        list(cube.iter_blocks(max_bytes=2 * 3 * 8 * 8 * 4))


def test_lazy_datacube_streams_and_computes():
    da = pytest.importorskip("dask.array")
    data = np.random.default_rng(1).random((4, 3, 6, 6))
    cube = DataCube(da.from_array(data, chunks=(1, 3, 6, 6)))
    assert cube.is_lazy and not cube.compute().is_lazy
    np.testing.assert_array_equal(np.concatenate([b for _, b in cube.iter_blocks(6 * 6 * 3 * 4)]), data)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        np.save(tmp, np.zeros(3))
        raise RuntimeError("writer crashed half-way")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        np.save(tmp, np.ones(3))
    np.testing.assert_array_equal(np.load(target), np.ones(3))
    with pytest.raises(ConfigurationError, match="already exists"), atomic_output(target, overwrite=False):
        pass
    assert math.isclose(np.load(target).sum(), 3.0)
