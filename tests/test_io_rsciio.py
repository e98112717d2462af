"""Detector formats through RosettaSciIO, checked against the raw bytes or h5py."""

import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the compression filters of Arina data files
import numpy as np
import pytest

from stemforge.core.errors import FileFormatError, MissingFileError, ShapeError
from stemforge.datasets.io import read_datacube

DATA = Path(__file__).parent / "data"
MIB_FULL = DATA / "quantumdetector" / "001_4x2_6bit.mib"
MIB_ROI = DATA / "quantumdetector" / "002_4x2_6bit_roi128.mib"


def _mib_frames(path: Path) -> np.ndarray:
    """Frames from the raw bytes: each has an ASCII header ('MQ1,seq,header bytes,...,
    width,height,U08,...') and then big-endian pixels, rows first."""
    raw = path.read_bytes()
    fields = raw[:100].decode("ascii").split(",")
    header, width, height, dtype = int(fields[2]), int(fields[4]), int(fields[5]), fields[6]
    pixel = np.dtype(">" + {"U08": "u1", "U16": "u2", "U32": "u4"}[dtype])
    frame_bytes = header + width * height * pixel.itemsize
    frames = np.frombuffer(raw, np.uint8).reshape(-1, frame_bytes)[:, header:]
    return frames.copy().view(pixel).reshape(-1, height, width)


@pytest.mark.parametrize("path", [MIB_FULL, MIB_ROI])
def test_merlin_frames_equal_the_raw_bytes(path):
    cube = read_datacube(path)
    frames = _mib_frames(path)
    assert cube.shape == (2, 4, *frames.shape[1:]) and cube.dtype == np.uint8
    # the header knows the 4×2 scan (4 frames per line); RosettaSciIO flips rows (axis -2)
    np.testing.assert_array_equal(cube.data, frames[:, ::-1, :].reshape(2, 4, *frames.shape[1:]))
    lazy = read_datacube(path, lazy=True)
    assert lazy.is_lazy and lazy.data.chunksize[2:] == frames.shape[1:]
    np.testing.assert_array_equal(lazy.data.compute(), cube.data)
    assert cube.metadata["original_metadata"]["hdr_file"]["Counter Depth (number)"] == "6"


def test_merlin_scan_shape_override_and_mismatch():
    frames = _mib_frames(MIB_FULL)[:, ::-1, :]
    cube = read_datacube(MIB_FULL, scan_shape=(8, 1))
    np.testing.assert_array_equal(cube.data[:, 0], frames)
    with pytest.raises(ShapeError, match="8 patterns"):
        read_datacube(MIB_FULL, scan_shape=(3, 3))


def test_blockfile_frames_equal_the_raw_bytes():
    path = DATA / "blockfile" / "test1.blo"
    raw = np.frombuffer(path.read_bytes(), np.uint8)
    offset = int(raw[12:16].view("<u4")[0])  # header: ID(6) MAGIC(2) offset1(4) offset2(4)
    side, nx, ny = (int(v) for v in raw[20:28].view("<u2")[[0, 2, 3]])  # DP_SZ, rot, NX, NY
    # every frame: 6 bytes (AA 55 + frame number) then side² pixels; scan rows (y) slowest
    expected = raw[offset : offset + nx * ny * (6 + side * side)].reshape(ny * nx, -1)[:, 6:]
    cube = read_datacube(path)
    assert cube.shape == (ny, nx, side, side) == (3, 2, 144, 144) and cube.dtype == np.uint8
    np.testing.assert_array_equal(cube.data, expected.reshape(ny, nx, side, side))
    cal = cube.calibration
    assert cal.r_pixel_size == pytest.approx(128.0) and cal.r_units == "A"  # 12.8 nm steps
    assert cal.energy == pytest.approx(200e3)
    assert cal.q_units == "pixels"  # the file's detector scale is a length on the screen


