"""Blind crystal identification from Bragg peak lists: a hierarchical scikit-learn model.

Three stages, each conditioned on the one before (after Gleason et al., PRMaterials 8,
093802, 2024):

1. crystal system (7 classes) from the :class:`~stemforge.models.peak_features.PeakFeatures`
   vector;
2. space group, one classifier per crystal system; the joint probability of a group is
   P(system) · P(group | system);
3. lattice parameters, one regressor per crystal system, predicting that system's free
   parameters (:data:`~stemforge.simulate.labels.FREE_LATTICE_PARAMETERS`) and filling in
   the rest by the system's constraints.

Many patterns of one grain (several zone axes, or the positions of one region) combine
in :func:`aggregate` by summing log-probabilities, which treats the patterns as independent
views; the confidence reported is the posterior of the winner under that assumption and
the margin of its summed log-probability over the runner-up. Within the winning system the
space-group probabilities are averaged instead (their shared prior would otherwise count
once per pattern), and the reflection conditions read from all patterns together decide.

Models persist as skops files (no pickle: loading refuses any type outside scikit-learn
and NumPy, so a file cannot run code), the settings as JSON inside them.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.core.errors import ConfigurationError, InvalidDataError
from stemforge.models.peak_features import PeakFeatures
from stemforge.simulate.labels import FREE_LATTICE_PARAMETERS
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS, space_group_range

#: Probability floor in summed log-probabilities: one pattern's zero vote cannot veto.
PROBABILITY_FLOOR = 1e-3
#: Share of the classifiers' summed log-odds kept between crystal systems that have the
#: reconstructed lattice (trigonal and hexagonal on hP): one pattern can rarely tell a
#: 3-fold from a 6-fold axis, and ten such votes outweighed the intensities' Laue class,
#: which read from all patterns at once does. Pyxtal seeds 31 / 101, hP crystals right:
#: 1 → 96 / 54, 0.5 → 97 / 55, 0.1 → 100 / 55, 0 → 100 / 57 (ties left to the order).
SHARED_LATTICE_WEIGHT = 0.1
FORMAT = "stemforge.crystal_id"
ESTIMATORS = ("random_forest", "hist_gradient_boosting")


def _classifier(kind: str, params: dict[str, Any], seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    if kind == "random_forest":
        return RandomForestClassifier(random_state=seed, **params)
    return HistGradientBoostingClassifier(random_state=seed, **params)


def _regressor(kind: str, params: dict[str, Any], seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.multioutput import MultiOutputRegressor

    if kind == "random_forest":
        return RandomForestRegressor(random_state=seed, **params)
    return MultiOutputRegressor(HistGradientBoostingRegressor(random_state=seed, **params))


STAGES = ("system", "group", "lattice")


def _stage_estimators(estimator: str | Mapping[str, str]) -> dict[str, str]:
    """The estimator kind of each stage from one kind or a stage → kind mapping."""
    if isinstance(estimator, str):
        chosen = dict.fromkeys(STAGES, estimator)
    else:
        unknown = set(estimator) - set(STAGES)
        if unknown:
            raise ConfigurationError(
                f"unknown crystal-identification stage(s) {sorted(unknown)}",
                f"map the stages {', '.join(STAGES)} to estimators",
            )
        chosen = {stage: estimator.get(stage, "random_forest") for stage in STAGES}
    for kind in chosen.values():
        if kind not in ESTIMATORS:
            raise ConfigurationError(
                f"unknown estimator {kind!r}", f"use one of {', '.join(ESTIMATORS)}"
            )
    return chosen


def complete_lattice(system: str, free: np.ndarray) -> np.ndarray:
    """(a, b, c, α, β, γ) rows from a system's free parameters ``(N, n_free)``."""
    free = np.atleast_2d(free)
    out = np.tile(np.array([0, 0, 0, 90.0, 90.0, 90.0]), (len(free), 1))
    out[:, list(FREE_LATTICE_PARAMETERS[system])] = free
    if system == "cubic":
        out[:, 1] = out[:, 2] = out[:, 0]
    elif system in ("tetragonal", "trigonal", "hexagonal"):
        out[:, 1] = out[:, 0]
        if system != "tetragonal":
            out[:, 5] = 120.0
    return out


