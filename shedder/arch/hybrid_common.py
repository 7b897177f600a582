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
* ``RemovedAttention(layer_idx)`` — the ``ZeroBranch`` of an extracted attention branch whose cache
  slot stays an attention slot (Falcon-H1, Jamba): it records the sequence length like a live mask.
* ``skip_layer(cache_slot=None, wrap=...)`` — a decoder layer's skip forward (``h`` in the layer's
  output format ``wrap(h)``); with ``cache_slot`` it records the sequence length too.
* ``record_length(cache, layer_idx, hidden_states)`` — for a live-masked attention whose cache
  slot stays an attention slot: append a [batch, 1, seq, 1] placeholder so the cache still
  reports how many tokens it has seen (positions and causal masks are read from it).
* ``present(module)`` — whether a sub-block is there (not ``None``, not a ``ZeroBranch``).

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
  ``common.sliced_state_dict(..., replace={layer: {"feed_forward": tensors}})``.
* ``resize_mlp(mlp, width, rows=ROWS, cols=COLS)`` — build: give a module tree's MLP ``width``
  intermediate channels (new ``nn.Linear`` modules on the same device / dtype).
* ``default_mlp_group_size(width)`` — channels per group when the plan does not say.

Layers ending in ``h = h + feed_forward(pre_ff_layernorm(h))`` (Bamba, Falcon-H1, Jamba) get the
whole MLP sub-block from ``FeedForwardGroups`` (an adapter mixin: group size, kept channels, live
mask, extracted tensors) and ``resize_feed_forward(layer, width)`` (build; 0 removes it).

Attention that must stay:

* ``check_attention_left(family, kind, with_attention, removed)`` — ``PlanError`` if ``removed``
  covers every layer in ``with_attention``: ``transformers`` builds a causal mask from the cache's
  attention layers, so a Bamba / Zamba2 (etc.) model without any cannot generate with a cache.

Deleting layers and renumbering state-dict keys is ``common.sliced_state_dict`` (pass an empty
dict for a removed sub-block, e.g. ``{"self_attn": {}}``, to drop its tensors).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import PruningPlan
from shedder.arch.base import patch_forward
from shedder.arch.common import sliced_state_dict
from shedder.arch.mamba2_core import Mamba2StyleAdapter, MixerLayout

ROWS = ("gate_proj", "up_proj")
COLS = ("down_proj",)


