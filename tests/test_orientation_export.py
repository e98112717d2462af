"""Orientation export: Bunge Euler angles, quaternions, IPF colours and keys, EDAX .ang files."""

import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
from scipy.spatial.transform import Rotation

from stemforge.core.errors import ConfigurationError, InvalidDataError, ShapeError
from stemforge.infer.map_figures import write_ipf_png, write_phase_png
from stemforge.infer.orientation_export import (
    AngPhase,
    _sector,
    _space_group_point_group,
    euler_bunge,
    ipf_colors,
    ipf_directions,
    ipf_key,
    ipf_key_labels,
    quaternions,
    rotations_from_euler,
    standard_frame,
    write_ang,
)
from stemforge.simulate.orientation import conventional_standard_structure, quiet_spglib

RED, GREEN, BLUE = np.eye(3)


def _conventional(space_group, lattice, species, coords):
    structure = Structure.from_spacegroup(space_group, lattice, species, coords)
    return conventional_standard_structure(structure)


def _laue_rotations(structure):
    """Proper rotations of the Laue group, Cartesian frame of ``structure``."""
    with quiet_spglib():
        ops = SpacegroupAnalyzer(structure).get_point_group_operations(cartesian=True)
    matrices = np.array([op.rotation_matrix for op in ops])
    matrices = matrices * np.sign(np.linalg.det(matrices))[:, None, None]
    _, first = np.unique(np.round(matrices, 6), axis=0, return_index=True)
    return matrices[np.sort(first)]


