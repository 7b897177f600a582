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
  shared ``mamba2_core`` with Falcon-H1's hooks (below). Removing every head of a layer is refused
  (remove the block instead), so the Mamba branch never vanishes.
* ``mlp`` — the feed-forward branch (with ``pre_ff_layernorm``) contributes nothing.
* ``mlp_channel_group`` — a group of MLP intermediate channels (gate/up rows, down columns); the
  gate / down multipliers stay as they are.

Falcon-H1's mixer differs from Mamba-2's in three places, handled by ``FalconH1Hooks`` (an
additive extension of ``mamba2_core.Mamba2Hooks``, no copy of the forward): the input is scaled by
``ssm_in_multiplier`` and in_proj's output by the per-section muP vector (z, x, B, C, dt multipliers);
the gated RMSNorm is optional (``mamba_rms_norm``; without it ``y * silu(z)``) and normalises
*before* gating by default (``mamba_norm_before_gate``).

Cache: every Falcon-H1 layer has a hybrid cache slot (key/value + conv/SSM state), and
``transformers`` reads the sequence length from layer 0's key/value states. A removed attention
branch (and, in the live mask, a skipped block) therefore still records the length of what it has
seen, as a ``[batch, 1, seq, 1]`` placeholder, so generation with a cache stays correct.

Extracted models that only lose whole blocks have a stock config (``num_hidden_layers`` changed);
otherwise ``config.shedder = {"layers": [spec, ...]}``, one dict per kept layer holding what differs
from stock: ``"attention": false``, ``"mamba": MixerLayout.to_dict()``, ``"mlp": width`` (0 = none).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError, PlanError
from ..plan import Component, PruningPlan
from . import register
from .base import patch_forward
from .bamba import default_mlp_group_size
from .hybrid_common import (ZeroBranch, check_mlp_groups, kept_mlp_channels, mask_mlp_channels, mlp_groups,
                            pruned_mlp_state, remove_sub_block, resize_mlp, skip_sub_block)
from .mamba2 import Mamba2StyleAdapter
from .mamba2_core import (Mamba2Hooks, MixerLayout, PrunedMamba2Mixer, Selection, gated_group_rms_norm,
                          mixer_layout, sliced_state_dict, ssm_components)


# ------------------------------------------------------------------------------ mixer hooks
class FalconH1Hooks(Mamba2Hooks):
    """Falcon-H1's differences around the shared Mamba-2 forward (see the module docstring)."""

    def project(self, mixer, hidden_states, weight, bias, select: Selection | None):
        """[b, l, hidden] -> [b, l, rows]: ``in_proj(h * ssm_in) * mup`` on the selected rows."""
        mup = mixer.mup_vector  # [1, 1, rows of the mixer's own layout]
        if select is not None:
            mup = mup.index_select(-1, select.in_rows.to(mup.device))
        return F.linear(hidden_states * mixer.ssm_in_multiplier, weight, bias) * mup

    def gate_norm(self, mixer, y, gate, weight, layout: MixerLayout):
        """[b, l, H*P] -> same: ``y * silu(z)`` without the norm; else the grouped RMSNorm, applied
        before the gate (Falcon-H1's default) or after it (Mamba-2's order)."""
        if not mixer.mamba_rms_norm:
            return y * F.silu(gate)
        before = getattr(mixer, "norm_before_gate", None)  # pruned mixers hold it, stock ones on their norm
        if not (mixer.norm.norm_before_gate if before is None else before):
            return gated_group_rms_norm(y, gate, weight, mixer.norm.variance_epsilon, layout, mixer.head_dim)
        normed = gated_group_rms_norm(y, None, weight, mixer.norm.variance_epsilon, layout, mixer.head_dim)
        return (normed.float() * F.silu(gate.float())).to(y.dtype)

    def init_pruned(self, pruned: nn.Module, template: nn.Module) -> None:
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


FALCON_H1_HOOKS = FalconH1Hooks()


