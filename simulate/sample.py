"""The unit the factory produces: one simulated pattern with its exact labels.

Detector grid convention (all images of a sample share it): ``n × n`` square pixels of
``q_pixel_size`` Å⁻¹, array axes (qx, qy) as in a datacube, zero scattering vector at
pixel ``(n // 2, n // 2)``. Peak positions are in pixels of that grid (0 = first pixel
centre), raw, not origin-centred, like the Bragg peak tables of ``stemforge disks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Columns of the Bragg peak table of a sample.
PEAK_DTYPE = np.dtype(
    [
        ("h", np.int16),
        ("k", np.int16),
        ("l", np.int16),
        ("qx", np.float32),  # pixels, detector axis -2
        ("qy", np.float32),  # pixels, detector axis -1
        ("intensity_kinematic", np.float32),  # |V_g|², kinematic
        ("intensity_dynamical", np.float32),  # integrated dynamical disk intensity (fraction of the beam)
    ]
)

#: Keys every sample's metadata holds (values may be None where not applicable).
METADATA_KEYS = (
    "structure_id",
    "formula",
    "space_group",  # international number 1..230
    "crystal_system",  # 'triclinic' ... 'cubic'
    "lattice",  # (a, b, c, alpha, beta, gamma) of the conventional standard cell, Å and degrees
    "zone_axis",  # (u, v, w) in the conventional standard cell
    "thickness",  # Å
    "energy",  # eV
    "semiangle",  # mrad
    "q_pixel_size",  # Å⁻¹ per pixel
    "dose",  # electrons per pattern, None for the noise-free pattern
    "residual_strain",  # max |ε| of the periodic approximation of the oriented cell
    "strain",  # 3×3 applied homogeneous strain (beam along z), None if unstrained
    "seed",
)


@dataclass
class Sample:
    """One simulated diffraction pattern and its labels.

    Parameters
    ----------
    cbed
        ``(n, n)`` float32 dynamical pattern; intensities are fractions of the incident
        beam (sum ≤ 1) unless a dose was applied, then counts.
    probe
        ``(n, n)`` float32 vacuum probe on the same grid, same normalisation (sum = 1).
    target
        ``(n, n)`` float32 kinematic structure-factor image (FCU-Net target): peaks of
        height |V_g| at the Bragg positions of the zero-order Laue zone.
    peaks
        Bragg peak table, structured array of :data:`PEAK_DTYPE`.
    metadata
        The :data:`METADATA_KEYS` and anything else worth keeping (JSON-serialisable).
    """

    cbed: np.ndarray
    probe: np.ndarray
    target: np.ndarray
    peaks: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