@pytest.fixture(scope="module")
def si():
    return _conventional("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])


@pytest.fixture(scope="module")
def mg():
    # pymatgen's conventional hexagonal cell has a at -60° from x: not the standard frame
    return _conventional(
        "P6_3/mmc", Lattice.hexagonal(3.209, 5.211), ["Mg"], [[1 / 3, 2 / 3, 0.25]]
    )


def _beam_along(direction, spin=0.0):
    """A rotation U with Uᵀ ẑ ∥ ``direction`` (Cartesian, crystal frame), turned by ``spin``."""
    z = np.asarray(direction, dtype=float)
    z = z / np.linalg.norm(z)
    helper = np.eye(3)[np.argmin(np.abs(z))]
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    u = np.stack([x, np.cross(z, x), z])  # rows: U maps z to ẑ
    return Rotation.from_euler("z", spin).as_matrix() @ u


# ---- Euler angles and quaternions ---------------------------------------------------------------


def test_euler_round_trip_over_random_rotations():
    u = Rotation.random(2000, random_state=0).as_matrix()
    euler = euler_bunge(u)
    assert euler.shape == (2000, 3)
    assert np.all((euler[:, [0, 2]] >= 0) & (euler[:, [0, 2]] < 2 * np.pi))
    assert np.all((euler[:, 1] >= 0) & (euler[:, 1] <= np.pi))
    np.testing.assert_allclose(rotations_from_euler(euler), u, atol=1e-12)
    np.testing.assert_allclose(euler_bunge(rotations_from_euler(euler)), euler, atol=1e-10)
    # batch shapes are kept
    assert euler_bunge(u.reshape(20, 100, 3, 3)).shape == (20, 100, 3)


def test_euler_angles_describe_the_orientation_g_equal_u_transposed():
    phi1, big_phi, phi2 = 0.3, 0.7, 1.1
    u = rotations_from_euler([phi1, big_phi, phi2])
    # U = Rz(φ1) Rx(Φ) Rz(φ2) as active rotations (scipy intrinsic ZXZ)
    np.testing.assert_allclose(
        u, Rotation.from_euler("ZXZ", [phi1, big_phi, phi2]).as_matrix(), atol=1e-15
    )
    # the beam in crystal coordinates, g[:, 2] = (s2 sΦ, c2 sΦ, cΦ)
    beam = u.T @ [0, 0, 1]
    np.testing.assert_allclose(
        beam,
        [math.sin(phi2) * math.sin(big_phi), math.cos(phi2) * math.sin(big_phi), math.cos(big_phi)],
        atol=1e-15,
    )
    np.testing.assert_allclose(beam, [0.57413154, 0.29221464, 0.76484219], atol=1e-8)
    # orix 0.15.0: Orientation.from_euler([0.3, 0.7, 1.1]).data
    np.testing.assert_allclose(
        quaternions(u), [0.71847188, -0.3158298, 0.1335307, -0.60516052], atol=1e-8
    )


def test_crystal_turned_about_the_beam():
    u = Rotation.from_euler("z", 30, degrees=True).as_matrix()  # crystal +30° about the beam
    np.testing.assert_allclose(euler_bunge(u), [np.pi / 6, 0, 0], atol=1e-12)
    np.testing.assert_allclose(euler_bunge(np.eye(3)), [0, 0, 0], atol=1e-15)
    np.testing.assert_allclose(euler_bunge(np.diag([1.0, -1, -1])), [0, np.pi, 0], atol=1e-12)
    # 90° about lab x: the crystal's +y axis ends along the beam
    u = Rotation.from_euler("x", 90, degrees=True).as_matrix()
    np.testing.assert_allclose(euler_bunge(u), [0, np.pi / 2, 0], atol=1e-12)
    np.testing.assert_allclose(u.T @ [0, 0, 1], [0, 1, 0], atol=1e-15)


def test_gimbal_lock_cases_are_exact_and_vectorised():
    euler = np.array(
        [
            [0.4, 0.0, 1.3],
            [0.4, np.pi, 1.3],
            [5.9, 0.0, 1.0],
            [0.4, 1e-13, 1.3],
            [0.4, np.pi - 1e-13, 1.3],
            [0.4, 1e-6, 1.3],
        ]
    )
    u = rotations_from_euler(euler)
    back = euler_bunge(u)
    np.testing.assert_allclose(back[0], [1.7, 0, 0], atol=1e-12)  # φ1 + φ2
    np.testing.assert_allclose(back[1], [2 * np.pi - 0.9, np.pi, 0], atol=1e-12)  # φ1 - φ2
    np.testing.assert_allclose(back[2], [6.9 - 2 * np.pi, 0, 0], atol=1e-12)
    np.testing.assert_allclose(back[5], euler[5], atol=1e-9)  # not locked: both kept
    np.testing.assert_allclose(rotations_from_euler(back), u, atol=1e-11)


def test_quaternions_are_unit_w_positive_and_rotate_sample_into_crystal():
    u = Rotation.random(500, random_state=1).as_matrix()
    q = quaternions(u)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-12)
    assert np.all(q[:, 0] >= 0)
    w, x, y, z = q.T
    active = np.stack(
        [
            [1 - 2 * (y**2 + z**2), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x**2 + z**2), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x**2 + y**2)],
        ]
    ).transpose(2, 0, 1)
    np.testing.assert_allclose(active, np.swapaxes(u, 1, 2), atol=1e-12)  # R(q) = g = Uᵀ
    nan = np.full((2, 3, 3), np.nan)
    assert np.all(np.isnan(quaternions(nan))) and np.all(np.isnan(euler_bunge(nan)))
    with pytest.raises(ShapeError):
        euler_bunge(np.eye(4))


# ---- IPF colours ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "colour"),
    [
        ((0, 0, 1), RED),
        ((1, 0, 0), RED),
        ((0, -1, 0), RED),
        ((1, 0, 1), GREEN),
        ((0, 1, -1), GREEN),
        ((1, 1, 1), BLUE),
        ((-1, 1, -1), BLUE),
    ],
)
def test_cubic_corners_are_pure_red_green_blue(si, direction, colour):
    symmetry = _laue_rotations(si)
    u = np.stack([_beam_along(direction, spin) for spin in (0.0, 0.7, 2.0)])
    np.testing.assert_allclose(ipf_colors(u, symmetry, "cubic"), [colour] * 3, atol=1e-9)


