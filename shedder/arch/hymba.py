"""Hymba (``HymbaForCausalLM``, our own implementation in ``hymba_model``): the official Hymba kinds.

A layer computes ``h = h + mamba(input_layernorm(h))`` with ``mamba`` the Hymba block (attention and
SSM heads in parallel, each normalised, averaged, projected), then ``h = h + moe(pre_moe_layernorm(h))``
(the FFN). Removing a component means, as the official ``hybrid/Hymba-Pruning`` masks do:

* ``block`` — the whole layer is skipped, ``h = h``; extraction deletes it.
* ``mixer`` — the Hymba block (``pruned_hymba_block_idx``, ``mask_hymba_block``): the block and its
  input norm go, the FFN stays.
* ``attention`` — the attention heads (``pruned_self_attn_idx``): the SSM branch alone feeds
  ``out_proj``, ``out_proj(pre_avg_layernorm2(ssm))`` (no average). The q rows and
  ``pre_avg_layernorm1`` go.
* ``ssm`` — the SSM heads (``pruned_ssm_idx``): ``out_proj(pre_avg_layernorm1(attn))``. The x and z
  rows of ``in_proj``, conv1d, x_proj, dt_proj, A, D, the dt/B/C norms and ``pre_avg_layernorm2`` go
  (the official extraction keeps conv1d and the x / z rows, which then compute nothing used).
* ``mlp`` — the FFN (``pruned_moe_idx``) with its norm.
* ``mlp_channel_group`` — a group of FFN channels (``pruned_mlp_channels`` gives remaining widths).

Removing both branches of one layer is refused (the official code then feeds ``out_proj`` with the
conv output, which is neither branch; remove the ``mixer`` instead).

Cross-layer KV sharing: a producer layer's keys and values feed its consumers. Removing a producer's
attention keeps its key / value rows, so the consumers still attend to them (the official mask does
the same: the attention still runs, its output is dropped). Removing a producer's ``block`` or
``mixer`` while a consumer still attends is refused, naming the consumers (the official code fails
there). The extracted config renumbers ``kv_reuse_group`` and ``global_attn_idx``; consumers that lost
their attention leave their group, and a producer left without attending consumers, whose attention
was removed, loses its key / value rows.

Extracted models whose kept layers are all stock have a stock Hymba config (layers deleted,
groups renumbered); otherwise the ``shedder`` section holds ``attention``/``ssm``/``mixer``/``mlp``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch.base import Adapter, patch_forward
from shedder.arch.feed_forward import (check_mlp_groups, default_mlp_group_size, kept_mlp_channels, l1_reorder,
                                       mask_mlp_channels, mlp_width_after, num_mlp_groups, pruned_mlp_state, resize_mlp)
from shedder.arch.hymba_model import HymbaBlock, HymbaForCausalLM
from shedder.arch.layers import present, remove_sub_block, skip_sub_block, sliced_state_dict
from shedder.arch.spec import LayerSpec, PrunedSpec

_SECTIONS = ("q", "k", "v", "x", "z")
#: The SSM branch's modules inside a Hymba block (the official extraction's ``SSM_MODULES``, and conv1d).
_SSM_MODULES = ("conv1d", "x_proj", "dt_proj", "A_log", "D", "dt_layernorm", "B_layernorm", "C_layernorm",
                "pre_avg_layernorm2")


def _masked_block(block: HymbaBlock, attention: bool, ssm: bool):
    def forward(hidden_states, context):
        return HymbaBlock.forward(block, hidden_states, context, attention=attention, ssm=ssm)
    return forward


class HymbaAdapter(Adapter):
    architectures = ("HymbaForCausalLM",)
    model_types = ("hymba",)
    kinds = ("block", "mixer", "attention", "ssm", "mlp", "mlp_channel_group")
    official_keys = {"pruned_hymba_block_idx": "mixer", "pruned_self_attn_idx": "attention",
                     "pruned_ssm_idx": "ssm", "pruned_moe_idx": "mlp"}
    lora_targets = ("in_proj", "out_proj", "up_proj", "down_proj")
    model_class = HymbaForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "num_attention_heads", "num_key_value_heads",
                                         "mamba_d_state", "mamba_d_conv", "mamba_dt_rank", "num_memory_tokens")

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    # ------------------------------------------------------------------ inventory
    def block(self, layer: int):
        return self.layers()[layer].mamba

    def has_mixer(self, layer: int) -> bool:
        return present(self.block(layer))

    def has_attention(self, layer: int) -> bool:
        return self.has_mixer(layer) and self.block(layer).attention

    def has_ssm(self, layer: int) -> bool:
        return self.has_mixer(layer) and self.block(layer).ssm

    def mlp_width(self, layer: int) -> int:
        moe = self.layers()[layer].moe
        return moe.experts[0].intermediate_size if present(moe) else 0

    def layer_kind(self, layer: int) -> str:
        return "hybrid" if self.has_mixer(layer) else "mlp"

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mixer(layer):
            comps.append(Component("mixer", layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        if self.has_ssm(layer):
            comps.append(Component("ssm", layer))
        width = self.mlp_width(layer)
        if width:
            comps += [Component("mlp", layer)] + [Component("mlp_channel_group", layer, g)
                                                   for g in range(num_mlp_groups(width, self.mlp_group_size))]
        return comps

    def reorder_mlp_channels(self) -> int:
        ffns = [self.layers()[i].moe.experts[0] for i in range(self.num_layers) if self.mlp_width(i)]
        for ffn in ffns:
            l1_reorder(ffn)
        return len(ffns)

    def consumers(self, layer: int) -> list[int]:
        """Layers attending to the keys and values ``layer`` produces."""
        return sorted(c for c, p in self.config.kv_sources().items() if p == layer)

    def attending(self, plan: PruningPlan, layer: int) -> bool:
        """Whether ``layer`` still attends under ``plan``."""
        gone = {c.kind for c in plan.components if c.layer == layer}
        return self.has_attention(layer) and not gone & {"block", "mixer", "attention"}

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            kinds = {c.kind for c in comps}
            if "mixer" in kinds and kinds & {"attention", "ssm"}:
                inside = next(c for c in comps if c.kind in ("attention", "ssm"))
                raise PlanError(f"{inside} is redundant: the mixer of layer {layer} is removed as a whole")
            if {"attention", "ssm"} <= kinds:
                raise PlanError(f"layer {layer}: removing both its attention and its SSM heads leaves no branch; "
                                f"remove the Hymba block instead (mixer:{layer})")
            if "mlp" in kinds and "mlp_channel_group" in kinds:
                raise PlanError(f"mlp_channel_group:{layer} is redundant: the MLP of layer {layer} is removed as a whole")
            groups = [c.index for c in comps if c.kind == "mlp_channel_group"]
            if groups:
                check_mlp_groups(layer, self.mlp_width(layer), self.mlp_group_size, groups)
            if kinds & {"block", "mixer"}:
                still = [c for c in self.consumers(layer) if self.attending(plan, c)]
                if still:
                    raise PlanError(f"layer {layer} produces the keys and values layer(s) {', '.join(map(str, still))} "
                                    f"attend to; remove their attention (or blocks) first, or remove only its SSM "
                                    f"(ssm:{layer}) or attention (attention:{layer})")

    # ------------------------------------------------------------------ live masks
    def resume_points(self) -> list[int]:
        """Not between a producer and its last consumer: the consumers need the producer's keys and values."""
        inside = {i for c, p in self.config.kv_sources().items() for i in range(p + 1, c + 1)}
        return [i for i in range(self.num_layers) if i not in inside]

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        decoder, kinds = self.layers()[layer], {c.kind for c in comps}
        if "mixer" in kinds:
            skip_sub_block(stack, decoder.mamba, decoder.input_layernorm)
        elif kinds & {"attention", "ssm"}:
            patch_forward(decoder.mamba, _masked_block(decoder.mamba, "attention" not in kinds, "ssm" not in kinds), stack)
        if "mlp" in kinds:
            skip_sub_block(stack, decoder.moe, decoder.pre_moe_layernorm)
        elif "mlp_channel_group" in kinds:
            mask_mlp_channels(decoder.moe.experts[0], self._kept_channels(layer, comps), stack)

    def _kept_channels(self, layer: int, comps) -> torch.Tensor:
        return kept_mlp_channels(self.mlp_width(layer), self.mlp_group_size,
                                 [c.index for c in comps if c.kind == "mlp_channel_group"])

    # ------------------------------------------------------------------ extraction
    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        kinds = {c.kind for c in comps}
        fields = {}
        if "mixer" in kinds or not self.has_mixer(layer):
            fields["mamba"] = False
        else:
            fields["attention"] = self.has_attention(layer) and "attention" not in kinds
            fields["ssm"] = self.has_ssm(layer) and "ssm" not in kinds
        width = 0 if "mlp" in kinds else mlp_width_after(self.mlp_width(layer), self.mlp_group_size,
                                                          [c.index for c in comps if c.kind == "mlp_channel_group"])
        if width != self.config.intermediate_size:
            fields["mlp"] = width
        if fields.get("mamba") is False and width == 0:
            return None
        return LayerSpec(**fields)

    def _groups_after(self, plan: PruningPlan, layer_map: dict[int, int]) -> list[list[int]]:
        """``kv_reuse_group`` of the extracted model: kept producers with their still-attending consumers."""
        groups = []
        for producer in sorted(set(self.config.kv_sources().values())):
            consumers = [c for c in self.consumers(producer) if c in layer_map and self.attending(plan, c)]
            if producer in layer_map and consumers:
                groups.append([layer_map[producer]] + [layer_map[c] for c in consumers])
        return groups

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        layer_map = spec.layer_map()
        config.num_hidden_layers = len(spec.layers)
        config.kv_reuse_group = self._groups_after(plan, layer_map) or None
        config.kv_reuse_every_i_layer = -1
        if config.global_attn_idx is not None:
            config.global_attn_idx = [layer_map[i] for i in config.global_attn_idx if i in layer_map]
        if hasattr(config, "conv_dim"):
            del config.conv_dim
        return all(s.stock for s in spec.layers)

    @classmethod
    def limits(cls, config):
        return type(super().limits(config))(int(config.num_hidden_layers), mlp=int(config.intermediate_size))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        spec, by_layer = self.pruned_spec(plan), self.by_layer(plan)
        layer_map = spec.layer_map()
        producers = {g[0] for g in self._groups_after(plan, layer_map)}
        replace = {}
        for s in spec.layers:
            old, comps, decoder, mods = s.source, by_layer.get(s.source, []), self.layers()[s.source], {}
            if not s.mamba:
                mods.update({"mamba": {}, "input_layernorm": {}})
            elif not (s.attention and s.ssm):
                block = decoder.mamba
                kv = block.kv_source is None and (s.attention or layer_map[old] in producers)
                keep = [n for n, on in zip(_SECTIONS, (s.attention, kv, kv, s.ssm, s.ssm)) if on]
                gone = (() if s.attention else ("pre_avg_layernorm1",)) + (() if s.ssm else _SSM_MODULES)
                state = {k: v for k, v in block.state_dict().items() if k.split(".")[0] not in gone}
                rows = torch.tensor(block.rows(keep), dtype=torch.long, device=block.in_proj.weight.device)
                state["in_proj.weight"] = block.in_proj.weight[rows]
                if block.in_proj.bias is not None:
                    state["in_proj.bias"] = block.in_proj.bias[rows]
                mods["mamba"] = {k: v.detach().clone() for k, v in state.items()}
            if s.mlp == 0:
                mods.update({"moe": {}, "pre_moe_layernorm": {}})
            elif any(c.kind == "mlp_channel_group" for c in comps):
                expert = pruned_mlp_state(decoder.moe.experts[0], self._kept_channels(old, comps))
                mods["moe"] = {f"experts.0.{k}": v for k, v in expert.items()}
            if mods:
                replace[old] = mods
        return sliced_state_dict(self.model.state_dict(), self.layer_prefix, layer_map, replace)

    @classmethod
    def apply_spec(cls, model: nn.Module, spec: PrunedSpec) -> None:
        config = model.config
        producers = {g[0] for g in (config.kv_reuse_group or [])}
        for index, (layer, s) in enumerate(zip(model.get_submodule(cls.layers_path), spec.layers)):
            if not s.mamba:
                remove_sub_block(layer, "mamba", "input_layernorm")
            elif not (s.attention and s.ssm):
                stock = layer.mamba
                kv = stock.kv_source is None and (s.attention or index in producers)
                with torch.device(stock.in_proj.weight.device):
                    layer.mamba = HymbaBlock(config, index, attention=s.attention, ssm=s.ssm, kv_rows=kv)
            if s.mlp == 0:
                remove_sub_block(layer, "moe", "pre_moe_layernorm")
            elif s.mlp is not None:
                resize_mlp(layer.moe.experts[0], s.mlp)
