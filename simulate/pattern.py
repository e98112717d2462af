"""The factory's one entry point: a structure and a zone axis in, labelled samples out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stemforge.core.errors import ConfigurationError
from stemforge.core.units import electron_wavelength
from stemforge.simulate.labels import KinematicLabels, crystal_metadata
from stemforge.simulate.multislice import (
    DetectorGrid,
    abtem_parametrization,
    simulate_cbed,
    validate_aberrations,
)
from stemforge.simulate.orientation import (
    MAX_RESIDUAL_STRAIN,
    apply_strain,
    conventional_standard_structure,
    orient,
    validate_strain,
)
from stemforge.simulate.sample import Sample


def _structure_and_id(record: Any) -> tuple[Any, str | None]:
    """A pymatgen Structure, or a record holding one (attribute or key ``structure``)."""
    from pymatgen.core import Structure

    if isinstance(record, Structure):
        return record, None
    if isinstance(record, Mapping):
        structure, ident = record.get("structure"), record.get("structure_id", record.get("id"))
    else:
        structure = getattr(record, "structure", None)
        ident = getattr(record, "structure_id", getattr(record, "id", None))
    if not isinstance(structure, Structure):
        raise ConfigurationError(
            f"cannot simulate a {type(record).__name__}: no pymatgen Structure in it",
            "pass a pymatgen Structure or a structure record with a .structure attribute",
        )
    return structure, None if ident is None else str(ident)


def simulate_patterns(
    structure_record_or_structure: Any,
    zone_axis: Sequence[int],
    *,
    thicknesses: Sequence[float],
    energy: float = 300e3,
    semiangle: float = 2.0,
    n_pixels: int = 128,
    q_max: float | None = None,
    q_pixel_size: float | None = None,
    defocus: float = 0.0,
    aberrations: dict[str, float] | None = None,
    phonons: int = 0,
    phonon_sigma: float | dict[str, float] = 0.08,
    strain: Any = None,
    mistilt: tuple[float, float] | None = None,
    x_reflection: Sequence[int] | None = None,
    max_repetitions: int = 8,
    max_residual_strain: float = MAX_RESIDUAL_STRAIN,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    oversampling: float = 2.0,
    min_cutoff: float = 4.0,
    parametrization: str = "lobato",
    engine: str = "abtem",
) -> list[Sample]:
    """Simulate labelled CBED patterns of a crystal along a zone axis, one per thickness.

    One multislice pass gives every thickness. Deterministic for a seed; safe to call in a
    dask worker (no global state; FFT and BLAS threads are set by ``threads``).

    Parameters
    ----------
    structure_record_or_structure
        pymatgen ``Structure`` or a record with ``.structure`` (and ``.structure_id``/``.id``).
    zone_axis
        ``[uvw]`` in the conventional standard cell.
    thicknesses
        Sample thicknesses (Å); each is rounded to whole slices (~2 Å), the metadata has the
        value simulated.
    energy, semiangle
        Beam energy (eV) and convergence semiangle (mrad).
    n_pixels, q_max, q_pixel_size
        Detector: ``n_pixels²`` pixels of ``q_pixel_size`` Å⁻¹, or ``q_max`` Å⁻¹ at the edge
        (``q_max = (n_pixels // 2) · q_pixel_size``); default ``q_max`` = 2 Å⁻¹.
    defocus, aberrations
        Probe defocus (Å, ``-C10``, abTEM's sign) and polar aberrations (``C30``/``Cs`` ...).
    phonons, phonon_sigma
        Frozen-phonon runs averaged (0: static) and their rms displacement (Å) per axis.
    strain
        Homogeneous strain (3×3 or in-plane 2×2 displacement gradient, lab frame).
    mistilt
        Crystal tilt ``(θx, θy)`` (mrad) against the zone axis.
    x_reflection
        ``(hkl)`` to put along detector +qx (default: the shortest ZOLZ reflection).
    max_repetitions, max_residual_strain
        Bounds of the orthogonal periodic cell (see :func:`~stemforge.simulate.orientation.orient`).
    seed
        Seed of everything random (frozen phonons).
    device, threads
        'cpu' or 'gpu'; CPU threads for FFT and BLAS.
    oversampling, min_cutoff, parametrization
        Accuracy knobs of :func:`~stemforge.simulate.multislice.simulate_cbed`.
    engine
        'abtem' (abTEM's ``CrystalPotential`` and multislice) or 'fast' (the hand-written
        loop). Oblique cells (shear strain, in-plane rotation) and mistilts run on 'fast'
        whatever is asked; ``metadata["engine"]`` records the engine that ran.

    Returns
    -------
    list[Sample]
        One per thickness, in the order given.
    """
    structure, structure_id = _structure_and_id(structure_record_or_structure)
    conventional = conventional_standard_structure(structure)
    oriented = orient(
        conventional,
        zone_axis,
        x_reflection=x_reflection,
        max_repetitions=max_repetitions,
        max_residual_strain=max_residual_strain,
        standardize=False,
    )
    eps = None if strain is None else validate_strain(strain)
    atoms = oriented.atoms if eps is None else apply_strain(oriented.atoms, eps)
    detector = DetectorGrid.from_options(n_pixels, q_max=q_max, q_pixel_size=q_pixel_size)
    if phonons < 0 or int(phonons) != phonons:
        raise ConfigurationError(
            f"phonons must be a whole number ≥ 0, got {phonons!r}", "e.g. 0 or 8"
        )
    all_aberrations = validate_aberrations(aberrations, defocus)
    series = simulate_cbed(
        atoms,
        energy=energy,
        semiangle=semiangle,
        detector=detector,
        thicknesses=thicknesses,
        aberrations=all_aberrations,
        mistilt=mistilt,
        phonons=int(phonons),
        phonon_sigma=phonon_sigma,
        seed=seed,
        oversampling=oversampling,
        min_cutoff=min_cutoff,
        parametrization=parametrization,
        engine=engine,
        device=device,
        threads=threads,
    )
    labels = KinematicLabels(
        atoms,
        oriented.supercell,
        detector,
        abtem_parametrization(parametrization),
        phonon_sigma if phonons else None,
    )
    target = labels.target()
    disk_radius = semiangle * 1e-3 / electron_wavelength(energy) / detector.q_pixel_size
    shared = {
        **crystal_metadata(conventional),
        "structure_id": structure_id,
        "zone_axis": tuple(int(v) for v in oriented.zone_axis),
        "energy": float(energy),
        "semiangle": float(semiangle),
        "q_pixel_size": detector.q_pixel_size,
        "dose": None,
        "residual_strain": oriented.residual_strain,
        "strain": None if eps is None else eps.tolist(),
        "seed": int(seed),
        "x_reflection": tuple(int(v) for v in oriented.x_reflection),
        "mistilt": None if mistilt is None else tuple(float(v) for v in mistilt),
        "aberrations": all_aberrations,
        "phonons": int(phonons),
        "phonon_sigma": (phonon_sigma if phonons else None),
        "disk_radius": disk_radius,
        "engine": series.engine,
        "simulation": {
            "gpts": list(series.grid.gpts),
            "tiling": list(series.grid.tiling),
            "slice_thickness": series.grid.slice_thickness,
            "period": series.grid.period,
            "atoms_per_cell": len(atoms),
            "parametrization": parametrization,
        },
    }
    samples = []
    for pattern, thickness in zip(series.patterns, series.thicknesses, strict=True):
        metadata = {**shared, "thickness": float(thickness)}
        samples.append(
            Sample(
                cbed=pattern,
                probe=series.probe,
                target=target,
                peaks=labels.table(pattern, disk_radius),
                metadata=metadata,
            )
        )
    return samples
