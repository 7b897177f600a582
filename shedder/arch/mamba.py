"""Mamba-1 (``MambaForCausalLM``): blocks, the SSM inside each block, and groups of inner channels.

Everything about the mixer itself (masked forward, pruned mixer class, weight slicing) lives in
``mamba1_mixer``; this file maps it onto the ``backbone.layers[i].mixer`` layout of the model.
Falcon-Mamba shares the layout and subclasses this adapter.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import transformers
from torch import nn

from shedder.core.plan import Component, PruningPlan
from shedder.arch.base import Adapter
from shedder.arch.layers import sliced_state_dict
from shedder.arch.mamba1_mixer import (build_mixer, check_group_size, check_mixer, default_channel_group_size, mask_mixer,
                                       mixer_components, mixer_spec, pruned_mixer_weights)
from shedder.arch.spec import LayerSpec, PrunedSpec


class MambaAdapter(Adapter):
    architectures = ("MambaForCausalLM",)
    model_types = ("mamba",)
    kinds = ("block", "ssm", "channel_group")
    lora_targets = ("in_proj", "out_proj")
    model_class = transformers.MambaForCausalLM
    layers_path = "backbone.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "state_size", "time_step_rank", "conv_kernel", "expand")

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        super().__init__(model, group_sizes)
        mixers = [layer.mixer for layer in self.layers()]
        widths = [m.intermediate_size for m in mixers]
        self.group_sizes.setdefault("channel_group", default_channel_group_size(self.config.intermediate_size, widths))
        for i, mixer in enumerate(mixers):
            check_group_size(mixer, i, self.group_size)

    @property
    def group_size(self) -> int:
        return self.group_sizes["channel_group"]

    # ------------------------------------------------------------------ inventory
    def layer_components(self, layer: int) -> list[Component]:
        return [Component("block", layer)] + mixer_components(self.layers()[layer].mixer, layer, self.group_size)

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if not any(c.kind == "block" for c in comps):
                check_mixer(self.layers()[layer].mixer, layer, comps, self.group_size)

    # ------------------------------------------------------------------ live masks
    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        mask_mixer(self.layers()[layer].mixer, comps, self.group_size, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer, comps) -> LayerSpec:
        return LayerSpec(**mixer_spec(self.layers()[layer].mixer, comps, self.group_size, self.config.intermediate_size))

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)  # layer_types follows (a property of num_hidden_layers)
        return False

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), inner=int(config.intermediate_size))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        by_layer = self.by_layer(plan)
        layer_map = self.layer_map(plan)
        replace = {i: {"mixer": pruned_mixer_weights(self.layers()[i].mixer, by_layer[i], self.group_size)}
                   for i in layer_map if i in by_layer}
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, layer_map, replace)

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        layers[index].mixer = build_mixer(layers[index].mixer, spec)
