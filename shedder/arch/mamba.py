"""Mamba-1 (``MambaForCausalLM``): blocks, the SSM inside each block, and groups of inner channels.

Everything about the mixer itself (masked forward, pruned mixer class, weight slicing) lives in
``mamba1_core``; this file maps it onto the ``backbone.layers[i].mixer`` layout of the model.
Falcon-Mamba shares the layout and subclasses this adapter.
"""
from __future__ import annotations

import contextlib
import copy
from typing import ClassVar

import torch
import transformers
from torch import nn

from ..errors import PlanError
from ..plan import Component, PruningPlan
from . import register
from .base import Adapter
from .mamba1_core import (build_mixer, check_group_size, check_mixer, default_channel_group_size, layer_spec,
                          mask_mixer, mixer_components, pruned_mixer_weights)
from .mamba2_core import set_shedder, shedder_layers, sliced_state_dict


@register
class MambaAdapter(Adapter):
    architectures = ("MambaForCausalLM",)
    model_types = ("mamba",)
    kinds = ("block", "ssm", "channel_group")
    #: The stock ``transformers`` class ``build`` starts from.
    model_class: ClassVar[type[nn.Module]] = transformers.MambaForCausalLM
    layers_key: ClassVar[str] = "backbone.layers."

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
    def layers(self) -> nn.ModuleList:
        return self.model.backbone.layers

    def layer_kind(self, layer: int) -> str:
        return "mamba"

    def layer_components(self, layer: int) -> list[Component]:
        return [Component("block", layer)] + mixer_components(self.layers()[layer].mixer, layer, self.group_size)

    def check(self, plan: PruningPlan) -> None:
        by_layer = self.by_layer(plan)
        if len(plan.of_kind("block")) >= self.num_layers:
            raise PlanError(f"removing all {self.num_layers} blocks leaves no layers")
        for layer, comps in by_layer.items():
            if not any(c.kind == "block" for c in comps):
                check_mixer(self.layers()[layer].mixer, layer, comps, self.group_size)

    # ------------------------------------------------------------------ live masks
    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        mask_mixer(self.layers()[layer].mixer, comps, self.group_size, stack)

    # ------------------------------------------------------------------ extraction
    def pruned_config(self, plan: PruningPlan):
        by_layer = self.by_layer(plan)
        specs = [layer_spec(self.layers()[i].mixer, by_layer.get(i, []), self.group_size)
                 for i in self.kept_layers(plan)]
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = len(specs)  # layer_types follows (a property of num_hidden_layers)
        full = {"ssm": True, "intermediate_size": config.intermediate_size}
        set_shedder(config, None if all(spec == full for spec in specs) else {"layers": specs})
        return config

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        kept, by_layer = self.kept_layers(plan), self.by_layer(plan)
        replace = {i: {"mixer": pruned_mixer_weights(self.layers()[i].mixer, by_layer[i], self.group_size)}
                   for i in kept if i in by_layer}
        return sliced_state_dict(self.model.state_dict(), self.layers_key, kept, replace)

    @classmethod
    def build(cls, config) -> nn.Module:
        model = cls.model_class(config)
        layers = model.backbone.layers
        for layer, spec in zip(layers, shedder_layers(config, len(layers)) or []):
            layer.mixer = build_mixer(layer.mixer, spec)
        return model