# ---------------------------------------------------------------------------- skipped sub-blocks
def _cache(kwargs: dict):
    """The cache a layer or sub-block was called with (``cache``, or the older ``past_key_values``)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _zero_output(returns_tuple: bool, cache_slot: int | None = None):
    def forward(*args, **kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if cache_slot is not None:
            record_length(_cache(kwargs), cache_slot, hidden_states)
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
    """A removed residual branch: no parameters, output zero, so ``h + branch(...) == h`` exactly.
    With ``cache_slot`` it also records the sequence length in that cache slot."""

    def __init__(self, returns_tuple: bool = False, cache_slot: int | None = None):
        super().__init__()
        self.returns_tuple = returns_tuple
        self._forward = _zero_output(returns_tuple, cache_slot)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return "removed"


class RemovedAttention(ZeroBranch):
    """The attention branch of an extracted layer whose cache slot stays an attention slot: no
    parameters, zero output, and the sequence length recorded in the cache (see ``record_length``)."""

    def __init__(self, layer_idx: int):
        super().__init__(returns_tuple=True, cache_slot=layer_idx)
        self.layer_idx = layer_idx


def present(module) -> bool:
    """Whether a sub-block is there: not absent from its layer and not removed by an extraction."""
    return module is not None and not isinstance(module, ZeroBranch)


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def skip_layer(cache_slot: int | None = None, wrap: Callable = _identity) -> Callable:
    """A skipped decoder layer's forward: ``wrap(hidden_states)`` (the layer's output format, e.g.
    ``lambda h: (h, None)``); a layer with an attention cache slot passes it as ``cache_slot`` so the
    cache keeps counting tokens for the layers that still attend."""
    def forward(hidden_states, *args, **kwargs):
        if cache_slot is not None:
            record_length(_cache(kwargs), cache_slot, hidden_states)
        return wrap(hidden_states)
    return forward


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


# ---------------------------------------------------------------------------- feed-forward sub-block
def resize_feed_forward(layer: nn.Module, width: int) -> None:
    """Build time: give ``layer.feed_forward`` ``width`` intermediate channels; 0 removes the
    sub-block (and ``pre_ff_layernorm``)."""
    if width:
        resize_mlp(layer.feed_forward, width)
    else:
        remove_sub_block(layer, "feed_forward", "pre_ff_layernorm")


class FeedForwardGroups:
    """Adapter mixin for hybrids whose layers end in ``h = h + feed_forward(pre_ff_layernorm(h))``
    (Bamba, Falcon-H1, Jamba): the ``mlp`` / ``mlp_channel_group`` side of masking and extraction.
    The adapter provides ``layers()`` and ``mlp_width(layer)`` (0 for no dense MLP)."""

    #: What a removed ``attention`` takes out of a layer's state dict (its pre-norm too, unless
    #: another branch still reads it).
    attention_modules: tuple[str, ...] = ("self_attn", "input_layernorm")
    #: every token-mixer module a layer may hold, dropped by ``mixer`` (the FFN stays)
    mixer_modules: tuple[str, ...] = ("mamba", "self_attn", "input_layernorm")

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    def mlp_kept_channels(self, layer: int, comps) -> torch.Tensor:
        """[kept] intermediate channels of ``layer``'s MLP after removing the groups in ``comps``."""
        groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
        return kept_mlp_channels(self.mlp_width(layer), self.mlp_group_size, groups)

    def mlp_width_under(self, layer: int, comps) -> int:
        """Intermediate channels ``layer``'s MLP keeps when ``comps`` are removed (0: no MLP left)."""
        if any(c.kind == "mlp" for c in comps):
            return 0
        groups = (c.index for c in comps if c.kind == "mlp_channel_group")
        return mlp_width_after(self.mlp_width(layer), self.mlp_group_size, groups)

    def check_feed_forward(self, layer: int, comps) -> None:
        """Refuse channel groups of a removed MLP, and group removals ``check_mlp_groups`` refuses."""
        groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
        if not groups:
            return
        if any(c.kind == "mlp" for c in comps):
            raise PlanError(f"mlp_channel_group:{layer}:{groups[0]} is redundant: the MLP of layer {layer} "
                            "is removed as a whole")
        check_mlp_groups(layer, self.mlp_width(layer), self.mlp_group_size, groups)

    def mask_feed_forward(self, layer: int, comps, stack: contextlib.ExitStack) -> None:
        """Live mask: skip the sub-block (``mlp``) or narrow its MLP (``mlp_channel_group``)."""
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        if "mlp" in kinds:
            skip_sub_block(stack, block.feed_forward, block.pre_ff_layernorm)
        elif "mlp_channel_group" in kinds:
            mask_mlp_channels(block.feed_forward, self.mlp_kept_channels(layer, comps), stack)

    def sub_block_replacements(self, plan, replace: dict[int, dict]) -> dict[int, dict]:
        """``replace`` (``sliced_state_dict``'s argument, e.g. the mixers' replacements) plus what
        removed attention and feed-forward sub-blocks take away in every kept layer."""
        by_layer = self.by_layer(plan)
        for layer in self.layer_map(plan):
            comps = by_layer.get(layer, [])
            kinds = {c.kind for c in comps}
            mods = {name: {} for name in self.attention_modules} if "attention" in kinds else {}
            if "mixer" in kinds:
                mods.update({name: {} for name in self.mixer_modules})
            mods.update(self.feed_forward_state(layer, comps, removed="mlp" in kinds))
            if mods:
                replace.setdefault(layer, {}).update(mods)
        return replace

    def feed_forward_state(self, layer: int, comps, removed: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Extraction: ``sliced_state_dict`` replacements for the sub-block of ``layer`` — none of its
        tensors when ``removed``, the sliced MLP when ``comps`` remove channel groups, else nothing."""
        if removed:
            return {"feed_forward": {}, "pre_ff_layernorm": {}}
        if any(c.kind == "mlp_channel_group" for c in comps):
            ff = self.layers()[layer].feed_forward
            return {"feed_forward": pruned_mlp_state(ff, self.mlp_kept_channels(layer, comps))}
        return {}


class Mamba2FeedForwardAdapter(FeedForwardGroups, Mamba2StyleAdapter):
    """Base of the hybrids whose layers hold a Mamba-2 mixer (config ``mamba_n_heads`` /
    ``mamba_n_groups``) and end in a feed-forward block (Bamba, Falcon-H1): the parts of their
    extraction that do not depend on the family."""

    @classmethod
    def stock_layout(cls, config) -> MixerLayout:
        return MixerLayout((config.mamba_n_heads // config.mamba_n_groups,) * config.mamba_n_groups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace = self.sub_block_replacements(plan, self.mixer_replacements(plan))
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.layer_map(plan), replace)