def test_symmetry_equivalent_orientations_get_the_same_colour(si, mg):
    u = Rotation.random(300, random_state=2).as_matrix()
    for structure, system in ((si, "cubic"), (mg, "hexagonal")):
        symmetry = _laue_rotations(structure)
        lattice = structure.lattice.matrix
        colours = ipf_colors(u, symmetry, system, lattice=lattice)
        assert colours.shape == (300, 3)
        assert np.all((colours >= 0) & (colours <= 1))
        np.testing.assert_allclose(colours.max(axis=1), 1, atol=1e-12)
        for s in symmetry:
            np.testing.assert_allclose(
                ipf_colors(u @ s, symmetry, system, lattice=lattice), colours, atol=1e-6
            )


def test_cubic_directions_land_in_the_standard_triangle(si):
    symmetry = _laue_rotations(si)
    u = Rotation.random(1000, random_state=3).as_matrix()
    reduced = ipf_directions(u, symmetry, "cubic")
    x, y, z = reduced.T
    assert np.all(z >= x - 1e-12) and np.all(x >= y - 1e-12) and np.all(y >= -1e-12)
    # the reduced direction is an equivalent of the beam direction Uᵀ ẑ
    beam = u[:, 2, :]
    orbit = np.einsum("kij,nj->nki", np.concatenate([symmetry, -symmetry]), beam)
    assert np.all(np.min(np.linalg.norm(orbit - reduced[:, None], axis=2), axis=1) < 1e-12)


def test_hexagonal_key_in_pymatgen_frame(mg):
    symmetry = _laue_rotations(mg)
    a, b, c = mg.lattice.matrix
    assert abs(a[1]) > 1  # a is not along x in pymatgen's cell
    beams = {"0001": c, "2-1-10": a, "-12-10": b, "10-10": 2 * a + b, "01-10": a + 2 * b}
    u = np.stack([_beam_along(v, 0.4) for v in beams.values()])
    colours = ipf_colors(u, symmetry, "hexagonal", lattice=mg.lattice.matrix)
    np.testing.assert_allclose(colours, [RED, GREEN, GREEN, BLUE, BLUE], atol=1e-9)
    reduced = ipf_directions(u, symmetry, "hexagonal", lattice=mg.lattice.matrix)
    np.testing.assert_allclose(
        reduced[1] @ standard_frame(mg.lattice.matrix).T, [1, 0, 0], atol=1e-9
    )


@pytest.mark.parametrize(
    ("system", "space_group", "lattice", "corners"),
    [
        ("tetragonal", "P4/mmm", Lattice.tetragonal(3, 5), [(0, 0, 1), (1, 0, 0), (1, 1, 0)]),
        ("orthorhombic", "Pmmm", Lattice.orthorhombic(3, 4, 5), [(0, 0, 1), (1, 0, 0), (0, 1, 0)]),
    ],
)
def test_tetragonal_and_orthorhombic_corners(system, space_group, lattice, corners):
    structure = _conventional(space_group, lattice, ["Si"], [[0, 0, 0]])
    symmetry = _laue_rotations(structure)
    u = np.stack([_beam_along(np.asarray(uvw) @ structure.lattice.matrix) for uvw in corners])
    np.testing.assert_allclose(ipf_colors(u, symmetry, system), np.eye(3), atol=1e-9)


