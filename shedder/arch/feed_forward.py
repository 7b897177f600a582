"""MLP channel groups, and the feed-forward sub-block of the hybrid layers.

MLP intermediate channels are removed in groups of ``group_size`` consecutive channels (the last
group may be shorter). Gated MLPs keep rows of their input projections and columns of their output
projection; the attribute names default to the Llama-style ``gate_proj`` / ``up_proj`` /
``down_proj`` and can be overridden (e.g. ``rows=("up_proj",)`` for Nemotron-H's ungated MLP).
``fused`` names input projections holding gate and up stacked (``[gate; up]``, 2 * width rows, as
Granite's ``input_linear``): a kept channel keeps its row in both halves.

* ``mlp_groups(width, group_size) -> list[range]`` — the channel ranges of each group;
  ``num_mlp_groups(width, group_size)`` and ``mlp_width_after(width, group_size, removed)`` count
  without listing (for checks that run on every search candidate).
* ``kept_mlp_channels(width, group_size, removed) -> LongTensor[kept]`` — channels left.
* ``check_mlp_groups(layer, width, group_size, removed)`` — ``PlanError`` if ``removed`` would
  empty the MLP (removing the whole ``mlp`` is the way to do that) or names a missing group.
* ``mask_mlp_channels(mlp, kept, stack, rows=ROWS, cols=COLS)`` — live mask: the projections'
  forwards use only the kept rows / columns (indexing per call, no stored copies), so the MLP's
  own forward (multipliers, activation, ...) runs unchanged.
* ``pruned_mlp_state(mlp, kept, rows=ROWS, cols=COLS) -> dict[str, Tensor]`` — extraction: the
  sliced tensors, named relative to the MLP (``"gate_proj.weight"``, ...), ready for
  ``layers.sliced_state_dict(..., replace={layer: {"feed_forward": tensors}})``.
* ``resize_mlp(mlp, width, rows=ROWS, cols=COLS)`` — build: give a module tree's MLP ``width``
  intermediate channels (new ``nn.Linear`` modules on the same device / dtype).
* ``default_mlp_group_size(width)`` — channels per group when the plan does not say.
* ``l1_reorder(mlp)`` — the official optional weight reorder (channels sorted by L1 norm, in place).

Layers ending in ``h = h + feed_forward(pre_ff_layernorm(h))`` (Bamba, Falcon-H1, Jamba) call the
sub-block steps below for the ``mlp`` / ``mlp_channel_group`` kinds, in the order a family file
shows them: ``components`` (inventory), ``check`` (validation), ``width_after`` (spec), ``mask``
(live mask), ``pruned_state`` (extraction) and ``resize`` (build; 0 removes the sub-block).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch.base import patch_forward
from shedder.arch.layers import remove_sub_block, skip_sub_block

ROWS = ("gate_proj", "up_proj")
COLS = ("down_proj",)


# ---------------------------------------------------------------------------- MLP channel groups
def default_mlp_group_size(width: int) -> int:
    """256 channels per group for real checkpoints; tiny models get about 8 groups per MLP."""
    return max(1, min(256, width // 8))


def mlp_groups(width: int, group_size: int) -> list[range]:
    """Consecutive channel ranges of ``group_size`` (the last one may be shorter)."""
    return [range(start, min(start + group_size, width)) for start in range(0, width, group_size)]


def num_mlp_groups(width: int, group_size: int) -> int:
    return -(-width // group_size)


def mlp_width_after(width: int, group_size: int, removed: Iterable[int]) -> int:
    """Channels left after removing groups ``removed`` (arithmetic only: cheap enough to run for
    every candidate of a search)."""
    n = num_mlp_groups(width, group_size)
    return width - sum(min(group_size, width - g * group_size) for g in set(removed) if 0 <= g < n)


def kept_mlp_channels(width: int, group_size: int, removed: Iterable[int]) -> torch.Tensor:
    """Indices of the intermediate channels left after removing groups ``removed``: LongTensor[kept]."""
    gone = set(removed)
    kept = [c for g, r in enumerate(mlp_groups(width, group_size)) if g not in gone for c in r]
    return torch.tensor(kept, dtype=torch.long)


def check_mlp_groups(layer: int, width: int, group_size: int, removed: Iterable[int]) -> None:
    """Refuse group removals that name a missing group or would leave the MLP with no channel."""
    removed = set(removed)
    n = num_mlp_groups(width, group_size)
    bad = sorted(g for g in removed if not 0 <= g < n)
    if bad:
        raise PlanError(f"mlp_channel_group:{layer}:{bad[0]}: layer {layer}'s MLP has groups 0..{n - 1} "
                        f"({width} channels in groups of {group_size})")
    if len(removed) >= n:
        raise PlanError(f"layer {layer}: removing all {n} MLP channel groups would leave an MLP with no channels; "
                        f"remove the layer's MLP instead (mlp:{layer})")


def _weight_rows(linear: nn.Linear, kept: torch.Tensor):
    def forward(x):  # x: [..., in] -> [..., kept]
        bias = None if linear.bias is None else linear.bias[kept]
        return F.linear(x, linear.weight[kept], bias)
    return forward


def _weight_cols(linear: nn.Linear, kept: torch.Tensor):
    def forward(x):  # x: [..., kept] -> [..., out]
        return F.linear(x, linear.weight[:, kept], linear.bias)
    return forward


def _fused_rows(linear: nn.Linear, kept: torch.Tensor) -> torch.Tensor:
    """Rows of a fused [gate; up] projection that ``kept`` channels use: [2 * kept]."""
    return torch.cat([kept, kept + linear.out_features // 2])


def mask_mlp_channels(mlp: nn.Module, kept: torch.Tensor, stack: contextlib.ExitStack,
                      rows: Sequence[str] = ROWS, cols: Sequence[str] = COLS, fused: Sequence[str] = ()) -> None:
    """Live mask: the MLP computes with only ``kept`` intermediate channels (exactly what the sliced
    extracted MLP computes), without storing any copy of its weights."""
    kept = kept.to(getattr(mlp, (*rows, *fused)[0]).weight.device)
    for name in rows:
        patch_forward(getattr(mlp, name), _weight_rows(getattr(mlp, name), kept), stack)
    for name in fused:
        linear = getattr(mlp, name)
        patch_forward(linear, _weight_rows(linear, _fused_rows(linear, kept)), stack)
    for name in cols:
        patch_forward(getattr(mlp, name), _weight_cols(getattr(mlp, name), kept), stack)


def pruned_mlp_state(mlp: nn.Module, kept: torch.Tensor, rows: Sequence[str] = ROWS,
                     cols: Sequence[str] = COLS, fused: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Extraction: rows ``kept`` of the input projections and columns ``kept`` of the output
    projection, as sliced copies named relative to the MLP."""
    out = {}
    for name in (*rows, *fused):
        lin = getattr(mlp, name)
        idx = kept.to(lin.weight.device)
        idx = _fused_rows(lin, idx) if name in fused else idx
        out[f"{name}.weight"] = lin.weight[idx]
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias[idx]
    for name in cols:
        lin = getattr(mlp, name)
        out[f"{name}.weight"] = lin.weight[:, kept.to(lin.weight.device)]
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias
    return {k: v.detach().clone() for k, v in out.items()}


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)


