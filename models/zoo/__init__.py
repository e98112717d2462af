"""The model zoo: pretrained models by ``name@version``, verified by sha256, loaded without pickle.

``resolve("fcunet")`` finds the latest version in the registries (the one shipped in the
package plus ``$STEMFORGE_ZOO_REGISTRY``); ``pull`` downloads it through pooch into the cache
(``$STEMFORGE_ZOO_CACHE``) or finds it embedded in the package; ``load_model`` builds the
architecture its safetensors metadata names and loads the weights strictly. Maintainers
publish a model with ``add_model``. torch is imported only when weights are loaded.
"""

from stemforge.models.zoo.architectures import (
    architectures,
    get_architecture,
    register_architecture,
)
from stemforge.models.zoo.cache import CACHE_ENV, cache_dir
from stemforge.models.zoo.registry import (
    REGISTRY_ENV,
    ModelEntry,
    ModelUnavailableError,
    Registry,
    list_models,
    load_registry,
    resolve,
)
from stemforge.models.zoo.store import (
    add_model,
    build_model,
    cached_path,
    load_model,
    load_model_file,
    load_weights,
    local_path,
    pull,
    read_metadata,
    verify,
)

__all__ = [
    "CACHE_ENV",
    "REGISTRY_ENV",
    "ModelEntry",
    "ModelUnavailableError",
    "Registry",
    "add_model",
    "architectures",
    "cache_dir",
    "cached_path",
    "get_architecture",
    "list_models",
    "build_model",
    "load_model",
    "load_model_file",
    "load_registry",
    "load_weights",
    "local_path",
    "pull",
    "read_metadata",
    "register_architecture",
    "resolve",
    "verify",
]