@pytest.mark.parametrize(
    ("system", "space_group", "lattice", "species", "coords", "laue"),
    [
        (
            "trigonal",
            "P-3m1",
            Lattice.hexagonal(3, 5),
            ["Si", "O"],
            [[1 / 3, 2 / 3, 0.2], [0, 0, 0.5]],
            "-3m",
        ),
        (
            "monoclinic",
            "P2_1/c",
            Lattice.monoclinic(5, 6, 7, 100),
            ["Si"],
            [[0.1, 0.2, 0.3]],
            "2/m",
        ),
        (
            "triclinic",
            "P-1",
            Lattice.from_parameters(5, 6, 7, 80, 100, 110),
            ["Si"],
            [[0.1, 0.2, 0.3]],
            "-1",
        ),
        (
            "cubic",
            "Pa-3",
            Lattice.cubic(5.6),
            ["Fe", "S"],
            [[0, 0, 0], [0.385, 0.385, 0.385]],
            "m-3",
        ),
    ],
)
def test_generic_key_is_symmetric_and_white_at_the_pole(
    system, space_group, lattice, species, coords, laue
):
    structure = _conventional(space_group, lattice, species, coords)
    symmetry = _laue_rotations(structure)
    matrix = structure.lattice.matrix
    assert _sector(symmetry, system, matrix).laue == laue
    u = Rotation.random(200, random_state=4).as_matrix()
    colours = ipf_colors(u, symmetry, system, lattice=matrix)
    assert np.all((colours >= 0) & (colours <= 1 + 1e-12))
    for s in symmetry:
        np.testing.assert_allclose(
            ipf_colors(u @ s, symmetry, system, lattice=matrix), colours, atol=1e-6
        )
    # the sector's pole (c*, or the 2-fold axis b of the monoclinic cell) is white
    pole = np.cross(matrix[0], matrix[1]) if system != "monoclinic" else matrix[1]
    np.testing.assert_allclose(
        ipf_colors(_beam_along(pole), symmetry, system, lattice=matrix), [1, 1, 1], atol=1e-6
    )


def test_ipf_colors_nan_and_mismatched_symmetry(si, mg):
    u = np.stack([np.eye(3), np.full((3, 3), np.nan)])
    colours = ipf_colors(u, _laue_rotations(si), "cubic")
    np.testing.assert_allclose(colours[0], RED)
    assert np.all(np.isnan(colours[1]))
    with pytest.raises(ConfigurationError, match="not one of a cubic"):
        ipf_colors(u, _laue_rotations(mg), "cubic", lattice=mg.lattice.matrix)
    with pytest.raises(ConfigurationError, match="unknown crystal system"):
        ipf_colors(u, _laue_rotations(si), "cubical")
    with pytest.raises(ShapeError):
        ipf_colors(u, np.eye(4), "cubic")


def test_ipf_key_image_and_labels(si, mg):
    symmetry = _laue_rotations(si)
    key = ipf_key(symmetry, "cubic", size=120)
    assert key.shape[2] == 4 and max(key.shape[:2]) == 120
    assert set(np.unique(key[..., 3])) == {0.0, 1.0}
    # the triangle fills about half of its bounding box in stereographic projection
    assert 0.4 < key[..., 3].mean() < 0.65
    labels = ipf_key_labels(symmetry, "cubic", size=120)
    assert [text for text, _ in labels] == ["001", "101", "111"]
    rows, cols = np.nonzero(key[..., 3])
    for (_, (r, c)), colour in zip(labels, np.eye(3), strict=True):
        # the inside pixel nearest to each corner carries that corner's colour
        nearest = np.argmin((rows - r) ** 2 + (cols - c) ** 2)
        assert np.argmax(key[rows[nearest], cols[nearest], :3]) == np.argmax(colour)
    hexagonal = ipf_key_labels(_laue_rotations(mg), "hexagonal", lattice=mg.lattice.matrix)
    assert [text for text, _ in hexagonal] == ["0001", "2-1-10", "10-10"]


# ---- .ang files ----------------------------------------------------------------------------------


def _read_ang(path):
    """Header lines (without '# ') and the data table of an .ang file."""
    header, rows = [], []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            header.append(line[1:].strip())
        elif line.strip():
            rows.append([float(v) for v in line.split()])
    return header, np.array(rows)