@dataclass(frozen=True)
class PatternPredictions:
    """Per-pattern outputs of :meth:`CrystalIdentifier.predict`.

    Attributes
    ----------
    system_probability
        ``(N, 7)`` P(crystal system), columns in :data:`CRYSTAL_SYSTEMS` order.
    group_probability
        ``(N, 230)`` joint P(space group), column g − 1 for group g.
    lattice
        ``(N, 7, 6)`` lattice (a b c Å, α β γ °) predicted under each crystal system.
    spacings
        ``(N, M)`` measured |g| (Å⁻¹) of strong reflections of each pattern (0: none), for
        :func:`~stemforge.models.lattice_refinement.refine_lattice`; None: not available.
    nets
        ``(N, 2, 2)`` each pattern's 2D net ``g1, g2`` (Å⁻¹, detector frame; NaN: none), for
        :func:`~stemforge.models.lattice_reconstruction.reconstruct_lattice`; None: not
        available.
    reflections
        ``(N, K, 3)`` each pattern's spots indexed in its net, rows ``m, n, I`` (NaN padded;
        :func:`~stemforge.models.laue_symmetry.net_reflections`), for the intensity symmetry
        test of the aggregate; None: not available.
    """

    system_probability: np.ndarray
    group_probability: np.ndarray
    lattice: np.ndarray
    spacings: np.ndarray | None = None
    nets: np.ndarray | None = None
    reflections: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.system_probability)

    def take(self, rows: np.ndarray) -> PatternPredictions:
        """The predictions of the patterns at ``rows``."""
        return PatternPredictions(
            self.system_probability[rows],
            self.group_probability[rows],
            self.lattice[rows],
            None if self.spacings is None else self.spacings[rows],
            None if self.nets is None else self.nets[rows],
            None if self.reflections is None else self.reflections[rows],
        )

    def with_nets(
        self, q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray
    ) -> PatternPredictions:
        """These predictions with the nets of the patterns' CSR peak lists and their spots
        indexed in them."""
        from stemforge.infer.lattice import DIRECT_BEAM_REACH
        from stemforge.models.lattice_reconstruction import NET_REACH, pattern_nets
        from stemforge.models.laue_symmetry import net_reflections

        nets = pattern_nets(q, intensity, offsets)
        reflections = net_reflections(
            q, intensity, offsets, nets, reach=NET_REACH, inner=DIRECT_BEAM_REACH
        )
        return replace(self, nets=nets, reflections=reflections)

    @property
    def crystal_system(self) -> np.ndarray:
        """``(N,)`` index of the most probable crystal system."""
        return np.argmax(self.system_probability, axis=1)

    @property
    def space_group(self) -> np.ndarray:
        """``(N,)`` most probable space group (1..230)."""
        return np.argmax(self.group_probability, axis=1) + 1

    def top_groups(self, k: int = 3) -> np.ndarray:
        """``(N, k)`` the k most probable space groups, best first."""
        return np.argsort(-self.group_probability, axis=1, kind="stable")[:, :k] + 1

    def best_lattice(self) -> np.ndarray:
        """``(N, 6)`` the lattice under each pattern's most probable system."""
        return self.lattice[np.arange(len(self)), self.crystal_system]


