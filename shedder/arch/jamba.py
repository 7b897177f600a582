"""Jamba (``JambaForCausalLM``): Mamba-1 layers and attention layers, each followed by a dense MLP
or a mixture-of-experts feed-forward.

A decoder layer computes ``h = h + mixer(input_layernorm(h)); h = h + feed_forward(pre_ff_layernorm(h))``
with ``mixer`` a Mamba-1 mixer with dt/B/C RMS norms (``layer.mamba``) or self-attention
(``layer.self_attn``), and ``feed_forward`` a ``JambaMLP`` or a ``JambaSparseMoeBlock``. The config
places them by period / offset (``attn_layer_period``/``_offset``, ``expert_layer_period``/``_offset``).
Removing a component means:

* ``block`` — the whole layer is skipped: ``h = h``; extraction deletes it and renumbers the rest.
* ``ssm`` / ``channel_group`` (Mamba layers) — as in Mamba-1, through ``mamba1_mixer``: the selective
  scan replaced by ``y = x * silu(z)`` / a group of inner channels gone.
* ``attention`` (attention layers) — the attention branch contributes nothing; its projections and
  ``input_layernorm`` go.
* ``mixer`` (every layer with one) — the token mixer (Mamba-1 or attention) with ``input_layernorm``
  contributes nothing, the feed-forward stays (on an attention layer the same as ``attention``).
* ``mlp`` (every layer) — the feed-forward branch, dense MLP or the whole MoE (router and all
  experts), contributes nothing; with ``pre_ff_layernorm`` it goes.
* ``mlp_channel_group`` (dense-MLP layers only) — a group of MLP intermediate channels. Experts are
  left whole: an expert's channels are not a structure the router knows about.
* ``expert`` (MoE layers) — one expert with its router row (``experts``): the router's softmax and
  top-k run over the others; at least ``num_experts_per_tok`` stay.

Cache: ``transformers`` reads the sequence length (for masks and positions) from the first
attention layer's key/value slot, and a Jamba with no attention layer at all cannot run with a cache.
So a removed attention branch (and, in the live mask, a skipped attention block) records the length
of what it has seen as a ``[batch, 1, seq, 1]`` placeholder, and extraction never deletes the last
attention-type layer: if a plan removes them all, the first one stays as a parameterless layer
(no attention, no feed-forward) that only does this bookkeeping — the same function and parameter
count as deleting it. Other layers left with neither mixer nor feed-forward are deleted.

Extracted models that only lose whole blocks, and whose remaining layer pattern a period / offset
pair still describes, have a stock config. Otherwise every kept layer's ``LayerSpec`` holds its
``type`` (``"mamba"`` / ``"attention"``), ``moe``, and what differs from stock: ``ssm`` / ``inner``,
``mamba=False`` (a Mamba layer without its mixer), ``attention=False``, ``mlp`` (0 = no
feed-forward), ``experts`` (experts kept). ``build`` then builds from a ``PatternJambaConfig`` (a Jamba config whose layer
pattern is given per layer, constructed from the saved one) so the stock model classes, masks and
cache follow the pattern.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch.base import Adapter
from shedder.arch import experts, feed_forward
from shedder.arch.feed_forward import default_mlp_group_size
from shedder.arch.layers import RemovedAttention, present, remove_sub_block, skip_layer, skip_sub_block, sliced_state_dict
from shedder.arch.mamba1_mixer import (build_mixer, check_group_size, check_mixer, default_channel_group_size, mask_mixer,
                                       mixer_components, mixer_spec, pruned_mixer_weights)
from shedder.arch.spec import LayerSpec, PrunedSpec

_MIXER_KINDS = ("ssm", "channel_group")


class PatternJambaConfig(transformers.JambaConfig):
    """A Jamba config whose layer pattern is given per layer (``PrunedSpec``'s ``type`` / ``moe``)
    instead of by the period / offset fields, which cannot describe an arbitrary pattern. ``build``
    constructs one from the saved config; it saves as a plain Jamba config.json."""

    def __init__(self, pattern: tuple[tuple[str, bool], ...] = (), **kwargs):
        super().__init__(**kwargs)
        self._pattern = tuple(pattern)

    def to_dict(self):
        return {k: v for k, v in super().to_dict().items() if k != "_pattern"}

    @property
    def layers_block_type(self):
        return [t for t, _ in self._pattern] if self._pattern else super().layers_block_type

    @property
    def layers_num_experts(self):
        return [self.num_experts if moe else 1 for _, moe in self._pattern] if self._pattern else super().layers_num_experts


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


class JambaAdapter(Adapter):
    architectures = ("JambaForCausalLM",)
    model_types = ("jamba",)
    kinds = ("block", "mixer", "ssm", "channel_group", "attention", "mlp", "mlp_channel_group", "expert")
    model_class = transformers.JambaForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                                         "mamba_dt_rank", "num_attention_heads", "num_key_value_heads", "num_experts",
                                         "num_experts_per_tok", "attn_layer_period", "expert_layer_period")

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        super().__init__(model, group_sizes)
        mixers = [self.layers()[i].mamba for i in range(self.num_layers) if self.is_mamba(i)]
        inner = self.config.mamba_expand * self.config.hidden_size
        self.group_sizes.setdefault("channel_group", default_channel_group_size(inner, [m.intermediate_size for m in mixers]))
        for i in range(self.num_layers):
            if self.is_mamba(i):
                check_group_size(self.layers()[i].mamba, i, self.group_sizes["channel_group"])

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    # ------------------------------------------------------------------ inventory
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

    def moe(self, layer: int) -> nn.Module | None:
        """The layer's mixture of experts (None: a dense MLP, or removed)."""
        ff = self.layers()[layer].feed_forward
        return ff if present(ff) and hasattr(ff, "router") else None

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
        return (comps + feed_forward.components(layer, self.mlp_width(layer), self.mlp_group_size,
                                                has_sub_block=present(block.feed_forward))
                + experts.components(layer, self.moe(layer)))

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if any(c.kind == "block" for c in comps):
                continue
            if any(c.kind == "mixer" for c in comps):
                inside = [c for c in comps if c.kind in ("attention",) + _MIXER_KINDS]
                if inside:
                    raise PlanError(f"{inside[0]} is redundant: the mixer of layer {layer} is removed as a whole")
            elif self.has_mamba(layer):
                check_mixer(self.layers()[layer].mamba, layer, comps, self.group_sizes["channel_group"])
            feed_forward.check(layer, comps, self.mlp_width(layer), self.mlp_group_size)
            gone = [c for c in comps if c.kind == "expert"]
            if gone and any(c.kind == "mlp" for c in comps):
                raise PlanError(f"{gone[0]} is redundant: the MLP of layer {layer} is removed as a whole")
            experts.check(layer, self.moe(layer), comps)

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
        feed_forward.mask(block, comps, self.mlp_width(layer), self.mlp_group_size, stack)
        if self.moe(layer) is not None and "mlp" not in kinds:
            experts.mask(block.feed_forward, comps, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component], emptied: bool = False) -> LayerSpec | None:
        """``emptied``: the layer is kept only as the cache's length recorder, with nothing inside."""
        config = self.config
        kinds = {c.kind for c in comps}
        fields = {"type": "mamba" if self.is_mamba(layer) else "attention", "moe": self.is_moe(layer)}
        if self.is_mamba(layer):
            if "mixer" in kinds or not self.has_mamba(layer):
                fields["mamba"] = False
            else:
                fields.update(mixer_spec(self.layers()[layer].mamba, comps, self.group_sizes["channel_group"],
                                         config.mamba_expand * config.hidden_size))
        elif emptied or not self.has_attention(layer) or kinds & {"attention", "mixer"}:
            fields["attention"] = False
        if emptied or "mlp" in kinds or not present(self.layers()[layer].feed_forward):
            fields["mlp"] = 0
        elif "mlp_channel_group" in kinds:
            fields["mlp"] = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
        elif not fields["moe"] and self.mlp_width(layer) != config.intermediate_size:
            fields["mlp"] = self.mlp_width(layer)
        moe = self.moe(layer)
        if fields.get("mlp") != 0 and moe is not None and experts.kept_count(moe, comps) != config.num_experts:
            fields["experts"] = experts.kept_count(moe, comps)
        if not emptied and False in (fields.get("attention", True), fields.get("mamba", True)) and fields.get("mlp") == 0:
            return None  # a layer with nothing left computes the identity
        return LayerSpec(**fields)

    def cache_anchor_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not self.is_mamba(i)]

    def emptied_anchor_spec(self, layer: int) -> LayerSpec:
        return self.layer_spec(layer, [], emptied=True)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        attn = period_offset([s.type == "attention" for s in spec.layers], (config.attn_layer_period, config.attn_layer_offset))
        moe = period_offset([s.moe for s in spec.layers], (config.expert_layer_period, config.expert_layer_offset))
        if attn is None or moe is None or not all(s.stock for s in spec.layers):
            return False
        config.attn_layer_period, config.attn_layer_offset = attn
        config.expert_layer_period, config.expert_layer_offset = moe
        return True

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), inner=config.mamba_expand * config.hidden_size,
                                   mlp=int(config.intermediate_size), experts=int(config.num_experts))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace, by_layer = {}, self.by_layer(plan)
        spec = self.pruned_spec(plan)
        for s in spec.layers:
            old = s.source
            comps = [c for c in by_layer.get(old, []) if c.kind != "block"]
            mods = {}
            if self.is_mamba(old) and any(c.kind in _MIXER_KINDS for c in comps):
                mods["mamba"] = pruned_mixer_weights(self.layers()[old].mamba, comps, self.group_sizes["channel_group"])
            if not s.attention:
                mods.update({"self_attn": {}, "input_layernorm": {}})
            if not s.mamba:
                mods.update({"mamba": {}, "input_layernorm": {}})
            mods.update(feed_forward.pruned_state(self.layers()[old], comps, self.mlp_width(old), self.mlp_group_size,
                                                  removed=s.mlp == 0))
            if s.mlp != 0 and any(c.kind == "expert" for c in comps):
                mods["feed_forward"] = experts.pruned_state(self.layers()[old].feed_forward, comps)
            if mods:
                replace[old] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, spec.layer_map(), replace)

    @classmethod
    def stock_model(cls, config, spec: PrunedSpec | None) -> nn.Module:
        if spec is None or all(s.type is None for s in spec.layers):
            return transformers.JambaForCausalLM(config)
        pattern = tuple((s.type, bool(s.moe)) for s in spec.layers)
        return transformers.JambaForCausalLM(PatternJambaConfig(pattern=pattern, **config.to_dict()))

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        block = layers[index]
        if hasattr(block, "mamba") and not spec.mamba:
            remove_sub_block(block, "mamba", "input_layernorm")
        elif hasattr(block, "mamba"):
            block.mamba = build_mixer(block.mamba, spec)
        if not spec.attention:
            block.self_attn = RemovedAttention(index)
            block.input_layernorm = nn.Identity()
        if spec.mlp is not None:
            feed_forward.resize(block, spec.mlp)
        if spec.experts is not None:
            experts.resize(block.feed_forward, spec.experts)
