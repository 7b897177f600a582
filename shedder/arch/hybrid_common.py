"""Attention / MLP sub-block helpers shared by the hybrid families (Bamba, Zamba2, Falcon-H1, Jamba).

Hybrid decoder layers wrap their sub-blocks in residual adds (``h = h + branch(norm(h))``), so a
removed sub-block is one whose branch contributes exactly zero. The live mask and the extracted
model use the same parameterless stand-ins, which is what keeps their logits equal:

* ``ZeroBranch(returns_tuple=False)`` — module that returns ``zeros_like(hidden_states)`` (or
  ``(zeros, None)`` for attention modules whose callers unpack two values). Put in place of the
  removed branch in an extracted model; ``nn.Identity`` replaces the branch's pre-norm.
* ``skip_sub_block(stack, branch, norm=None, returns_tuple=False, cache_slot=None)`` — live mask:
  patch ``branch`` (and its pre-norm, made identity so no work is wasted) to behave like
  ``ZeroBranch``; with ``cache_slot`` it also calls ``record_length`` (attention branches).
* ``remove_sub_block(layer, branch_attr, norm_attr=None, returns_tuple=False)`` — build time:
  swap the stand-ins into a module tree (weights of the branch and its norm disappear).
* ``record_length(cache, layer_idx, hidden_states)`` — for a live-masked attention whose cache
  slot stays an attention slot: append a [batch, 1, seq, 1] placeholder so the cache still
  reports how many tokens it has seen (positions and causal masks are read from it).

Cache caveat for removed attention: ``transformers`` takes the sequence length (and the causal
mask's offset) from the first attention layer of the cache, so a removed attention must not leave
an attention slot that is never written. Live masks call ``record_length``; extracted Bamba /
Zamba2 layers are re-typed as linear-attention (Mamba) layers, so their cache has no such slot.

MLP intermediate channels are removed in groups of ``group_size`` consecutive channels (the last
group may be shorter). Gated MLPs keep rows of their input projections and columns of their output
projection; the attribute names default to the Llama-style ``gate_proj`` / ``up_proj`` /
``down_proj`` and can be overridden (e.g. ``rows=("up_proj",)`` for an ungated MLP).

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
  ``mamba2_core.sliced_state_dict(..., replace={layer: {"feed_forward": tensors}})``.
* ``resize_mlp(mlp, width, rows=ROWS, cols=COLS)`` — build: give a module tree's MLP ``width``
  intermediate channels (new ``nn.Linear`` modules on the same device / dtype).

Attention that must stay:

* ``check_attention_left(family, kind, with_attention, removed)`` — ``PlanError`` if ``removed``
  covers every layer in ``with_attention``: ``transformers`` builds a causal mask from the cache's
  attention layers, so a Bamba / Zamba2 (etc.) model without any cannot generate with a cache.

Deleting layers and renumbering state-dict keys is ``mamba2_core.sliced_state_dict`` (pass an empty
dict for a removed sub-block, e.g. ``{"self_attn": {}}``, to drop its tensors).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError
from .base import patch_forward

ROWS = ("gate_proj", "up_proj")
COLS = ("down_proj",)


# ---------------------------------------------------------------------------- skipped sub-blocks
def _zero_output(returns_tuple: bool, cache_slot: int | None = None):
    def forward(*args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if cache_slot is not None:
            record_length(kwargs.get("cache"), cache_slot, hidden_states)
        zeros = torch.zeros_like(hidden_states)  # [batch, seq, hidden]
        return (zeros, None) if returns_tuple else zeros
    return forward


def record_length(cache, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Write a [batch, 1, seq, 1] placeholder into an attention cache slot whose attention is
    masked away, so the cache's sequence length stays right for the layers that still attend."""
    if cache is not None:
        batch, seq, _ = hidden_states.shape
        marker = hidden_states.new_zeros(batch, 1, seq, 1)
        cache.update(marker, marker, layer_idx)


class ZeroBranch(nn.Module):
    """A removed residual branch: no parameters, output zero, so ``h + branch(...) == h`` exactly."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple
        self._forward = _zero_output(returns_tuple)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return "removed"


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def skip_sub_block(stack: contextlib.ExitStack, branch: nn.Module, norm: nn.Module | None = None,
                   returns_tuple: bool = False, cache_slot: int | None = None) -> None:
    """Live mask: ``branch`` contributes zero (and its pre-norm does no work) until ``stack`` closes.
    For an attention branch pass ``cache_slot`` (its layer index) to keep the cache's length right."""
    patch_forward(branch, _zero_output(returns_tuple, cache_slot), stack)
    if norm is not None:
        patch_forward(norm, _identity, stack)


def remove_sub_block(layer: nn.Module, branch_attr: str, norm_attr: str | None = None,
                     returns_tuple: bool = False) -> None:
    """Build time: replace ``layer.<branch_attr>`` by a ``ZeroBranch`` and its norm by identity."""
    setattr(layer, branch_attr, ZeroBranch(returns_tuple))
    if norm_attr is not None:
        setattr(layer, norm_attr, nn.Identity())


def check_attention_left(family: str, kind: str, with_attention: Iterable[int], removed: Iterable[int]) -> None:
    """Refuse a plan that leaves no attention at all (the model could no longer generate with a cache)."""
    have = sorted(set(with_attention))
    if have and set(have) <= set(removed):
        raise PlanError(f"the plan removes every {kind} (layers {', '.join(map(str, have))}); {family} in transformers "
                        f"cannot generate with a cache without one, so keep at least one")


# ---------------------------------------------------------------------------- MLP channel groups
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


def mask_mlp_channels(mlp: nn.Module, kept: torch.Tensor, stack: contextlib.ExitStack,
                      rows: Sequence[str] = ROWS, cols: Sequence[str] = COLS) -> None:
    """Live mask: the MLP computes with only ``kept`` intermediate channels (exactly what the sliced
    extracted MLP computes), without storing any copy of its weights."""
    kept = kept.to(getattr(mlp, rows[0]).weight.device)
    for name in rows:
        patch_forward(getattr(mlp, name), _weight_rows(getattr(mlp, name), kept), stack)
    for name in cols:
        patch_forward(getattr(mlp, name), _weight_cols(getattr(mlp, name), kept), stack)


def pruned_mlp_state(mlp: nn.Module, kept: torch.Tensor, rows: Sequence[str] = ROWS,
                     cols: Sequence[str] = COLS) -> dict[str, torch.Tensor]:
    """Extraction: rows ``kept`` of the input projections and columns ``kept`` of the output
    projection, as sliced copies named relative to the MLP."""
    out = {}
    for name in rows:
        lin = getattr(mlp, name)
        idx = kept.to(lin.weight.device)
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


def resize_mlp(mlp: nn.Module, width: int, rows: Sequence[str] = ROWS, cols: Sequence[str] = COLS) -> None:
    """Build time: give ``mlp`` ``width`` intermediate channels (fresh, uninitialised projections)."""
    for name in rows:
        lin = getattr(mlp, name)
        setattr(mlp, name, _resized(lin, lin.in_features, width))
    for name in cols:
        lin = getattr(mlp, name)
        setattr(mlp, name, _resized(lin, width, lin.out_features))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width