def resize_mlp(mlp: nn.Module, width: int, rows: Sequence[str] = ROWS, cols: Sequence[str] = COLS,
               fused: Sequence[str] = ()) -> None:
    """Build time: give ``mlp`` ``width`` intermediate channels (fresh, uninitialised projections)."""
    for name in (*rows, *fused):
        lin = getattr(mlp, name)
        setattr(mlp, name, _resized(lin, lin.in_features, 2 * width if name in fused else width))
    for name in cols:
        lin = getattr(mlp, name)
        setattr(mlp, name, _resized(lin, width, lin.out_features))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


@torch.no_grad()
def l1_reorder(mlp: nn.Module, rows: Sequence[str] = ROWS, cols: Sequence[str] = COLS) -> None:
    """The official ``--weight_reorder`` (``reorder_in_mlp_block`` of the Mamba-Shedder Hymba and
    Zamba2 scripts): sort the intermediate channels by the summed L1 norm of their input-projection
    rows, largest first (ties: the lower index first), permuting those rows and the output
    projection's columns in place. The MLP computes the same function; keeping its first ``width``
    channels afterwards keeps the ``width`` with the largest norms."""
    importance = sum(getattr(mlp, name).weight.abs().sum(dim=1) for name in rows)
    order = torch.sort(importance, descending=True, stable=True).indices
    for name in rows:
        lin = getattr(mlp, name)
        lin.weight.copy_(lin.weight[order])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[order])
    for name in cols:
        lin = getattr(mlp, name)
        lin.weight.copy_(lin.weight[:, order.to(lin.weight.device)])


