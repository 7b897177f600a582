"""Mamba-2 (``Mamba2ForCausalLM``): blocks, SSMs and SSM heads.

The mixer math lives in ``mamba2_core`` (shared with the hybrid families); this file only says
where the layers are and how the config describes a pruned model:

* every kept layer has the same head count per group, all groups equal, the SSM kept, and
  ``num_heads * head_dim`` a multiple of ``hidden_size``: a stock config (``num_heads``,
  ``expand`` and ``num_hidden_layers`` changed) that plain ``transformers`` loads;
* otherwise ``config.shedder = {"layers": [{"ssm": bool, "heads_per_group": [...]}, ...]}`` (one
  entry per kept layer), rebuilt by ``build`` with ``PrunedMamba2Mixer`` modules.
"""
from __future__ import annotations

import copy

from torch import nn

from ..plan import Component, PruningPlan
from . import register
from .mamba2_core import (Mamba2StyleAdapter, MixerLayout, PrunedMamba2Mixer, mixer_layout, set_shedder, shedder_layers,
                          ssm_components, uniform_layout)


@register
class Mamba2Adapter(Mamba2StyleAdapter):
    architectures = ("Mamba2ForCausalLM",)
    model_types = ("mamba2",)
    kinds = ("block", "ssm", "head")

    def layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def layer_components(self, layer: int) -> list[Component]:
        return [Component("block", layer)] + ssm_components(layer, mixer_layout(self.mixer(layer)))

    def pruned_config(self, plan: PruningPlan):
        config = copy.deepcopy(self.config)
        kept = self.kept_layers(plan)
        layouts = [self.new_layout(plan, i) for i in kept]
        config.num_hidden_layers = len(kept)
        stock = uniform_layout(layouts)
        inner = stock.num_heads * config.head_dim if stock else 0
        expressible = stock and inner % config.hidden_size == 0
        if expressible:
            config.num_heads, config.expand = stock.num_heads, inner // config.hidden_size
        set_shedder(config, None if expressible else {"layers": [layout.to_dict() for layout in layouts]})
        return config

    @classmethod
    def build(cls, config) -> nn.Module:
        from transformers import Mamba2ForCausalLM

        model = Mamba2ForCausalLM(config)
        layers = model.backbone.layers
        for block, entry in zip(layers, shedder_layers(config, len(layers)) or []):
            block.mixer = PrunedMamba2Mixer(block.mixer, MixerLayout.from_dict(entry), cls.hooks)
        return model
