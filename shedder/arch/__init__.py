"""Registry of model-family adapters, discovered: every module of this package is imported once and
each ``Adapter`` subclass it defines with ``architectures`` is a family. Adding a family means adding
one file here; nothing else is edited, and nothing outside ``shedder.arch`` knows about families."""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from shedder.core.errors import UnsupportedModelError
from shedder.arch.base import Adapter, count_parameters, instantiate, patch_forward


@functools.lru_cache(maxsize=1)
def _families() -> tuple[type[Adapter], ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, Adapter) and cls.architectures and cls.__module__ == module.__name__]
    return tuple(found)


def supported_architectures() -> list[str]:
    return [a for cls in _families() for a in cls.architectures]


def adapter_class(architecture: str | None = None, model_type: str | None = None) -> type[Adapter]:
    """The adapter for a ``transformers`` class name or ``config.model_type``."""
    for cls in _families():
        if architecture in cls.architectures or model_type in cls.model_types:
            return cls
    found = architecture or model_type or "an unknown architecture"
    raise UnsupportedModelError(f"{found} is not supported; supported architectures: {', '.join(supported_architectures())}")


def adapter_for(model, group_sizes: dict[str, int] | None = None) -> Adapter:
    """The adapter bound to a loaded model."""
    return adapter_class(type(model).__name__, getattr(model.config, "model_type", None))(model, group_sizes)


__all__ = ["Adapter", "adapter_class", "adapter_for", "count_parameters", "instantiate", "patch_forward",
           "supported_architectures"]
