"""What Bamba and Granite 4.0-H share: every layer holds one token mixer, a Mamba-2 mixer
(``layer.mamba``) or self-attention (``layer.self_attn``), behind ``input_layernorm``, and then a
feed-forward. The kinds of the mixer half (``mixer``, ``ssm``, ``head``, ``attention``) mean the same
in both and are inventoried, checked, masked, specified and stated in a stock config here once; each
family keeps its feed-forward (Bamba's gated MLP; Granite's shared MLP with experts beside it), its
layer outputs and its config's layer list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import ClassVar

import torch
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import feed_forward, mamba2_mixer
from shedder.arch.base import Adapter
from shedder.arch.feed_forward import default_mlp_group_size
from shedder.arch.layers import check_attention_left, present, remove_sub_block, skip_sub_block, sliced_state_dict
from shedder.arch.mamba2_mixer import MixerLayout
from shedder.arch.spec import PrunedSpec
from shedder.arch.stock_shape import StockShape, adapter_shape, expand_for


class Mamba2HybridAdapter(Adapter):
    """Base of the families whose layers are "Mamba-2 or attention, then a feed-forward"."""

    #: The family's name in messages.
    family: ClassVar[str] = ""
    #: The config field of the feed-forward's (shared) MLP width.
    mlp_field: ClassVar[str] = "intermediate_size"

    def mlp_width_of(self, block: nn.Module) -> int:
        """Intermediate channels of ``block``'s MLP (0 when it was removed)."""
        raise NotImplementedError

    def check_feed_forward(self, layer: int, comps: list[Component]) -> None:
        """Refuse what the family's feed-forward cannot do with ``comps``."""
        raise NotImplementedError

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(getattr(self.config, self.mlp_field))}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.mamba_n_heads, config.mamba_n_groups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(getattr(config, cls.mlp_field)),
                                   heads_per_group=cls.stock_layout(config).heads_per_group)

    # ------------------------------------------------------------------ inventory
    @functools.cached_property
    def _structure(self) -> tuple[tuple[bool, bool, int], ...]:
        """(has a Mamba mixer, has attention, MLP width) per layer, read once from the modules (masks
        never change them); validation runs for every search candidate, so it must be cheap."""
        return tuple((present(getattr(block, "mamba", None)), present(getattr(block, "self_attn", None)),
                      self.mlp_width_of(block)) for block in self.layers())

    def has_mamba(self, layer: int) -> bool:
        return self._structure[layer][0]

    def has_attention(self, layer: int) -> bool:
        return self._structure[layer][1]

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of the layer's MLP (0 when it was removed)."""
        return self._structure[layer][2]

    def mamba(self, layer: int) -> nn.Module:
        return self.layers()[layer].mamba

    def layer_kind(self, layer: int) -> str:
        if self.has_mamba(layer):
            return "mamba"
        return "attention" if self.has_attention(layer) else "mlp"

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mamba(layer) or self.has_attention(layer):
            comps.append(Component("mixer", layer))
        if self.has_mamba(layer):
            comps += mamba2_mixer.components(layer, self.mamba(layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        width = self.mlp_width(layer)
        return comps + feed_forward.components(layer, width, self.mlp_group_size, has_sub_block=bool(width))

    def check(self, plan: PruningPlan) -> None:
        by_layer = self.by_layer(plan)
        for layer, comps in by_layer.items():
            if self.has_mamba(layer):
                mamba2_mixer.check(layer, self.mamba(layer), comps)
        check_attention_left(self.family, "attention layer", [i for i in range(self.num_layers) if self.has_attention(i)],
                             [c.layer for c in plan.components if c.kind in ("block", "mixer", "attention")])
        for layer, comps in by_layer.items():
            if any(c.kind == "block" for c in comps):
                continue
            if any(c.kind == "mixer" for c in comps):
                inside = [c for c in comps if c.kind in ("ssm", "head", "attention")]
                if inside:
                    raise PlanError(f"{inside[0]} is redundant: the mixer of layer {layer} is removed as a whole")
            self.check_feed_forward(layer, comps)

    # ------------------------------------------------------------------ live masks
    def mask_mixer(self, layer: int, kinds: set[str], comps: list[Component], stack: contextlib.ExitStack) -> None:
        """The mixer half of ``mask_layer``: heads / SSM inside the Mamba-2 mixer, or the whole mixer."""
        block = self.layers()[layer]
        if self.has_mamba(layer):
            mamba2_mixer.mask(block.mamba, comps, stack)  # ssm / head
        if "attention" in kinds or ("mixer" in kinds and self.has_attention(layer)):
            skip_sub_block(stack, block.self_attn, block.input_layernorm, returns_tuple=True, cache_slot=layer)
        elif "mixer" in kinds:
            skip_sub_block(stack, block.mamba, block.input_layernorm)

    # ------------------------------------------------------------------ extraction
    def mixer_fields(self, layer: int, comps: list[Component]) -> tuple[dict, bool]:
        """The mixer half of ``layer_spec``: its ``LayerSpec`` fields, and whether a mixer is left."""
        kinds = {c.kind for c in comps}
        mamba = self.has_mamba(layer) and "mixer" not in kinds
        has_mixer = mamba or (self.has_attention(layer) and not kinds & {"attention", "mixer"})
        fields = mamba2_mixer.spec_fields(self.mamba(layer), comps, self.stock_layout(self.config)) if mamba else {}
        if not has_mixer:  # built as a Mamba layer (``configure``) without its mixer
            fields["mamba"] = False
        return fields, has_mixer

    def feed_forward_state(self, layer: int, kinds: set[str], comps: list[Component]) -> dict:
        """The feed-forward's sliced or removed sub-blocks under ``comps`` (``sliced_state_dict``'s ``replace``)."""
        raise NotImplementedError

    @staticmethod
    def apply_feed_forward(block: nn.Module, spec) -> None:
        """Give ``block``'s feed-forward the shape ``spec`` asks for."""
        raise NotImplementedError

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace, by_layer = {}, self.by_layer(plan)
        for layer in self.layer_map(plan):
            comps = by_layer.get(layer, [])
            kinds = {c.kind for c in comps}
            mods = {}
            if self.has_mamba(layer):
                state = mamba2_mixer.pruned_state(self.mamba(layer), comps)
                if state is not None:
                    mods["mamba"] = state
            if "attention" in kinds:
                mods.update({"self_attn": {}, "input_layernorm": {}})
            if "mixer" in kinds:
                mods.update({"mamba": {}, "self_attn": {}, "input_layernorm": {}})
            mods.update(self.feed_forward_state(layer, kinds, comps))
            if mods:
                replace[layer] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.layer_map(plan), replace)

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        block = layers[index]
        mamba = present(getattr(block, "mamba", None))
        if not spec.mamba:
            remove_sub_block(block, "mamba" if mamba else "self_attn", "input_layernorm", returns_tuple=not mamba)
        elif mamba:
            block.mamba = mamba2_mixer.build(block.mamba, spec)
        cls.apply_feed_forward(block, spec)

    def stock_shape(self, config, spec: PrunedSpec) -> StockShape | None:
        """``spec``'s one shape, with the head count written into ``config`` (``mamba_n_heads``, and
        ``mamba_expand`` for the mixer width); ``None`` when the stock config cannot state it."""
        shape = adapter_shape(self, spec)
        expand = shape and expand_for(shape.inner(config.mamba_d_head), config.hidden_size)
        if shape is None or (shape.num_heads is not None and expand is None):
            return None
        if shape.num_heads is not None:
            config.mamba_n_heads, config.mamba_expand = shape.num_heads, expand
        setattr(config, self.mlp_field, shape.mlp or getattr(config, self.mlp_field))
        return shape
