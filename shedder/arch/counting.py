"""Counting parameters: of a module tree, and of a model as extracted under a plan (exact, on a
meta-device skeleton, so it costs no memory and no extraction). ``adapter`` is an ``Adapter``
(``base.py``, which calls these)."""
from __future__ import annotations

import copy
import torch
from torch import nn

from shedder.arch.resolved import ResolvedPlan
from shedder.core.plan import Component, PruningPlan


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding / lm_head pair counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def pruned_skeleton(adapter, plan: ResolvedPlan) -> nn.Module:
    """The module tree of ``adapter``'s model extracted under ``plan``, on the meta device (no
    memory, no initialisation), weights tied as the model ties them."""
    config = adapter.pruned_config(plan) if plan.components else copy.deepcopy(adapter.config)
    with torch.device("meta"):
        skeleton = type(adapter).build(config)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton


def param_count(adapter, plan: ResolvedPlan) -> int:
    """Parameters of ``adapter``'s model as extracted under ``plan`` (tied weights counted once)."""
    return count_parameters(pruned_skeleton(adapter, plan))


def component_params(adapter, comp: Component, base: PruningPlan) -> int:
    """Parameters removed by ``comp`` on top of ``base``."""
    return adapter.param_count(base) - adapter.param_count(base.with_components([comp]))
