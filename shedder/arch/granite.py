"""Granite 4.0-H (``GraniteMoeHybridForCausalLM``): Mamba-2 and attention layers, each with a shared
MLP and, in the MoE checkpoints, a mixture of experts beside it.

A decoder layer computes, with ``r`` the config's ``residual_multiplier``::

    h = h + r * mixer(input_layernorm(h))
    f = post_attention_layernorm(h);  h = h + r * (moe(f) + shared_mlp(f))    # dense: shared_mlp(f) only

``mixer`` is a Mamba-2 mixer (``layer.mamba``) or self-attention (``layer.self_attn``, scaled by
``attention_multiplier``, no RoPE in the published "nope" checkpoints); the embeddings are scaled by
``embedding_multiplier`` and the logits divided by ``logits_scaling``. Those multipliers stay where
the stock modules apply them: every removal below makes a branch contribute exactly zero (``r * 0``)
or narrows a module that keeps its own forward, so the multipliers are respected by construction.
Removing a component means:

* ``block`` — the whole layer is skipped, ``h = h``; extraction deletes it.
* ``mixer`` (every layer) — the token mixer (Mamba-2 or attention) with ``input_layernorm``
  contributes nothing, the feed-forward stays (on an attention layer the same as ``attention``).
* ``ssm`` / ``head`` (Mamba layers) — as in Mamba-2, through ``mamba2_mixer``.
* ``attention`` (attention layers) — the self-attention branch contributes nothing; its projections
  and ``input_layernorm`` go. The extracted layer is listed as a Mamba (``linear_attention``) layer
  without a mixer, so the cache holds no key/value states for it.
* ``mlp`` (every layer) — the whole feed-forward, shared MLP *and* mixture of experts (router and
  every expert), with ``post_attention_layernorm``, contributes nothing (``pruned_mlp_idx``).
* ``mlp_channel_group`` — a group of the shared MLP's intermediate channels: their rows in both
  halves of the fused ``input_linear`` ([gate; up]) and their columns of ``output_linear``. Experts
  are left whole (their channels are no structure the router knows about).
* ``expert`` (MoE layers) — one expert with its router row (``experts``): the router picks among
  the others. At least ``num_experts_per_tok`` stay.

A layer left with neither mixer nor feed-forward is the identity and is deleted. A plan must keep one
attention layer when the model has any (``transformers`` reads the cache's length from one), as in
Bamba. Extraction keeps a stock config when every kept layer has stock shapes, or when every layer
keeps the same shared-MLP width and expert count (they become ``shared_intermediate_size`` /
``num_local_experts``); otherwise each kept layer's ``LayerSpec`` says what differs: ``mamba=False``,
``ssm`` / ``heads_per_group``, ``mlp`` (0 = no feed-forward), ``experts``.
"""
from __future__ import annotations

import contextlib
import dataclasses

import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch import experts, feed_forward
from shedder.arch.base import Adapter
from shedder.arch.mamba2_hybrid import Mamba2HybridAdapter
from shedder.arch.feed_forward import mask_mlp_channels, pruned_mlp_state, resize_mlp
from shedder.arch.layers import present, remove_sub_block, skip_layer, skip_sub_block
from shedder.arch.spec import LayerSpec, PrunedSpec

#: The shared MLP's projections: a fused [gate; up] input, the output.
_SHARED_MLP = dict(rows=(), cols=("output_linear",), fused=("input_linear",))


