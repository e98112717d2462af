"""Format dispatch, errors, memory budget and calibration sidecars."""

from pathlib import Path

import numpy as np
import pytest

from stemforge.core import Calibration, DataCube
from stemforge.core.errors import (
    ConfigurationError,
    FileFormatError,
    MissingFileError,
    ShapeError,
)
from stemforge.datasets.io import (
    SUPPORTED_FORMATS,
    default_memory_budget,
    read_calibration_sidecar,
    read_datacube,
    write_calibration,
    write_datacube,
)
from stemforge.datasets.io.memory import parse_size, scan_chunks


def test_missing_file_names_it_and_the_formats(tmp_path):
    with pytest.raises(MissingFileError, match="nothing.npy does not exist") as err:
        read_datacube(tmp_path / "nothing.npy")
    assert ".mib" in str(err.value)


def test_unknown_extension_lists_the_supported_formats(tmp_path):
    (tmp_path / "scan.tif").write_bytes(b"II*\x00")
    with pytest.raises(FileFormatError, match=r"unknown file type '\.tif'") as err:
        read_datacube(tmp_path / "scan.tif")
    assert all(key in str(err.value) for key in SUPPORTED_FORMATS)


def test_archives_are_named_as_such(tmp_path):
    (tmp_path / "scan.zip").write_bytes(b"PK\x03\x04")
    with pytest.raises(FileFormatError, match="archive.*Fix: extract it first"):
        read_datacube(tmp_path / "scan.zip")


def test_hdf5_files_without_a_datacube_say_what_they_hold():
    data = Path(__file__).parent / "data"
    with pytest.raises(FileFormatError, match=r"braggpeaks_cal_raw \(PointListArray\)"):
        read_datacube(data / "py4dstem" / "braggdisks_cali.h5")
    with pytest.raises(FileFormatError, match="test_00_master.h5"):
        read_datacube(data / "arina" / "test_00.h5")


def test_writer_refuses_unknown_extensions_and_writes_nothing(tmp_path):
    with pytest.raises(FileFormatError, match=r"\.npy"):
        write_datacube(DataCube(np.zeros((1, 1, 2, 2))), tmp_path / "cube.tif")
    assert list(tmp_path.iterdir()) == []


def test_bad_scan_shape_argument(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((4, 2, 2)))
    with pytest.raises(ShapeError, match="two positive integers"):
        read_datacube(tmp_path / "s.npy", scan_shape=(0, 4))


def test_scan_shape_reshapes_a_4d_cube(tmp_path):
    data = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    np.save(tmp_path / "c.npy", data)
    cube = read_datacube(tmp_path / "c.npy", scan_shape=(3, 2))
    np.testing.assert_array_equal(cube.data.reshape(6, 2, 2), data.reshape(6, 2, 2))
    lazy = read_datacube(tmp_path / "c.npy", scan_shape=(6, 1), lazy=True)
    assert lazy.shape == (6, 1, 2, 2) and lazy.data.chunksize[2:] == (2, 2)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GB", 2 * 10**9),
        ("512MB", 512 * 10**6),
        ("1.5 GiB", 3 * 2**29),
        ("1000", 1000),
        (4096, 4096),
        ("64kib", 65536),
    ],
)
def test_memory_sizes(text, size):
    assert parse_size(text) == size


def test_memory_budget_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STEMFORGE_MEMORY_BUDGET", "1KB")
    assert default_memory_budget() == 1000
    np.save(tmp_path / "c.npy", np.zeros((2, 2, 16, 16)))
    assert read_datacube(tmp_path / "c.npy").is_lazy  # 8 kB > 1 kB
    monkeypatch.setenv("STEMFORGE_MEMORY_BUDGET", "lots")
    with pytest.raises(ConfigurationError, match="STEMFORGE_MEMORY_BUDGET"):
        default_memory_budget()
    monkeypatch.delenv("STEMFORGE_MEMORY_BUDGET")
    assert 64 * 2**20 <= default_memory_budget() <= 16 * 2**30


def test_chunks_group_whole_rows_and_never_split_patterns():
    assert scan_chunks((100, 50, 64, 64), 4, target=64 * 64 * 4 * 120) == (2, 50, 64, 64)
    assert scan_chunks((100, 50, 64, 64), 4, target=64 * 64 * 4 * 20) == (1, 20, 64, 64)
    assert scan_chunks((100, 50, 512, 512), 4, target=10) == (1, 1, 512, 512)
    assert scan_chunks((7, 16, 16), 4) == (7, 16, 16)


def test_sidecar_is_written_atomically_and_applied(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4, 4)))
    cal = Calibration(
        q_pixel_size=0.02, q_units="A^-1", qx0=np.full((2, 3), 2.0), qy0=np.full((2, 3), 1.5)
    )
    assert read_calibration_sidecar(tmp_path / "c.npy") is None
    assert write_calibration(tmp_path / "c.npy", cal) == tmp_path / "c.npy.calibration.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "c.npy.calibration.json"]
    cube = read_datacube(tmp_path / "c.npy")
    assert cube.calibration == cal
    np.testing.assert_array_equal(cube.calibration.qx0, cal.qx0)


def test_bad_sidecars_name_the_sidecar(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4, 4)))
    sidecar = tmp_path / "c.npy.calibration.json"
    sidecar.write_text("{not json")
    with pytest.raises(FileFormatError, match="c.npy.calibration.json"):
        read_datacube(tmp_path / "c.npy")
    sidecar.write_text(Calibration(qx0=np.zeros((5, 5)), qy0=np.zeros((5, 5))).to_json())
    with pytest.raises(ShapeError, match="c.npy.calibration.json"):
        read_datacube(tmp_path / "c.npy")
    sidecar.write_text('{"q_pixel_size": -1}')
    with pytest.raises(FileFormatError, match="not a valid calibration"):
        read_datacube(tmp_path / "c.npy")


def test_write_calibration_needs_the_data_file(tmp_path):
    with pytest.raises(MissingFileError):
        write_calibration(tmp_path / "absent.npy", Calibration())
    assert list(tmp_path.iterdir()) == []
