"""Virtual crystal: mixed sites scatter as the occupancy-weighted mean of their species."""

import numpy as np
import pytest
from abtem.parametrizations import validate_parametrization
from pymatgen.core import Lattice, Structure

from stemforge.core.errors import ConfigurationError
from stemforge.core.units import electron_wavelength
from stemforge.datasets.factory import diamond_cell
from stemforge.simulate.labels import crystal_metadata, structure_factors
from stemforge.simulate.multislice import DetectorGrid, simulate_cbed, slice_potentials
from stemforge.simulate.orientation import orient
from stemforge.simulate.strain import Material
from stemforge.simulate.virtual_crystal import SECOND_FRACTION, SECOND_NUMBER, mix

LOBATO = validate_parametrization("lobato")
A = 5.5  # one lattice for every composition: only the scattering differs
G = np.array([[0.0, 0.0], [0.26, 0.0], [0.26, 0.37], [0.9, -0.5]])  # Å⁻¹, in-plane


def oriented(composition, axis=(0, 0, 1)):
    material = Material("test", A, tuple(composition))
    return orient(diamond_cell(material), axis)


def substituted(atoms, fraction, second=32):
    return mix(atoms.copy(), np.full(len(atoms), second), np.full(len(atoms), fraction))


def test_an_alloy_structure_carries_its_occupancy_through_orientation():
    cell = oriented((("Si", 0.8), ("Ge", 0.2)), axis=(1, 1, 0))
    atoms = cell.atoms
    assert len(atoms) > 8 and set(atoms.numbers) == {14}  # the majority species
    assert np.all(atoms.arrays[SECOND_NUMBER] == 32)
    assert np.allclose(atoms.arrays[SECOND_FRACTION], 0.2)
    pure = oriented((("Si", 1.0),)).atoms
    assert SECOND_FRACTION not in pure.arrays  # ordered sites stay plain atoms
    # symmetry sees one kind of mixed site: the alloy keeps diamond's Fd-3m
    alloy = diamond_cell(Material("SiGe", A, (("Si", 0.8), ("Ge", 0.2))))
    assert crystal_metadata(alloy)["space_group"] == 227


@pytest.mark.parametrize("fraction", [0.0, 0.35, 1.0])
def test_mixed_sites_scatter_as_the_weighted_mean_of_their_species(fraction):
    si = oriented((("Si", 1.0),)).atoms
    ge = si.copy()
    ge.numbers[:] = 32
    mixed = substituted(si, fraction)
    # static, and with each species' own Debye-Waller damping (rms displacements, Å)
    for sigma in (None, {"Si": 0.076, "Ge": 0.085}):
        factors = [structure_factors(a, G, LOBATO, sigma) for a in (si, ge, mixed)]
        expected = (1 - fraction) * factors[0] + fraction * factors[1]
        assert np.allclose(factors[2], expected, rtol=1e-12, atol=0)

    cell, period = np.asarray(si.cell)[:2, :2], si.cell[2, 2]
    args = (cell, period, (48, 48), 2, LOBATO)
    expected = (1 - fraction) * slice_potentials(si, *args) + fraction * slice_potentials(ge, *args)
    assert np.allclose(slice_potentials(mixed, *args), expected, rtol=1e-10, atol=1e-9)


def test_multislice_through_mixed_sites_lies_between_the_pure_crystals():
    """End to end on the fast engine (abTEM's atoms cannot carry a mean potential): Si sites
    holding Ge at occupancy 1 diffract exactly as germanium, and half-filled ones scatter
    more out of the central disk than Si and less than Ge."""
    si = oriented((("Si", 1.0),)).atoms
    ge = si.copy()
    ge.numbers[:] = 32
    detector = DetectorGrid.from_options(64, q_pixel_size=0.04)
    kwargs = dict(energy=300e3, semiangle=2.0, detector=detector, thicknesses=[20.0, 100.0])
    series = {
        name: simulate_cbed(atoms, engine="abtem", **kwargs)
        for name, atoms in [
            ("Si", si),
            ("half", substituted(si, 0.5)),
            ("full", substituted(si, 1.0)),
            ("Ge", ge),
        ]
    }
    assert [s.engine for s in series.values()] == ["abtem", "fast", "fast", "abtem"]
    fast_ge = simulate_cbed(ge, engine="fast", **kwargs).patterns
    assert np.allclose(series["full"].patterns, fast_ge, rtol=1e-5, atol=1e-9)

    radius = 2.0e-3 / electron_wavelength(300e3) / detector.q_pixel_size  # probe disk, px
    q = np.hypot(*np.meshgrid(*(np.arange(64) - detector.origin,) * 2, indexing="ij"))
    # thin (20 Å): the scattered fraction grows with the potential, before any Pendellösung
    scattered = {k: s.patterns[0][q > radius + 1].sum() for k, s in series.items()}
    assert scattered["Si"] < scattered["half"] < scattered["Ge"], scattered


def test_a_site_of_three_species_or_with_vacancies_is_refused():
    three = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.0), [{"Cu": 0.5, "Au": 0.3, "Ag": 0.2}], [[0, 0, 0]]
    )
    with pytest.raises(ConfigurationError, match="one or two species per site"):
        orient(three, (0, 0, 1))
    vacant = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.0), [{"Cu": 0.9}], [[0, 0, 0]])
    with pytest.raises(ConfigurationError, match="occupancy 0.9"):
        orient(vacant, (0, 0, 1))
