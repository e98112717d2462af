"""The LightningModule that trains pattern → structure-factor networks (FCU-Net, UNet).

Besides the loss, validation scores what the network is for: finding Bragg peaks. Peaks
are local maxima above a threshold, taken alike from the target and from the prediction
(:func:`find_peaks`, a simple extractor for now), the central beam left out, and matched
within a tolerance (:func:`match_peaks`); the accuracy is ``TP / (TP + FP + FN)`` as in
Munshi et al. (2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmetrics import Metric

from stemforge.core.errors import ConfigurationError
from stemforge.datasets.datamodule import structure_factor_image

#: Losses on (prediction, target) by config name.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "smooth_l1": F.smooth_l1_loss,
}

#: Learning-rate schedules by config name (all stepped once per optimizer step).
SCHEDULES = ("cosine", "onecycle", "constant")

_DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 1e-4}
_DEFAULT_SCHEDULER = {"name": "cosine", "warmup_fraction": 0.05, "min_lr_ratio": 0.01}


# ---- peaks -----------------------------------------------------------------------------------
def find_peaks(images: torch.Tensor, threshold: float) -> list[np.ndarray]:
    """Local maxima (3x3) of at least ``threshold``, refined to subpixel positions.

    Of two equal neighbouring maxima (a peak centred between them) only one is kept.

    Each position is refined along each axis by a parabola through the logarithms of the
    maximum and its two neighbours, exact for a Gaussian peak like those of the target;
    the shift is capped at half a pixel.

    Parameters
    ----------
    images
        ``(B, 1, H, W)`` or ``(B, H, W)``.
    threshold
        Lowest peak value, in the images' units.

    Returns
    -------
    list of numpy.ndarray
        Per image, ``(K, 3)`` float64 rows ``(qx, qy, value)`` in pixels along axes -2, -1.
    """
    x = images.detach().float().reshape(-1, 1, *images.shape[-2:]).cpu()
    height, width = x.shape[-2:]
    around = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    is_max = x >= threshold
    for dx, dy in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        neighbour = around[..., 1 + dx : 1 + dx + height, 1 + dy : 1 + dy + width]
        # Of equal neighbours only the first in raster order counts, so a peak centred
        # between two pixels is found once.
        is_max &= x > neighbour if (dx, dy) < (0, 0) else x >= neighbour
    log = torch.log(x.clamp_min(1e-12 if threshold <= 0 else threshold * 1e-3))
    padded = F.pad(log, (1, 1, 1, 1), mode="replicate")
    centre = padded[..., 1:-1, 1:-1]

    def shift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        curvature = before - 2 * centre + after
        safe = torch.where(curvature < 0, curvature, torch.full_like(curvature, -1.0))
        step = torch.where(curvature < 0, (before - after) / (2 * safe), torch.zeros_like(safe))
        return step.clamp(-0.5, 0.5)

    dx = shift(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1])
    dy = shift(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    peaks = []
    for b in range(x.shape[0]):
        rows, cols = torch.nonzero(is_max[b, 0], as_tuple=True)
        peaks.append(
            torch.stack(
                [rows + dx[b, 0, rows, cols], cols + dy[b, 0, rows, cols], x[b, 0, rows, cols]],
                dim=1,
            )
            .double()
            .numpy()
        )
    return peaks


def match_peaks(
    predicted: np.ndarray, true: np.ndarray, tolerance: float
) -> tuple[int, int, int, np.ndarray]:
    """One-to-one matching of predicted to true peak positions within ``tolerance`` pixels.

    The assignment minimises the total distance (Hungarian algorithm) over pairs closer
    than the tolerance.

    Parameters
    ----------
    predicted, true
        ``(N, ≥2)`` and ``(M, ≥2)`` arrays whose first two columns are positions.
    tolerance
        Largest distance of a match, pixels.

    Returns
    -------
    tp, fp, fn, distances
        Matched pairs, unmatched predictions, unmatched true peaks, and the distances of
        the matched pairs.
    """
    if len(predicted) == 0 or len(true) == 0:
        return 0, len(predicted), len(true), np.empty(0)
    d = np.linalg.norm(predicted[:, None, :2] - true[None, :, :2], axis=-1)
    far = d > tolerance
    rows, cols = linear_sum_assignment(np.where(far, 1e9, d))
    keep = ~far[rows, cols]
    distances = d[rows[keep], cols[keep]]
    tp = len(distances)
    return tp, len(predicted) - tp, len(true) - tp, distances


def _without_centre(peaks: np.ndarray, centre: np.ndarray, tolerance: float) -> np.ndarray:
    return peaks[np.linalg.norm(peaks[:, :2] - centre, axis=1) > tolerance]


class PeakAccuracy(Metric):
    """Peak-finding accuracy ``TP / (TP + FP + FN)`` and mean position error (pixels).

    Peaks of target and prediction come from :func:`find_peaks` with the same threshold;
    the central beam (the target's highest peak) and anything predicted within the
    tolerance of it are left out, as the forward beam is no Bragg reflection to find.
    Counts are summed over all updates (and across DDP processes) before the ratio.

    Parameters
    ----------
    threshold
        Lowest peak height as a fraction of the central beam's ``|V_0|``, on the images that
        :func:`~stemforge.datasets.datamodule.structure_factor_image` makes of outputs and
        targets; FCU-Net used 5 %.
    tolerance
        Largest distance, pixels, between a predicted and a true peak that match.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.05, tolerance: float = 1.5) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.tolerance = float(tolerance)
        for name in ("tp", "fp", "fn", "distance"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add the peaks of a batch of ``(B, 1, H, W)`` network outputs and normalised targets."""
        found = find_peaks(structure_factor_image(prediction), self.threshold)
        true = find_peaks(structure_factor_image(target), self.threshold)
        for pred, truth in zip(found, true, strict=True):
            if len(truth):
                centre = truth[np.argmax(truth[:, 2]), :2]
                pred = _without_centre(pred, centre, self.tolerance)
                truth = _without_centre(truth, centre, self.tolerance)
            tp, fp, fn, distances = match_peaks(pred, truth, self.tolerance)
            self.tp += tp
            self.fp += fp
            self.fn += fn
            self.distance += float(distances.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        """``accuracy`` (1 when there was nothing to find and nothing was found) and
        ``position_error`` (NaN without any match)."""
        total = self.tp + self.fp + self.fn
        accuracy = self.tp / total if total > 0 else torch.ones_like(total)
        error = self.distance / self.tp if self.tp > 0 else torch.full_like(total, math.nan)
        return {"accuracy": accuracy.float(), "position_error": error.float()}


# ---- the module ------------------------------------------------------------------------------
def instantiate_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a network from a Hydra-style config: ``_target_`` plus keyword arguments."""
    from hydra.utils import instantiate

    if "_target_" not in config:
        raise ConfigurationError(
            f"the model config {dict(config)} has no _target_",
            "name the class, e.g. model._target_=stemforge.models.fcunet.FCUNet",
        )
    model = instantiate(dict(config), _convert_="all")
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"model._target_={config['_target_']} built a {type(model).__name__}, not a torch module",
            "point _target_ at a torch.nn.Module class such as stemforge.models.unet.UNet",
        )
    return model


