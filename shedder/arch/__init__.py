"""Registry of model-family adapters. Adding a family means adding one module here and listing it
in ``_FAMILY_MODULES``; nothing outside ``shedder.arch`` knows about families."""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError
from .base import Adapter, count_parameters, instantiate, patch_forward

_FAMILY_MODULES = ("mamba", "falcon_mamba", "mamba2", "nemotron_h", "bamba", "zamba2", "falcon_h1", "jamba")

_REGISTRY: list[type[Adapter]] = []


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator used by each family module."""
    _REGISTRY.append(cls)
    return cls


_LOADED = False


def _load_families() -> list[type[Adapter]]:
    # A flag, not "registry empty": importing one family module directly (e.g. in a test) registers
    # that family early, and the others must still be imported on the first lookup.
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for name in _FAMILY_MODULES:
            try:
                importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as e:  # a family file not written yet must not break the rest
                if e.name != f"{__name__}.{name}":
                    raise
    return _REGISTRY


def supported_architectures() -> list[str]:
    return [a for cls in _load_families() for a in cls.architectures]


def adapter_class(architecture: str | None = None, model_type: str | None = None) -> type[Adapter]:
    """The adapter for a ``transformers`` class name or ``config.model_type``."""
    for cls in _load_families():
        if architecture in cls.architectures or model_type in cls.model_types:
            return cls
    found = architecture or model_type or "an unknown architecture"
    raise UnsupportedModelError(f"{found} is not supported; supported architectures: {', '.join(supported_architectures())}")


def adapter_for(model, group_sizes: dict[str, int] | None = None) -> Adapter:
    """The adapter bound to a loaded model."""
    return adapter_class(type(model).__name__, getattr(model.config, "model_type", None))(model, group_sizes)


__all__ = ["Adapter", "adapter_class", "adapter_for", "count_parameters", "instantiate", "patch_forward",
           "register", "supported_architectures"]
