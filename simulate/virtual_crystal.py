"""Mixed sites as a virtual crystal: each scatters as the occupancy-weighted mean of its species.

An alloy such as Si₁₋ₓGeₓ holds Si and Ge at random on one set of sites. Its Bragg
(coherent) scattering is that of the mean potential, ``(1 − x) V_Si + x V_Ge`` on every site:
the virtual crystal approximation (the diffuse scattering of the disorder is left out). An
ase ``Atoms`` carries a mixed site as an atom whose ``numbers`` entry is its majority
species, with the second species' atomic number in the per-atom array :data:`SECOND_NUMBER`
at the occupancy :data:`SECOND_FRACTION` (0 on ordered sites). The arrays travel with
copies, repeats and slices of the ``Atoms``. Kinematic labels damp each species by its own
Debye-Waller factor; a frozen-phonon configuration moves a mixed site as its majority
species.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError

SECOND_NUMBER = "vca_number"
SECOND_FRACTION = "vca_fraction"


def site_arrays(structure: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, second, fraction)`` per site of a pymatgen ``Structure``: the majority
    species' atomic number, the other species' (0 if none) and its occupancy.

    Raises
    ------
    ConfigurationError
        A site holds more than two species, or is not fully occupied.
    """
    first, second, fraction = [], [], []
    for index, site in enumerate(structure):
        items = sorted(
            ((el.Z, float(occ)) for el, occ in site.species.items()), key=lambda t: -t[1]
        )
        total = sum(occ for _, occ in items)
        if len(items) > 2 or abs(total - 1.0) > 1e-6:
            raise ConfigurationError(
                f"site {index} holds {site.species} (occupancy {total:g}): the virtual crystal "
                "takes one or two species per site, fully occupied",
                "give each site one or two species whose occupancies sum to 1",
            )
        first.append(items[0][0])
        second.append(items[1][0] if len(items) == 2 else 0)
        fraction.append(items[1][1] if len(items) == 2 else 0.0)
    return np.array(first, int), np.array(second, int), np.array(fraction, float)


def site_types(structure: Any) -> np.ndarray:
    """Symmetry types of a pymatgen ``Structure``'s sites (e.g. for spglib): the atomic
    number of an ordered site; mixed sites of one composition share a type of their own."""
    first, second, fraction = site_arrays(structure)
    if not np.any(fraction > 0):
        return first
    keys = list(zip(first.tolist(), second.tolist(), np.round(fraction, 9).tolist(), strict=True))
    index = {key: 1000 + i for i, key in enumerate(dict.fromkeys(keys))}  # clear of every Z
    return np.array([key[0] if key[2] == 0 else index[key] for key in keys])


def mix(atoms: Any, second: np.ndarray, fraction: np.ndarray) -> Any:
    """``atoms`` with mixed sites: ``second`` (atomic numbers, 0 = none) at ``fraction``."""
    second = np.asarray(second, int)
    fraction = np.where(second > 0, np.asarray(fraction, float), 0.0)
    if np.any(fraction > 0):
        atoms.new_array(SECOND_NUMBER, second)
        atoms.new_array(SECOND_FRACTION, fraction)
    return atoms


def is_virtual(atoms: Any) -> bool:
    """True where some site of ``atoms`` is mixed."""
    return SECOND_FRACTION in atoms.arrays and bool(np.any(atoms.arrays[SECOND_FRACTION] > 0))


def species_weights(
    first: np.ndarray, second: np.ndarray | None = None, fraction: np.ndarray | None = None
) -> list[tuple[int, np.ndarray]]:
    """``(Z, weight per site)`` of every species: a site counts ``1 − c`` for its first
    species and ``c`` for its second, 1 for the only species of an ordered site."""
    first = np.asarray(first, int)
    if fraction is None:
        second, fraction = np.zeros_like(first), np.zeros(len(first))
    second, fraction = np.asarray(second, int), np.asarray(fraction, float)
    weights: dict[int, np.ndarray] = {}
    for number, share in ((first, 1.0 - fraction), (second, fraction)):
        for z in np.unique(number[(number > 0) & (share > 0)]):
            weights[int(z)] = weights.get(int(z), 0.0) + np.where(number == z, share, 0.0)
    return sorted(weights.items())


def atoms_species(atoms: Any) -> list[tuple[int, np.ndarray]]:
    """:func:`species_weights` of an ase ``Atoms`` (mixed sites as :func:`mix` marks them)."""
    return species_weights(
        atoms.numbers, atoms.arrays.get(SECOND_NUMBER), atoms.arrays.get(SECOND_FRACTION)
    )
