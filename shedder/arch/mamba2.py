"""Mamba-2 (``Mamba2ForCausalLM``): blocks, SSMs and SSM heads.

The mixer math lives in ``mamba2_core`` (shared with the hybrid families); this file only says
where the layers are and how the config describes a pruned model: when every kept layer has the
same head count per group, all groups equal, the SSM kept, and ``num_heads * head_dim`` a multiple
of ``hidden_size``, a stock config (``num_heads``, ``expand`` changed) that plain ``transformers``
loads; otherwise each layer's ``LayerSpec`` (``ssm``, ``heads_per_group``).
"""
from __future__ import annotations

import transformers

from shedder.core.plan import Component
from shedder.arch.mamba2_core import Mamba2StyleAdapter, MixerLayout, mixer_layout, ssm_components, uniform_layout
from shedder.arch.spec import LayerSpec, PrunedSpec


class Mamba2Adapter(Mamba2StyleAdapter):
    architectures = ("Mamba2ForCausalLM",)
    model_types = ("mamba2",)
    kinds = ("block", "ssm", "head")
    lora_targets = ("in_proj", "out_proj")
    model_class = transformers.Mamba2ForCausalLM
    layers_path = "backbone.layers"
    size_fields = Mamba2StyleAdapter.size_fields + ("num_heads", "head_dim", "n_groups", "state_size", "chunk_size",
                                                    "conv_kernel", "expand", "time_step_rank")

    def layer_components(self, layer: int) -> list[Component]:
        return [Component("block", layer)] + ssm_components(layer, mixer_layout(self.mixer(layer)))

    def layer_spec(self, layer, comps) -> LayerSpec:
        return LayerSpec(**self.mixer_spec(layer, comps))

    @classmethod
    def stock_layout(cls, config) -> MixerLayout:
        return MixerLayout((config.num_heads // config.n_groups,) * config.n_groups)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        stock = uniform_layout([MixerLayout.of_spec(s, self.stock_layout(config)) for s in spec.layers])
        inner = stock.num_heads * config.head_dim if stock else 0
        if not (stock and inner % config.hidden_size == 0):
            return False
        config.num_heads, config.expand = stock.num_heads, inner // config.hidden_size
        return True

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        cls.apply_mixer(layers[index], spec)