# ---------------------------------------------------------------------------- feed-forward sub-block
# ``block`` is a decoder layer ending in ``h = h + feed_forward(pre_ff_layernorm(h))``; ``width`` its
# MLP's intermediate channels (0: no dense MLP); ``comps`` the plan's components of that layer.

def _groups(comps: Iterable[Component]) -> list[int]:
    return [c.index for c in comps if c.kind == "mlp_channel_group"]


def components(layer: int, width: int, group_size: int, has_sub_block: bool = True) -> list[Component]:
    """Inventory: ``mlp`` (when the sub-block is there) and one ``mlp_channel_group`` per group of a
    dense MLP of ``width`` channels."""
    if not has_sub_block:
        return []
    groups = num_mlp_groups(width, group_size) if width else 0
    return [Component("mlp", layer)] + [Component("mlp_channel_group", layer, g) for g in range(groups)]


def check(layer: int, comps: Iterable[Component], width: int, group_size: int) -> None:
    """Validation: refuse channel groups of a removed MLP, and group removals ``check_mlp_groups`` refuses."""
    comps = list(comps)
    groups = _groups(comps)
    if not groups:
        return
    if any(c.kind == "mlp" for c in comps):
        raise PlanError(f"mlp_channel_group:{layer}:{groups[0]} is redundant: the MLP of layer {layer} "
                        "is removed as a whole")
    check_mlp_groups(layer, width, group_size, groups)


def width_after(comps: Iterable[Component], width: int, group_size: int) -> int:
    """Spec: intermediate channels the MLP keeps when ``comps`` are removed (0: no MLP left)."""
    comps = list(comps)
    if any(c.kind == "mlp" for c in comps):
        return 0
    return mlp_width_after(width, group_size, _groups(comps))


def kept_channels(comps: Iterable[Component], width: int, group_size: int) -> torch.Tensor:
    """[kept] intermediate channels of the MLP after removing the groups in ``comps``."""
    return kept_mlp_channels(width, group_size, _groups(comps))


def mask(block: nn.Module, comps: Iterable[Component], width: int, group_size: int,
         stack: contextlib.ExitStack) -> None:
    """Live mask: skip the sub-block (``mlp``) or narrow its MLP (``mlp_channel_group``)."""
    comps = list(comps)
    kinds = {c.kind for c in comps}
    if "mlp" in kinds:
        skip_sub_block(stack, block.feed_forward, block.pre_ff_layernorm)
    elif "mlp_channel_group" in kinds:
        mask_mlp_channels(block.feed_forward, kept_channels(comps, width, group_size), stack)


def pruned_state(block: nn.Module, comps: Iterable[Component], width: int, group_size: int,
                 removed: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Extraction: ``sliced_state_dict`` replacements for the sub-block — none of its tensors when
    ``removed``, the sliced MLP when ``comps`` remove channel groups, else nothing."""
    comps = list(comps)
    if removed:
        return {"feed_forward": {}, "pre_ff_layernorm": {}}
    if _groups(comps):
        return {"feed_forward": pruned_mlp_state(block.feed_forward, kept_channels(comps, width, group_size))}
    return {}


def resize(block: nn.Module, width: int) -> None:
    """Build time: give ``block.feed_forward`` ``width`` intermediate channels; 0 removes the
    sub-block (and ``pre_ff_layernorm``)."""
    if width:
        resize_mlp(block.feed_forward, width)
    else:
        remove_sub_block(block, "feed_forward", "pre_ff_layernorm")
