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

from ..errors import ModelLoadError, PlanError
from ..plan import Component, PruningPlan
from . import register
from .base import Adapter
from .mamba1_core import (build_mixer, check_group_size, check_mixer, default_channel_group_size, layer_spec,
                          mask_mixer, mixer_components, pruned_mixer_weights)


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
    def _kept(self, plan: PruningPlan) -> list[int]:
        removed = {c.layer for c in plan.of_kind("block")}
        return [i for i in range(self.num_layers) if i not in removed]

    def pruned_config(self, plan: PruningPlan):
        by_layer = self.by_layer(plan)
        specs = [layer_spec(self.layers()[i].mixer, by_layer.get(i, []), self.group_size) for i in self._kept(plan)]
        config = copy.deepcopy(self.config)
        config.num_hidden_layers = len(specs)  # layer_types follows (a property of num_hidden_layers)
        full = {"ssm": True, "intermediate_size": config.intermediate_size}
        if all(spec == full for spec in specs):
            if hasattr(config, "shedder"):
                del config.shedder
        else:
            config.shedder = {"layers": specs}
        return config

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        by_layer = self.by_layer(plan)
        prefix = self.layers_key
        out = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        for new, old in enumerate(self._kept(plan)):
            layer = self.layers()[old]
            for name, tensor in layer.state_dict().items():
                if not name.startswith("mixer."):
                    out[f"{prefix}{new}.{name}"] = tensor
            for name, tensor in pruned_mixer_weights(layer.mixer, by_layer.get(old, []), self.group_size).items():
                out[f"{prefix}{new}.mixer.{name}"] = tensor
        return out

    @classmethod
    def build(cls, config) -> nn.Module:
        model = cls.model_class(config)
        specs = (getattr(config, "shedder", None) or {}).get("layers")
        if specs is not None:
            layers = model.backbone.layers
            if len(specs) != len(layers):
                raise ModelLoadError(f"config.shedder describes {len(specs)} layers but num_hidden_layers is {len(layers)}")
            for layer, spec in zip(layers, specs):
                layer.mixer = build_mixer(layer.mixer, spec)
        return model
