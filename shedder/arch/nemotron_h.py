"""Nemotron-H (``NemotronHForCausalLM``): a hybrid whose every layer holds one sub-block.

``layer_types`` entries are ``linear_attention`` (a Mamba-2 mixer), ``full_attention``, ``mlp``
or ``moe``. Components offered:

* Mamba layers: ``block`` (skip the layer), ``ssm``, ``head`` (the shared ``mamba2_mixer``);
* attention layers: ``attention`` (skip the layer — the layer *is* the attention sub-block);
* MLP layers: ``mlp`` (skip) and ``mlp_channel_group`` (intermediate channels in groups of
  ``group_sizes["mlp_channel_group"]``: up_proj rows and down_proj columns; the last group may be
  smaller);
* MoE layers: ``mlp`` (skip the whole expert sub-block; no channel groups).

Extraction deletes skipped layers (renumbering the rest, ``layer_types`` shrinks) and slices
mixers and MLPs. When all kept Mamba layers share one stock-expressible layout and all kept MLPs
one width, the config is stock (``mamba_num_heads`` / ``intermediate_size`` changed); otherwise
each kept layer's ``LayerSpec`` says what differs: ``ssm`` / ``heads_per_group`` (Mamba), ``mlp``
(an MLP's width), ``attention=False`` (a ``RemovedAttentionLayer``).

Cache: ``transformers``' Nemotron-H reads the sequence length (positions, causal masks) from the
first attention layer's key/value slot and cannot run with a cache without one. So a skipped
attention layer records the length of what it has seen in its slot (``layers.record_length``),
and extraction never deletes the last attention-type layer: if a plan removes them all, the first
stays as a ``RemovedAttentionLayer`` (no parameters, output = input) that only does this
bookkeeping: the same function and parameter count as deleting it.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import mamba2_mixer
from shedder.arch.base import Adapter, patch_forward
from shedder.arch.feed_forward import kept_mlp_channels, mask_mlp_channels, mlp_groups, pruned_mlp_state, resize_mlp
from shedder.arch.layers import skip_layer, sliced_state_dict
from shedder.arch.mamba2_mixer import MixerLayout, uniform_layout
from shedder.arch.spec import LayerSpec, PrunedSpec

#: Nemotron-H's MLP is ungated: ``down_proj(act(up_proj(x)))``.
_MLP_ROWS = ("up_proj",)

_KIND_OF_TYPE = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention",
                 "attention": "attention", "mlp": "mlp", "moe": "moe"}


class RemovedAttentionLayer(nn.Module):
    """An extracted attention layer whose attention is removed but whose cache slot must stay (the
    model's last attention-type layer): no parameters, returns its input, and records the sequence
    length in its slot so the cache can still size positions and masks."""

    #: what ``NemotronHModel`` reads to pick the layer's mask (and ``DynamicCache`` its slot type)
    block_type = "full_attention"

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self._forward = skip_layer(cache_slot=layer_idx)

    def forward(self, hidden_states, *args, **kwargs):  # [batch, seq, hidden] -> the same tensor
        return self._forward(hidden_states, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, attention removed"


class NemotronHAdapter(Adapter):
    architectures = ("NemotronHForCausalLM",)
    model_types = ("nemotron_h",)
    kinds = ("block", "ssm", "head", "attention", "mlp", "mlp_channel_group")
    stock_kinds = ("head", "mlp_channel_group")
    lora_targets = ("in_proj", "out_proj", "up_proj", "down_proj")
    default_group_sizes = {"mlp_channel_group": 64}
    model_class = transformers.NemotronHForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "mamba_num_heads", "mamba_head_dim",
                                                    "n_groups", "ssm_state_size", "chunk_size", "conv_kernel",
                                                    "expand", "num_attention_heads", "num_key_value_heads",
                                                    "head_dim", "moe_intermediate_size", "n_routed_experts")

    def layer_kind(self, layer: int) -> str:
        return _KIND_OF_TYPE[self.layers()[layer].block_type]

    def sub_block(self, layer: int) -> nn.Module:
        """The layer's one sub-block (``layer.mixer``: a Mamba-2 mixer, an attention, an MLP or an MoE)."""
        return self.layers()[layer].mixer

    def is_removed_attention(self, layer: int) -> bool:
        """Whether ``layer`` is an attention layer an earlier extraction already emptied."""
        return isinstance(self.layers()[layer], RemovedAttentionLayer)

    # ------------------------------------------------------------------ inventory
    def mlp_width(self, layer: int) -> int:
        return self.sub_block(layer).up_proj.out_features

    def mlp_groups(self, layer: int) -> list[range]:
        """Channel ranges of each ``mlp_channel_group`` of an MLP layer (the last may be short)."""
        return mlp_groups(self.mlp_width(layer), self.group_sizes["mlp_channel_group"])

    def layer_components(self, layer: int) -> list[Component]:
        kind = self.layer_kind(layer)
        if kind == "mamba":
            return [Component("block", layer)] + mamba2_mixer.components(layer, self.sub_block(layer))
        if kind == "attention":
            return [] if self.is_removed_attention(layer) else [Component("attention", layer)]
        if kind == "mlp":
            return [Component("mlp", layer)] + [Component("mlp_channel_group", layer, g)
                                                for g in range(len(self.mlp_groups(layer)))]
        return [Component("mlp", layer)]

    def kept_channels(self, layer: int, comps) -> torch.Tensor:
        """Intermediate channels of an MLP layer left after removing the ``mlp_channel_group``
        components among ``comps``: [kept] indices in channel order."""
        gone = [c.index for c in comps if c.layer == layer and c.kind == "mlp_channel_group"]
        return kept_mlp_channels(self.mlp_width(layer), self.group_sizes["mlp_channel_group"], gone)

    # ------------------------------------------------------------------ validation
    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if self.layer_kind(layer) == "mamba":
                mamba2_mixer.check(layer, self.sub_block(layer), comps)
            groups = [c for c in comps if c.kind == "mlp_channel_group"]
            if groups and Component("mlp", layer) in plan:
                raise PlanError(f"{groups[0]} is redundant: the MLP of layer {layer} is removed as a whole")
            if groups and len(groups) >= len(self.mlp_groups(layer)):
                raise PlanError(f"layer {layer}: removing all {len(groups)} MLP channel groups leaves no MLP; "
                                "remove the MLP instead")

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        """A skipped layer returns its input; an attention layer also keeps its cache slot counting
        tokens (the layers that still attend, and the cache's length, read it)."""
        attention = self.layer_kind(layer) == "attention"
        return skip_layer(cache_slot=self.layers()[layer].layer_idx if attention else None)

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        if any(c.kind in ("attention", "mlp") for c in comps):
            patch_forward(self.layers()[layer], self.skip_forward(layer), stack)
        elif any(c.kind == "mlp_channel_group" for c in comps):
            mask_mlp_channels(self.sub_block(layer), self.kept_channels(layer, comps), stack, rows=_MLP_ROWS)
        elif self.layer_kind(layer) == "mamba":
            mamba2_mixer.mask(self.sub_block(layer), comps, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        kind = self.layer_kind(layer)
        if any(c.kind in ("attention", "mlp") for c in comps):
            return None  # the layer is its sub-block: skipped, deleted
        if kind == "mamba":
            return LayerSpec(**mamba2_mixer.spec_fields(self.sub_block(layer), comps, self.stock_layout(self.config)))
        if kind == "attention" and self.is_removed_attention(layer):
            return LayerSpec(attention=False)
        if kind == "mlp":
            width = len(self.kept_channels(layer, comps))
            return LayerSpec(mlp=width) if width != self.config.intermediate_size else LayerSpec()
        return LayerSpec()

    def cache_anchor_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.layer_kind(i) == "attention"]

    def emptied_anchor_spec(self, layer: int) -> LayerSpec:
        return LayerSpec(attention=False)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        types = [config.layers_block_type[s.source] for s in spec.layers]
        config.layers_block_type = types
        stock = self.stock_layout(config)
        layouts = [MixerLayout.of_spec(s, stock) for s, t in zip(spec.layers, types) if _KIND_OF_TYPE[t] == "mamba"]
        widths = {s.mlp or config.intermediate_size for s, t in zip(spec.layers, types) if t == "mlp"}
        uniform = uniform_layout(layouts)
        if not ((uniform or not layouts) and len(widths) <= 1 and all(s.attention for s in spec.layers)):
            return False
        if uniform:
            config.mamba_num_heads = uniform.num_heads
        if widths:
            config.intermediate_size = widths.pop()
        return True

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.mamba_num_heads, config.n_groups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size),
                                   heads_per_group=cls.stock_layout(config).heads_per_group)

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace = {}
        layer_map, by_layer = self.layer_map(plan), self.by_layer(plan)
        for layer in layer_map:
            kind = self.layer_kind(layer)
            if kind == "mamba":
                state = mamba2_mixer.pruned_state(self.sub_block(layer), by_layer.get(layer, []))
                if state is not None:
                    replace[layer] = {"mixer": state}
            elif kind == "attention" and (layer in by_layer or self.is_removed_attention(layer)):
                replace[layer] = {"mixer": {}, "norm": {}}  # kept only as the cache's anchor
            elif kind == "mlp" and layer in by_layer:
                kept = self.kept_channels(layer, by_layer[layer])
                replace[layer] = {"mixer": pruned_mlp_state(self.sub_block(layer), kept, rows=_MLP_ROWS)}
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, layer_map, replace)

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        block = layers[index]
        if not spec.attention:
            layers[index] = RemovedAttentionLayer(index)
        elif _KIND_OF_TYPE[block.block_type] == "mamba":
            block.mixer = mamba2_mixer.build(block.mixer, spec)
        elif spec.mlp is not None:
            resize_mlp(block.mixer, spec.mlp, rows=_MLP_ROWS)
