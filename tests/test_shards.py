"""Shard files and dataset folders: round trips, determinism, atomic writes, clear errors."""

import json
import os

import numpy as np
import pytest

from stemforge.core.errors import (
    ChecksumError,
    FileFormatError,
    InvalidDataError,
    MissingFileError,
    ShapeError,
)
from stemforge.datasets.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_COLUMNS,
    ShardInfo,
    ShardReader,
    open_dataset,
    read_shard,
    sha256_file,
    write_manifest,
    write_shard,
)
from stemforge.simulate.sample import METADATA_KEYS, PEAK_DTYPE, Sample


def _sample(i: int, q: int = 12, n_peaks: int = 3) -> Sample:
    rng = np.random.default_rng(i)
    images = rng.random((3, q, q), dtype=np.float32)
    peaks = np.zeros(n_peaks, PEAK_DTYPE)
    peaks["h"], peaks["qx"], peaks["intensity_kinematic"] = (
        np.arange(n_peaks),
        rng.random(n_peaks) * q,
        1.5,
    )
    metadata = {
        "structure_id": f"mp-{i % 3}",
        "formula": "GaN",
        "space_group": 186,
        "crystal_system": "hexagonal",
        "lattice": (3.19, 3.19, 5.19, 90.0, 90.0, 120.0),
        "zone_axis": np.array([1, 0, 0]),
        "thickness": 20.0 * (i + 1),
        "energy": 300e3,
        "semiangle": 2.0,
        "q_pixel_size": 0.0125,
        "dose": None if i % 2 else 1e6,
        "residual_strain": 0.002,
        "strain": None if i % 2 else np.diag([0.01, -0.005, 0.0]),
        "seed": 2**40 + i,
        "frozen_phonons": 8,  # not a column: kept in the JSON column
        "note": {"source": "test"},
    }
    return Sample(images[0], images[1], images[2], peaks, metadata)


def _assert_same(a: Sample, b: Sample) -> None:
    for name in ("cbed", "probe", "target"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(b, name).dtype == np.float32
    for name in PEAK_DTYPE.names:
        np.testing.assert_array_equal(a.peaks[name], b.peaks[name])
    assert b.peaks.dtype == PEAK_DTYPE
    for key, value in a.metadata.items():
        if value is None or isinstance(value, str | int | dict):
            assert b.metadata[key] == value, key
        else:
            np.testing.assert_array_equal(b.metadata[key], value, err_msg=key)


def _dataset(folder, samples_per_shard=(3, 2, 0)) -> list[Sample]:
    """A dataset folder written by hand (no builder): shards of the given sizes."""
    folder.mkdir(exist_ok=True)
    samples, entries, i = [], [], 0
    for j, n in enumerate(samples_per_shard):
        shard = [_sample(i + k) for k in range(n)]
        path = f"shard-{j:05d}.h5"
        digest = write_shard(folder / path, shard)
        entries.append(
            ShardInfo(path, digest, n, (folder / path).stat().st_size, (j, j + 1)).to_json()
        )
        samples += shard
        i += n
    write_manifest(
        folder,
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "complete": True,
            "config": {"q": 12},
            "seed": 7,
            "n_shards": len(entries),
            "shards": entries,
        },
    )
    return samples


def test_every_metadata_key_of_the_sample_contract_has_a_column():
    assert set(METADATA_COLUMNS) == set(METADATA_KEYS)


