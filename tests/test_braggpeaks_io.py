"""Bragg peak files: CSV / HDF5 / py4DSTEM round trips, py4DSTEM's own files, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from stemforge.core import (
    BraggPeaks,
    Calibration,
    ConfigurationError,
    FileFormatError,
    InvalidDataError,
    MissingFileError,
    ShapeError,
)
from stemforge.datasets.io import (
    read_braggpeaks,
    read_braggpeaks_file,
    read_datacube,
    write_braggpeaks,
)

DATA = Path(__file__).parent / "data"
LEGACY = DATA / "py4dstem" / "braggdisks_cali.h5"
PY4DSTEM_BV = DATA / "py4dstem" / "py4dstem_0.14.18_braggvectors.h5"
COLS = ("rx", "ry", "qx", "qy", "intensity")


def _peaks(seed: int = 0, scan=(4, 3), detector=(64, 48)) -> BraggPeaks:
    """Random table with empty positions, including the whole last scan row."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, scan[0] * scan[1])
    counts[1] = 0
    counts[-scan[1] :] = 0
    tables = [
        np.column_stack(
            [rng.uniform(0, detector[0], n), rng.uniform(0, detector[1], n), rng.exponential(1, n)]
        )
        for n in counts
    ]
    tables[0][0] = (1 / 3, 0.1, 1e-300)  # values whose decimal forms are not short
    return BraggPeaks.from_patterns(tables, scan, detector)


def _calibration(scan=(4, 3)) -> Calibration:
    return Calibration(
        q_pixel_size=0.0123,
        q_units="A^-1",
        energy=300e3,
        qx0=32 + np.arange(scan[0] * scan[1], dtype=float).reshape(scan) / 7,
        qy0=np.full(scan, 24.5),
        ellipse=(1.02, 1.0, 0.3),
        qr_rotation=0.2,
    )


def _assert_same(a: BraggPeaks, b: BraggPeaks) -> None:
    assert (a.scan_shape, a.detector_shape) == (b.scan_shape, b.detector_shape)
    for name in COLS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(b, name).dtype == (np.int64 if name in ("rx", "ry") else np.float64)


@pytest.mark.parametrize("ext", ["csv", "h5", "hdf5", "emd"])
def test_round_trip_is_exact_with_empty_positions_and_calibration(tmp_path, ext):
    peaks, cal = _peaks(), _calibration()
    path = write_braggpeaks(peaks, tmp_path / f"p.{ext}", calibration=cal)
    shapes = {"scan_shape": (4, 3), "detector_shape": (64, 48)} if ext == "csv" else {}
    got = read_braggpeaks_file(path, **shapes)
    _assert_same(peaks, got.peaks)
    assert got.calibration == cal and not got.calibrated and "raw detector pixels" in got.note
    np.testing.assert_array_equal(got.calibration.qx0, cal.qx0)
    _assert_same(peaks, read_braggpeaks(path, **shapes))
    sidecar = {f"{path.name}.calibration.json"} if ext == "csv" else set()
    assert {p.name for p in tmp_path.iterdir()} == {path.name} | sidecar  # no temporaries left


@pytest.mark.parametrize("ext", ["csv", "h5", "emd"])
def test_empty_table_round_trip(tmp_path, ext):
    peaks = BraggPeaks.empty((2, 5), (16, 16))
    path = write_braggpeaks(peaks, tmp_path / f"e.{ext}")
    shapes = {"scan_shape": (2, 5), "detector_shape": (16, 16)} if ext == "csv" else {}
    got = read_braggpeaks_file(path, **shapes)
    _assert_same(peaks, got.peaks)
    if ext == "csv":
        assert path.read_text() == "rx,ry,qx,qy,intensity\n" and got.calibration is None
        with pytest.raises(ShapeError, match="no peaks.*pass scan_shape and detector_shape"):
            read_braggpeaks(path)