def _step_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _examples(
    batch: Mapping[str, torch.Tensor], prediction: torch.Tensor, n: int
) -> list[np.ndarray]:
    """Input | target | prediction side by side, uint8 per sample; target and prediction
    share the target's scale, the input has its own."""
    images = []
    for k in range(min(n, prediction.shape[0])):
        pattern = batch["pattern"][k, 0].float().cpu()
        target = batch["target"][k, 0].float().cpu()
        pred = prediction[k, 0].detach().float().cpu()
        scale = target.max().clamp_min(1e-12)
        panels = [pattern / pattern.max().clamp_min(1e-12), target / scale, pred / scale]
        gap = torch.ones(pattern.shape[0], 1)
        row = torch.cat([panels[0], gap, panels[1], gap, panels[2]], dim=1).clamp(0, 1)
        images.append((row * 255).round().to(torch.uint8).numpy())
    return images


class ScheduledModule(pl.LightningModule):
    """What every stemforge LightningModule shares: the optimizer from ``hparams.optimizer``
    (a Hydra node), the learning-rate schedule of ``hparams.scheduler`` (cosine | onecycle |
    constant, stepped every optimizer step) and torch's generator reseeded before every
    training step from ``(hparams.seed, epoch, batch, rank)``, so a resumed run continues
    bit for bit."""

    @staticmethod
    def optimization(
        optimizer: Mapping[str, Any] | None, scheduler: Mapping[str, Any] | None
    ) -> dict[str, dict[str, Any]]:
        """The ``optimizer`` and ``scheduler`` hyperparameters with defaults filled in.

        Raises
        ------
        ConfigurationError
            For an unknown schedule name.
        """
        scheduler = {**_DEFAULT_SCHEDULER, **dict(scheduler or {})}
        if scheduler["name"] not in SCHEDULES:
            raise ConfigurationError(
                f"unknown learning-rate schedule {scheduler['name']!r}",
                f"use one of {list(SCHEDULES)}",
            )
        return {"optimizer": dict(optimizer or _DEFAULT_OPTIMIZER), "scheduler": scheduler}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(
            _step_seed(self.hparams.seed, self.current_epoch, batch_idx, self.global_rank)
        )

    def configure_optimizers(self) -> dict[str, Any]:
        from hydra.utils import instantiate

        optimizer = instantiate(self.hparams.optimizer, params=self.parameters(), _convert_="all")
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigurationError(
                "the number of training steps is unbounded, so the learning-rate schedule has no length",
                "set trainer.max_epochs or trainer.max_steps",
            )
        total = max(int(total), 1)
        config = self.hparams.scheduler
        warmup = float(config.get("warmup_fraction", 0.0))
        if config["name"] == "onecycle" and total >= 3:
            # Each of the two phases must span at least one step.
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[group["lr"] for group in optimizer.param_groups],
                total_steps=total,
                pct_start=min(max(warmup, 2 / total), 1 - 1 / total),
            )
        else:  # also a one-cycle run too short for two phases (fast_dev_run): constant
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                _cosine(total, warmup, float(config.get("min_lr_ratio", 0.0)))
                if config["name"] == "cosine"
                else _constant,
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class FCUNetModule(ScheduledModule):
    """Training of a network that maps (pattern, probe) to a structure-factor image.

    Batches are dicts of ``pattern``, ``probe`` and ``target``, ``(B, 1, H, W)``, as
    :class:`~stemforge.datasets.datamodule.FCUNetDataModule` makes them. Logged:
    ``train/loss`` (per step), ``val/loss``, ``val/accuracy``, ``val/position_error``
    (per epoch; likewise ``test/...``), and every ``log_images_every_n_epochs`` epochs
    input/target/prediction images to the loggers that take images (W&B).

    Parameters
    ----------
    model
        Hydra-style config of the network: ``_target_`` (a class called as
        ``net(pattern, probe)``) and its keyword arguments. Kept in the hyperparameters,
        so that ``FCUNetModule.load_from_checkpoint`` rebuilds the network.
    loss
        One of :data:`LOSSES`.
    optimizer
        Hydra-style config of a torch optimizer, called with the parameters
        (default AdamW, lr 1e-3, weight decay 1e-4).
    scheduler
        ``name``: ``cosine`` (linear warm-up over ``warmup_fraction`` of the steps, then a
        cosine down to ``min_lr_ratio`` of the rate), ``onecycle`` (torch's
        ``OneCycleLR``, warm-up fraction as ``pct_start``; constant for runs under 3 steps)
        or ``constant``; stepped every optimizer step.
    peak_threshold, match_tolerance
        Of :class:`PeakAccuracy`.
    log_images_every_n_epochs
        Image logging period (0: never).
    n_images
        Validation samples shown in each image log.
    seed
        Dropout (and any other randomness inside a training step) draws from torch's
        generator reseeded with ``(seed, epoch, batch, rank)`` before every step, so that a
        resumed run continues bit for bit.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        *,
        loss: str = "mse",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        peak_threshold: float = 0.05,
        match_tolerance: float = 1.5,
        log_images_every_n_epochs: int = 5,
        n_images: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigurationError(f"unknown loss {loss!r}", f"use one of {sorted(LOSSES)}")
        # Plain containers only: checkpoints then load with torch's weights-only unpickler.
        self.save_hyperparameters(
            {
                "model": dict(model),
                "loss": loss,
                **self.optimization(optimizer, scheduler),
                "peak_threshold": float(peak_threshold),
                "match_tolerance": float(match_tolerance),
                "log_images_every_n_epochs": int(log_images_every_n_epochs),
                "n_images": int(n_images),
                "seed": int(seed),
            }
        )
        self.net = instantiate_model(model)
        self.loss_fn = LOSSES[loss]
        self.val_peaks = PeakAccuracy(peak_threshold, match_tolerance)
        self.test_peaks = PeakAccuracy(peak_threshold, match_tolerance)
        self._shown: list[np.ndarray] = []

    def forward(self, pattern: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """The network's prediction for normalised inputs."""
        return self.net(pattern, probe)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self(batch["pattern"], batch["probe"]), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        return loss

    def _evaluate(
        self, batch: Mapping[str, torch.Tensor], stage: str, peaks: PeakAccuracy
    ) -> torch.Tensor:
        prediction = self(batch["pattern"], batch["probe"])
        loss = self.loss_fn(prediction, batch["target"])
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            sync_dist=True,
            batch_size=batch["target"].shape[0],
        )
        peaks.update(prediction, batch["target"])
        return prediction

    def _log_peaks(self, stage: str, peaks: PeakAccuracy) -> None:
        scores = peaks.compute()  # counts already summed across processes: equal everywhere
        self.log(f"{stage}/accuracy", scores["accuracy"], sync_dist=True)
        self.log(f"{stage}/position_error", scores["position_error"], sync_dist=True)
        peaks.reset()

    def _show_images_now(self) -> bool:
        every = self.hparams.log_images_every_n_epochs
        return (
            every > 0
            and self.trainer.state.fn == "fit"  # not the final validation of the best weights
            and not self.trainer.sanity_checking
            and (self.current_epoch + 1) % every == 0
            and any(hasattr(logger, "log_image") for logger in self.loggers)
        )

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        prediction = self._evaluate(batch, "val", self.val_peaks)
        if batch_idx == 0 and self._show_images_now():
            self._shown = _examples(batch, prediction, self.hparams.n_images)

    def on_validation_epoch_end(self) -> None:
        self._log_peaks("val", self.val_peaks)
        if self._shown:
            for logger in self.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(
                        key="val/examples",
                        images=self._shown,
                        caption=["input | target | prediction"] * len(self._shown),
                        step=self.global_step,
                    )
            self._shown = []

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_peaks)

    def on_test_epoch_end(self) -> None:
        self._log_peaks("test", self.test_peaks)


def _constant(step: int) -> float:
    return 1.0


def _cosine(total: int, warmup_fraction: float, min_ratio: float) -> Callable[[int], float]:
    """Rate factor: linear from 0 over the warm-up steps, then cosine from 1 to ``min_ratio``."""
    warmup = int(round(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
