"""Nemotron-H (``NemotronHForCausalLM``): a hybrid whose every layer holds one sub-block.

``layer_types`` entries are ``linear_attention`` (a Mamba-2 mixer), ``full_attention``, ``mlp``
or ``moe``. Components offered:

* Mamba layers: ``block`` (skip the layer), ``ssm``, ``head`` (the shared ``mamba2_core``);
* attention layers: ``attention`` (skip the layer — the layer *is* the attention sub-block);
* MLP layers: ``mlp`` (skip) and ``mlp_channel_group`` (intermediate channels in groups of
  ``group_sizes["mlp_channel_group"]``: up_proj rows and down_proj columns; the last group may be
  smaller);
* MoE layers: ``mlp`` (skip the whole expert sub-block; no channel groups).

Extraction deletes skipped layers (renumbering the rest, ``layer_types`` shrinks) and slices
mixers and MLPs. When all kept Mamba layers share one stock-expressible layout and all kept MLPs
one width, the config is stock (``mamba_num_heads`` / ``intermediate_size`` changed); otherwise
``config.shedder = {"layers": [...]}`` holds one entry per kept layer: a Mamba layout
(``{"ssm", "heads_per_group"}``), ``{"intermediate_size": n}`` for an MLP, ``{"attention": false}``
for a ``RemovedAttentionLayer``, ``{}`` for the rest.

Cache: ``transformers``' Nemotron-H reads the sequence length (positions, causal masks) from the
first attention layer's key/value slot and cannot run with a cache without one. So a skipped
attention layer records the length of what it has seen in its slot (``hybrid_common.record_length``),
and extraction never deletes the last attention-type layer: if a plan removes them all, the first
stays as a ``RemovedAttentionLayer`` (no parameters, output = input) that only does this
bookkeeping: the same function and parameter count as deleting it.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import PlanError
from ..plan import Component, PruningPlan
from . import register
from .base import patch_forward
from .hybrid_common import kept_mlp_channels, mask_mlp_channels, mlp_groups, pruned_mlp_state, skip_layer
from .mamba2_core import (Mamba2StyleAdapter, MixerLayout, PrunedMamba2Mixer, mixer_layout, set_shedder, shedder_layers,
                          sliced_state_dict, ssm_components, uniform_layout)

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


@register
class NemotronHAdapter(Mamba2StyleAdapter):
    architectures = ("NemotronHForCausalLM",)
    model_types = ("nemotron_h",)
    kinds = ("block", "ssm", "head", "attention", "mlp", "mlp_channel_group")
    default_group_sizes = {"mlp_channel_group": 64}
    layer_prefix = "model.layers."

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_kind(self, layer: int) -> str:
        return _KIND_OF_TYPE[self.layers()[layer].block_type]

    def has_ssm_mixer(self, layer: int) -> bool:
        return self.layer_kind(layer) == "mamba"

    def is_removed_attention(self, layer: int) -> bool:
        """Whether ``layer`` is an attention layer an earlier extraction already emptied."""
        return isinstance(self.layers()[layer], RemovedAttentionLayer)

    # ------------------------------------------------------------------ inventory
    def mlp_width(self, layer: int) -> int:
        return self.mixer(layer).up_proj.out_features

    def mlp_groups(self, layer: int) -> list[range]:
        """Channel ranges of each ``mlp_channel_group`` of an MLP layer (the last may be short)."""
        return mlp_groups(self.mlp_width(layer), self.group_sizes["mlp_channel_group"])

    def layer_components(self, layer: int) -> list[Component]:
        kind = self.layer_kind(layer)
        if kind == "mamba":
            return [Component("block", layer)] + ssm_components(layer, mixer_layout(self.mixer(layer)))
        if kind == "attention":
            return [] if self.is_removed_attention(layer) else [Component("attention", layer)]
        if kind == "mlp":
            return [Component("mlp", layer)] + [Component("mlp_channel_group", layer, g)
                                                for g in range(len(self.mlp_groups(layer)))]
        return [Component("mlp", layer)]

    def removed_layers(self, plan: PruningPlan) -> set[int]:
        """Layers a plan skips whole (``kept_layers`` may still keep one attention layer among them,
        as a ``RemovedAttentionLayer``)."""
        return {c.layer for c in plan.components if c.kind in ("block", "attention", "mlp")}

    def kept_layers(self, plan: PruningPlan) -> list[int]:
        """Layers not removed, plus the first attention layer when the plan removes them all (kept
        as a ``RemovedAttentionLayer`` so the cache still has an attention slot)."""
        gone = self.removed_layers(plan)
        kept = [i for i in range(self.num_layers) if i not in gone]
        attention = [i for i in range(self.num_layers) if self.layer_kind(i) == "attention"]
        if attention and not set(attention) & set(kept):
            kept = sorted(kept + attention[:1])
        return kept

    def emptied_attention(self, plan: PruningPlan) -> set[int]:
        """Kept layers that the extracted model holds as a ``RemovedAttentionLayer``."""
        gone = self.removed_layers(plan)
        return {i for i in self.kept_layers(plan)
                if self.layer_kind(i) == "attention" and (i in gone or self.is_removed_attention(i))}

    def kept_channels(self, layer: int, comps) -> torch.Tensor:
        """Intermediate channels of an MLP layer left after removing the ``mlp_channel_group``
        components among ``comps``: [kept] indices in channel order."""
        gone = [c.index for c in comps if c.layer == layer and c.kind == "mlp_channel_group"]
        return kept_mlp_channels(self.mlp_width(layer), self.group_sizes["mlp_channel_group"], gone)

    # ------------------------------------------------------------------ validation
    def check(self, plan: PruningPlan) -> None:
        gone = self.removed_layers(plan)
        if all(i in gone or self.is_removed_attention(i) for i in range(self.num_layers)):
            raise PlanError(f"the plan removes all {self.num_layers} layers; nothing would be left of the model")
        super().check(plan)
        for layer, comps in self.by_layer(plan).items():
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
            mask_mlp_channels(self.mixer(layer), self.kept_channels(layer, comps), stack, rows=_MLP_ROWS)
        else:
            super().mask_layer(layer, comps, stack)

    # ------------------------------------------------------------------ extraction
    def pruned_config(self, plan: PruningPlan):
        config = copy.deepcopy(self.config)
        kept = self.kept_layers(plan)
        emptied = self.emptied_attention(plan)
        entries, layouts, widths = [], [], []
        for layer in kept:
            kind = self.layer_kind(layer)
            if layer in emptied:
                entries.append({"attention": False})
            elif kind == "mamba":
                layouts.append(self.new_layout(plan, layer))
                entries.append(layouts[-1].to_dict())
            elif kind == "mlp":
                widths.append(len(self.kept_channels(layer, plan.components)))
                entries.append({"intermediate_size": widths[-1]})
            else:
                entries.append({})
        config.layers_block_type = [config.layers_block_type[i] for i in kept]
        stock = uniform_layout(layouts)
        expressible = (stock or not layouts) and len(set(widths)) <= 1 and not emptied
        if expressible:
            if stock:
                config.mamba_num_heads = stock.num_heads
            if widths:
                config.intermediate_size = widths[0]
        set_shedder(config, None if expressible else {"layers": entries})
        return config

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace = self.mixer_replacements(plan)
        for layer in self.emptied_attention(plan):
            replace[layer] = {self.mixer_name: {}, "norm": {}}
        for layer in self.kept_layers(plan):
            if self.layer_kind(layer) == "mlp" and any(c.layer == layer for c in plan.components):
                kept = self.kept_channels(layer, plan.components)
                replace[layer] = {self.mixer_name: pruned_mlp_state(self.mixer(layer), kept, rows=_MLP_ROWS)}
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.kept_layers(plan), replace)

    @classmethod
    def build(cls, config) -> nn.Module:
        from transformers import NemotronHForCausalLM
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

        model = NemotronHForCausalLM(config)
        layers = model.model.layers
        for i, entry in enumerate(shedder_layers(config, len(layers)) or []):
            if entry.get("attention", True) is False:
                layers[i] = RemovedAttentionLayer(i)
            elif "heads_per_group" in entry:
                layers[i].mixer = PrunedMamba2Mixer(layers[i].mixer, MixerLayout.from_dict(entry), cls.hooks)
            elif "intermediate_size" in entry:
                layers[i].mixer = NemotronHMLP(config, intermediate_size=entry["intermediate_size"])
        return model