def _value(header, key):
    """Values of the header lines ``KEY value`` (tabs and spaces between)."""
    parts = [line.split(None, 1) for line in header]
    return [p[1].strip() if len(p) > 1 else "" for p in parts if p and p[0] == key]


@pytest.fixture()
def scan(si, mg):
    rx, ry = 3, 4
    u = Rotation.random(rx * ry, random_state=5).as_matrix().reshape(rx, ry, 3, 3)
    u[0, 0] = np.eye(3)
    phase = np.array([[0, 0, 1, 1], [1, -1, 0, 0], [0, 1, -1, 1]])
    u[1, 1] = np.nan  # not indexed: ignored
    score = np.arange(12.0).reshape(rx, ry)
    reliability = np.linspace(0, 1, 12).reshape(rx, ry)
    phases = [AngPhase.from_structure(si), AngPhase.from_structure(mg, name="magnesium (hcp)")]
    return u, phase, score, reliability, phases


def test_write_ang_header_and_columns(tmp_path, scan, mg):
    u, phase, score, reliability, phases = scan
    path = write_ang(
        tmp_path / "map.ang",
        u,
        phase,
        phases=phases,
        score=score,
        reliability=reliability,
        step=(20.0, 10.0),
    )
    header, data = _read_ang(path)
    assert header.count("Phase 1") == 1 and header.count("Phase 2") == 1
    assert _value(header, "MaterialName") == ["Si", "magnesium (hcp)"]
    assert _value(header, "Formula") == ["Si", "Mg"]
    assert _value(header, "Symmetry") == ["43", "62"]
    lattices = [[float(v) for v in s.split()] for s in _value(header, "LatticeConstants")]
    np.testing.assert_allclose(
        lattices, [[5.431] * 3 + [90] * 3, [3.209, 3.209, 5.211, 90, 90, 120]]
    )
    assert "GRID: SqrGrid" in header
    assert "XSTEP: 0.0010000" in header and "YSTEP: 0.0020000" in header  # µm; x = scan y
    assert "NCOLS_ODD: 4" in header and "NCOLS_EVEN: 4" in header and "NROWS: 3" in header
    assert data.shape == (12, 10)
    # rows in C order of (Rx, Ry): .ang x = scan y, .ang y = scan x
    i, j = np.divmod(np.arange(12), 4)
    np.testing.assert_allclose(data[:, 3], j * 0.001)
    np.testing.assert_allclose(data[:, 4], i * 0.002)
    indexed = phase.ravel() >= 0
    np.testing.assert_array_equal(data[:, 7], phase.ravel() + 1)
    np.testing.assert_allclose(data[indexed, 5], score.ravel()[indexed])
    np.testing.assert_allclose(data[indexed, 6], reliability.ravel()[indexed], atol=1e-6)
    # not indexed: EDAX's 4π, IQ 0, CI -1, phase 0, fit 180
    np.testing.assert_allclose(data[~indexed, :3], 12.56637)
    np.testing.assert_array_equal(data[~indexed][:, [5, 6, 7, 8, 9]], [[0, -1, 0, 0, 180]] * 2)
    # Euler angles: of U for the cubic phase, of U Fᵀ (standard frame) for the hexagonal one
    np.testing.assert_allclose(data[0, :3], 0)
    cubic = phase.ravel() == 0
    flat = u.reshape(-1, 3, 3)
    np.testing.assert_allclose(rotations_from_euler(data[cubic, :3]), flat[cubic], atol=2e-5)
    hexagonal = phase.ravel() == 1
    frame = standard_frame(mg.lattice.matrix)
    np.testing.assert_allclose(
        rotations_from_euler(data[hexagonal, :3]), flat[hexagonal] @ frame.T, atol=2e-5
    )
    # the beam direction read back, in the standard frame: F Uᵀ ẑ
    beam = rotations_from_euler(data[hexagonal, :3])[:, 2, :]
    np.testing.assert_allclose(beam, flat[hexagonal][:, 2, :] @ frame.T, atol=2e-5)


