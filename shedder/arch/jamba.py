"""Jamba (``JambaForCausalLM``): Mamba-1 layers and attention layers, each followed by a dense MLP
or a mixture-of-experts feed-forward.

A decoder layer computes ``h = h + mixer(input_layernorm(h)); h = h + feed_forward(pre_ff_layernorm(h))``
with ``mixer`` a Mamba-1 mixer with dt/B/C RMS norms (``layer.mamba``) or self-attention
(``layer.self_attn``), and ``feed_forward`` a ``JambaMLP`` or a ``JambaSparseMoeBlock``. The config
places them by period / offset (``attn_layer_period``/``_offset``, ``expert_layer_period``/``_offset``).
Removing a component means:

* ``block`` — the whole layer is skipped: ``h = h``; extraction deletes it and renumbers the rest.
* ``ssm`` / ``channel_group`` (Mamba layers) — as in Mamba-1, through ``mamba1_core``: the selective
  scan replaced by ``y = x * silu(z)`` / a group of inner channels gone.
* ``attention`` (attention layers) — the attention branch contributes nothing; its projections and
  ``input_layernorm`` go.
* ``mixer`` (every layer with one) — the token mixer (Mamba-1 or attention) with ``input_layernorm``
  contributes nothing, the feed-forward stays (on an attention layer the same as ``attention``).
* ``mlp`` (every layer) — the feed-forward branch, dense MLP or the whole MoE (router and all
  experts), contributes nothing; with ``pre_ff_layernorm`` it goes.
* ``mlp_channel_group`` (dense-MLP layers only) — a group of MLP intermediate channels. Experts are
  left whole: an expert's channels are not a structure the router knows about, so MoE layers offer
  only ``mlp``.

Cache: ``transformers`` reads the sequence length (for masks and positions) from the first
attention layer's key/value slot, and a Jamba with no attention layer at all cannot run with a cache.
So a removed attention branch (and, in the live mask, a skipped attention block) records the length
of what it has seen as a ``[batch, 1, seq, 1]`` placeholder, and extraction never deletes the last
attention-type layer: if a plan removes them all, the first one stays as a parameterless layer
(no attention, no feed-forward) that only does this bookkeeping — the same function and parameter
count as deleting it. Other layers left with neither mixer nor feed-forward are deleted.

Extracted models that only lose whole blocks, and whose remaining layer pattern a period / offset
pair still describes, have a stock config. Otherwise ``config.shedder = {"layers": [spec, ...]}``
with one dict per kept layer: ``"type"`` (``"mamba"`` / ``"attention"``), ``"moe"`` (bool), and
what differs from stock: ``"mamba": {"ssm", "intermediate_size"}``, ``"mixer": false`` (a Mamba layer
without its mixer), ``"attention": false``,
``"mlp": width`` (0 = no feed-forward). ``build`` then gives the config a per-layer pattern
(``ShedderJambaConfig``) so the stock model classes, masks and cache follow it.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from transformers import JambaConfig

from ..errors import PlanError
from ..plan import Component, PruningPlan
from . import register
from .base import Adapter
from .hybrid_common import (FeedForwardGroups, RemovedAttention, mlp_groups, present, remove_sub_block,
                            resize_feed_forward, skip_layer, skip_sub_block)
from .mamba1_core import (build_mixer, check_group_size, check_mixer, default_channel_group_size, layer_spec,
                          mask_mixer, mixer_components, pruned_mixer_weights)
from .mamba2_core import set_shedder, shedder_layers, sliced_state_dict

_MIXER_KINDS = ("ssm", "channel_group")


class ShedderJambaConfig(JambaConfig):
    """A Jamba config whose layer pattern comes from ``shedder["layers"]`` instead of the period /
    offset fields (which cannot describe an arbitrary pattern). Only ``build`` creates it; saved, it
    is a plain Jamba config.json with the ``shedder`` entry."""

    def _specs(self):
        return (getattr(self, "shedder", None) or {}).get("layers")

    @property
    def layers_block_type(self):
        specs = self._specs()
        return super().layers_block_type if specs is None else [s["type"] for s in specs]

    @property
    def layers_num_experts(self):
        specs = self._specs()
        return super().layers_num_experts if specs is None else [self.num_experts if s["moe"] else 1 for s in specs]


def period_offset(flags: list[bool], prefer: tuple[int, int]) -> tuple[int, int] | None:
    """A (period, offset) with ``flags[i] == (i % period == offset)`` for every layer, ``prefer`` when
    it fits; None if no pair describes the pattern. A period longer than the model expresses "none"
    (offset past the end) and "only layer k"."""
    n = len(flags)
    candidates = [prefer] + [(p, o) for p in range(1, n + 2) for o in range(p)]
    for period, offset in candidates:
        if offset < period and all(f == (i % period == offset) for i, f in enumerate(flags)):
            return period, offset
    return None


@register
class JambaAdapter(FeedForwardGroups, Adapter):
    architectures = ("JambaForCausalLM",)
    model_types = ("jamba",)
    kinds = ("block", "mixer", "ssm", "channel_group", "attention", "mlp", "mlp_channel_group")
    layer_prefix = "model.layers."

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        super().__init__(model, group_sizes)
        mixers = [self.layers()[i].mamba for i in range(self.num_layers) if self.is_mamba(i)]
        inner = self.config.mamba_expand * self.config.hidden_size
        self.group_sizes.setdefault("channel_group", default_channel_group_size(inner, [m.intermediate_size for m in mixers]))
        for i in range(self.num_layers):
            if self.is_mamba(i):
                check_group_size(self.layers()[i].mamba, i, self.group_sizes["channel_group"])

    # ------------------------------------------------------------------ inventory
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def is_mamba(self, layer: int) -> bool:
        return hasattr(self.layers()[layer], "mamba")

    def has_attention(self, layer: int) -> bool:
        return present(getattr(self.layers()[layer], "self_attn", None))

    def has_mamba(self, layer: int) -> bool:
        """A Mamba layer that still has its mixer."""
        return present(getattr(self.layers()[layer], "mamba", None))

    def is_moe(self, layer: int) -> bool:
        """Whether the layer was built with an MoE feed-forward (present or removed)."""
        return self.config.layers_num_experts[layer] > 1

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of a dense MLP (0 for an MoE or a removed feed-forward)."""
        ff = self.layers()[layer].feed_forward
        return ff.gate_proj.out_features if present(ff) and hasattr(ff, "gate_proj") else 0

    def layer_kind(self, layer: int) -> str:
        if self.is_mamba(layer):
            return "mamba"
        if self.has_attention(layer) or not present(self.layers()[layer].feed_forward):
            return "attention"
        return "moe" if self.is_moe(layer) else "mlp"

    def layer_components(self, layer: int) -> list[Component]:
        block = self.layers()[layer]
        comps = [Component("block", layer)]
        if self.has_mamba(layer) or self.has_attention(layer):
            comps.append(Component("mixer", layer))
        if self.has_mamba(layer):
            comps += mixer_components(block.mamba, layer, self.group_sizes["channel_group"])
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        if present(block.feed_forward):
            comps.append(Component("mlp", layer))
            width = self.mlp_width(layer)
            groups = len(mlp_groups(width, self.mlp_group_size)) if width else 0
            comps += [Component("mlp_channel_group", layer, g) for g in range(groups)]
        return comps

    def check(self, plan: PruningPlan) -> None:
        if len(plan.of_kind("block")) >= self.num_layers:
            raise PlanError(f"the plan removes all {self.num_layers} layers; nothing would be left of the model")
        for layer, comps in self.by_layer(plan).items():
            if any(c.kind == "block" for c in comps):
                continue
            if any(c.kind == "mixer" for c in comps):
                inside = [c for c in comps if c.kind in ("attention",) + _MIXER_KINDS]
                if inside:
                    raise PlanError(f"{inside[0]} is redundant: the mixer of layer {layer} is removed as a whole")
            elif self.has_mamba(layer):
                check_mixer(self.layers()[layer].mamba, layer, comps, self.group_sizes["channel_group"])
            self.check_feed_forward(layer, comps)

    # ------------------------------------------------------------------ live masks
    def _attention_idx(self, layer: int) -> int | None:
        """The cache slot an attention-type layer writes (None for Mamba layers)."""
        return None if self.is_mamba(layer) else self.layers()[layer].self_attn.layer_idx

    def skip_forward(self, layer: int):
        return skip_layer(self._attention_idx(layer))  # layers return a tensor

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        if kinds & set(_MIXER_KINDS):
            mask_mixer(block.mamba, comps, self.group_sizes["channel_group"], stack)
        if "attention" in kinds or ("mixer" in kinds and self.has_attention(layer)):
            skip_sub_block(stack, block.self_attn, block.input_layernorm, returns_tuple=True,
                           cache_slot=block.self_attn.layer_idx)
        elif "mixer" in kinds:
            skip_sub_block(stack, block.mamba, block.input_layernorm)
        self.mask_feed_forward(layer, comps, stack)

    # ------------------------------------------------------------------ extraction
    def _spec(self, plan: PruningPlan, layer: int, emptied: bool = False) -> dict:
        """The kept layer ``layer`` after ``plan`` (``emptied``: kept only as the cache's length
        recorder, with nothing inside)."""
        config = self.config
        comps = [c for c in plan.components if c.layer == layer and c.kind != "block"]
        kinds = {c.kind for c in comps}
        spec = {"type": "mamba" if self.is_mamba(layer) else "attention", "moe": self.is_moe(layer)}
        if self.is_mamba(layer):
            if "mixer" in kinds or not self.has_mamba(layer):
                spec["mixer"] = False
            else:
                mixer = layer_spec(self.layers()[layer].mamba, comps, self.group_sizes["channel_group"])
                if mixer != {"ssm": True, "intermediate_size": config.mamba_expand * config.hidden_size}:
                    spec["mamba"] = mixer
        elif emptied or not self.has_attention(layer) or kinds & {"attention", "mixer"}:
            spec["attention"] = False
        if emptied or "mlp" in kinds or not present(self.layers()[layer].feed_forward):
            spec["mlp"] = 0
        elif "mlp_channel_group" in kinds:
            spec["mlp"] = len(self.mlp_kept_channels(layer, comps))
        elif not spec["moe"] and self.mlp_width(layer) != config.intermediate_size:
            spec["mlp"] = self.mlp_width(layer)
        return spec

    def _kept_specs(self, plan: PruningPlan) -> list[tuple[int, dict]]:
        """(old index, spec) of every layer the extracted model keeps, in order."""
        blocks = {c.layer for c in plan.of_kind("block")}
        kept = []
        for i in range(self.num_layers):
            if i in blocks:
                continue
            spec = self._spec(plan, i)
            if False in (spec.get("attention", True), spec.get("mixer", True)) and spec.get("mlp") == 0:
                continue  # a layer with nothing left computes the identity
            kept.append((i, spec))
        attention_layers = [i for i in range(self.num_layers) if not self.is_mamba(i)]
        if attention_layers and not any(spec["type"] == "attention" for _, spec in kept):
            first = attention_layers[0]
            kept = sorted(kept + [(first, self._spec(plan, first, emptied=True))])
        return kept

    def kept_layers(self, plan: PruningPlan) -> list[int]:
        return [old for old, _ in self._kept_specs(plan)]

    def pruned_config(self, plan: PruningPlan):
        config = copy.deepcopy(self.config)
        specs = [spec for _, spec in self._kept_specs(plan)]
        config.num_hidden_layers = len(specs)
        attn = period_offset([s["type"] == "attention" for s in specs], (config.attn_layer_period, config.attn_layer_offset))
        moe = period_offset([s["moe"] for s in specs], (config.expert_layer_period, config.expert_layer_offset))
        stock = attn is not None and moe is not None and all(set(s) == {"type", "moe"} for s in specs)
        if stock:
            config.attn_layer_period, config.attn_layer_offset = attn
            config.expert_layer_period, config.expert_layer_offset = moe
        set_shedder(config, None if stock else {"layers": specs})
        return config

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace = {}
        for old, spec in self._kept_specs(plan):
            comps = [c for c in plan.components if c.layer == old and c.kind != "block"]
            mods = {}
            if "mamba" in spec:
                mods["mamba"] = pruned_mixer_weights(self.layers()[old].mamba, comps, self.group_sizes["channel_group"])
            if spec.get("attention", True) is False:
                mods.update({"self_attn": {}, "input_layernorm": {}})
            if spec.get("mixer", True) is False:
                mods.update({"mamba": {}, "input_layernorm": {}})
            mods.update(self.feed_forward_state(old, comps, removed=spec.get("mlp") == 0))
            if mods:
                replace[old] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.kept_layers(plan), replace)

    @classmethod
    def build(cls, config) -> nn.Module:
        from transformers import JambaForCausalLM

        specs = shedder_layers(config, config.num_hidden_layers)
        if specs is None:
            return JambaForCausalLM(config)
        config = copy.deepcopy(config)
        config.__class__ = ShedderJambaConfig
        model = JambaForCausalLM(config)
        for i, (block, spec) in enumerate(zip(model.model.layers, specs)):
            if spec.get("mixer", True) is False:
                remove_sub_block(block, "mamba", "input_layernorm")
            elif "mamba" in spec:
                block.mamba = build_mixer(block.mamba, spec["mamba"])
            if spec.get("attention", True) is False:
                block.self_attn = RemovedAttention(i)
                block.input_layernorm = nn.Identity()
            if "mlp" in spec:
                resize_feed_forward(block, int(spec["mlp"]))
        return model

