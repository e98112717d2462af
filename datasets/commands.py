"""``stemforge simulate PRESET [key=value ...]``: run the simulation factory from a Hydra preset.

The command lives in ``datasets`` because it joins the physics of ``simulate`` to the
shard store of ``datasets`` (dependencies point from simulate to datasets, not back).
"""

from __future__ import annotations

from importlib import resources

import click

PRESET_GROUP = "simulate"


def available_presets() -> list[str]:
    """Names of the simulation presets shipped in ``stemforge.conf.simulate``."""
    folder = resources.files("stemforge.conf") / PRESET_GROUP
    return sorted(
        p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != "base.yaml"
    )


def compose_config(preset: str, overrides: list[str], *, require_out: bool = True):  # noqa: ANN201 - DictConfig
    """The resolved configuration of ``preset`` with command-line ``overrides``."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from stemforge.core.errors import ConfigurationError

    presets = available_presets()
    if preset not in presets:
        raise ConfigurationError(f"unknown simulation preset {preset!r}", f"use one of {presets}")
    try:
        with initialize_config_module(config_module="stemforge.conf", version_base="1.3"):
            cfg = compose(config_name=f"{PRESET_GROUP}/{preset}", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigurationError(
            f"bad override for preset {preset!r}: {exc}".splitlines()[0],
            "write overrides as key=value with keys of the preset (see `stemforge simulate PRESET --cfg`)",
        ) from exc
    if require_out and OmegaConf.is_missing(cfg, "out"):
        raise ConfigurationError(
            "no output folder given",
            f"add out=DIR, e.g. `stemforge simulate {preset} out=data/{preset}`",
        )
    return cfg


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("preset")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--cfg", "show_config", is_flag=True, help="Print the resolved configuration and exit."
)
def simulate(preset: str, overrides: tuple[str, ...], show_config: bool) -> None:
    """Simulate a labelled training set (or a strain benchmark scan) with abTEM.

    PRESET is one of the presets in stemforge/conf/simulate (fcunet_small, fcunet,
    crystal_id, sige_strain_scan); OVERRIDES are Hydra key=value pairs, e.g.
    `stemforge simulate fcunet_small out=data/small n_patterns=500 seed=1 detector.n_pixels=64`.
    Reruns into the same folder resume: finished shards are kept and checked.
    """
    from omegaconf import OmegaConf

    cfg = compose_config(preset, list(overrides), require_out=not show_config)
    if show_config:
        click.echo(OmegaConf.to_yaml(cfg))
        return
    from stemforge.datasets.factory import run_factory

    out = run_factory(cfg)
    click.echo(f"wrote {out}")
