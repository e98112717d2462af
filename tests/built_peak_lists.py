"""A peak-list file that a crystal-ID training config counts as its own: shared by the
Hydra run tests of both identifiers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from stemforge.datasets.peak_lists import PeakLists, write_peak_lists


def built_peak_lists(cfg, lists: PeakLists, folder: Path) -> Path:
    """Write ``lists`` with the data config of ``cfg`` (composed experiment), so the run
    reuses the file instead of building the kinematic lists."""
    built = {key: OmegaConf.to_container(cfg.data[key]) for key in ("structures", "kinematic")}
    return write_peak_lists(folder / "lists.h5", lists, {**built, "seed": cfg.data.seed})