def test_csv_header_rows_and_shape_inference(tmp_path):
    peaks = _peaks()
    path = write_braggpeaks(peaks, tmp_path / "p.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "rx,ry,qx,qy,intensity" and len(lines) == len(peaks) + 1
    assert lines[1] == "0,0,0.3333333333333333,0.1,1e-300"
    # No shapes stored: scan = max + 1 (the peak-less last row is lost), detector = floor(max) + 1
    got = read_braggpeaks(path)
    assert got.scan_shape == (int(peaks.rx.max()) + 1, int(peaks.ry.max()) + 1)
    assert got.scan_shape[0] < peaks.scan_shape[0]
    assert got.detector_shape == (int(peaks.qx.max()) + 1, int(peaks.qy.max()) + 1)
    for name in COLS:
        np.testing.assert_array_equal(getattr(got, name), getattr(peaks, name))


def test_csv_from_another_tool(tmp_path):
    """CRLF line ends, a BOM, blank trailing line, float-formatted positions: all fine."""
    path = tmp_path / "other.csv"
    path.write_bytes(
        "\ufeffrx,ry,qx,qy,intensity\r\n1.0,0,3.5,4.25,2\r\n0,1,1e1,0.5,1\r\n\r\n".encode()
    )
    peaks = read_braggpeaks(path, scan_shape=(2, 2), detector_shape=(16, 16))
    np.testing.assert_array_equal(peaks.rx, [0, 1])
    np.testing.assert_array_equal(peaks.qx, [10.0, 3.5])


def test_hdf5_layout(tmp_path):
    cal = _calibration()
    path = write_braggpeaks(_peaks(), tmp_path / "p.h5", calibration=cal)
    with h5py.File(path) as f:
        group = f["braggpeaks"]
        assert {k: group[k].dtype for k in group} == {
            "rx": np.int64,
            "ry": np.int64,
            "qx": np.float64,
            "qy": np.float64,
            "intensity": np.float64,
        }
        assert all(group[k].ndim == 1 for k in group)
        assert tuple(group.attrs["scan_shape"]) == (4, 3)
        assert tuple(group.attrs["detector_shape"]) == (64, 48)
        assert group.attrs["stemforge_braggpeaks_version"] == 1
        assert Calibration.from_json(group.attrs["calibration"]) == cal
    without = write_braggpeaks(_peaks(), tmp_path / "q.h5")
    assert read_braggpeaks_file(without).calibration is None
    # a per-pattern origin of a 128×128 scan makes a JSON far over HDF5's 64 KiB compact limit
    big = Calibration(qx0=np.full((128, 128), 1 / 3), qy0=np.full((128, 128), 2.5))
    path = write_braggpeaks(
        BraggPeaks.empty((128, 128), (8, 8)), tmp_path / "big.h5", calibration=big
    )
    np.testing.assert_array_equal(read_braggpeaks_file(path).calibration.qx0, big.qx0)


def test_bare_braggpeaks_group_from_another_tool(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("braggpeaks")
        for name, values in zip(
            COLS, ([1, 0], [0, 2], [3.5, 1.0], [2.0, 7.5], [1.0, 2.0]), strict=True
        ):
            g.create_dataset(name, data=values)
    got = read_braggpeaks(path)
    assert got.scan_shape == (2, 3) and got.detector_shape == (4, 8)
    np.testing.assert_array_equal(got.qy, [7.5, 2.0])
    assert read_braggpeaks(path, scan_shape=(5, 5)).scan_shape == (5, 5)


def test_emd_layout_matches_the_one_py4dstem_writes(tmp_path):
    """Same groups, datasets, EMD tags and vector dtype as py4DSTEM.save's BraggVectors."""
    path = write_braggpeaks(_peaks(), tmp_path / "p.emd", calibration=_calibration())

    def layout(file: Path) -> dict:
        out = {}
        with h5py.File(file) as f:
            assert (f.attrs["emd_group_type"], int(f.attrs["version_major"])) == ("file", 1)

            def visit(name, obj):
                if "metadatabundle/calibration/" in name:
                    return  # parameters differ with the calibration
                tags = tuple(str(obj.attrs.get(k, "")) for k in ("emd_group_type", "python_class"))
                kind = h5py.check_vlen_dtype(obj.dtype) if isinstance(obj, h5py.Dataset) else None
                out[name] = (tags, kind)

            f.visititems(visit)
        return out

    ours, theirs = layout(path), layout(PY4DSTEM_BV)
    assert ours == theirs
    assert ours["braggvectors_root/braggvectors/_v_uncal/data"][1] == np.dtype(
        [("qx", "<f8"), ("qy", "<f8"), ("intensity", "<f8")]
    )
    with h5py.File(path) as f:
        shapes = f["braggvectors_root/braggvectors/metadatabundle/_braggvectors_shape"]
        assert list(shapes["Rshape"][()]) == [4, 3] and list(shapes["Qshape"][()]) == [64, 48]
        assert shapes["Rshape"].attrs["type"] == "tuple"
        vectors = f["braggvectors_root/braggvectors/_v_uncal/data"]
        assert vectors.shape == (4, 3) and len(vectors[0, 1]) == 0


def test_py4dstem_format_in_an_h5_file(tmp_path):
    peaks = _peaks()
    path = write_braggpeaks(peaks, tmp_path / "bv.h5", format="py4dstem")
    got = read_braggpeaks_file(path)
    assert got.format == "py4dstem" and got.group == "braggvectors_root/braggvectors/_v_uncal"
    assert got.calibration == Calibration()  # py4DSTEM's default is always written
    _assert_same(peaks, got.peaks)


def test_reads_a_braggvectors_file_written_by_py4dstem():
    got = read_braggpeaks_file(PY4DSTEM_BV)
    peaks = got.peaks
    assert got.format == "py4dstem" and not got.calibrated
    assert peaks.scan_shape == (3, 4) and peaks.detector_shape == (40, 48)
    expected = np.full((3, 4), 9)
    expected[2, 3] = 0  # the blank pattern
    np.testing.assert_array_equal(peaks.counts(), expected)
    # find_Bragg_disks found every synthetic disk to a small fraction of a pixel
    for rx, ry in np.ndindex(2, 4):
        x0, y0 = 20 + 0.25 * rx, 24 - 0.5 * ry
        truth = np.array(
            [(x0 + 9 * a - 3 * b, y0 + 2 * a + 10 * b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
        )
        found = peaks.at(rx, ry)[:, :2]
        assert np.abs(found[:, None] - truth[None]).max(axis=-1).min(axis=1).max() < 0.05
    cal = got.calibration
    assert (cal.q_pixel_size, cal.q_units) == (0.05, "A^-1")
    np.testing.assert_array_equal(cal.qx0, np.repeat([[20.0], [20.25], [20.5]], 4, axis=1))
    np.testing.assert_array_equal(cal.qy0, np.tile([24.0, 23.5, 23.0, 22.5], (3, 1)))
    # the same values h5py reads straight from the file
    with h5py.File(PY4DSTEM_BV) as f:
        raw = f["braggvectors_root/braggvectors/_v_uncal/data"][1, 2]
    np.testing.assert_array_equal(
        peaks.at(1, 2), np.column_stack([raw[k] for k in raw.dtype.names])
    )
    assert read_braggpeaks(f"{PY4DSTEM_BV}::braggvectors_root/braggvectors").scan_shape == (3, 4)


def test_reads_the_legacy_py4dstem_013_calibrated_peaks():
    got = read_braggpeaks_file(LEGACY)
    peaks = got.peaks
    assert got.format == "py4dstem-0.13" and got.group == "4DSTEM/braggpeaks_cal_raw"
    assert got.calibrated and "origin-centred" in got.note and "Å⁻¹" in got.note
    # their frame already is calibrated Å⁻¹ about the origin: the identity calibration says so
    assert got.calibration == Calibration(q_pixel_size=1.0, q_units="A^-1", qx0=0.0, qy0=0.0)
    assert peaks.scan_shape == (80, 58) and len(peaks) == 121390
    counts = peaks.counts()
    assert (counts.min(), counts.max()) == (1, 70)
    assert peaks.at(0, 0).shape == (6, 3) and peaks.at(79, 57).shape == (1, 3)
    np.testing.assert_allclose(
        peaks.at(0, 0)[0], [-0.00692827, 0.00080758, 12.68152024], rtol=0, atol=1e-8
    )
    np.testing.assert_allclose(
        peaks.at(79, 57)[0], [0.00355191, -0.0015386, 15.95398235], atol=1e-8
    )
    with h5py.File(LEGACY) as f:
        data = f["4DSTEM/braggpeaks_cal_raw/data"]
        for rx, ry in [(0, 0), (10, 20), (41, 3), (79, 57)]:
            want = data[rx, ry]
            np.testing.assert_array_equal(
                peaks.at(rx, ry), np.column_stack([want["qx"], want["qy"], want["intensity"]])
            )
    assert read_braggpeaks(LEGACY, detector_shape=(256, 256)).detector_shape == (256, 256)
    with pytest.raises(ShapeError, match=r"stores scan_shape \(80, 58\)"):
        read_braggpeaks(LEGACY, scan_shape=(58, 80))


def test_csv_calibration_sidecar(tmp_path):
    cal = _calibration()
    path = write_braggpeaks(_peaks(), tmp_path / "p.csv", calibration=cal)
    assert (tmp_path / "p.csv.calibration.json").is_file()
    assert read_braggpeaks_file(path, scan_shape=(4, 3)).calibration == cal
    write_braggpeaks(_peaks(), path, overwrite=True)
    assert not (tmp_path / "p.csv.calibration.json").exists()
    assert read_braggpeaks_file(path, scan_shape=(4, 3)).calibration is None


def test_no_overwrite_without_permission(tmp_path):
    path = write_braggpeaks(_peaks(0), tmp_path / "p.h5")
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="already exists"):
        write_braggpeaks(_peaks(1), path)
    assert path.read_bytes() == before
    write_braggpeaks(_peaks(1), path, overwrite=True)
    _assert_same(_peaks(1), read_braggpeaks(path))


@pytest.mark.parametrize("ext", ["csv", "emd"])
def test_a_failing_write_leaves_the_old_file_and_no_partial_one(tmp_path, ext):
    good = write_braggpeaks(_peaks(), tmp_path / f"p.{ext}")
    before = good.read_bytes()
    p = _peaks()
    broken = BraggPeaks(  # bypasses validation: columns of different lengths
        p.rx, p.ry, p.qx[:-1], p.qy, p.intensity, p.scan_shape, p.detector_shape
    )
    with pytest.raises(ValueError):
        write_braggpeaks(broken, good, overwrite=True)
    assert good.read_bytes() == before and [x.name for x in tmp_path.iterdir()] == [good.name]
    with pytest.raises(ValueError):
        write_braggpeaks(broken, tmp_path / f"new.{ext}")
    assert [x.name for x in tmp_path.iterdir()] == [good.name]


def test_writer_errors_write_nothing(tmp_path):
    peaks = _peaks()
    with pytest.raises(FileFormatError, match=r"unknown output type '\.txt'.*\.csv"):
        write_braggpeaks(peaks, tmp_path / "p.txt")
    with pytest.raises(FileFormatError, match="name the file with one of .csv"):
        write_braggpeaks(peaks, tmp_path / "p.h5", format="csv")
    with pytest.raises(ConfigurationError, match="unknown Bragg peak format 'zarr'"):
        write_braggpeaks(peaks, tmp_path / "p.h5", format="zarr")
    with pytest.raises(ShapeError, match=r"origin has shape \(2, 2\).*scan is \(4, 3\)"):
        write_braggpeaks(peaks, tmp_path / "p.emd", calibration=_calibration((2, 2)))
    with pytest.raises(ConfigurationError, match="takes a BraggPeaks"):
        write_braggpeaks(peaks.columns(), tmp_path / "p.h5")
    assert list(tmp_path.iterdir()) == []


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        read_braggpeaks(tmp_path / "nope.csv")
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(FileFormatError, match=r"unknown Bragg peak file type '\.parquet'"):
        read_braggpeaks(tmp_path / "p.parquet")
    # a datacube file holds no peaks
    with pytest.raises(FileFormatError, match="holds no Bragg peaks.*datacube_root/"):
        read_braggpeaks(DATA / "emd" / "py4dstem_0.14.18_calibrated.h5")
    with pytest.raises(FileFormatError, match="no peak table 'nope'.*_v_uncal"):
        read_braggpeaks(f"{PY4DSTEM_BV}::nope")
    ours = write_braggpeaks(_peaks(), tmp_path / "p.h5")
    with pytest.raises(FileFormatError, match=r"no peak table 'nope'.*\['braggpeaks'\]"):
        read_braggpeaks(f"{ours}::nope")


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("rx,ry,qx,qy\n0,0,1,2\n", FileFormatError, "missing columns: intensity"),
        ("qx,qy,intensity,rx,ry\n", FileFormatError, "first line is exactly rx,ry,qx,qy"),
        ("", FileFormatError, "header is ''"),
        ("rx,ry,qx,qy,intensity\n0,0,1,2,3\n0,1,1,2", FileFormatError, "may be cut off"),
        ("rx,ry,qx,qy,intensity\n0,0,1,2,3\n0,1,1,2\n", FileFormatError, "malformed row"),
        ("rx,ry,qx,qy,intensity\n0,0,1,x,3\n", FileFormatError, "malformed row"),
        ("rx,ry,qx,qy,intensity\n0,0,1,nan,3\n", InvalidDataError, "qy contains NaN"),
        ("rx,ry,qx,qy,intensity\n0,0.5,1,2,3\n", InvalidDataError, "non-integer"),
        ("rx,ry,qx,qy,intensity\n-1,0,1,2,3\n", ShapeError, "outside the scan"),
    ],
)
def test_bad_csv(tmp_path, text, error, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(error, match=match) as err:
        read_braggpeaks(path, detector_shape=(8, 8))
    assert str(path) in str(err.value)


def test_bad_hdf5(tmp_path):
    path = write_braggpeaks(_peaks(), tmp_path / "p.h5")
    with h5py.File(path, "r+") as f:
        del f["braggpeaks/intensity"]
    with pytest.raises(FileFormatError, match="lacks the columns intensity"):
        read_braggpeaks(path)
    newer = write_braggpeaks(_peaks(), tmp_path / "n.h5")
    with h5py.File(newer, "r+") as f:
        f["braggpeaks"].attrs["stemforge_braggpeaks_version"] = 2
    with pytest.raises(FileFormatError, match="format version 2.*update stemforge"):
        read_braggpeaks(newer)
    with pytest.raises(ShapeError, match=r"stores detector_shape \(64, 48\)"):
        read_braggpeaks(write_braggpeaks(_peaks(), tmp_path / "d.h5"), detector_shape=(8, 8))


@pytest.mark.parametrize("ext", ["h5", "emd"])
def test_truncated_hdf5(tmp_path, ext):
    path = write_braggpeaks(_peaks(), tmp_path / f"p.{ext}")
    cut = tmp_path / f"cut.{ext}"
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        read_braggpeaks(cut)


def test_peak_files_are_not_datacubes():
    with pytest.raises(FileFormatError, match="braggvectors"):
        read_datacube(PY4DSTEM_BV)
