"""Layer-level helpers: skipped layers and sub-blocks, their parameterless stand-ins, renumbering layers.

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

Attention that must stay:

* ``check_attention_left(family, kind, with_attention, removed)`` — ``PlanError`` if ``removed``
  covers every layer in ``with_attention``: ``transformers`` builds a causal mask from the cache's
  attention layers, so a Bamba / Zamba2 (etc.) model without any cannot generate with a cache.

Deleting layers and renumbering state-dict keys: ``sliced_state_dict`` (pass an empty dict for a
removed sub-block, e.g. ``{"self_attn": {}}``, to drop its tensors). Every family's extraction uses it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from shedder.core.errors import PlanError
from shedder.arch.base import patch_forward


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


# ---------------------------------------------------------------------------- renumbered layers
def sliced_state_dict(state: dict[str, torch.Tensor], prefix: str, layer_map: dict[int, int],
                      replace: dict[int, dict[str, dict[str, torch.Tensor]]] | None = None) -> dict[str, torch.Tensor]:
    """A model state dict with layers renumbered and some sub-modules' tensors replaced.

    ``prefix`` is the layer list's key prefix (``"backbone.layers."``); ``layer_map`` the adapter's
    old → new layer index map (layers not in it are dropped); ``replace[old][module]`` the new
    tensors of sub-module ``module`` of layer ``old`` (e.g. ``{"mixer": mamba2_mixer.pruned_state(...)}``),
    replacing all its old tensors (an empty dict drops the sub-module's tensors).
    """
    replace = replace or {}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        num, rest = key[len(prefix):].split(".", 1)
        old = int(num)
        if old not in layer_map:
            continue
        if any(rest.startswith(module + ".") for module in replace.get(old, {})):
            continue
        out[f"{prefix}{layer_map[old]}.{rest}"] = value
    for old, modules in replace.items():
        if old in layer_map:
            for module, tensors in modules.items():
                out.update({f"{prefix}{layer_map[old]}.{module}.{k}": v for k, v in tensors.items()})
    return out