def test_arina_master_matches_h5py_eager_and_lazy():
    path = DATA / "arina" / "test_00_master.h5"
    with h5py.File(path) as f:
        frames = np.concatenate([f["entry/data"][k][()] for k in sorted(f["entry/data"])])
    for lazy in (False, True):
        cube = read_datacube(path, lazy=lazy)
        assert cube.shape == (4, 4, 192, 192) and cube.dtype == np.uint32 and cube.is_lazy == lazy
        np.testing.assert_array_equal(cube.compute().data, frames.reshape(4, 4, 192, 192))
    cal = cube.calibration
    assert cal.r_pixel_size == pytest.approx(1.3915206) and cal.r_units == "A"
    assert cal.energy == pytest.approx(300e3)
    with pytest.raises(ShapeError, match="16 frames"):
        read_datacube(path, scan_shape=(5, 3))
    assert read_datacube(path, scan_shape=(2, 8)).shape == (2, 8, 192, 192)


def test_arina_without_its_data_file(tmp_path):
    shutil.copy(DATA / "arina" / "test_00_master.h5", tmp_path)
    with pytest.raises(MissingFileError, match="data file"):
        read_datacube(tmp_path / "test_00_master.h5")


def _write_empad(folder: Path) -> np.ndarray:
    """An EMPAD acquisition as the EMPAD software writes it (the layout RosettaSciIO reads):
    a .xml header naming the .raw file and the scan size, and float32 frames of 128×130
    (2 footer rows), little-endian, in scan order."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><root>'
        '<timestamp isoformat="2024-01-02T03:04:05.000000"/><pix_x>4</pix_x><pix_y>3</pix_y>'
        '<raw_file filename="scan_x4_y3.raw"/><iom_measurements><optics>'
        "<get_full_scan_field_of_view>[3e-09, 4e-09]</get_full_scan_field_of_view></optics>"
        "<calibrated_pixelsize>2e-10</calibrated_pixelsize></iom_measurements></root>"
    )
    (folder / "scan.xml").write_text(xml)
    raw = np.random.default_rng(4).random((3, 4, 130, 128), dtype=np.float32)
    raw.astype("<f4").tofile(folder / "scan_x4_y3.raw")
    return raw[:, :, :128, :]


def test_empad_xml_and_raw(tmp_path):
    expected = _write_empad(tmp_path)
    for lazy in (False, True):
        cube = read_datacube(tmp_path / "scan.xml", lazy=lazy)
        assert cube.shape == (3, 4, 128, 128) and cube.dtype == np.float32
        np.testing.assert_array_equal(cube.compute().data, expected)
    cal = cube.calibration
    assert cal.r_pixel_size == pytest.approx(10.0) and cal.r_units == "A"  # 1 nm steps
    assert cal.q_pixel_size == pytest.approx(0.02) and cal.q_units == "A^-1"  # 0.2 nm⁻¹
    (tmp_path / "scan_x4_y3.raw").unlink()
    with pytest.raises(MissingFileError, match="scan.xml"):
        read_datacube(tmp_path / "scan.xml")


def test_digitalmicrograph_missing_and_corrupt(tmp_path):
    with pytest.raises(MissingFileError, match="scan.dm4 does not exist"):
        read_datacube(tmp_path / "scan.dm4")
    (tmp_path / "scan.dm4").write_bytes(b"\x00\x00\x00\x04" + bytes(60))
    with pytest.raises(FileFormatError, match="Gatan DigitalMicrograph"):
        read_datacube(tmp_path / "scan.dm4")


def test_truncated_merlin_file_counts_only_complete_frames(tmp_path):
    cut = tmp_path / "cut.mib"
    cut.write_bytes(MIB_FULL.read_bytes()[:-5000])
    with pytest.raises(ShapeError, match="hold 7 patterns"):
        read_datacube(cut, scan_shape=(2, 4))


def test_signal_axes_stored_first_are_moved_last(tmp_path):
    from stemforge.datasets.io.rsciio_formats import _navigation_first

    data = np.arange(2 * 3 * 4 * 5).reshape(4, 5, 2, 3)  # (ky, kx, y, x) on disk
    axes = [{"navigate": False}, {"navigate": False}, {"navigate": True}, {"navigate": True}]
    fixed = _navigation_first({"data": data, "axes": axes}, tmp_path / "x.dm4")
    np.testing.assert_array_equal(fixed["data"], data.transpose(2, 3, 0, 1))
    assert [a["navigate"] for a in fixed["axes"]] == [True, True, False, False]
    with pytest.raises(ShapeError, match="navigation flags"):
        _navigation_first({"data": data[0], "axes": axes[1:]}, tmp_path / "spectra.dm4")