@dataclass(frozen=True)
class Aggregate:
    """The identification of a set of patterns taken together."""

    crystal_system: str
    space_group: int
    lattice: np.ndarray
    confidence: float
    margin: float
    system_probability: np.ndarray
    group_probability: np.ndarray
    n_patterns: int
    bravais_lattice: str | None = None
    n_indexed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lattice as a b c alpha beta gamma)."""
        return {
            "bravais_lattice": self.bravais_lattice,
            "patterns_indexed": int(self.n_indexed),
            "crystal_system": self.crystal_system,
            "space_group": int(self.space_group),
            "lattice": dict(
                zip(
                    ("a", "b", "c", "alpha", "beta", "gamma"), map(float, self.lattice), strict=True
                )
            ),
            "confidence": float(self.confidence),
            "margin": float(self.margin),
            "n_patterns": int(self.n_patterns),
            "probabilities": {
                name: float(p)
                for name, p in zip(CRYSTAL_SYSTEMS, self.system_probability, strict=True)
            },
        }


def _posterior(log_sum: np.ndarray) -> np.ndarray:
    z = log_sum - log_sum.max()
    p = np.exp(z)
    return p / p.sum()


def aggregate(
    predictions: PatternPredictions,
    floor: float = PROBABILITY_FLOOR,
    *,
    scale_error: float | None = None,
) -> Aggregate:
    """Combine patterns by summed log-probabilities (see the module notes).

    Where the patterns' nets fix a 3D lattice
    (:func:`~stemforge.models.lattice_reconstruction.reconstruct_lattice`: several zone
    axes), its Bravais lattice weighs the systems
    (:func:`~stemforge.models.lattice_reconstruction.system_log_prior`; where the patterns
    still choose a system the lattice rules out, the lattice is set aside; between systems
    that share it, hexagonal and trigonal on hP, the classifiers' votes count only
    :data:`SHARED_LATTICE_WEIGHT`), so do the rotations
    of it that the patterns' intensities obey
    (:func:`~stemforge.models.laue_symmetry.laue_evidence`: hexagonal against trigonal on
    hP above all), its centring and the intensities' Laue class weigh the space groups, and
    the lattice parameters are its conventional
    cell. Otherwise the space group is chosen among the winning system's groups and the
    lattice is the median of the patterns' predictions under the winning system, refined
    against the patterns' measured spacings where the system allows
    (:func:`~stemforge.models.lattice_refinement.refine_lattice`). ``scale_error``: the
    calibration difference between patterns the reconstruction allows (default: patterns of
    one session, :data:`~stemforge.models.lattice_reconstruction.SCALE_ERROR`).
    """
    from stemforge.infer.lattice import DIRECT_BEAM_REACH
    from stemforge.models.extinctions import absence_log_likelihood
    from stemforge.models.lattice_reconstruction import (
        NET_REACH,
        SCALE_ERROR,
        SYMMETRY_TOLERANCES,
        lattice_symmetry,
        reconstruct_lattice,
        space_group_centrings,
        system_log_prior,
        system_reading,
    )
    from stemforge.models.lattice_refinement import refine_lattice
    from stemforge.models.laue_symmetry import (
        EVIDENCE_WEIGHT,
        indexed_spots,
        laue_evidence,
        laue_rotation_count,
        system_evidence,
        unseen_nodes,
    )

    if len(predictions) == 0:
        raise InvalidDataError("no patterns to aggregate", "pass at least one pattern with peaks")
    system_log = np.log(np.maximum(predictions.system_probability, floor)).sum(axis=0)
    reconstruction = symmetry = None
    laue: dict[tuple[str, int], float] = {}
    spots: list[tuple[np.ndarray, np.ndarray]] = []
    unseen: list[np.ndarray] = []
    if predictions.nets is not None:
        reconstruction = reconstruct_lattice(
            predictions.nets, scale_error=SCALE_ERROR if scale_error is None else scale_error
        )
    if reconstruction is not None:
        readings = [lattice_symmetry(reconstruction, t) for t in SYMMETRY_TOLERANCES]
        shared = [CRYSTAL_SYSTEMS.index(s) for s in readings[0].systems]
        mean = system_log[shared].mean()
        system_log[shared] = mean + SHARED_LATTICE_WEIGHT * (system_log[shared] - mean)
        system_log = system_log + system_log_prior(readings)
        if predictions.reflections is not None:
            spots = indexed_spots(
                reconstruction.metric,
                predictions.nets,
                predictions.reflections,
                reconstruction.indices,
            )
            laue = laue_evidence(reconstruction.metric, spots)
            unseen = unseen_nodes(
                reconstruction.metric,
                predictions.nets,
                predictions.reflections,
                reconstruction.indices,
                reach=NET_REACH,
                inner=DIRECT_BEAM_REACH,
            )
            system_log = system_log + EVIDENCE_WEIGHT * np.nan_to_num(system_evidence(laue))
    system_post = _posterior(system_log)
    best = int(np.argmax(system_log))
    if reconstruction is not None:
        symmetry = system_reading(reconstruction, readings, CRYSTAL_SYSTEMS[best])
        if not symmetry.admits(CRYSTAL_SYSTEMS[best]):
            symmetry = None  # the patterns outvoted a lattice that rules their system out
    ranked = np.sort(system_log)
    margin = float(ranked[-1] - ranked[-2]) if len(ranked) > 1 else float("inf")
    groups = np.array(space_group_range(CRYSTAL_SYSTEMS[best]))
    absences = np.zeros(len(groups))
    if symmetry is not None and CRYSTAL_SYSTEMS[best] in symmetry.systems:
        centrings = space_group_centrings()
        same = [centrings[g - 1] == symmetry.centring for g in groups]
        groups = groups[same] if any(same) else groups
        absences = absence_log_likelihood(
            groups, spots, unseen, symmetry.to_conventional, CRYSTAL_SYSTEMS[best]
        )
    conditional = predictions.group_probability[:, groups - 1] / np.maximum(
        predictions.system_probability[:, [best]], 1e-12
    )
    # Averaged, not summed: each pattern's probabilities carry the forests' space-group prior
    # (on seed 31 they favour Pnma in a third of the orthorhombic misses), and a sum over ten
    # patterns counts it ten times over the reflection conditions, which the absences and
    # the Laue class read from all patterns at once. Pyxtal seed 31, aggregated top-1 /
    # top-3: sum 24.5 / 51.3 %, 0.3 × sum 28.4 / 60.9 %, 0 × sum 28.0 / 62.1 %, mean 29.9 /
    # 62.8 %.
    group_log = np.log(np.maximum(conditional, floor)).mean(axis=0) + absences
    # The intensities' Laue class within the system (e.g. 4/m against 4/mmm).
    classes = [laue.get((CRYSTAL_SYSTEMS[best], laue_rotation_count(g))) for g in groups]
    if classes and None not in classes:
        group_log = group_log + EVIDENCE_WEIGHT * np.array(classes)
    group_post = np.zeros(230)
    group_post[groups - 1] = _posterior(group_log)
    system = CRYSTAL_SYSTEMS[best]
    if symmetry is not None:
        lattice = symmetry.parameters(system)
    else:
        free = np.median(
            predictions.lattice[:, best, list(FREE_LATTICE_PARAMETERS[system])], axis=0
        )
        if predictions.spacings is not None:
            lengths = [i for i, p in enumerate(FREE_LATTICE_PARAMETERS[system]) if p < 3]
            free[lengths] = refine_lattice(system, free[lengths], predictions.spacings)
        lattice = complete_lattice(system, free)[0]
    return Aggregate(
        crystal_system=system,
        space_group=int(groups[np.argmax(group_log)]),
        lattice=lattice,
        confidence=float(system_post[best]),
        margin=margin,
        system_probability=system_post,
        group_probability=group_post,
        n_patterns=len(predictions),
        bravais_lattice=None if symmetry is None else symmetry.bravais,
        n_indexed=0 if reconstruction is None else int(reconstruction.explained.sum()),
    )


class CrystalIdentifier:
    """Crystal system → space group → lattice, from peak-list features.

    Parameters
    ----------
    features
        The encoding of peak lists.
    estimator
        ``random_forest`` or ``hist_gradient_boosting`` for all three stages, or a mapping
        from stage (``system``, ``group``, ``lattice``) to one of them (stages left out:
        ``random_forest``). Boosted trees read the crystal system from one pattern better
        (benchmark one-pattern 37.1 → 42.0 %); forests keep the 230-class group stage small.
    system_params, group_params, lattice_params
        Keyword arguments of the scikit-learn estimators of each stage.
    seed
        Random state of every estimator.
    """

    def __init__(
        self,
        features: PeakFeatures | None = None,
        estimator: str | Mapping[str, str] = "random_forest",
        system_params: dict[str, Any] | None = None,
        group_params: dict[str, Any] | None = None,
        lattice_params: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.estimators = _stage_estimators(estimator)
        self.features = features or PeakFeatures()
        self.params = {
            "system": dict(system_params or {}),
            "group": dict(group_params or {}),
            "lattice": dict(lattice_params or {}),
        }
        self.seed = seed
        self.system_model: Any = None
        self.group_models: dict[str, Any] = {}
        self.lattice_models: dict[str, Any] = {}
        self.metadata: dict[str, Any] = {}

    @property
    def architecture(self) -> str:
        """Zoo architecture name: ``crystal_id_`` and the estimator kinds, system's first."""
        return "crystal_id_" + "+".join(dict.fromkeys(self.estimators.values()))

    # ---- fitting ------------------------------------------------------------------------------

    def fit(self, x: np.ndarray, space_group: np.ndarray, lattice: np.ndarray) -> CrystalIdentifier:
        """Fit all stages on feature rows ``x`` with their space groups and lattices.

        Parameters
        ----------
        x
            ``(N, features.size)`` from :attr:`features`.
        space_group
            ``(N,)`` international numbers.
        lattice
            ``(N, 6)`` in the conventions of :func:`~stemforge.simulate.labels.lattice_parameters`.
        """
        from stemforge.simulate.structures.record import crystal_system_of

        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.features.size:
            raise InvalidDataError(
                f"feature matrix of shape {x.shape}, expected (N, {self.features.size})",
                "compute the rows with this model's features",
            )
        space_group = np.asarray(space_group, int)
        systems = np.array([CRYSTAL_SYSTEMS.index(crystal_system_of(int(g))) for g in space_group])
        self.system_model = _classifier(self.estimators["system"], self.params["system"], self.seed)
        self.system_model.fit(x, systems)
        self.group_models, self.lattice_models = {}, {}
        for index, name in enumerate(CRYSTAL_SYSTEMS):
            rows = systems == index
            if not rows.any():
                continue
            groups = np.unique(space_group[rows])
            self.group_models[name] = (
                int(groups[0])
                if len(groups) == 1
                else _classifier(self.estimators["group"], self.params["group"], self.seed).fit(
                    x[rows], space_group[rows]
                )
            )
            target = np.asarray(lattice, float)[rows][:, list(FREE_LATTICE_PARAMETERS[name])]
            model = _regressor(self.estimators["lattice"], self.params["lattice"], self.seed)
            self.lattice_models[name] = model.fit(
                x[rows], target if target.shape[1] > 1 else target.ravel()
            )
        return self

    # ---- prediction ---------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> PatternPredictions:
        """Per-pattern probabilities and lattices for feature rows ``x``."""
        if self.system_model is None:
            raise ConfigurationError(
                "the crystal identifier is not fitted", "fit it or load a trained one"
            )
        x = np.asarray(x, np.float32)
        n = len(x)
        system_p = np.zeros((n, len(CRYSTAL_SYSTEMS)))
        if n == 0:
            return PatternPredictions(system_p, np.zeros((0, 230)), np.zeros((0, 7, 6)))
        classes = self.system_model.classes_
        # Boosted trees fitted on one class still answer two columns (a binary loss).
        system_p[:, classes] = self.system_model.predict_proba(x) if len(classes) > 1 else 1.0
        group_p = np.zeros((n, 230))
        lattice = np.zeros((n, len(CRYSTAL_SYSTEMS), 6))
        for index, name in enumerate(CRYSTAL_SYSTEMS):
            model = self.group_models.get(name)
            if model is None:
                continue
            if isinstance(model, int):
                group_p[:, model - 1] = system_p[:, index]
            else:
                group_p[:, model.classes_ - 1] = model.predict_proba(x) * system_p[:, [index]]
            free = self.lattice_models[name].predict(x).reshape(n, -1)
            lattice[:, index] = complete_lattice(name, free)
        return PatternPredictions(system_p, group_p, lattice, self.features.spacings(x))

    def predict_peaks(
        self, q: np.ndarray, intensity: np.ndarray, offsets: np.ndarray
    ) -> PatternPredictions:
        """Predictions straight from CSR peak lists (see :class:`PeakFeatures`), with nets."""
        return self.predict(self.features(q, intensity, offsets)).with_nets(q, intensity, offsets)

    # ---- persistence --------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """JSON-ready description (features, estimators, seed, metadata)."""
        return {
            "format": FORMAT,
            "features": self.features.to_dict(),
            "estimator": self.estimators,
            "params": self.params,
            "seed": self.seed,
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> Path:
        """Write a skops file (temporary name, then rename)."""
        import skops.io as sio

        from stemforge.core.atomic import atomic_output

        state = {
            "settings": json.dumps(self.settings()),
            "system": self.system_model,
            "groups": self.group_models,
            "lattices": self.lattice_models,
        }
        path = Path(path)
        with atomic_output(path) as tmp:
            sio.dump(state, tmp, compression=zipfile.ZIP_DEFLATED)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CrystalIdentifier:
        """Read a skops file; refuses types outside scikit-learn and NumPy."""
        import skops.io as sio

        path = Path(path)
        if not path.is_file():
            raise InvalidDataError(
                f"no crystal-identification model at {path}",
                "check the path or pull it from the zoo",
            )
        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as exc:
            raise InvalidDataError(
                f"{path} is not a skops model file ({exc})",
                "pass a file written by CrystalIdentifier.save",
            ) from exc
        foreign = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
        if foreign:
            raise InvalidDataError(
                f"{path} holds types that are not scikit-learn or NumPy: {foreign}",
                "only load crystal-identification models written by stemforge",
            )
        state = sio.load(path, trusted=untrusted)
        settings = json.loads(state["settings"])
        if settings.get("format") != FORMAT:
            raise InvalidDataError(f"{path} is not a stemforge crystal-identification model")
        features = settings["features"]
        features["coherence_orders"] = tuple(features["coherence_orders"])
        model = cls(
            PeakFeatures(**features),
            settings["estimator"],
            settings["params"]["system"],
            settings["params"]["group"],
            settings["params"]["lattice"],
            settings["seed"],
        )
        model.system_model = state["system"]
        model.group_models = {
            k: (int(v) if isinstance(v, int | np.integer) else v)
            for k, v in state["groups"].items()
        }
        model.lattice_models = state["lattices"]
        model.metadata = settings["metadata"]
        return model