def test_write_ang_rejects_bad_input(tmp_path, scan):
    u, phase, score, reliability, phases = scan
    kwargs = {"phases": phases, "score": score, "reliability": reliability}
    with pytest.raises(ShapeError):
        write_ang(tmp_path / "a.ang", u[:2], phase, **kwargs)
    with pytest.raises(ConfigurationError, match="phase indices"):
        write_ang(tmp_path / "a.ang", u, phase + 1, **kwargs)
    bad = u.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InvalidDataError):
        write_ang(tmp_path / "a.ang", bad, phase, **kwargs)
    unknown = {"name": "x", "formula": "X", "point_group": "7/m", "lattice": (1, 1, 1, 90, 90, 90)}
    with pytest.raises(ConfigurationError, match="unknown point group"):
        write_ang(tmp_path / "a.ang", u, phase, **{**kwargs, "phases": [unknown] * 2})
    assert not any(tmp_path.iterdir())  # nothing half-written
    write_ang(tmp_path / "a.ang", u, phase, **kwargs)
    with pytest.raises(ConfigurationError, match="already exists"):
        write_ang(tmp_path / "a.ang", u, phase, overwrite=False, **kwargs)


def test_phase_dicts_and_crystal_systems(tmp_path):
    phases = [
        {
            "name": "α-Fe",
            "formula": "Fe",
            "crystal_system": "cubic",
            "lattice": (2.87, 2.87, 2.87, 90, 90, 90),
        }
    ]
    path = write_ang(
        tmp_path / "fe.ang",
        np.tile(np.eye(3), (1, 2, 1, 1)),
        np.zeros((1, 2), int),
        phases=phases,
        score=np.ones((1, 2)),
        reliability=np.ones((1, 2)),
    )
    header, data = _read_ang(path)
    assert _value(header, "MaterialName") == ["alpha-Fe"]  # ASCII for orix and MTEX
    assert _value(header, "Symmetry") == ["43"]
    assert data.shape == (2, 10)


@pytest.mark.parametrize(
    ("point_group", "lattice", "code"),
    [
        ("m-3m", (4, 4, 4, 90, 90, 90), "43"),
        ("-43m", (4, 4, 4, 90, 90, 90), "43"),
        ("m-3", (4, 4, 4, 90, 90, 90), "23"),
        ("6/mmm", (3, 3, 5, 90, 90, 120), "62"),
        ("6/m", (3, 3, 5, 90, 90, 120), "6"),
        ("-3m1", (3, 3, 5, 90, 90, 120), "32"),
        ("-31m", (3, 3, 5, 90, 90, 120), "3"),
        ("-3", (3, 3, 5, 90, 90, 120), "3"),
        ("4/mmm", (3, 3, 5, 90, 90, 90), "42"),
        ("4/m", (3, 3, 5, 90, 90, 90), "4"),
        ("mm2", (3, 4, 5, 90, 90, 90), "22"),
        ("2/m", (3, 4, 5, 90, 100, 90), "20"),
        ("2/m", (3, 4, 5, 90, 90, 100), "2"),
        ("-1", (3, 4, 5, 80, 100, 110), "1"),
        ("hexagonal", (3, 3, 5, 90, 90, 120), "62"),
    ],
)
def test_tsl_symmetry_codes(point_group, lattice, code):
    assert AngPhase("x", "X", point_group, lattice).tsl_symmetry() == code


