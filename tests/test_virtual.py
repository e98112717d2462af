"""Virtual imaging equals explicit NumPy sums; detectors follow the origin when asked."""

import numpy as np
import pytest

from stemforge.core import Calibration, DataCube
from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.detectors import Detector, parse_detector
from stemforge.infer.virtual import (
    bright_field_radius,
    default_origin,
    estimate_bright_field,
    sample_patterns,
    virtual_diffraction,
    virtual_from_specs,
    virtual_images,
)

RNG = np.random.default_rng(7)
SHAPE = (5, 4, 24, 20)


@pytest.fixture(scope="module")
def data():
    return RNG.poisson(50.0, SHAPE).astype(np.uint16)


def disk_mask(shape, cx, cy, r0, r1):
    qx, qy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(qx - cx, qy - cy)
    return (r >= r0) & (r < r1)


def test_fixed_detectors_equal_explicit_sums(data):
    cube = DataCube(data)
    dets = [parse_detector("bf:4"), parse_detector("annulus:5,9"), parse_detector("circle:3,-2,2.5")]
    images = virtual_images(cube, dets, origin=(11.5, 9.25))
    masks = [
        disk_mask(SHAPE[2:], 11.5, 9.25, 0, 4),
        disk_mask(SHAPE[2:], 11.5, 9.25, 5, 9),
        disk_mask(SHAPE[2:], 14.5, 7.25, 0, 2.5),
    ]
    for image, mask in zip(images, masks, strict=True):
        expected = data[..., mask].sum(axis=-1, dtype=np.float64)
        np.testing.assert_allclose(image, expected, rtol=1e-6)


def test_default_origin_is_detector_centre_then_calibration(data):
    det = [parse_detector("bf:3")]
    centre = virtual_images(DataCube(data), det)[0]
    np.testing.assert_allclose(centre, virtual_images(DataCube(data), det, origin=(11.5, 9.5))[0])
    cal = Calibration(qx0=np.full(SHAPE[:2], 8.0), qy0=np.full(SHAPE[:2], 6.0))
    calibrated = virtual_images(DataCube(data, cal), det)[0]
    np.testing.assert_allclose(calibrated, data[..., disk_mask(SHAPE[2:], 8, 6, 0, 3)].sum(-1))


def test_detectors_follow_per_pattern_origin(data):
    qx0 = 10 + RNG.uniform(-2, 2, SHAPE[:2])
    qy0 = 9 + RNG.uniform(-2, 2, SHAPE[:2])
    cube = DataCube(data, Calibration(qx0=qx0, qy0=qy0))
    images = virtual_images(cube, [parse_detector("bf:3.5"), parse_detector("annulus:4,7")], follow_origin=True)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            bf = disk_mask(SHAPE[2:], qx0[i, j], qy0[i, j], 0, 3.5)
            adf = disk_mask(SHAPE[2:], qx0[i, j], qy0[i, j], 4, 7)
            assert images[0, i, j] == pytest.approx(data[i, j][bf].sum(), rel=1e-6)
            assert images[1, i, j] == pytest.approx(data[i, j][adf].sum(), rel=1e-6)


def test_lazy_cube_gives_the_same_images(data):
    da = pytest.importorskip("dask.array")
    qx0 = 10 + RNG.uniform(-1, 1, SHAPE[:2])
    cal = Calibration(qx0=qx0, qy0=qx0 - 1)
    eager = DataCube(data, cal)
    lazy = DataCube(da.from_array(data, chunks=(2, 3, -1, -1)), cal)
    dets = [parse_detector("bf:4"), parse_detector("annulus:5,9")]
    for follow in (False, True):
        np.testing.assert_allclose(
            virtual_images(lazy, dets, follow_origin=follow), virtual_images(eager, dets, follow_origin=follow)
        )
    np.testing.assert_allclose(virtual_diffraction(lazy, "mean"), data.mean(axis=(0, 1)))
    np.testing.assert_allclose(virtual_diffraction(lazy, "max"), data.max(axis=(0, 1)))


def test_streaming_blocks_match_whole_array(data):
    dets = [parse_detector("annulus:2,8")]
    whole = virtual_images(DataCube(data), dets)
    streamed = virtual_images(DataCube(data), dets, max_bytes=SHAPE[1] * SHAPE[2] * SHAPE[3] * 4)
    np.testing.assert_array_equal(whole, streamed)


def test_virtual_diffraction_mean_and_max(data):
    np.testing.assert_allclose(virtual_diffraction(DataCube(data), "mean"), data.mean(axis=(0, 1)))
    np.testing.assert_array_equal(virtual_diffraction(DataCube(data), "max"), data.max(axis=(0, 1)))
    with pytest.raises(ConfigurationError):
        virtual_diffraction(DataCube(data), "median")


