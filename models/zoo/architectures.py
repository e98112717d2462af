"""Architecture table: the name a weights file records → the callable that builds the module.

Built-in architectures are ``"module:attribute"`` strings, imported only when a model of
that kind is loaded (so listing the zoo never imports torch). Code outside stemforge, and
tests, add their own with :func:`register_architecture`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from stemforge.core.errors import ConfigurationError

#: A factory: called with the ``config`` keyword arguments, returns a ``torch.nn.Module``.
Factory = Callable[..., Any]

_ARCHITECTURES: dict[str, str | Factory] = {
    "fcunet": "stemforge.models.fcunet:FCUNet",
    "unet": "stemforge.models.unet:UNet",
    "peak_set": "stemforge.models.peak_set:PeakSetNet",
}


def register_architecture(name: str, factory: str | Factory, *, replace: bool = False) -> None:
    """Make weights whose metadata says ``model = name`` loadable.

    Parameters
    ----------
    name
        Architecture name as written in the safetensors metadata (``model``).
    factory
        A callable taking the config keyword arguments and returning a ``torch.nn.Module``,
        or a ``"package.module:attribute"`` string naming one (imported on first use).
    replace
        Allow replacing a different factory already registered under ``name``.

    Raises
    ------
    ConfigurationError
        ``name`` is taken by another factory and ``replace`` is False.
    """
    current = _ARCHITECTURES.get(name)
    if current is not None and current != factory and not replace:
        raise ConfigurationError(
            f"architecture {name!r} is already registered ({current!r})",
            "pick another name, or pass replace=True to override it",
        )
    _ARCHITECTURES[name] = factory


def architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> Factory:
    """The factory registered under ``name``, importing it if it is a ``module:attribute`` string.

    Raises
    ------
    ConfigurationError
        Unknown name (listing the known ones), or a built-in whose module cannot be imported.
    """
    if name not in _ARCHITECTURES:
        raise ConfigurationError(
            f"unknown architecture {name!r}; known: {', '.join(architectures())}",
            "register it with stemforge.models.zoo.register_architecture(name, factory), "
            "or upgrade stemforge",
        )
    factory = _ARCHITECTURES[name]
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(
                f"architecture {name!r} points to {_ARCHITECTURES[name]}, which cannot be imported ({exc})",
                "reinstall stemforge, or register a working factory with register_architecture",
            ) from exc
    return factory