def test_point_group_from_space_group_and_unique_axis_a():
    cases = {
        "P6_3/mmc": "6/mmm",
        "Fd-3m": "m-3m",
        "P2_12_12_1": "222",
        "I4_1/amd": "4/mmm",
        "P-31c": "-31m",
        "P3_121": "321",
        "C2/c": "2/m",
        "Pnma": "mmm",
        "Ia-3d": "m-3m",
    }
    assert {k: _space_group_point_group(k) for k in cases} == cases
    with pytest.raises(ConfigurationError, match="unique axis a"):
        AngPhase("x", "X", "2/m", (3, 4, 5, 100, 90, 90)).tsl_symmetry()


# ---- figures ---------------------------------------------------------------------------------------


def test_ipf_and_phase_pngs(tmp_path, si):
    import matplotlib.image

    symmetry = _laue_rotations(si)
    u = Rotation.random(6 * 5, random_state=6).as_matrix().reshape(6, 5, 3, 3)
    colours = ipf_colors(u, symmetry, "cubic")
    mask = np.ones((6, 5), bool)
    mask[0, 0] = False
    png = write_ipf_png(
        tmp_path / "ipf.png",
        colours,
        mask=mask,
        key=ipf_key(symmetry, "cubic", 64),
        key_labels=ipf_key_labels(symmetry, "cubic", 64),
        title="Si IPF-Z",
    )
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    phase = np.array([[0, 1, -1, 0, 1]] * 6)
    png = write_phase_png(
        tmp_path / "phase.png",
        phase,
        ["Si", "Mg"],
        title="phases",
        score=np.random.default_rng(0).random((6, 5)),
    )
    assert matplotlib.image.imread(png).ndim == 3


# ---- orix (not a dependency: these run only where orix is installed) -------------------------------


@pytest.fixture(scope="module")
def orix_map(tmp_path_factory, si, mg):
    pytest.importorskip("orix")
    from orix import io

    rx, ry = 4, 5
    u = Rotation.random(rx * ry, random_state=7).as_matrix().reshape(rx, ry, 3, 3)
    u[0, 0] = np.eye(3)
    u[0, 1] = _beam_along(np.ones(3), 0.3)  # [111] along the beam
    phase = np.zeros((rx, ry), int)
    phase[2:] = 1
    phase[1, 3] = -1
    path = tmp_path_factory.mktemp("orix") / "map.ang"
    phases = [AngPhase.from_structure(si), AngPhase.from_structure(mg)]
    write_ang(
        path,
        u,
        phase,
        phases=phases,
        score=np.ones((rx, ry)),
        reliability=np.ones((rx, ry)),
        step=(30.0, 20.0),
    )
    return io.load(str(path)), u, phase


def test_orix_reads_phases_grid_and_not_indexed(orix_map):
    xmap, u, phase = orix_map
    assert xmap.shape == phase.shape  # (Rx, Ry)
    assert xmap.scan_unit == "um"
    assert (xmap.dy, xmap.dx) == pytest.approx((0.003, 0.002))
    assert [xmap.phases[i].name for i in (1, 2)] == ["Si", "Mg"]
    assert [xmap.phases[i].point_group.name for i in (1, 2)] == ["432", "622"]
    assert [xmap.phases[i].point_group.laue.name for i in (1, 2)] == ["m-3m", "6/mmm"]
    np.testing.assert_allclose(xmap.phases[1].structure.lattice.abcABG(), [5.431] * 3 + [90] * 3)
    np.testing.assert_allclose(
        xmap.phases[2].structure.lattice.abcABG(), [3.209, 3.209, 5.211, 90, 90, 120]
    )
    np.testing.assert_array_equal(
        xmap.get_map_data("phase_id"), np.where(phase >= 0, phase + 1, -1)
    )