def test_round_trip_keeps_images_ragged_peaks_and_metadata(tmp_path):
    samples = [_sample(0), _sample(1, n_peaks=0), _sample(2, n_peaks=7)]
    reordered = np.dtype([(name, PEAK_DTYPE[name]) for name in reversed(PEAK_DTYPE.names)])
    table = np.empty(len(samples[2].peaks), reordered)
    for name in PEAK_DTYPE.names:
        table[name] = samples[2].peaks[name]
    samples[2].peaks = table  # columns are matched by name
    digest = write_shard(tmp_path / "a.h5", samples)
    assert digest == sha256_file(tmp_path / "a.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]
    back = read_shard(tmp_path / "a.h5")
    assert len(back) == 3
    for a, b in zip(samples, back, strict=True):
        _assert_same(a, b)
    assert back[1].metadata["dose"] is None and back[1].metadata["strain"] is None
    assert back[0].metadata["seed"] == 2**40 and back[0].metadata["lattice"][5] == 120.0


def test_unset_metadata_reads_back_as_none(tmp_path):
    sample = _sample(0)
    sample.metadata = {"structure_id": "x"}
    write_shard(tmp_path / "a.h5", [sample])
    (back,) = read_shard(tmp_path / "a.h5")
    assert back.metadata["structure_id"] == "x"
    assert all(back.metadata[key] is None for key in METADATA_KEYS if key != "structure_id")


def test_same_samples_give_the_same_bytes(tmp_path):
    samples = [_sample(i) for i in range(4)]
    assert write_shard(tmp_path / "a.h5", samples) == write_shard(tmp_path / "b.h5", samples)
    assert write_shard(tmp_path / "c.h5", samples[::-1]) != sha256_file(tmp_path / "a.h5")


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.h5", [])
    assert read_shard(tmp_path / "e.h5") == []


def test_reader_reads_single_items(tmp_path):
    samples = [_sample(i) for i in range(3)]
    write_shard(tmp_path / "a.h5", samples)
    reader = ShardReader(tmp_path / "a.h5")
    assert len(reader) == 3
    np.testing.assert_array_equal(reader.image("target", 2), samples[2].target)
    np.testing.assert_array_equal(reader.peaks(1), samples[1].peaks)
    assert reader.metadata(2)["thickness"] == 60.0 and reader.metadata(2)["frozen_phonons"] == 8
    reader.close()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda s: setattr(s, "probe", s.probe[:-1]), ShapeError, "probe of shape"),
        (lambda s: s.cbed.__setitem__((0, 0), np.nan), InvalidDataError, "NaN"),
        (lambda s: setattr(s, "peaks", np.zeros((2, 2))), ShapeError, "PEAK_DTYPE"),
        (lambda s: s.metadata.update(space_group=186.5), InvalidDataError, "space_group"),
        (lambda s: s.metadata.update(lattice=(1, 2, 3)), InvalidDataError, "lattice"),
    ],
)
def test_bad_samples_are_refused_and_nothing_is_left_behind(tmp_path, change, error, match):
    samples = [_sample(0), _sample(1)]
    change(samples[1])
    with pytest.raises(error, match=match):
        write_shard(tmp_path / "a.h5", samples)
    assert list(tmp_path.iterdir()) == []


def test_open_dataset_indexes_across_shards(tmp_path):
    samples = _dataset(tmp_path / "ds")
    store = open_dataset(tmp_path / "ds", verify=True)
    assert len(store) == 5 and store.seed == 7 and store.config == {"q": 12}
    assert [store.locate(i) for i in (0, 2, 3, 4, -1)] == [(0, 0), (0, 2), (1, 0), (1, 1), (1, 1)]
    with pytest.raises(IndexError):
        store.locate(5)
    assert store.column("structure_id").tolist() == [s.metadata["structure_id"] for s in samples]


def test_missing_and_truncated_shards_are_named_with_the_fix(tmp_path):
    _dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match="shard-00001.h5 has .* bytes.*resume the build"):
        open_dataset(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(MissingFileError, match="shard-00001.h5 .* is missing.*resume the build"):
        open_dataset(tmp_path / "ds")


def test_corruption_of_the_same_size_is_caught_by_verify(tmp_path):
    _dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_dataset(tmp_path / "ds")  # size checks only
    with pytest.raises(ChecksumError, match="shard-00000.h5 does not match its SHA-256"):
        open_dataset(tmp_path / "ds", verify=True)


def test_unreadable_files_give_format_errors(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FileFormatError, match="junk.h5 is not a readable HDF5"):
        read_shard(tmp_path / "junk.h5")
    with pytest.raises(MissingFileError, match="no manifest.json"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{truncated")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        open_dataset(tmp_path)


def test_incomplete_dataset_needs_consent(tmp_path):
    _dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["complete"], manifest["n_shards"] = False, 5
    write_manifest(tmp_path / "ds", manifest)
    with pytest.raises(FileFormatError, match="incomplete .3 of 5 shards.*resume"):
        open_dataset(tmp_path / "ds")
    assert len(open_dataset(tmp_path / "ds", allow_incomplete=True)) == 5


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    write_manifest(tmp_path, {"format": FORMAT_NAME, "version": 1, "shards": []})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(tmp_path, {"format": FORMAT_NAME, "version": 1, "shards": [1]})
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == []
