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

import transformers
from torch import nn

from shedder.core.plan import Component, PruningPlan
from shedder.arch import feed_forward
from shedder.arch.base import Adapter
from shedder.arch.mamba2_hybrid import Mamba2HybridAdapter
from shedder.arch.feed_forward import check_mlp_groups
from shedder.arch.layers import present, skip_layer
from shedder.arch.spec import LayerSpec, PrunedSpec


class BambaAdapter(Mamba2HybridAdapter):
    architectures = ("BambaForCausalLM",)
    model_types = ("bamba",)
    family = "Bamba"
    kinds = ("block", "mixer", "ssm", "head", "attention", "mlp", "mlp_channel_group")
    stock_kinds = ("head", "mlp_channel_group")
    model_class = transformers.BambaForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
                                         "mamba_d_state", "mamba_chunk_size", "mamba_d_conv", "mamba_expand",
                                         "num_attention_heads", "num_key_value_heads")

    def mlp_width_of(self, block: nn.Module) -> int:
        return block.feed_forward.gate_proj.out_features if present(block.feed_forward) else 0

    def check_feed_forward(self, layer: int, comps: list[Component]) -> None:
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
        self.mask_mixer(layer, {c.kind for c in comps}, comps, stack)
        feed_forward.mask(self.layers()[layer], comps, self.mlp_width(layer), self.mlp_group_size, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        fields, has_mixer = self.mixer_fields(layer, comps)
        width = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
        if not has_mixer and not width:
            return None  # nothing left: the identity
        if width != self.config.intermediate_size:
            fields["mlp"] = width
        return LayerSpec(**fields)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        config.attn_layer_indices = [j for j, s in enumerate(spec.layers)
                                     if s.mamba and not self.has_mamba(s.source)]
        return self.stock_shape(config, spec) is not None

    def feed_forward_state(self, layer: int, kinds: set[str], comps: list[Component]) -> dict:
        return feed_forward.pruned_state(self.layers()[layer], comps, self.mlp_width(layer), self.mlp_group_size,
                                         removed="mlp" in kinds)

    @staticmethod
    def apply_feed_forward(block: nn.Module, spec) -> None:
        if spec.mlp is not None:
            feed_forward.resize(block, spec.mlp)
