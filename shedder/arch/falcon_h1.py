"""Falcon-H1 (``FalconH1ForCausalLM``): every layer runs attention and a Mamba-2 mixer in parallel.

A decoder layer computes, with muP multipliers (scalars from the config)::

    n = input_layernorm(h)
    h = h + ssm_out * mamba(n) + attn_out * self_attn(attn_in * n)
    h = h + feed_forward(pre_ff_layernorm(h))

Removing a component means:

* ``block`` — the whole layer is skipped: ``h = h``; extraction deletes it and renumbers the rest.
* ``attention`` — the attention term leaves the parallel sum: ``h = h + ssm_out * mamba(n)``; its
  projections go (``input_layernorm`` stays: the Mamba branch still reads it).
* ``ssm`` / ``head`` — the Mamba branch's SSD scan / one of its heads, as in Mamba-2, through the
  shared ``mamba2_mixer`` with Falcon-H1's hooks (below). Removing every head of a layer is refused
  (remove the block instead), so the Mamba branch never vanishes.
* ``mixer`` — the whole parallel mixer (Mamba and attention, with ``input_layernorm``) leaves, the
  MLP stays: ``h = h + feed_forward(pre_ff_layernorm(h))`` (the Hymba-style block removal of the
  official code, ``mask_hymba_block``). The layer's key/value slot only records the length.
* ``mlp`` — the feed-forward branch (with ``pre_ff_layernorm``) contributes nothing.
* ``mlp_channel_group`` — a group of MLP intermediate channels (gate/up rows, down columns); the
  gate / down multipliers stay as they are.

Falcon-H1's mixer differs from Mamba-2's in three places, handled by ``FALCON_H1_HOOKS`` (a
``mamba2_mixer.Mamba2Hooks`` value holding three functions, no copy of the forward): the input is scaled by
``ssm_in_multiplier`` and in_proj's output by the per-section muP vector (z, x, B, C, dt multipliers);
the gated RMSNorm is optional (``mamba_rms_norm``; without it ``y * silu(z)``) and normalises
*before* gating by default (``mamba_norm_before_gate``).

Cache: every Falcon-H1 layer has a hybrid cache slot (key/value + conv/SSM state), and
``transformers`` reads the sequence length from layer 0's key/value states. A removed attention
branch (and, in the live mask, a skipped block) therefore still records the length of what it has
seen, as a ``[batch, 1, seq, 1]`` placeholder, so generation with a cache stays correct.

Extracted models that only lose whole blocks have a stock config (``num_hidden_layers`` changed);
otherwise each kept layer's ``LayerSpec`` holds what differs from stock: ``attention=False``,
``mamba=False`` (no Mamba branch, no input norm), ``ssm`` / ``heads_per_group``, ``mlp`` (0 = none).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import feed_forward, mamba2_mixer
from shedder.arch.base import Adapter
from shedder.arch.feed_forward import default_mlp_group_size
from shedder.arch.layers import RemovedAttention, present, remove_sub_block, skip_layer, skip_sub_block, sliced_state_dict
from shedder.arch.mamba2_mixer import Mamba2Hooks, MixerLayout, Selection, gated_group_rms_norm
from shedder.arch.spec import LayerSpec, PrunedSpec
from shedder.arch.stock_shape import adapter_shape


# ------------------------------------------------------------------------------ mixer hooks
# Adapted from transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer.forward, v5.24
# (Falcon-H1's differences around the shared Mamba-2 forward, see the module docstring)
def _project(mixer, hidden_states, weight, bias, select: Selection | None):
    """[b, l, hidden] -> [b, l, rows]: ``in_proj(h * ssm_in) * mup`` on the selected rows."""
    mup = mixer.mup_vector  # [1, 1, rows of the mixer's own layout]
    if select is not None:
        mup = mup.index_select(-1, select.in_rows.to(mup.device))
    return F.linear(hidden_states * mixer.ssm_in_multiplier, weight, bias) * mup


def _gate_norm(mixer, y, gate, weight, layout: MixerLayout):
    """[b, l, H*P] -> same: ``y * silu(z)`` without the norm; else the grouped RMSNorm, applied
    before the gate (Falcon-H1's default) or after it (Mamba-2's order)."""
    if not mixer.mamba_rms_norm:
        return y * F.silu(gate)
    before = getattr(mixer, "norm_before_gate", None)  # pruned mixers hold it, stock ones on their norm
    if not (mixer.norm.norm_before_gate if before is None else before):
        return gated_group_rms_norm(y, gate, weight, mixer.norm.variance_epsilon, layout, mixer.head_dim)
    normed = gated_group_rms_norm(y, None, weight, mixer.norm.variance_epsilon, layout, mixer.head_dim)
    return (normed.float() * F.silu(gate.float())).to(y.dtype)


def _init_pruned(pruned: nn.Module, template: nn.Module) -> None:
    """Carry the multipliers over and give the pruned mixer its own muP vector (a non-persistent
    buffer, like the stock one): each kept row keeps its section's multiplier."""
    pruned.ssm_in_multiplier = template.ssm_in_multiplier
    pruned.mamba_rms_norm = template.mamba_rms_norm
    pruned.norm_before_gate = getattr(getattr(template, "norm", None), "norm_before_gate", True)
    inner, bc = template.intermediate_size, template.n_groups * template.ssm_state_size
    new_inner = pruned.intermediate_size
    sources = [torch.zeros(new_inner), torch.full((new_inner,), inner)]          # z, x sections
    if pruned.layout.ssm:
        new_bc = pruned.layout.n_groups * pruned.ssm_state_size
        sources += [torch.full((new_bc,), 2 * inner), torch.full((new_bc,), 2 * inner + bc),  # B, C
                    torch.full((pruned.num_heads,), 2 * inner + 2 * bc)]                        # dt
    index = torch.cat(sources).long().to(template.mup_vector.device)
    pruned.register_buffer("mup_vector", template.mup_vector.index_select(-1, index).clone(), persistent=False)