# ------------------------------------------------------------------------- removed attention
def record_length(cache, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Let a layer whose attention is gone still tell the cache how many tokens it has seen:
    append a [batch, 1, seq, 1] placeholder to its key/value slot (``transformers`` sizes masks and
    positions from the sequence length of the first attention slot, layer 0 in Falcon-H1)."""
    if cache is not None:
        b, s, _ = hidden_states.shape
        marker = hidden_states.new_zeros(b, 1, s, 1)
        cache.update(marker, marker, layer_idx)


def removed_attention_forward(layer_idx: int):
    """Forward of a removed attention branch: zero output, sequence length recorded in the cache."""
    def forward(hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        record_length(cache if cache is not None else past_key_values, layer_idx, hidden_states)
        return torch.zeros_like(hidden_states), None
    return forward


class RemovedAttention(ZeroBranch):
    """The attention branch of an extracted layer after ``attention`` removal: no parameters, zero
    output; records the sequence length in the cache (see ``record_length``)."""

    def __init__(self, layer_idx: int):
        super().__init__(returns_tuple=True)
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        return removed_attention_forward(self.layer_idx)(*args, **kwargs)


def _present(module) -> bool:
    return module is not None and not isinstance(module, ZeroBranch)


# ------------------------------------------------------------------------------------ adapter
@register
class FalconH1Adapter(Mamba2StyleAdapter):
    architectures = ("FalconH1ForCausalLM",)
    model_types = ("falcon_h1",)
    kinds = ("block", "attention", "ssm", "head", "mlp", "mlp_channel_group")
    hooks = FALCON_H1_HOOKS
    layer_prefix = "model.layers."
    mixer_name = "mamba"

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        super().__init__(model, group_sizes)
        self.group_sizes.setdefault("mlp_channel_group", default_mlp_group_size(self.config.intermediate_size))

    @property
    def group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    # ------------------------------------------------------------------ inventory
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_kind(self, layer: int) -> str:
        return "hybrid" if self.has_attention(layer) else "mamba"

    def has_attention(self, layer: int) -> bool:
        return _present(self.layers()[layer].self_attn)

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of the layer's MLP (0 when it was removed)."""
        ff = self.layers()[layer].feed_forward
        return ff.gate_proj.out_features if _present(ff) else 0

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        comps += ssm_components(layer, mixer_layout(self.mixer(layer)))
        width = self.mlp_width(layer)
        if width:
            comps.append(Component("mlp", layer))
            comps += [Component("mlp_channel_group", layer, g) for g in range(len(mlp_groups(width, self.group_size)))]
        return comps

    def check(self, plan: PruningPlan) -> None:
        super().check(plan)  # at least one layer kept; head removals leave every group a head
        for layer, comps in self.by_layer(plan).items():
            groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
            if not groups:
                continue
            if any(c.kind == "mlp" for c in comps):
                raise PlanError(f"mlp_channel_group:{layer}:{groups[0]} is redundant: the MLP of layer {layer} "
                                "is removed as a whole")
            check_mlp_groups(layer, self.mlp_width(layer), self.group_size, groups)

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        block = self.layers()[layer]

        def forward(hidden_states, *args, cache=None, past_key_values=None, **kwargs):  # layers return a 1-tuple
            record_length(cache if cache is not None else past_key_values, block.mamba.layer_idx, hidden_states)
            return (hidden_states,)
        return forward

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        super().mask_layer(layer, comps, stack)  # ssm / head
        block = self.layers()[layer]
        kinds = {c.kind for c in comps}
        if "attention" in kinds:
            patch_forward(block.self_attn, removed_attention_forward(block.self_attn.layer_idx), stack)
        if "mlp" in kinds:
            skip_sub_block(stack, block.feed_forward, block.pre_ff_layernorm)
        elif "mlp_channel_group" in kinds:
            mask_mlp_channels(block.feed_forward, self._kept_channels(layer, comps), stack)

    def _kept_channels(self, layer: int, comps) -> torch.Tensor:
        groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
        return kept_mlp_channels(self.mlp_width(layer), self.group_size, groups)

    # ------------------------------------------------------------------ extraction
    def _layer_spec(self, plan: PruningPlan, layer: int) -> dict:
        """What differs from a stock layer in kept layer ``layer`` after ``plan``."""
        config = self.config
        comps = [c for c in plan.components if c.layer == layer]
        kinds = {c.kind for c in comps}
        spec = {}
        if not self.has_attention(layer) or "attention" in kinds:
            spec["attention"] = False
        layout = self.new_layout(plan, layer)
        if layout != _stock_layout(config):
            spec["mamba"] = layout.to_dict()
        if "mlp" in kinds:
            width = 0
        elif "mlp_channel_group" in kinds:
            width = len(self._kept_channels(layer, comps))
        else:
            width = self.mlp_width(layer)
        if width != config.intermediate_size:
            spec["mlp"] = width
        return spec

    def pruned_config(self, plan: PruningPlan):
        config = copy.deepcopy(self.config)
        specs = [self._layer_spec(plan, i) for i in self.kept_layers(plan)]
        config.num_hidden_layers = len(specs)
        if any(specs):
            config.shedder = {"layers": specs}
        elif hasattr(config, "shedder"):
            del config.shedder
        return config

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        replace = self.mixer_replacements(plan)
        for layer in self.kept_layers(plan):
            comps = [c for c in plan.components if c.layer == layer]
            kinds = {c.kind for c in comps}
            mods = {}
            if "attention" in kinds:
                mods["self_attn"] = {}
            if "mlp" in kinds:
                mods.update({"feed_forward": {}, "pre_ff_layernorm": {}})
            elif "mlp_channel_group" in kinds:
                mods["feed_forward"] = pruned_mlp_state(self.layers()[layer].feed_forward, self._kept_channels(layer, comps))
            if mods:
                replace.setdefault(layer, {}).update(mods)
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, self.kept_layers(plan), replace)

    @classmethod
    def build(cls, config) -> nn.Module:
        from transformers import FalconH1ForCausalLM

        model = FalconH1ForCausalLM(config)
        specs = (getattr(config, "shedder", None) or {}).get("layers")
        if specs is None:
            return model
        layers = model.model.layers
        if len(specs) != len(layers):
            raise ModelLoadError(f"config.shedder describes {len(specs)} layers but num_hidden_layers is {len(layers)}")
        for i, (block, spec) in enumerate(zip(layers, specs)):
            if spec.get("attention", True) is False:
                block.self_attn = RemovedAttention(i)
            if "mamba" in spec:
                template = block.mamba
                if not config.mamba_rms_norm:
                    template.norm = None  # nn.Identity: the pruned mixer gets no norm module at all
                block.mamba = PrunedMamba2Mixer(template, MixerLayout.from_dict(spec["mamba"]), cls.hooks)
            if "mlp" in spec:
                if spec["mlp"]:
                    resize_mlp(block.feed_forward, int(spec["mlp"]))
                else:
                    remove_sub_block(block, "feed_forward", "pre_ff_layernorm")
        return model


def _stock_layout(config) -> MixerLayout:
    return MixerLayout((config.mamba_n_heads // config.mamba_n_groups,) * config.mamba_n_groups)
