"""``stemforge train [OVERRIDES]``: train a model from Hydra configs (networks with
Lightning, crystal-identification forests with scikit-learn)."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--cfg", "show_config", is_flag=True, help="Print the composed configuration and exit."
)
@click.option(
    "-m",
    "--multirun",
    is_flag=True,
    help="Sweep: run every combination of comma-separated override values "
    "(locally in parallel with hydra/launcher=joblib, on SLURM with hydra/launcher=submitit_slurm).",
)
def train(overrides: tuple[str, ...], show_config: bool, multirun: bool) -> None:
    """Train a model on simulated data; export the best one for the zoo.

    OVERRIDES are Hydra overrides: config groups (experiment=fcunet_small|fcunet|unet_small|
    crystal_id_rf|crystal_id_nn, model=..., trainer=cpu|gpu|ddp|ddp_spawn, logger=wandb|csv,
    hydra/launcher=joblib|submitit_slurm) and key=value pairs, e.g.

    \b
      stemforge train experiment=fcunet_small data.path=data/small trainer.max_epochs=5

    W&B logs offline by default (no account needed; `wandb sync` uploads later). Outputs go
    to outputs/train/NAME/TIME (hydra.run.dir=DIR to choose); resume an interrupted run with
    hydra.run.dir=<its folder> ckpt_path=last.
    """
    from omegaconf import OmegaConf

    from stemforge.train.run import check_config, compose_config, main

    if show_config:
        click.echo(OmegaConf.to_yaml(compose_config(list(overrides))))
        return
    if not multirun:  # sweeps cannot be composed here; their jobs check themselves
        check_config(compose_config(list(overrides)))
    main([*(["--multirun"] if multirun else []), *overrides])
