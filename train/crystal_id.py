"""Training of the crystal identifier: ``stemforge train experiment=crystal_id_rf``.

One run: build (or reuse) the kinematic peak-list file of ``data.path``, add the files of
``data.extra`` (peak lists from multislice shards), split by structure, augment the
training patterns ``data.augment.copies`` times, fit :class:`CrystalIdentifier`, score it
on validation and test structures (one pattern per zone axis; per pattern and aggregated
per structure), log the
scores, and export ``model.skops`` + ``model.json`` for the zoo.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stemforge.datasets.peak_lists import (
    PeakLists,
    augment,
    build_kinematic_peak_lists,
    one_per_zone_axis,
    read_peak_lists,
    split_by_structure,
)
from stemforge.models.crystal_id import CrystalIdentifier, aggregate
from stemforge.models.peak_features import PeakFeatures
from stemforge.simulate.structures.record import CRYSTAL_SYSTEMS

log = logging.getLogger(__name__)


def identification_scores(
    model: CrystalIdentifier, lists: PeakLists, prefix: str
) -> dict[str, float]:
    """Per-pattern and per-structure (aggregated) accuracies of ``model`` on ``lists``."""
    if len(lists) == 0:
        return {}
    predictions = model.predict_peaks(lists.q, lists.intensity, lists.offsets)
    system = lists.crystal_system
    scores = {
        f"{prefix}/system_accuracy": float(np.mean(predictions.crystal_system == system)),
        f"{prefix}/group_accuracy": float(np.mean(predictions.space_group == lists.space_group)),
        f"{prefix}/group_top3": float(
            np.mean(np.any(predictions.top_groups(3) == lists.space_group[:, None], axis=1))
        ),
    }
    group_hits, system_hits = [], []
    for structure in np.unique(lists.structure_id):
        rows = np.flatnonzero(lists.structure_id == structure)
        result = aggregate(predictions.take(rows))
        group_hits.append(result.space_group == lists.space_group[rows[0]])
        system_hits.append(result.crystal_system == CRYSTAL_SYSTEMS[system[rows[0]]])
    scores[f"{prefix}/aggregate_group_accuracy"] = float(np.mean(group_hits))
    scores[f"{prefix}/aggregate_system_accuracy"] = float(np.mean(system_hits))
    return scores


def load_training_lists(data: dict[str, Any], seed: int) -> PeakLists:
    """The kinematic file of ``data`` (built if missing) plus its ``extra`` sources."""
    path = build_kinematic_peak_lists(
        data["path"], data["structures"], data["kinematic"], seed=data["seed"]
    )
    parts = [read_peak_lists(path)[0]]
    for extra in data.get("extra") or []:
        parts += extra_peak_lists(extra)
    return PeakLists.concatenate(parts)


def extra_peak_lists(path: str | Path) -> list[PeakLists]:
    """The spot lists of one ``data.extra`` entry.

    A peak-list file (:func:`~stemforge.datasets.peak_lists.write_peak_lists`) as it is; a
    factory dataset folder (``stemforge simulate crystal_id``) twice: its exact tables with
    the dynamical disk intensities and the disks the correlation detector finds in its
    patterns, so that the models meet both kinds of list in training.
    """
    from stemforge.datasets.peak_lists import shard_peak_lists
    from stemforge.infer.identify import detected_peak_lists

    path = Path(path)
    if not path.is_dir():
        return [read_peak_lists(path)[0]]
    log.info("detecting the disks of the factory dataset %s", path)
    return [shard_peak_lists(path), detected_peak_lists(path)]


def train_crystal_id(cfg: Any) -> dict[str, float]:
    """Fit, score and export a crystal identifier from a composed config (see the module)."""
    from omegaconf import OmegaConf

    from stemforge.models.zoo.cache import file_sha256

    plain = OmegaConf.to_container(cfg, resolve=True)
    data, spec = plain["data"], plain["model"]
    lists = load_training_lists(data, plain["seed"])
    train_mask, val_mask, *test_mask = split_by_structure(
        lists.structure_id, data["splits"], data["split_seed"]
    )
    settings = dict(data["augment"])
    copies = int(settings.pop("copies"))
    train = PeakLists.concatenate(
        augment(lists.select(train_mask), plain["seed"] * 1000 + i, **settings)
        for i in range(copies)
    )
    features_spec = dict(spec["features"])
    features_spec["coherence_orders"] = tuple(features_spec["coherence_orders"])
    model = CrystalIdentifier(
        PeakFeatures(**features_spec),
        spec["estimator"],
        spec["system_params"],
        spec["group_params"],
        spec["lattice_params"],
        seed=plain["seed"],
    )
    log.info(
        "fitting on %d patterns of %d structures", len(train), len(np.unique(train.structure_id))
    )
    model.fit(
        model.features(train.q, train.intensity, train.offsets), train.space_group, train.lattice
    )

    metrics: dict[str, float] = {}
    evaluation_seed = 10_000 + plain["seed"]
    for prefix, mask in (("val", val_mask), *(("test", m) for m in test_mask)):
        # Validation and test patterns carry the same measurement errors as training ones;
        # each crystal is scored on one pattern per zone axis, as the benchmark does (the
        # aggregate's lattice reconstruction over all thicknesses took > 25 min at 300 per
        # system).
        part = lists.select(mask)
        part = part.select(one_per_zone_axis(part, evaluation_seed))
        metrics.update(
            identification_scores(model, augment(part, evaluation_seed, **settings), prefix)
        )
    for key, value in sorted(metrics.items()):
        log.info("%s = %.4f", key, value)

    loggers = [_instantiate(c) for c in (plain.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams({k: v for k, v in plain.items() if k != "hydra"})
        logger.log_metrics(metrics)
        logger.save()
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        wandb.finish()

    if plain.get("export", True):
        export_dir = Path(plain["paths"]["export_dir"])
        export_dir.mkdir(parents=True, exist_ok=True)
        model.metadata = {
            "name": plain["name"],
            "seed": plain["seed"],
            "data": {k: v for k, v in data.items() if k != "path"},
            "n_train_patterns": len(train),
            "n_structures": int(len(np.unique(lists.structure_id))),
            "metrics": metrics,
        }
        weights = model.save(export_dir / "model.skops")
        description = {**model.settings(), "file": weights.name, "sha256": file_sha256(weights)}
        (export_dir / "model.json").write_text(json.dumps(description, indent=2))
        log.info("exported %s", weights)
    return metrics


def _instantiate(node: dict[str, Any]) -> Any:
    from hydra.utils import instantiate

    return instantiate(node)