def test_mask_file_detector_moves_by_whole_pixels(tmp_path, data):
    mask = np.zeros(SHAPE[2:], np.float32)
    mask[10:13, 8:10] = 1.0
    path = tmp_path / "mask.npy"
    np.save(path, mask)
    det = parse_detector(str(path))
    assert det.name == "mask"
    np.testing.assert_allclose(virtual_images(DataCube(data), [det])[0], data[..., 10:13, 8:10].sum(axis=(-2, -1)))
    moved = Detector("m", mask=mask, mask_origin=(10.0, 10.0)).render(SHAPE[2:], np.array([[12.2, 9.0]]))[0]
    np.testing.assert_array_equal(moved, np.roll(np.roll(mask, 2, axis=0), -1, axis=1))
    np.save(path, np.zeros((3, 3)))
    with pytest.raises(ShapeError, match="shape"):
        virtual_images(DataCube(data), [parse_detector(str(path))])


def test_radii_in_mrad_use_the_calibration():
    cal = Calibration(q_pixel_size=0.5, q_units="mrad", energy=300e3)
    det = parse_detector("annulus:10,20", units="mrad", calibration=cal)
    assert (det.r_inner, det.r_outer) == (20.0, 40.0)
    det = parse_detector("annulus:0.2,0.4", units="A^-1", calibration=cal)
    # 0.2 Å⁻¹ at 300 keV is 3.937 mrad = 7.87 px of 0.5 mrad.
    assert det.r_inner == pytest.approx(0.2 * 0.0196875 * 1e3 / 0.5, rel=1e-4)
    with pytest.raises(ConfigurationError, match="not calibrated"):
        parse_detector("bf:3", units="mrad", calibration=Calibration())


@pytest.mark.parametrize("spec", ["annulus:5", "annulus:9,5", "circle:1,2", "ring:1,2", "bf:x"])
def test_bad_detector_specs(spec):
    with pytest.raises(ConfigurationError):
        parse_detector(spec)


def test_nan_frame_is_named(data):
    bad = data.astype(np.float32)
    bad[3, 2, 0, 0] = np.inf
    with pytest.raises(InvalidDataError, match=r"rx=3, ry=2"):
        virtual_images(DataCube(bad), [parse_detector("bf:3")])


def test_uncalibrated_detectors_centre_on_the_measured_disk():
    pattern = disk_mask((40, 48), 28.4, 12.7, 0, 5.0) * 200.0 + 1.0
    data = np.broadcast_to(pattern, (3, 2, 40, 48)).copy()
    cube = DataCube(data)
    assert default_origin(cube) == pytest.approx((28.4, 12.7), abs=0.1)
    images = virtual_from_specs(cube, ["bf", "adf"])
    # bf: the whole disk (r ≈ 5 px measured); adf: everything beyond 2·r_bf, to the corners.
    assert images["bf"][0, 0] == pytest.approx(pattern[disk_mask((40, 48), 28.4, 12.7, 0, 5.0)].sum(), rel=0.05)
    r_bf = estimate_bright_field(pattern)[2]
    assert images["adf"][0, 0] == pytest.approx(pattern[~disk_mask((40, 48), 28.4, 12.7, 0, 2 * r_bf)].sum(), rel=0.01)


def test_blank_data_needs_explicit_radii():
    cube = DataCube(np.zeros((2, 2, 16, 16), np.uint16))
    assert estimate_bright_field(cube.data[0, 0]) is None
    assert default_origin(cube) == (7.5, 7.5)
    with pytest.raises(ConfigurationError, match="no bright-field disk"):
        virtual_from_specs(cube, ["bf"])
    assert virtual_from_specs(cube, ["annulus:2,5"])["annulus_2-5px"].sum() == 0


def test_bright_field_radius_falls_back_on_the_calibrated_semiangle():
    flat = np.ones((2, 2, 12, 12), np.float32)  # a disk filling the detector: nothing to measure
    cal = Calibration(q_pixel_size=0.5, q_units="mrad", convergence_semiangle=2.0)
    cube = DataCube(flat, cal)
    assert bright_field_radius(cube) == pytest.approx(4.0)
    qx, qy = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    assert virtual_from_specs(cube, ["bf"])["bf"][0, 0] == np.sum(np.hypot(qx - 5.5, qy - 5.5) < 4.0)
    # with r_bf = 5 px the corners (7.8 px out, +1) lie inside 2·r_bf: no room for a default ADF
    with pytest.raises(ConfigurationError, match="inside twice the bright-field radius"):
        virtual_from_specs(DataCube(flat, cal.replace(convergence_semiangle=2.5)), ["adf"])


def test_bright_field_estimate_on_a_disk():
    pattern = disk_mask((64, 64), 30.3, 33.6, 0, 9.0) * 100.0 + 1.0
    qx0, qy0, r = estimate_bright_field(pattern)
    # A pixelated disk of radius 9 has area π·81 within about one perimeter's worth of half pixels.
    assert r == pytest.approx(9.0, abs=0.3)
    assert (qx0, qy0) == pytest.approx((30.3, 33.6), abs=0.1)
    cube = DataCube(np.broadcast_to(pattern, (3, 3, 64, 64)))
    np.testing.assert_allclose(sample_patterns(cube, 4), pattern)
