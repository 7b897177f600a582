"""Registry of model-family adapters, discovered: every module of this package is imported once and
each ``Adapter`` subclass it defines with ``architectures`` is a family. Adding a family means adding
one file here; nothing else is edited, and nothing outside ``shedder.arch`` knows about families."""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from shedder.core.errors import UnsupportedModelError
from shedder.core.plan import PruningPlan
from shedder.arch.base import Adapter
from shedder.arch.counting import count_parameters
from shedder.arch.resolved import PlanSource, ResolvedPlan
from shedder.arch.runtime import instantiate, patch_forward


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


def adapter_for_plan(model, plan: PruningPlan | PlanSource | None) -> Adapter:
    """The adapter to use ``plan`` with on ``model``: the one a ``ResolvedPlan`` was resolved against
    (so it is not checked again), else one set up for the plan's group sizes."""
    if isinstance(plan, ResolvedPlan) and plan.adapter.model is model:
        return plan.adapter
    return adapter_for(model, plan.group_sizes if isinstance(plan, PruningPlan) else None)


__all__ = ["Adapter", "PlanSource", "ResolvedPlan", "adapter_class", "adapter_for", "adapter_for_plan",
           "count_parameters", "instantiate", "patch_forward", "supported_architectures"]
