"""Rotation- and order-invariant encodings of Bragg peak lists, for crystal identification.

A pattern is a list of diffracted spots (qx, qy, I) in Å⁻¹ about the direct beam (which is
left out). The encodings do not change when the pattern is turned in-plane or its peaks
are listed in another order, and change little when weak peaks are missing (weights grow
with intensity) or the calibration is off by a few percent (soft bins wider than the
shift; models are trained with scale jitter on top).

Blocks of the feature vector (:meth:`PeakFeatures.names` spells them out):

``count``
    log(1 + number of spots within ``q_max``).
``radial``
    Weighted radial distribution: spot weights softly binned over ``n_radial`` bins on
    [0, q_max], divided by the total weight.
``harmonic``
    Angular harmonics per radial bin, ``|c_km| / c_k0`` for m = 1..``n_harmonics`` with
    ``c_km = Σ w exp(-i m φ)``: the rotational symmetry of every ring (a 4-fold ring has
    |c_k4| = c_k0). Magnitudes are rotation invariant.
``coherence``
    Relative phases between rings, ``Re(c_km C_m*) / (c_k0 |C_m|)`` with ``C_m`` the
    harmonic of the whole pattern, for m in ``coherence_orders``: rings whose spots line up
    (one lattice row) score 1, rings turned by π/m against the rest score −1. Rotation
    invariant because both factors turn by the same phase.
``pair_distance``
    Histogram of the distances between the ``n_strongest`` strongest spots (weights
    w_i w_j): the reciprocal lattice's own metric, independent of the origin.
``pair_angle``
    Histogram of the angles between the spot vectors of those spots (0..π).
``cell``
    The reduced 2D reciprocal cell of the strong spots: |g1|, |g2| (Å⁻¹), the angle
    between them (rad) and |g2| / |g1|.
``symmetry``
    How well the strong spots' weights obey the 2D point operations a zone-axis pattern
    can have (the plane-symmetry test of a crystallographer): n-fold rotations about the
    beam for n = 2, 3, 4, 6, and mirrors across the lines along and normal to g1, g2,
    g1 + g2 and g1 − g2, sorted from best to worst (which line is which depends on the
    choice of basis, so only their ranking is invariant); then |g1 ± g2| / |g1|, the rest
    of the 2D metric. A score is Σ w·w' / Σ w² over the spots, w' the weight found at the
    spot's image (0 where the image is no spot), so 1 means the operation holds.

Weights are ``(I / I_max) ** intensity_power`` per pattern (square root by default:
kinematic and dynamical intensities rank alike but differ in contrast).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from stemforge.core.errors import ConfigurationError, InvalidDataError

#: Spots weaker than this weight do not define the reduced cell.
CELL_MIN_WEIGHT = 0.05
#: |sin| of the angle below which two spot vectors count as collinear.
COLLINEAR = 0.2
#: Rotation orders tested by the ``symmetry`` block.
ROTATIONS = (2, 3, 4, 6)
#: Mirror lines tested: along (0) or normal to (1) g1, g2, g1 + g2, g1 − g2.
MIRRORS = tuple((a, b, normal) for a, b in ((1, 0), (0, 1), (1, 1), (1, -1)) for normal in (0, 1))
#: Spot images within this fraction of a net step of a node land on it.
INDEX_TOLERANCE = 0.15
#: Largest net index kept in the lookup of spot weights.
NET_REACH = 6


@dataclass(frozen=True)
class PeakFeatures:
    """Settings of the peak-list encoding (stored with every model trained on it).

    Parameters
    ----------
    q_max
        Spots beyond this |q| (Å⁻¹) are ignored.
    n_radial
        Radial bins of the ``radial``, ``harmonic`` and ``coherence`` blocks.
    n_harmonics
        Highest angular order m.
    coherence_orders
        Orders m of the ``coherence`` block.
    n_strongest
        Spots entering the pair histograms and the reduced cell.
    n_pair_bins
        Bins of each pair histogram.
    intensity_power
        Weight exponent on the normalised intensity.
    """

    q_max: float = 1.6
    n_radial: int = 32
    n_harmonics: int = 12
    coherence_orders: tuple[int, ...] = (2, 3, 4, 6)
    n_strongest: int = 32
    n_pair_bins: int = 32
    intensity_power: float = 0.5
    _blocks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.q_max > 0 or self.n_radial < 2 or self.n_harmonics < 1:
            raise ConfigurationError(
                f"invalid feature settings {self.to_dict()}",
                "q_max must be positive, n_radial ≥ 2 and n_harmonics ≥ 1",
            )
        object.__setattr__(self, "coherence_orders", tuple(int(m) for m in self.coherence_orders))
        blocks = (
            ("count", 1),
            ("radial", self.n_radial),
            ("harmonic", self.n_radial * self.n_harmonics),
            ("coherence", self.n_radial * len(self.coherence_orders)),
            ("pair_distance", self.n_pair_bins),
            ("pair_angle", self.n_pair_bins),
            ("cell", 4),
            ("symmetry", 4 + len(MIRRORS) + 2),
        )
        object.__setattr__(self, "_blocks", blocks)

    @property
    def size(self) -> int:
        """Length of the feature vector."""
        return sum(n for _, n in self._blocks)

    def block(self, name: str) -> slice:
        """Columns of one block of the feature vector."""
        start = 0
        for block, n in self._blocks:
            if block == name:
                return slice(start, start + n)
            start += n
        raise KeyError(name)

    def names(self) -> list[str]:
        """A name per column, e.g. ``harmonic[k=3,m=4]``."""
        out = ["count"]
        out += [f"radial[k={k}]" for k in range(self.n_radial)]
        out += [
            f"harmonic[k={k},m={m}]"
            for k in range(self.n_radial)
            for m in range(1, self.n_harmonics + 1)
        ]
        out += [
            f"coherence[k={k},m={m}]" for k in range(self.n_radial) for m in self.coherence_orders
        ]
        out += [f"pair_distance[{i}]" for i in range(self.n_pair_bins)]
        out += [f"pair_angle[{i}]" for i in range(self.n_pair_bins)]
        out += ["cell|g1|", "cell|g2|", "cell_angle", "cell_ratio"]
        out += [f"rotation[{n}]" for n in ROTATIONS]
        out += [f"mirror[{i}]" for i in range(len(MIRRORS))]
        return out + ["|g1+g2|/|g1|", "|g1-g2|/|g1|"]

    def spacings(self, x: np.ndarray) -> np.ndarray:
        """``(N, 4)`` |g1|, |g2|, |g1 + g2|, |g1 − g2| (Å⁻¹) of each row's reduced cell (0: none).

        The strongest zero-order-Laue-zone spacings of each pattern, read back from the
        ``cell`` and ``symmetry`` blocks, for lattice refinement.
        """
        x = np.asarray(x, float)
        cell, symmetry = x[:, self.block("cell")], x[:, self.block("symmetry")]
        g1 = cell[:, 0]
        return np.stack([g1, cell[:, 1], symmetry[:, -2] * g1, symmetry[:, -1] * g1], axis=1)

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        out = asdict(self)
        out.pop("_blocks")
        out["coherence_orders"] = list(self.coherence_orders)
        return out

    def __call__(
        self, q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray, chunk: int = 4096
    ) -> np.ndarray:
        """Encode many peak lists at once.

        Parameters
        ----------
        q
            ``(P, 2)`` spot positions (Å⁻¹) about the direct beam, all patterns concatenated.
        intensity
            ``(P,)`` non-negative spot intensities.
        offsets
            ``(N + 1,)`` CSR offsets: pattern i owns rows ``offsets[i]:offsets[i + 1]``.
        chunk
            Patterns encoded per step (bounds the memory of the pair blocks).

        Returns
        -------
        np.ndarray
            ``(N, size)`` float32.
        """
        q, intensity, offsets = _check(q, intensity, offsets)
        n = len(offsets) - 1
        out = np.zeros((n, self.size), np.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            lo, hi = offsets[start], offsets[stop]
            out[start:stop] = self._encode(
                q[lo:hi], intensity[lo:hi], offsets[start : stop + 1] - lo
            )
        return out

    # ---- blocks -----------------------------------------------------------------------------

    def _encode(self, q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        n = len(offsets) - 1
        pattern = np.repeat(np.arange(n), np.diff(offsets))
        radius = np.hypot(q[:, 0], q[:, 1])
        inside = radius <= self.q_max
        pattern, q, radius, intensity = (
            pattern[inside],
            q[inside],
            radius[inside],
            intensity[inside],
        )
        peak_max = np.zeros(n)
        np.maximum.at(peak_max, pattern, intensity)
        weight = (
            intensity / np.where(peak_max > 0, peak_max, 1.0)[pattern]
        ) ** self.intensity_power
        counts = np.bincount(pattern, minlength=n)

        out = np.zeros((n, self.size))
        out[:, self.block("count")] = np.log1p(counts)[:, None]
        harmonics = self._harmonics(pattern, q, radius, weight, n)
        total = np.maximum(harmonics[:, :, 0].real.sum(axis=1), 1e-12)
        c0 = harmonics[:, :, 0].real
        safe = np.where(c0 > 1e-9, c0, np.inf)
        out[:, self.block("radial")] = c0 / total[:, None]
        out[:, self.block("harmonic")] = (
            np.abs(harmonics[:, :, 1 : self.n_harmonics + 1]) / safe[:, :, None]
        ).reshape(n, -1)
        coherence = np.zeros((n, self.n_radial, len(self.coherence_orders)))
        for i, m in enumerate(self.coherence_orders):
            ring = harmonics[:, :, m]
            whole = ring.sum(axis=1)
            unit = np.where(
                np.abs(whole) > 1e-9, np.conj(whole) / np.maximum(np.abs(whole), 1e-12), 0
            )
            coherence[:, :, i] = (ring * unit[:, None]).real / safe
        out[:, self.block("coherence")] = coherence.reshape(n, -1)

        strongest_q, strongest_w = self._strongest(pattern, q, weight, counts, n)
        out[:, self.block("pair_distance")], out[:, self.block("pair_angle")] = self._pairs(
            strongest_q, strongest_w
        )
        cell, g1, g2 = reduced_cell(strongest_q, strongest_w)
        out[:, self.block("cell")] = cell
        out[:, self.block("symmetry")] = symmetry_scores(strongest_q, strongest_w, g1, g2)
        return out

    def _harmonics(
        self, pattern: np.ndarray, q: np.ndarray, radius: np.ndarray, weight: np.ndarray, n: int
    ) -> np.ndarray:
        """``(n, n_radial, M + 1)`` complex ``c_km`` with linear (two-bin) radial weights."""
        orders = max(self.n_harmonics, *self.coherence_orders)
        u = radius / self.q_max * (self.n_radial - 1)
        low = np.minimum(np.floor(u).astype(int), self.n_radial - 2)
        frac = u - low
        phi = np.arctan2(q[:, 1], q[:, 0])
        out = np.zeros((n, self.n_radial, orders + 1), complex)
        size = n * self.n_radial
        for b, share in ((low, 1 - frac), (low + 1, frac)):
            index = pattern * self.n_radial + b
            for m in range(orders + 1):
                w = weight * share
                re = np.bincount(index, w * np.cos(m * phi), minlength=size)
                im = np.bincount(index, -w * np.sin(m * phi), minlength=size)
                out[:, :, m] += (re + 1j * im).reshape(n, self.n_radial)
        return out

    def _strongest(
        self, pattern: np.ndarray, q: np.ndarray, weight: np.ndarray, counts: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n_strongest`` spots of every pattern, padded with weight 0."""
        k = self.n_strongest
        order = np.lexsort((-weight, pattern))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(order)) - np.repeat(starts, counts)
        take = rank < k
        rows, cols = pattern[order][take], rank[take]
        strongest_q = np.zeros((n, k, 2))
        strongest_w = np.zeros((n, k))
        strongest_q[rows, cols] = q[order][take]
        strongest_w[rows, cols] = weight[order][take]
        return strongest_q, strongest_w

    def _pairs(self, q: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, k = w.shape
        pair_w = w[:, :, None] * w[:, None, :]
        upper = np.triu(np.ones((k, k), bool), 1)
        pair_w = pair_w * upper
        distance = np.linalg.norm(q[:, :, None, :] - q[:, None, :, :], axis=-1)
        norms = np.linalg.norm(q, axis=-1)
        cos = np.einsum("nid,njd->nij", q, q) / np.maximum(
            norms[:, :, None] * norms[:, None, :], 1e-12
        )
        angle = np.arccos(np.clip(cos, -1, 1))
        total = np.maximum(pair_w.sum(axis=(1, 2)), 1e-12)[:, None]
        hist_d = _soft_histogram(distance, pair_w, 2 * self.q_max, self.n_pair_bins) / total
        hist_a = _soft_histogram(angle, pair_w, np.pi, self.n_pair_bins) / total
        return hist_d, hist_a


def _soft_histogram(values: np.ndarray, weights: np.ndarray, top: float, bins: int) -> np.ndarray:
    """Per-row histogram over [0, top] with linear sharing between neighbouring bins."""
    n = values.shape[0]
    u = np.clip(values.reshape(n, -1) / top * (bins - 1), 0, bins - 1)
    w = weights.reshape(n, -1)
    low = np.minimum(np.floor(u).astype(int), bins - 2)
    frac = u - low
    row = np.arange(n)[:, None] * bins
    out = np.bincount((row + low).ravel(), (w * (1 - frac)).ravel(), minlength=n * bins)
    out += np.bincount((row + low + 1).ravel(), (w * frac).ravel(), minlength=n * bins)
    return out.reshape(n, bins)


def reduced_cell(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Reduced 2D reciprocal cell of padded spot sets.

    Parameters
    ----------
    q, w
        ``(N, K, 2)`` spot vectors and ``(N, K)`` weights (0 = padding).

    Returns
    -------
    cell, g1, g2
        ``(N, 4)``: |g1| ≤ |g2| (Å⁻¹), the angle between them in [π/3, π/2] (rad), and
        |g2| / |g1|, zeros where fewer than two non-collinear strong spots exist; and the
        ``(N, 2)`` basis vectors (zero there too).
    """
    n = len(q)
    length = np.linalg.norm(q, axis=-1)
    usable = (w >= CELL_MIN_WEIGHT) & (length > 1e-9)
    masked = np.where(usable, length, np.inf)
    i1 = np.argmin(masked, axis=1)
    g1 = q[np.arange(n), i1]
    cross = np.abs(q[:, :, 0] * g1[:, None, 1] - q[:, :, 1] * g1[:, None, 0])
    sin = cross / np.maximum(length * np.linalg.norm(g1, axis=-1)[:, None], 1e-12)
    i2 = np.argmin(np.where(usable & (sin > COLLINEAR), length, np.inf), axis=1)
    g2 = q[np.arange(n), i2]
    found = np.isfinite(masked.min(axis=1)) & (
        np.isfinite(np.where(usable & (sin > COLLINEAR), length, np.inf).min(axis=1))
    )
    # Gauss (Lagrange) reduction of the pair: shortest basis, |g1·g2| ≤ |g1|²/2.
    for _ in range(16):
        swap = np.sum(g2**2, axis=1) < np.sum(g1**2, axis=1)
        g1, g2 = np.where(swap[:, None], g2, g1), np.where(swap[:, None], g1, g2)
        mu = np.rint(np.sum(g1 * g2, axis=1) / np.maximum(np.sum(g1**2, axis=1), 1e-12))
        if not np.any(mu):
            break
        g2 = g2 - mu[:, None] * g1
    a, b = np.linalg.norm(g1, axis=1), np.linalg.norm(g2, axis=1)
    angle = np.arccos(np.clip(np.abs(np.sum(g1 * g2, axis=1)) / np.maximum(a * b, 1e-12), 0, 1))
    out = np.stack([a, b, angle, b / np.maximum(a, 1e-12)], axis=1)
    out[~found] = 0
    g1[~found] = 0
    g2[~found] = 0
    return out, g1, g2


def symmetry_scores(q: np.ndarray, w: np.ndarray, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """The ``symmetry`` block: rotation and mirror scores and |g1 ± g2| / |g1| (see module).

    Parameters
    ----------
    q, w
        ``(N, K, 2)`` spot vectors and ``(N, K)`` weights (0 = padding).
    g1, g2
        ``(N, 2)`` reduced basis of each pattern (zeros: no net, all scores 0).
    """
    n = len(q)
    basis = np.stack([g1, g2], axis=2)  # columns g1, g2
    has_net = np.abs(np.linalg.det(basis)) > 1e-12
    inverse = np.zeros_like(basis)
    inverse[has_net] = np.linalg.inv(basis[has_net])
    size = 2 * NET_REACH + 1

    def nodes(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat lookup index of the net node each vector lands on, and whether it does."""
        index = np.einsum("nij,nkj->nki", inverse, vectors)
        nearest = np.rint(index)
        on = (np.abs(index - nearest) < INDEX_TOLERANCE).all(axis=-1)
        on &= (np.abs(nearest) <= NET_REACH).all(axis=-1) & has_net[:, None]
        flat = (nearest[..., 0] + NET_REACH) * size + nearest[..., 1] + NET_REACH
        return np.where(on, flat, 0).astype(np.int64), on

    # Lookup of weights on the net; node (0, 0) (the direct beam) stays empty.
    table = np.zeros((n, size * size))
    own, on = nodes(q)
    rows = np.broadcast_to(np.arange(n)[:, None], own.shape)
    np.maximum.at(table, (rows[on], own[on]), w[on])
    norm = np.maximum(np.sum(w**2, axis=1), 1e-12)

    def score(images: np.ndarray) -> np.ndarray:
        flat, lands = nodes(images)
        found = np.where(lands, np.take_along_axis(table, flat, axis=1), 0.0)
        return np.sum(w * found, axis=1) / norm

    out = np.zeros((n, len(ROTATIONS) + len(MIRRORS) + 2))
    for i, order in enumerate(ROTATIONS):
        c, s = np.cos(2 * np.pi / order), np.sin(2 * np.pi / order)
        out[:, i] = score(q @ np.array([[c, s], [-s, c]]))
    mirrors = []
    for a, b, normal in MIRRORS:
        line = a * g1 + b * g2
        if normal:
            line = np.stack([-line[:, 1], line[:, 0]], axis=1)
        u = line / np.maximum(np.linalg.norm(line, axis=1, keepdims=True), 1e-12)
        reflect = 2 * u[:, :, None] * u[:, None, :] - np.eye(2)
        mirrors.append(score(np.einsum("nij,nkj->nki", reflect, q)))
    start = len(ROTATIONS)
    out[:, start : start + len(MIRRORS)] = -np.sort(-np.stack(mirrors, axis=1), axis=1)
    length = np.maximum(np.linalg.norm(g1, axis=1), 1e-12)
    out[:, -2] = np.linalg.norm(g1 + g2, axis=1) / length * has_net
    out[:, -1] = np.linalg.norm(g1 - g2, axis=1) / length * has_net
    return out


def _check(
    q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.asarray(q, float).reshape(-1, 2)
    intensity = np.asarray(intensity, float).ravel()
    offsets = np.asarray(offsets, np.int64).ravel()
    if len(intensity) != len(q):
        raise InvalidDataError(
            f"{len(q)} spot positions but {len(intensity)} intensities",
            "pass one intensity per spot",
        )
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(q) or np.any(np.diff(offsets) < 0):
        raise InvalidDataError(
            "peak-list offsets are not a non-decreasing CSR index from 0 to the number of spots",
            "pass offsets with offsets[0] = 0, offsets[-1] = len(q)",
        )
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(intensity))):
        raise InvalidDataError("peak list holds NaN or infinite values", "drop those spots first")
    if np.any(intensity < 0):
        raise InvalidDataError("negative spot intensities", "clip intensities at 0")
    return q, intensity, offsets