class GraniteHybridAdapter(Mamba2HybridAdapter):
    architectures = ("GraniteMoeHybridForCausalLM",)
    model_types = ("granitemoehybrid",)
    family = "Granite 4.0-H"
    mlp_field = "shared_intermediate_size"
    kinds = ("block", "mixer", "ssm", "head", "attention", "mlp", "mlp_channel_group", "expert")
    stock_kinds = ("head", "mlp_channel_group")
    model_class = transformers.GraniteMoeHybridForCausalLM
    layers_path = "model.layers"
    lora_targets = ("in_proj", "out_proj", "input_linear", "output_linear")
    size_fields = Adapter.size_fields + ("intermediate_size", "shared_intermediate_size", "mamba_n_heads",
                                         "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_chunk_size",
                                         "mamba_d_conv", "mamba_expand", "num_attention_heads",
                                         "num_key_value_heads", "num_local_experts", "num_experts_per_tok")

    def mlp_width_of(self, block: nn.Module) -> int:
        return block.shared_mlp.output_linear.in_features if present(block.shared_mlp) else 0

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), experts=int(config.num_local_experts) or None)

    def moe(self, layer: int) -> nn.Module | None:
        """The layer's mixture of experts (None: a dense checkpoint, or removed)."""
        moe = self.layers()[layer].block_sparse_moe
        return moe if present(moe) else None

    def layer_components(self, layer: int) -> list[Component]:
        return super().layer_components(layer) + experts.components(layer, self.moe(layer))

    def check_feed_forward(self, layer: int, comps: list[Component]) -> None:
        feed_forward.check(layer, comps, self.mlp_width(layer), self.mlp_group_size)
        gone = [c for c in comps if c.kind == "expert"]
        if gone and any(c.kind == "mlp" for c in comps):
            raise PlanError(f"{gone[0]} is redundant: the MLP of layer {layer} is removed as a whole")
        experts.check(layer, self.moe(layer), comps)

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        return skip_layer(layer if self.has_attention(layer) else None)  # the layer returns a tensor

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        self.mask_mixer(layer, kinds, comps, stack)
        if "mlp" in kinds:
            skip_sub_block(stack, block.shared_mlp, block.post_attention_layernorm)
            if self.moe(layer) is not None:
                skip_sub_block(stack, block.block_sparse_moe)
            return
        if "mlp_channel_group" in kinds:
            kept = feed_forward.kept_channels(comps, self.mlp_width(layer), self.mlp_group_size)
            mask_mlp_channels(block.shared_mlp, kept, stack, **_SHARED_MLP)
        if self.moe(layer) is not None:
            experts.mask(block.block_sparse_moe, comps, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        fields, has_mixer = self.mixer_fields(layer, comps)
        width = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
        if not has_mixer and not width:
            return None  # nothing left: the identity
        if width != self.config.shared_intermediate_size:
            fields["mlp"] = width
        moe = self.moe(layer)
        if width and moe is not None and experts.kept_count(moe, comps) != self.config.num_local_experts:
            fields["experts"] = experts.kept_count(moe, comps)
        return LayerSpec(**fields)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        config.layer_types = ["full_attention" if s.mamba and not self.has_mamba(s.source) else "linear_attention"
                              for s in spec.layers]
        shape = self.stock_shape(config, spec)  # every layer alike: the stock config says it
        if shape is None:
            return False
        config.num_local_experts = shape.experts or config.num_local_experts
        return True

    def feed_forward_state(self, layer: int, kinds: set[str], comps: list[Component]) -> dict:
        if "mlp" in kinds:
            return {"shared_mlp": {}, "block_sparse_moe": {}, "post_attention_layernorm": {}}
        block, mods = self.layers()[layer], {}
        if "mlp_channel_group" in kinds:
            kept = feed_forward.kept_channels(comps, self.mlp_width(layer), self.mlp_group_size)
            mods["shared_mlp"] = pruned_mlp_state(block.shared_mlp, kept, **_SHARED_MLP)
        if "expert" in kinds:
            mods["block_sparse_moe"] = experts.pruned_state(block.block_sparse_moe, comps)
        return mods

    @staticmethod
    def apply_feed_forward(block: nn.Module, spec) -> None:
        if spec.mlp == 0:
            remove_sub_block(block, "shared_mlp", "post_attention_layernorm")
            if block.block_sparse_moe is not None:
                remove_sub_block(block, "block_sparse_moe")
            return
        if spec.mlp is not None:
            resize_mlp(block.shared_mlp, spec.mlp, **_SHARED_MLP)
        if spec.experts is not None:
            experts.resize(block.block_sparse_moe, spec.experts)
