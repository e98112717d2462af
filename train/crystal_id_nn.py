"""Training of the neural crystal identifier: ``stemforge train experiment=crystal_id_nn``.

:class:`CrystalIdNNModule` fits a :class:`~stemforge.models.peak_set.PeakSetNet` with three
losses: the crystal system (cross-entropy), the space group given the true system (the
group head is normalised within each system, so the two add up to the joint's
cross-entropy) and the lattice (smooth L1 on the standardised free parameters of the true
system only, :data:`~stemforge.simulate.labels.FREE_LATTICE_PARAMETERS`; the constrained
ones are filled in by symmetry at prediction). Logged: ``train/loss`` (per step),
``val/loss``, ``val/system_accuracy``, ``val/group_accuracy``, ``val/group_top3``,
``val/lattice_error`` (mean relative error of the free lengths; likewise ``test/...``).

:func:`train_crystal_id_nn` runs it on the peak lists of the random-forest run (same file,
split, augmentation and validation/test draws), scores the best weights per pattern and
aggregated per structure with the forest's
:func:`~stemforge.train.crystal_id.identification_scores`, and exports them for the zoo
(``model.safetensors`` + ``model.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from stemforge.core.errors import ConfigurationError
from stemforge.models.peak_set import INPUTS, denormalize_lattice, normalize_lattice
from stemforge.train.module import (
    ScheduledModule,
    instantiate_model,
)

log = logging.getLogger(__name__)

#: Keys of the config's ``module`` node that this module takes (the rest are FCU-Net's).
MODULE_KEYS = (
    "optimizer",
    "scheduler",
    "group_weight",
    "lattice_weight",
    "label_smoothing",
    "seed",
)


class CrystalIdNNModule(ScheduledModule):
    """Training of a peak-set network on padded peak lists (see the module notes).

    Batches are dicts as :class:`~stemforge.datasets.peak_list_datamodule.PeakListDataset`
    makes them.

    Parameters
    ----------
    model
        Hydra-style config of the network (``_target_`` and keyword arguments), kept in the
        hyperparameters so that ``load_from_checkpoint`` rebuilds it.
    optimizer, scheduler
        As :class:`~stemforge.train.module.ScheduledModule` takes them.
    group_weight, lattice_weight
        Weights of the space-group and lattice losses against the crystal-system loss.
    label_smoothing
        Of the crystal-system cross-entropy.
    seed
        Dropout draws from torch's generator reseeded with ``(seed, epoch, batch, rank)``
        before every step, so that a resumed run continues bit for bit.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        group_weight: float = 1.0,
        lattice_weight: float = 0.5,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(group_weight, lattice_weight, label_smoothing) < 0 or label_smoothing >= 1:
            raise ConfigurationError(
                f"loss settings group_weight={group_weight}, lattice_weight={lattice_weight}, "
                f"label_smoothing={label_smoothing}",
                "use non-negative weights and a label smoothing in [0, 1)",
            )
        self.save_hyperparameters(
            {
                "model": dict(model),
                **self.optimization(optimizer, scheduler),
                "group_weight": float(group_weight),
                "lattice_weight": float(lattice_weight),
                "label_smoothing": float(label_smoothing),
                "seed": int(seed),
            }
        )
        self.net = instantiate_model(model)

    def forward(
        self, q: torch.Tensor, intensity: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The network's raw outputs (see :meth:`PeakSetNet.forward`)."""
        return self.net(q, intensity, mask)

    def _losses(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        out = self(batch["q"], batch["intensity"], batch["mask"])
        system, group = batch["system"], batch["group"]
        rows = torch.arange(len(system), device=system.device)
        # The system head gives log-probabilities, which log_softmax leaves unchanged.
        system_loss = F.cross_entropy(
            out["system"], system, label_smoothing=self.hparams.label_smoothing
        )
        group_loss = -out["group"][rows, group].mean()
        free = self.net.free[system]
        error = F.smooth_l1_loss(
            out["lattice"][rows, system], normalize_lattice(batch["lattice"]), reduction="none"
        )
        lattice_loss = (error * free).sum() / free.sum()
        loss = (
            system_loss
            + self.hparams.group_weight * group_loss
            + self.hparams.lattice_weight * lattice_loss
        )
        losses = {"loss": loss, "system_loss": system_loss, "group_loss": group_loss}
        return losses | {"lattice_loss": lattice_loss}, out

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses, _ = self._losses(batch)
        size = len(batch["system"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("system_loss", "group_loss", "lattice_loss"):
            self.log(f"train/{name}", losses[name], batch_size=size)
        return losses["loss"]

    def _evaluate(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        losses, out = self._losses(batch)
        system, group = batch["system"], batch["group"]
        rows = torch.arange(len(system), device=system.device)
        joint = out["group"] + out["system"][:, self.net.system_of_group]
        top3 = joint.topk(3, dim=1).indices
        lengths = denormalize_lattice(out["lattice"][rows, system])[:, :3]
        free = self.net.free[system, :3]
        relative = (lengths / batch["lattice"][:, :3] - 1).abs()
        scores = {
            "loss": losses["loss"],
            "system_accuracy": (out["system"].argmax(dim=1) == system).float().mean(),
            "group_accuracy": (top3[:, 0] == group).float().mean(),
            "group_top3": (top3 == group[:, None]).any(dim=1).float().mean(),
            "lattice_error": (relative * free).sum() / free.sum(),
        }
        for name, value in scores.items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name in ("loss", "system_accuracy"),
                sync_dist=True,
                batch_size=len(system),
            )

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")


def train_crystal_id_nn(cfg: Any) -> dict[str, float | None]:
    """Fit, score and export a peak-set crystal identifier from a composed config.

    Parameters
    ----------
    cfg
        A composed training config with ``task=crystal_id_nn`` (see
        ``experiment=crystal_id_nn``).

    Returns
    -------
    dict
        Metrics of the exported (best) weights: the Lightning scores and
        :func:`~stemforge.train.crystal_id.identification_scores` (per pattern and
        aggregated per structure, one pattern per zone axis) of ``val`` and, with a test split, ``test``.
    """
    from stemforge.datasets.peak_list_datamodule import PeakListDataModule
    from stemforge.datasets.peak_lists import one_per_zone_axis
    from stemforge.train.crystal_id import identification_scores, load_training_lists
    from stemforge.train.run import _plain, fit_and_export, prepare

    ckpt_path = prepare(cfg)
    data = _plain(cfg.data)
    datamodule = PeakListDataModule(
        load_training_lists(data, cfg.seed),
        max_spots=data["max_spots"],
        splits=data["splits"],
        split_seed=data["split_seed"],
        batch_size=data["batch_size"],
        augment=data["augment"],
        seed=cfg.seed,
        num_workers=data["num_workers"],
    )
    settings = _plain(cfg.module)
    module = CrystalIdNNModule(
        model=_plain(cfg.model), **{key: settings[key] for key in MODULE_KEYS if key in settings}
    )
    metrics = fit_and_export(
        cfg,
        module,
        datamodule,
        ckpt_path,
        lambda: {
            "normalization": INPUTS,
            "data": {key: value for key, value in data.items() if key != "path"},
            "n_structures": int(len(set(datamodule.lists.structure_id))),
        },
        # One pattern per zone axis of each crystal, as the forests are scored.
        lambda stage: identification_scores(
            module.net,
            datamodule.parts[stage].select(one_per_zone_axis(datamodule.parts[stage], cfg.seed)),
            stage,
        ),
    )
    for key, value in metrics.items():
        log.info("%s = %s", key, value)
    return metrics
