"""Mamba-2 (``Mamba2ForCausalLM``): blocks, SSMs and SSM heads.

The mixer math lives in ``mamba2_mixer`` (shared with the hybrid families); this file only says
where the layers are and how the config describes a pruned model: when every kept layer has the
same head count per group, all groups equal, the SSM kept, and ``num_heads * head_dim`` a multiple
of ``hidden_size``, a stock config (``num_heads``, ``expand`` changed) that plain ``transformers``
loads; otherwise each layer's ``LayerSpec`` (``ssm``, ``heads_per_group``).
"""
from __future__ import annotations

import transformers

import contextlib
import dataclasses

import torch
from torch import nn

from shedder.core.plan import Component, PruningPlan
from shedder.arch import mamba2_mixer
from shedder.arch.base import Adapter
from shedder.arch.layers import sliced_state_dict
from shedder.arch.mamba2_mixer import MixerLayout, uniform_layout
from shedder.arch.spec import LayerSpec, PrunedSpec


class Mamba2Adapter(Adapter):
    architectures = ("Mamba2ForCausalLM",)
    model_types = ("mamba2",)
    kinds = ("block", "ssm", "head")
    stock_kinds = ("head",)
    lora_targets = ("in_proj", "out_proj")
    model_class = transformers.Mamba2ForCausalLM
    layers_path = "backbone.layers"
    size_fields = Adapter.size_fields + ("num_heads", "head_dim", "n_groups", "state_size", "chunk_size",
                                                    "conv_kernel", "expand", "time_step_rank")

    def mixer(self, layer: int) -> nn.Module:
        return self.layers()[layer].mixer

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.num_heads, config.n_groups)

    # ------------------------------------------------------------------ inventory
    def layer_components(self, layer: int) -> list[Component]:
        return [Component("block", layer)] + mamba2_mixer.components(layer, self.mixer(layer))

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            mamba2_mixer.check(layer, self.mixer(layer), comps)

    # ------------------------------------------------------------------ live masks
    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        mamba2_mixer.mask(self.mixer(layer), comps, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer, comps) -> LayerSpec:
        return LayerSpec(**mamba2_mixer.spec_fields(self.mixer(layer), comps, self.stock_layout(self.config)))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        by_layer, replace = self.by_layer(plan), {}
        for layer in self.layer_map(plan):
            state = mamba2_mixer.pruned_state(self.mixer(layer), by_layer.get(layer, []))
            if state is not None:
                replace[layer] = {"mixer": state}
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.layer_map(plan), replace)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), heads_per_group=cls.stock_layout(config).heads_per_group)

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
        layers[index].mixer = mamba2_mixer.build(layers[index].mixer, spec)