def test_orix_orientations_match_ours(orix_map, si, mg):
    from orix.quaternion import Orientation
    from orix.vector import Vector3d

    xmap, u, phase = orix_map
    quats = xmap.rotations.data.reshape(*phase.shape, 4)  # all points, map order
    for index, (structure, system) in enumerate(((si, "cubic"), (mg, "hexagonal"))):
        pg = xmap.phases[index + 1].point_group
        rows = phase == index
        ori = Orientation(quats[rows], symmetry=pg)
        beam = (ori * Vector3d.zvector()).data  # crystal direction along sample z
        frame = standard_frame(structure.lattice.matrix)
        np.testing.assert_allclose(beam, u[rows][:, 2, :] @ frame.T, atol=1e-4)
        # orix's fundamental sector and ours agree (m-3m, 6/mmm: same triangles)
        in_sector = (ori * Vector3d.zvector()).in_fundamental_sector(pg.laue).data
        symmetry = _laue_rotations(structure)
        ours = ipf_directions(u[rows], symmetry, system, lattice=structure.lattice.matrix)
        np.testing.assert_allclose(in_sector, ours @ frame.T, atol=1e-4)


def test_orix_ipf_z_of_identity_and_111(orix_map):
    from orix.plot import IPFColorKeyTSL
    from orix.quaternion import Orientation
    from orix.vector import Vector3d

    xmap, _, _ = orix_map
    pg = xmap.phases[1].point_group
    ori = Orientation(xmap.rotations.data[:2], symmetry=pg)  # map points (0, 0) and (0, 1)
    ipf_z = (ori * Vector3d.zvector()).in_fundamental_sector(pg.laue).data
    np.testing.assert_allclose(ipf_z[0], [0, 0, 1], atol=1e-5)
    np.testing.assert_allclose(ipf_z[1], np.ones(3) / np.sqrt(3), atol=1e-5)
    # orix's TSL key puts the same colours on the corners as ours
    colours = IPFColorKeyTSL(pg.laue).orientation2color(ori)
    np.testing.assert_allclose(colours, [RED, BLUE], atol=0.02)


def test_orix_frames_and_groups_of_monoclinic_and_trigonal_phases(tmp_path):
    """pymatgen puts monoclinic a along y: the file must still hold orix's frame and group."""
    pytest.importorskip("orix")
    from orix import io
    from orix.quaternion import Orientation
    from orix.vector import Vector3d

    structures = [
        _conventional("P2_1/c", Lattice.monoclinic(5, 6, 7, 100), ["Si"], [[0.1, 0.2, 0.3]]),
        _conventional(
            "P-3m1", Lattice.hexagonal(3, 5), ["Si", "O"], [[1 / 3, 2 / 3, 0.2], [0, 0, 0.5]]
        ),
    ]
    u = Rotation.random(6, random_state=8).as_matrix().reshape(2, 3, 3, 3)
    phase = np.array([[0, 0, 0], [1, 1, 1]])
    phases = [AngPhase.from_structure(s) for s in structures]
    write_ang(tmp_path / "low.ang", u, phase, phases=phases, score=phase, reliability=phase + 1)
    xmap = io.load(str(tmp_path / "low.ang"))
    quats = xmap.rotations.data.reshape(2, 3, 4)
    for index, structure in enumerate(structures):
        orix_phase = xmap.phases[index + 1]
        assert orix_phase.point_group.name == ("121", "321")[index]
        frame = standard_frame(structure.lattice.matrix)
        # orix's crystal frame (x ∥ a, z ∥ c*) is our standard frame
        np.testing.assert_allclose(
            orix_phase.structure.lattice.base, structure.lattice.matrix @ frame.T, atol=1e-9
        )
        ori = Orientation(quats[index], symmetry=orix_phase.point_group)
        beam = (ori * Vector3d.zvector()).data
        np.testing.assert_allclose(beam, u[index][:, 2, :] @ frame.T, atol=1e-4)
        # the Laue rotations, in the standard frame, are orix's point group
        ours = np.einsum("ij,kjl,ml->kim", frame, _laue_rotations(structure), frame)
        theirs = orix_phase.point_group.to_matrix()
        assert len(ours) == len(theirs)
        assert all(np.min(np.abs(theirs - m).max(axis=(1, 2))) < 1e-6 for m in ours)
