"""The ``expert`` kind: one expert of a mixture-of-experts block, removed with its router row.

The MoE blocks of Granite 4.0-H (``GraniteMoeHybridMoE``) and Jamba (``JambaSparseMoeBlock``) hold a
``router`` whose ``weight`` is [experts, hidden] and ``experts`` whose tensors are stacked on a first
dimension of experts (``gate_up_proj`` [experts, 2 * I, hidden], ``down_proj`` [experts, hidden, I]).
Removing expert ``e`` (the usual structured MoE pruning) means the router no longer knows it: its
row goes, so the top-k choice (and a softmax over all logits, as Jamba's) runs over the experts
left, and its slices of the expert tensors go. A token routed to ``e`` before goes to the next best
expert instead; nothing is renormalised beyond what the router itself computes.

One forward serves both paths: the router's own ``forward`` (upstream code, unchanged) runs on a
stand-in holding the kept rows, so the live mask and the extracted router (the stock class with the
sliced weight) compute the same logits, top-k and weights. The live mask then maps the chosen
positions back to the stock experts' indices; the experts compute each chosen expert with the
same weights, in the same order (kept experts keep their relative order), so masked == extracted.

A plan must leave at least ``top_k`` experts in a layer (the router picks that many per token);
removing the whole block is the ``mlp`` kind. Steps a family file calls, in the order it shows
them: ``components``, ``check``, ``kept_count``, ``mask``, ``pruned_state``, ``resize``.
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable

import torch
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch.runtime import patch_forward

#: Router attributes its ``forward`` reads besides ``weight`` (copied onto the stand-in).
_ROUTER_SCALARS = ("top_k", "hidden_dim", "norm_topk_prob", "jitter_noise")


def num_experts(moe: nn.Module) -> int:
    """Experts ``moe`` holds (stock or extracted)."""
    return moe.router.weight.shape[0]


def top_k(moe: nn.Module) -> int:
    return moe.router.top_k


def _removed(comps: Iterable[Component]) -> list[int]:
    return sorted(c.index for c in comps if c.kind == "expert")


def kept_experts(moe: nn.Module, comps: Iterable[Component]) -> torch.Tensor:
    """[kept] indices of the experts left, ascending."""
    gone = set(_removed(comps))
    return torch.tensor([e for e in range(num_experts(moe)) if e not in gone], dtype=torch.long,
                        device=moe.router.weight.device)


def components(layer: int, moe: nn.Module | None) -> list[Component]:
    """Inventory: one ``expert`` per expert the block holds (none when there is no MoE block)."""
    return [] if moe is None else [Component("expert", layer, e) for e in range(num_experts(moe))]


def check(layer: int, moe: nn.Module | None, comps: Iterable[Component]) -> None:
    """Validation: the experts named exist, and at least ``top_k`` stay."""
    removed = _removed(comps)
    if not removed:
        return
    if moe is None:
        raise PlanError(f"expert:{layer}:{removed[0]}: layer {layer} has no mixture of experts")
    n, k = num_experts(moe), top_k(moe)
    bad = [e for e in removed if not 0 <= e < n]
    if bad:
        raise PlanError(f"expert:{layer}:{bad[0]}: layer {layer} has experts 0..{n - 1}")
    if n - len(removed) < k:
        raise PlanError(f"layer {layer}: removing {len(removed)} of {n} experts leaves {n - len(removed)}, fewer than "
                        f"the {k} each token is routed to; remove the layer's MLP instead (mlp:{layer})")


def kept_count(moe: nn.Module, comps: Iterable[Component]) -> int:
    """Spec: experts the block keeps after ``comps``."""
    return num_experts(moe) - len(_removed(comps))


def _router_on(router: nn.Module, weight: torch.Tensor):
    """A stand-in for ``router`` with ``weight`` (the kept rows) for its class's ``forward``."""
    fields = {name: getattr(router, name) for name in _ROUTER_SCALARS if hasattr(router, name)}
    return types.SimpleNamespace(weight=weight, num_experts=weight.shape[0], training=router.training, **fields)


def mask(moe: nn.Module, comps: Iterable[Component], stack: contextlib.ExitStack) -> None:
    """Live mask: the router chooses among the kept experts only, and the stock experts compute
    the chosen ones (positions mapped back to stock indices). Untouched when no expert goes."""
    comps = list(comps)
    if not _removed(comps):
        return
    router = moe.router
    kept = kept_experts(moe, comps)
    route = type(router).forward

    def forward(hidden_states):
        stand_in = _router_on(router, router.weight[kept])
        logits, weights, index = route(stand_in, hidden_states)  # index: positions among ``kept``
        return logits, weights, kept[index]

    patch_forward(router, forward, stack)


def pruned_state(moe: nn.Module, comps: Iterable[Component]) -> dict[str, torch.Tensor]:
    """Extraction: the block's tensors (names relative to it) with the removed experts' slices and
    router rows gone, as copies."""
    kept = kept_experts(moe, comps)
    n = num_experts(moe)
    out = {}
    for name, t in moe.state_dict().items():
        out[name] = t[kept] if t.dim() and t.shape[0] == n else t
    return {k: v.detach().clone() for k, v in out.items()}


def resize(moe: nn.Module, count: int) -> None:
    """Build time: give a freshly built block ``count`` experts (fresh, uninitialised tensors)."""
    for module in (moe.router, moe.experts):
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty((count, *p.shape[1:]), device=p.device, dtype=p.dtype)))
        if hasattr(module, "num_experts"):
            module.num_experts = count
    if hasattr(moe, "num_experts"):
        moe.num_experts = count
