"""The stemforge command line: help, info and virtual on real files, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from stemforge.core.cli import cli, main


def run(args, **kw):
    result = CliRunner().invoke(cli, args, catch_exceptions=True, **kw)
    return result


def run_main(args, monkeypatch, capsys):
    """Through the console entry point, which turns stemforge errors into exit code 2."""
    monkeypatch.setattr(sys, "argv", ["stemforge", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr()


def test_help_lists_commands_without_heavy_imports():
    code = (
        "import sys, io, contextlib\n"
        "from stemforge.core.cli import cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: cli.main(['--help'], standalone_mode=False)\n"
        "    except SystemExit: pass\n"
        "print(buf.getvalue())\n"
        "print(sorted(m for m in ('torch', 'abtem', 'dask', 'h5py', 'zarr', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("info", "virtual", "calibrate", "demo"):
        assert command in out
    assert out.strip().splitlines()[-1] == "[]"


@pytest.fixture
def cube_file(tmp_path):
    data = np.random.default_rng(3).poisson(20.0, (4, 3, 16, 16)).astype(np.uint16)
    path = tmp_path / "cube.npy"
    np.save(path, data)
    return path, data


def test_info_reports_shape_and_dtype(cube_file):
    path, _ = cube_file
    result = run(["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "(4, 3, 16, 16)" in result.output and "uint16" in result.output and "in memory" in result.output


def test_virtual_writes_each_detector(cube_file, tmp_path):
    path, data = cube_file
    out = tmp_path / "img.npy"
    result = run(["virtual", str(path), "-d", "bf:3", "-d", "annulus:4,7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    qx, qy = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    r = np.hypot(qx - 7.5, qy - 7.5)
    np.testing.assert_allclose(np.load(tmp_path / "img-bf.npy"), data[..., r < 3].sum(-1))
    np.testing.assert_allclose(np.load(tmp_path / "img-annulus_4-7px.npy"), data[..., (r >= 4) & (r < 7)].sum(-1))
    tif = tmp_path / "mean.tif"
    assert run(["virtual", str(path), "--pattern", "mean", "--out", str(tif)]).exit_code == 0
    np.testing.assert_allclose(tifffile.imread(tif), data.mean(axis=(0, 1)), rtol=1e-6)
    png = tmp_path / "bf.png"
    assert run(["virtual", str(path), "-d", "bf:3", "--out", str(png)]).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_virtual_errors_are_clear_and_write_nothing(cube_file, tmp_path, monkeypatch, capsys):
    path, _ = cube_file
    code, io = run_main(["virtual", str(path), "-d", "bf:3", "--out", str(tmp_path / "x.jpg")], monkeypatch, capsys)
    assert code == 2 and "unknown extension" in io.err and "Fix:" in io.err
    code, io = run_main(["virtual", str(tmp_path / "nope.npy"), "-d", "bf:3", "--out", str(tmp_path / "x.npy")], monkeypatch, capsys)
    assert code == 2 and "nope.npy" in io.err
    existing = tmp_path / "keep.npy"
    np.save(existing, np.arange(3))
    code, io = run_main(["virtual", str(path), "-d", "bf:3", "--out", str(existing)], monkeypatch, capsys)
    assert code == 2 and "already exists" in io.err
    np.testing.assert_array_equal(np.load(existing), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.npy", "keep.npy"]


def test_virtual_centered_uses_calibration_sidecar(cube_file, tmp_path):
    path, data = cube_file
    qx0 = np.full((4, 3), 6.0)
    qy0 = np.full((4, 3), 9.0)
    from stemforge.core import Calibration

    (tmp_path / "cube.npy.calibration.json").write_text(Calibration(qx0=qx0, qy0=qy0).to_json())
    out = tmp_path / "bf.npy"
    assert run(["virtual", str(path), "-d", "bf:2.5", "--centered", "--out", str(out)]).exit_code == 0
    qx, qy = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    np.testing.assert_allclose(np.load(out), data[..., np.hypot(qx - 6, qy - 9) < 2.5].sum(-1))
    assert json.loads((tmp_path / "cube.npy.calibration.json").read_text())["qx0"][0][0] == 6.0


def test_nan_frames_stop_virtual_and_calibrate_before_any_output(tmp_path, monkeypatch, capsys):
    data = np.ones((3, 2, 12, 12), np.float32)
    data[2, 1, 5, 5] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, data)
    code, io = run_main(["virtual", str(path), "-d", "bf:3", "--out", str(tmp_path / "bf.png")], monkeypatch, capsys)
    assert code == 2 and "rx=2, ry=1" in io.err and "Fix:" in io.err
    code, io = run_main(["calibrate", str(path)], monkeypatch, capsys)
    assert code == 2 and "rx=2, ry=1" in io.err
    code, io = run_main(["calibrate", str(path), "--q-pixel-size", "-0.01"], monkeypatch, capsys)
    assert code == 2 and "q_pixel_size must be a positive" in io.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]
