"""Bamba (``BambaForCausalLM``): Mamba-2 layers and attention layers, each followed by a gated MLP.

A decoder layer computes ``h = h + mixer(input_layernorm(h)); h = h + feed_forward(pre_ff_layernorm(h))``
with ``mixer`` either a Mamba-2 mixer (``layer.mamba``) or self-attention (``layer.self_attn``).
Removing a component means:

* ``block`` — the whole layer (mixer and MLP) is skipped: ``h = h``; extraction deletes it.
* ``mixer`` (every layer with one) — the token mixer's branch contributes nothing and the MLP stays:
  ``h = h + feed_forward(pre_ff_layernorm(h))``. The mixer is the Mamba-2 mixer or the attention
  (on an attention layer ``mixer`` is the same removal as ``attention``); with ``input_layernorm`` it
  goes. The Hymba-style block removal of the official code (``mask_hymba_block``).
* ``ssm`` / ``head`` (Mamba layers) — as in Mamba-2, through ``mamba2_mixer``.
* ``attention`` (attention layers) — the self-attention branch contributes nothing: ``h = h`` before
  the MLP; its projections and ``input_layernorm`` go. The extracted layer is listed as a
  linear-attention layer with no mixer, so the cache holds no key/value states for it.
* ``mlp`` (every layer) — the feed-forward branch (with ``pre_ff_layernorm``) contributes nothing.
* ``mlp_channel_group`` — a group of MLP intermediate channels (gate/up rows, down columns); groups
  of 256 channels by default (about 8 groups per MLP for tiny models).

A layer left with neither mixer nor MLP is the identity and is deleted like a removed block. A plan
must keep at least one attention layer: ``transformers`` derives the causal mask from the cache's
attention slots, so a Bamba without any cannot generate with a cache. Live masks keep the removed
attention's cache slot filled with placeholders for the same reason.
Extracted models whose layers all keep stock shapes (block removals only) have a stock config;
otherwise each kept layer's ``LayerSpec`` says what differs from stock: ``mamba=False`` (a layer
left without a token mixer: a Mamba layer that lost its mixer, or an attention layer that lost its
attention, which the extracted config lists as a Mamba layer, so it is built as one without its
mixer), ``ssm`` / ``heads_per_group``, ``mlp`` (0 = no MLP).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import feed_forward, mamba2_mixer
from shedder.arch.base import Adapter
from shedder.arch.feed_forward import check_mlp_groups, default_mlp_group_size
from shedder.arch.layers import (check_attention_left, present, remove_sub_block, skip_layer, skip_sub_block,
                                 sliced_state_dict)
from shedder.arch.mamba2_mixer import MixerLayout
from shedder.arch.spec import LayerSpec, PrunedSpec
from shedder.arch.stock_shape import expand_for, stock_shape


class BambaAdapter(Adapter):
    architectures = ("BambaForCausalLM",)
    model_types = ("bamba",)
    kinds = ("block", "mixer", "ssm", "head", "attention", "mlp", "mlp_channel_group")
    stock_kinds = ("head", "mlp_channel_group")
    model_class = transformers.BambaForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
                                         "mamba_d_state", "mamba_chunk_size", "mamba_d_conv", "mamba_expand",
                                         "num_attention_heads", "num_key_value_heads")

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.mamba_n_heads, config.mamba_n_groups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size),
                                   heads_per_group=cls.stock_layout(config).heads_per_group)

    # ------------------------------------------------------------------ inventory
    @functools.cached_property
    def _structure(self) -> tuple[tuple[bool, bool, int], ...]:
        """(has a Mamba mixer, has attention, MLP width) per layer, read once from the modules (masks
        never change them); validation runs for every search candidate, so it must be cheap."""
        out = []
        for block in self.layers():
            ff = block.feed_forward
            out.append((present(getattr(block, "mamba", None)), present(getattr(block, "self_attn", None)),
                        ff.gate_proj.out_features if present(ff) else 0))
        return tuple(out)

    def has_mamba(self, layer: int) -> bool:
        return self._structure[layer][0]

    def has_attention(self, layer: int) -> bool:
        return self._structure[layer][1]

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of the layer's MLP (0 when it was removed)."""
        return self._structure[layer][2]

    def mamba(self, layer: int) -> nn.Module:
        return self.layers()[layer].mamba

    def layer_kind(self, layer: int) -> str:
        if self.has_mamba(layer):
            return "mamba"
        return "attention" if self.has_attention(layer) else "mlp"

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mamba(layer) or self.has_attention(layer):
            comps.append(Component("mixer", layer))
        if self.has_mamba(layer):
            comps += mamba2_mixer.components(layer, self.mamba(layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        width = self.mlp_width(layer)
        return comps + feed_forward.components(layer, width, self.mlp_group_size, has_sub_block=bool(width))

    def check(self, plan: PruningPlan) -> None:
        attention = [i for i, (_, attn, _) in enumerate(self._structure) if attn]
        for layer, comps in self.by_layer(plan).items():
            if self.has_mamba(layer):
                mamba2_mixer.check(layer, self.mamba(layer), comps)
        check_attention_left("Bamba", "attention layer", attention,
                             [c.layer for c in plan.components if c.kind in ("block", "mixer", "attention")])
        for layer, comps in self.by_layer(plan).items():
            if any(c.kind == "mixer" for c in comps):
                inside = [c for c in comps if c.kind in ("ssm", "head", "attention")]
                if inside:
                    raise PlanError(f"{inside[0]} is redundant: the mixer of layer {layer} is removed as a whole")
            groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
            if groups and not any(c.kind == "mlp" for c in comps):  # a removed MLP takes its groups with it
                check_mlp_groups(layer, self.mlp_width(layer), self.mlp_group_size, groups)

    def candidates(self, plan: PruningPlan, kinds: list[str]) -> list[Component]:
        """As the base, minus channel groups of an MLP the plan already removes (no-ops)."""
        return [c for c in super().candidates(plan, kinds)
                if not (c.kind == "mlp_channel_group" and Component("mlp", c.layer) in plan)]

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        # the layer returns (hidden_states, attn_weights)
        return skip_layer(layer if self.has_attention(layer) else None, lambda h: (h, None))

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        if self.has_mamba(layer):
            mamba2_mixer.mask(block.mamba, comps, stack)  # ssm / head
        if "attention" in kinds or ("mixer" in kinds and self.has_attention(layer)):
            skip_sub_block(stack, block.self_attn, block.input_layernorm, returns_tuple=True, cache_slot=layer)
        elif "mixer" in kinds:
            skip_sub_block(stack, block.mamba, block.input_layernorm)
        feed_forward.mask(block, comps, self.mlp_width(layer), self.mlp_group_size, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        kinds = {c.kind for c in comps}
        mamba = self.has_mamba(layer) and "mixer" not in kinds
        has_mixer = mamba or (self.has_attention(layer) and not kinds & {"attention", "mixer"})
        width = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
        if not has_mixer and not width:
            return None  # nothing left: the identity
        fields = mamba2_mixer.spec_fields(self.mamba(layer), comps, self.stock_layout(self.config)) if mamba else {}
        if not has_mixer:  # built as a Mamba layer (``configure``) without its mixer
            fields["mamba"] = False
        if width != self.config.intermediate_size:
            fields["mlp"] = width
        return LayerSpec(**fields)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        config.attn_layer_indices = [j for j, s in enumerate(spec.layers)
                                     if s.mamba and not self.has_mamba(s.source)]
        shape = stock_shape(spec, self.stock_layout(self.config), filter(self.has_mamba, range(self.num_layers)))
        expand = shape and expand_for(shape.inner(config.mamba_d_head), config.hidden_size)
        if shape is None or (shape.num_heads is not None and expand is None):
            return False
        if shape.num_heads is not None:
            config.mamba_n_heads, config.mamba_expand = shape.num_heads, expand
        config.intermediate_size = shape.mlp or config.intermediate_size
        return True

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace, by_layer = {}, self.by_layer(plan)
        for layer in self.layer_map(plan):
            comps = by_layer.get(layer, [])
            kinds = {c.kind for c in comps}
            mods = {}
            if self.has_mamba(layer):
                state = mamba2_mixer.pruned_state(self.mamba(layer), comps)
                if state is not None:
                    mods["mamba"] = state
            if "attention" in kinds:
                mods.update({"self_attn": {}, "input_layernorm": {}})
            if "mixer" in kinds:
                mods.update({"mamba": {}, "self_attn": {}, "input_layernorm": {}})
            mods.update(feed_forward.pruned_state(self.layers()[layer], comps, self.mlp_width(layer),
                                                  self.mlp_group_size, removed="mlp" in kinds))
            if mods:
                replace[layer] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.layer_map(plan), replace)

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        block = layers[index]
        mamba = hasattr(block, "mamba")
        if not spec.mamba:
            remove_sub_block(block, "mamba" if mamba else "self_attn", "input_layernorm", returns_tuple=not mamba)
        elif mamba:
            block.mamba = mamba2_mixer.build(block.mamba, spec)
        if spec.mlp is not None:
            feed_forward.resize(block, spec.mlp)
