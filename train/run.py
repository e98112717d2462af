"""The Hydra application behind ``stemforge train``: compose, instantiate, fit, test, export.

Configs live in ``stemforge/conf/train`` (groups ``data``, ``model``, ``trainer``,
``logger``, ``callbacks``, ``experiment``, ``hydra/launcher``). A run writes into its
Hydra run folder (``outputs/train/<name>/<time>`` unless ``hydra.run.dir`` says otherwise):
``.hydra/`` (the composed config), ``checkpoints/`` (``last.ckpt`` and the best on
``val/loss``), logger output (``wandb/``, ``csv/``) and ``model/`` (the best weights as
``model.safetensors`` + ``model.json``, see :mod:`stemforge.train.export`).

Resuming: ``ckpt_path=last`` in the same run folder (``hydra.run.dir=<that folder>``), or
``ckpt_path=<file.ckpt>``. Data order, augmentation and dropout depend only on seeds,
epoch and batch (see :class:`~stemforge.datasets.datamodule.FCUNetDataModule` and
:class:`~stemforge.train.module.FCUNetModule`), and the checkpoint restores weights,
optimizer, schedule and loop counters, so a resumed run ends with the same weights as one
never interrupted (bit for bit on the CPU with ``trainer.deterministic=true``).

Run as a script (``python -m stemforge.train.run``/``python run.py``) it takes Hydra's
command line; Lightning relaunches it so for the other ranks of ``strategy=ddp``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from stemforge.core.errors import ConfigurationError, MissingFileError

log = logging.getLogger(__name__)

# conf/train/hydra/launcher/{joblib,submitit_slurm}.yaml complete the launcher plugins'
# schemas under the names users know (hydra/launcher=joblib); Hydra merges them onto the
# schemas as intended, but warns in every process that matching by name is deprecated.
_SCHEMA_WARNING = (
    r"\s*'hydra/launcher/(joblib|submitit_slurm)' is validated against ConfigStore schema"
)


def _hide_schema_warning() -> None:
    warnings.filterwarnings("ignore", message=_SCHEMA_WARNING, category=UserWarning)


_hide_schema_warning()  # at import: also in the launcher's job processes, which import this

#: The primary config in :func:`config_dir`.
CONFIG_NAME = "train"


def config_dir() -> str:
    """The folder of the training configs (``stemforge/conf/train``), as a file path.

    Hydra gets it as its primary config path, so that the groups sit at the top level
    (``model=unet_small``, ``hydra/launcher=joblib``) rather than under ``train/``.
    """
    return str(resources.files("stemforge.conf") / "train")


def compose_config(overrides: Sequence[str] = (), *, hydra: bool = False) -> Any:
    """The training config composed from ``overrides``, unresolved (Hydra's compose API).

    Parameters
    ----------
    overrides
        Hydra overrides, e.g. ``["experiment=fcunet_small", "data.path=data/small"]``
        (no sweeps: those need a multirun).
    hydra
        Keep the ``hydra`` node (launcher, run and sweep folders).

    Returns
    -------
    omegaconf.DictConfig
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with (
            warnings.catch_warnings(),
            initialize_config_dir(config_dir(), version_base="1.3", job_name="train"),
        ):
            _hide_schema_warning()
            return compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigurationError(
            "bad training override: " + " ".join(str(exc).splitlines()[:2]),  # with Hydra's hint
            "write overrides as key=value or group=option (see `stemforge train --cfg` and the "
            "groups in stemforge/conf/train)",
        ) from exc


def check_config(cfg: Any, *, launcher: str | None = None) -> None:
    """Refuse a config that cannot run, before anything is built.

    Parameters
    ----------
    cfg
        The composed training config.
    launcher
        In a multirun, ``submitit`` or the launcher's class (:func:`multirun_launcher`);
        None for a single run.

    Raises
    ------
    ConfigurationError
        No dataset given, or ``strategy=ddp`` inside a multirun on one machine.
    MissingFileError
        The dataset folder does not exist.
    """
    from omegaconf import OmegaConf

    task = cfg.get("task", "fcunet")
    if task == "crystal_id":
        return  # its peak-list file is built on first use
    if task != "crystal_id_nn":  # which, like crystal_id, builds its peak lists
        if OmegaConf.is_missing(cfg.data, "path"):
            raise ConfigurationError(
                "no training data given",
                "add data.path=DIR, a folder written by `stemforge simulate` (e.g. "
                "`stemforge simulate fcunet_small out=data/small`)",
            )
        paths = cfg.data.path if OmegaConf.is_list(cfg.data.path) else [cfg.data.path]
        for path in paths:
            if not Path(path).is_dir():
                raise MissingFileError(
                    f"the dataset folder {path} does not exist",
                    "check data.path, or simulate the data first with `stemforge simulate PRESET out=DIR`",
                )
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy.startswith("ddp") and not _spawns(strategy) and launcher not in (None, "submitit"):
        # Lightning relaunches the script for the other ranks, which then re-runs the sweep.
        raise ConfigurationError(
            f"strategy={strategy} cannot run inside a multirun on one machine (every rank would relaunch the sweep)",
            "use trainer=ddp_spawn for -m sweeps, or hydra/launcher=submitit_slurm on a cluster",
        )


def multirun_launcher() -> str | None:
    """None outside a multirun; else ``submitit`` or the launcher's class name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    target = str(HydraConfig.get().launcher.get("_target_", ""))
    return "submitit" if "submitit" in target else target


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint file to resume from: None, ``last`` in ``checkpoint_dir``, or a path."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = Path(checkpoint_dir) / "last.ckpt"
        if not last.is_file():
            raise ConfigurationError(
                f"ckpt_path=last, but there is no {last}",
                "resume in the folder of the interrupted run (add hydra.run.dir=<its folder>), "
                "or give the checkpoint file: ckpt_path=<path/to/last.ckpt>",
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise MissingFileError(
            f"the checkpoint {ckpt_path} does not exist",
            "give an existing .ckpt file, or ckpt_path=last",
        )
    return str(ckpt_path)


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _number(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None  # NaN is not JSON


def _command() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["stemforge train", *HydraConfig.get().overrides.task])


def _spawns(strategy: str) -> bool:
    """Whether a Lightning strategy starts its processes anew for every fit/validate/test."""
    return any(word in strategy for word in ("spawn", "fork", "notebook"))


def _evaluation_trainer(cfg: Any, trainer: Any) -> Any:
    """The trainer that scores the best weights after the fit: the fitting one, except
    after a spawning strategy, whose fresh processes per stage would restart the loggers
    (CSVLogger deletes the metrics of the fit); those score here, on one device, unlogged
    (the scores go to the export and the return value)."""
    from hydra.utils import instantiate

    if not _spawns(str(cfg.trainer.get("strategy", "auto"))):
        return trainer
    return instantiate(
        cfg.trainer,
        strategy="auto",
        devices=1,
        num_nodes=1,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
    )


def prepare(cfg: Any) -> str | None:
    """Checks, seeds and precision before a Lightning run is built; the checkpoint to resume."""
    import pytorch_lightning as pl
    import torch

    check_config(cfg, launcher=multirun_launcher())
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    return ckpt_path


def fit_and_export(
    cfg: Any,
    module: Any,
    datamodule: Any,
    ckpt_path: str | None,
    metadata: Callable[[], dict[str, Any]],
    extra_scores: Callable[[str], dict[str, float]] | None = None,
) -> dict[str, float | None]:
    """Fit with the configured trainer, loggers and callbacks; score the best weights on
    validation (and test); export ``module.net`` with its metadata.

    Parameters
    ----------
    cfg
        The composed config (``trainer``, ``logger``, ``callbacks``, ``paths``, ``test``,
        ``export``...).
    module, datamodule
        Built by the caller (after :func:`prepare`).
    ckpt_path
        Checkpoint to resume from (:func:`prepare` resolves it).
    metadata
        The export's entries besides ``name``, ``seed``, ``command``, ``metrics``,
        ``checkpoint``, ``epochs`` and ``steps`` (at least ``normalization`` and ``data``).
    extra_scores
        ``extra_scores(stage)`` → more metrics of the best weights for ``val``/``test``.

    Returns
    -------
    dict
        Metrics of the exported (best) weights; None for undefined values.
    """
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import WandbLogger

    from stemforge.train.export import export_model

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_config = {key: value for key, value in _plain(cfg).items() if key != "hydra"}
    for logger in trainer.loggers:
        logger.log_hyperparams(run_config)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")
        if best:
            module.load_state_dict(
                torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            )
        evaluator = _evaluation_trainer(cfg, trainer)
        results: dict[str, Any] = {}
        for stage in ["val"] + ["test"] * bool(cfg.test and datamodule.has_test):
            run = evaluator.validate if stage == "val" else evaluator.test
            for result in run(module, datamodule=datamodule, verbose=False):
                results.update(result)
            if extra_scores is not None:
                results.update(extra_scores(stage))
        metrics = {key: _number(value) for key, value in sorted(results.items())}
        if cfg.export and trainer.is_global_zero:
            weights = export_model(
                module.net,
                cfg.paths.export_dir,
                {
                    "name": cfg.name,
                    **metadata(),
                    "seed": cfg.seed,
                    "command": _command(),
                    "metrics": metrics,
                    "checkpoint": Path(best).name if best else None,
                    "epochs": trainer.current_epoch,
                    "steps": trainer.global_step,
                },
            )
            log.info("exported %s", weights)
        return metrics
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # Lightning leaves the run open; the next job of a sweep needs its own


def train(cfg: Any) -> dict[str, float | None]:
    """Fit, validate the best weights, test, and export them; the work of one run.

    Parameters
    ----------
    cfg
        A composed training config (resolved here; ``${hydra:...}`` needs a Hydra run).

    Returns
    -------
    dict
        Metrics of the exported (best) weights: ``val/...`` and, with a test split,
        ``test/...``; None for undefined values.
    """
    from hydra.utils import instantiate

    from stemforge.datasets.datamodule import NORMALIZATION
    from stemforge.train.module import FCUNetModule

    ckpt_path = prepare(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = FCUNetModule(model=_plain(cfg.model), **_plain(cfg.module))
    init_weights = cfg.get("init_weights")
    if init_weights and ckpt_path is None:  # a resumed run takes its checkpoint's weights
        load_initial_weights(module.net, str(init_weights))

    def metadata() -> dict[str, Any]:
        data = {key: value for key, value in _plain(cfg.data).items() if key != "_target_"}
        data["datasets"] = [
            {
                "path": str(path),
                "seed": store.seed,
                "shape": list(datamodule.pattern_shape),
                "config": store.config,
                # lets benchmarks hold these structures out without the data at hand
                "structure_ids": sorted({str(i) for i in store.column("structure_id") if i}),
            }
            for path, store in zip(datamodule.paths, datamodule.stores, strict=True)
        ]
        return {"normalization": NORMALIZATION, "data": data, "init_weights": init_weights}

    return fit_and_export(cfg, module, datamodule, ckpt_path, metadata)


def load_initial_weights(net: Any, spec: str) -> None:
    """Start ``net`` from the weights of a zoo model (``name[@version]``) or of an exported
    ``.safetensors`` file: fine-tuning on new data, or a longer schedule after a short one.

    Raises
    ------
    ConfigurationError
        The source has another architecture or configuration than ``net``, or was trained
        with another input normalisation.
    """
    from stemforge.infer.fcunet_detect import load_detector_model

    source = load_detector_model(spec)  # refuses another normalisation
    if type(source) is not type(net) or source.config() != net.config():
        raise ConfigurationError(
            f"init_weights={spec} is a {type(source).__name__} {source.config()}, "
            f"but this run builds a {type(net).__name__} {net.config()}",
            "set the model group and its settings to the source's (stemforge zoo info NAME "
            "shows them), or drop init_weights",
        )
    net.load_state_dict(source.state_dict())
    log.info("started from the weights of %s", spec)


def task(cfg: Any) -> float | None:
    """Hydra's task function: one training run; returns ``optimized_metric`` for sweepers."""
    if cfg.get("task", "fcunet") == "crystal_id":
        from stemforge.train.crystal_id import train_crystal_id

        metrics: dict[str, float | None] = dict(train_crystal_id(cfg))
    elif cfg.get("task") == "crystal_id_nn":
        from stemforge.train.crystal_id_nn import train_crystal_id_nn

        metrics = train_crystal_id_nn(cfg)
    else:
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def main(args: Sequence[str] = ()) -> None:
    """Run the Hydra application with a command line: overrides and Hydra flags
    (``--multirun``, ``--cfg job``...), as ``stemforge train`` passes them.

    Errors propagate as exceptions (stemforge's CLI prints its own errors as one line)
    instead of Hydra's report-and-exit.
    """
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    app = hydra.main(config_path=config_dir(), config_name=CONFIG_NAME, version_base="1.3")(task)
    # argv[0] is this file: Lightning's DDP relaunches `python argv[0] ...` for other ranks.
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with warnings.catch_warnings(), _argv([str(Path(__file__).resolve()), *args]):
            _hide_schema_warning()
            app()
    finally:
        GlobalHydra.instance().clear()  # a later run in this process starts afresh
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


if __name__ == "__main__":
    main(sys.argv[1:])
