"""Export trained weights for the model zoo: ``model.safetensors`` next to ``model.json``.

The safetensors header carries everything needed to rebuild and use the network, in the
form :mod:`stemforge.models.zoo` reads: ``model`` (the architecture name, a plain string)
and JSON-encoded ``config`` (the constructor's keyword arguments), ``normalization``,
``data``, ``seed``, ``command``, ``metrics`` and anything else given. ``model.json`` holds
the same, decoded, plus the weights file's name and SHA-256, for people and scripts that
do not read safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from stemforge.core.atomic import atomic_output
from stemforge.core.errors import ConfigurationError

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
#: Version of this pair's layout, recorded in both files.
FORMAT = "stemforge.model/1"


def architecture_and_config(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The zoo's architecture name of ``model`` and its constructor arguments.

    Raises
    ------
    ConfigurationError
        The module cannot describe itself (no ``config()`` method).
    """
    config = getattr(model, "config", None)
    if not callable(config):
        raise ConfigurationError(
            f"{type(model).__name__} has no config() method, so it cannot be rebuilt from its export",
            "give the network a config() that returns its constructor keyword arguments",
        )
    return str(getattr(model, "name", type(model).__name__.lower())), dict(config())


def export_model(model: nn.Module, path: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and metadata to the folder ``path``.

    The folder appears complete or not at all (written under a temporary name, then
    renamed); an existing one is replaced.

    Parameters
    ----------
    model
        The network (e.g. :class:`~stemforge.models.fcunet.FCUNet`); its ``name`` and
        ``config()`` become the ``model`` and ``config`` entries.
    path
        Output folder; gets ``model.safetensors`` and ``model.json``.
    metadata
        JSON-serialisable entries to record: at least ``normalization``, ``data`` and
        ``seed``; typically also ``command`` and ``metrics``.

    Returns
    -------
    Path
        The weights file.
    """
    from safetensors.torch import save_file

    missing = [key for key in ("normalization", "data", "seed") if key not in metadata]
    if missing:
        raise ConfigurationError(
            f"export metadata lacks {missing}",
            "pass the normalisation record, data config and seed",
        )
    architecture, config = architecture_and_config(model)
    record = {"format": FORMAT, **dict(metadata), "model": architecture, "config": config}
    try:
        header = {
            key: value if key == "model" else json.dumps(value, sort_keys=True)
            for key, value in record.items()
        }
    except TypeError as exc:
        raise ConfigurationError(
            f"export metadata is not JSON-serialisable ({exc})",
            "pass plain numbers, strings, lists and dicts (OmegaConf.to_container for configs)",
        ) from exc
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    out = Path(path)
    with atomic_output(out) as folder:
        folder.mkdir()
        weights = folder / WEIGHTS_FILE
        save_file(state, str(weights), metadata=header)
        summary = {
            **record,
            "file": WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (folder / METADATA_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return out / WEIGHTS_FILE
