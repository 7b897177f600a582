"""Reversible live masks: ``with masked(model, plan): ...`` runs the model as if the plan's
components were removed, without copying a single weight, and restores it exactly on exit."""
from __future__ import annotations

import contextlib
from typing import Iterator

from .arch import adapter_for
from .plan import PruningPlan


@contextlib.contextmanager
def masked(model, plan: PruningPlan, adapter=None) -> Iterator[PruningPlan]:
    """Apply ``plan`` to ``model`` for the duration of the block; yields the validated plan."""
    adapter = adapter or adapter_for(model, plan.group_sizes)
    with adapter.apply(plan) as resolved:
        yield resolved