FALCON_H1_HOOKS = Mamba2Hooks(project=_project, gate_norm=_gate_norm, init_pruned=_init_pruned)


# ------------------------------------------------------------------------------------ adapter
class FalconH1Adapter(Adapter):
    architectures = ("FalconH1ForCausalLM",)
    model_types = ("falcon_h1",)
    kinds = ("block", "mixer", "attention", "ssm", "head", "mlp", "mlp_channel_group")
    stock_kinds = ("head", "mlp_channel_group")
    model_class = transformers.FalconH1ForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "mamba_n_heads", "mamba_d_head", "mamba_n_groups",
                                         "mamba_d_state", "mamba_d_ssm", "mamba_chunk_size", "mamba_d_conv",
                                         "mamba_expand", "num_attention_heads", "num_key_value_heads", "head_dim")

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.mamba_n_heads, config.mamba_n_groups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size),
                                   heads_per_group=cls.stock_layout(config).heads_per_group)

    # ------------------------------------------------------------------ inventory
    def layer_kind(self, layer: int) -> str:
        if self.has_attention(layer):
            return "hybrid"
        return "mamba" if self.has_mamba(layer) else "mlp"

    def mamba(self, layer: int) -> nn.Module:
        return self.layers()[layer].mamba

    def has_mamba(self, layer: int) -> bool:
        return present(self.layers()[layer].mamba)

    def has_attention(self, layer: int) -> bool:
        return present(self.layers()[layer].self_attn)

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of the layer's MLP (0 when it was removed)."""
        ff = self.layers()[layer].feed_forward
        return ff.gate_proj.out_features if present(ff) else 0

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mamba(layer):
            comps.append(Component("mixer", layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        if self.has_mamba(layer):
            comps += mamba2_mixer.components(layer, self.mamba(layer))
        width = self.mlp_width(layer)
        return comps + feed_forward.components(layer, width, self.mlp_group_size, has_sub_block=bool(width))

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if self.has_mamba(layer):  # head removals leave every group a head
                mamba2_mixer.check(layer, self.mamba(layer), comps)
        for layer, comps in self.by_layer(plan).items():
            feed_forward.check(layer, comps, self.mlp_width(layer), self.mlp_group_size)
            inside = [c for c in comps if c.kind in ("attention", "ssm", "head")]
            if inside and any(c.kind == "mixer" for c in comps):
                raise PlanError(f"{inside[0]} is redundant: the mixer of layer {layer} is removed as a whole")

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        # every layer has an attention cache slot; layers return a 1-tuple
        return skip_layer(layer, lambda h: (h,))

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        if self.has_mamba(layer):
            mamba2_mixer.mask(block.mamba, comps, stack, FALCON_H1_HOOKS)  # ssm / head
        if kinds & {"attention", "mixer"} and self.has_attention(layer):
            skip_sub_block(stack, block.self_attn, returns_tuple=True, cache_slot=layer)
        if "mixer" in kinds:
            skip_sub_block(stack, block.mamba, block.input_layernorm)
        feed_forward.mask(block, comps, self.mlp_width(layer), self.mlp_group_size, stack)

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec:
        kinds = {c.kind for c in comps}
        if "mixer" in kinds or not self.has_mamba(layer):
            fields = {"mamba": False}
        else:
            fields = mamba2_mixer.spec_fields(self.mamba(layer), comps, self.stock_layout(self.config))
        if not self.has_attention(layer) or kinds & {"attention", "mixer"}:
            fields["attention"] = False
        width = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
        if width != self.config.intermediate_size:
            fields["mlp"] = width
        return LayerSpec(**fields)

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        config.num_hidden_layers = len(spec.layers)
        shape = adapter_shape(self, spec)
        if shape is None:
            return False
        if shape.num_heads is not None:  # the config's own mixer width (mamba_d_ssm) says it
            config.mamba_n_heads, config.mamba_d_ssm = shape.num_heads, shape.inner(config.mamba_d_head)
        config.intermediate_size = shape.mlp or config.intermediate_size
        return True

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace, by_layer = {}, self.by_layer(plan)
        for layer in self.layer_map(plan):
            comps = by_layer.get(layer, [])
            kinds = {c.kind for c in comps}
            mods = {}
            if self.has_mamba(layer):
                state = mamba2_mixer.pruned_state(self.mamba(layer), comps, FALCON_H1_HOOKS)
                if state is not None:
                    mods["mamba"] = state
            if "attention" in kinds:
                mods["self_attn"] = {}  # input_layernorm also feeds the Mamba branch
            if "mixer" in kinds:
                mods.update({"mamba": {}, "self_attn": {}, "input_layernorm": {}})
            mods.update(feed_forward.pruned_state(self.layers()[layer], comps, self.mlp_width(layer),
                                                  self.mlp_group_size, removed="mlp" in kinds))
            if mods:
                replace[layer] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.layer_map(plan), replace)

    @classmethod
    def apply_layer(cls, layers, index, spec) -> None:
        block = layers[index]
        if not spec.attention:
            block.self_attn = RemovedAttention(index)
        if not spec.mamba:
            remove_sub_block(block, "mamba", "input_layernorm")
        else:
            block.mamba = mamba2_mixer.build(block.mamba, spec, FALCON_H1_HOOKS)
        if spec.mlp is not None:
            feed_forward.resize(block, spec.mlp)
