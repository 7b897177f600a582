"""Zamba2 (``Zamba2ForCausalLM``): Mamba-2 layers, some of which also apply a shared transformer block.

Every decoder layer holds a Mamba-2 mixer: ``h = h + mamba(norm(h + T))``. In a *hybrid* layer
``T`` is the output of one **application** of a shared transformer block:
``T = linear(mlp(pre_ff_norm(attn(input_norm([h, embeddings])))))``, where attention and MLP weights
are shared by all applications of the same memory block (``num_mem_blocks`` of them, used in
turn), while ``linear`` and the LoRA-style adapters (q/k/v, gate_up) belong to one application.
In a plain Mamba layer ``T`` is absent. Removing a component means:

* ``block`` (every layer) — the whole layer is skipped, ``h = h``: its Mamba mixer and, in a hybrid
  layer, its shared-block application. Extraction deletes the layer.
* ``ssm`` / ``head`` (every layer) — the layer's Mamba-2 mixer loses its SSD scan / a head
  (``mamba2_mixer``).
* ``mixer`` (every layer) — the official "mamba block" removal (``pruned_mamba_block_idx``): the
  layer's Mamba-2 mixer and its input norm go, the shared block still runs, ``h = h + linear(T)``.
  On a plain Mamba layer there is no ``T``, so it is the same as ``block`` (the layer is deleted).
* ``attention`` (hybrid layers) — the official MHA mask (``pruned_mha_idx``): this application skips
  the concatenation with the embeddings, ``input_norm`` and attention, and its MLP runs on the
  stream, ``T = mlp(pre_ff_norm(h))``. The application's attention adapters go; its key/value slot
  stays in the cache and only records the sequence length.
* ``shared_block`` (hybrid layers) — the whole application goes (no official counterpart): ``T`` is
  gone and the layer computes as a plain Mamba layer. Its adapters and ``linear`` go, and the
  extracted layer is a stock Mamba layer (no key/value cache).
* ``mlp`` (hybrid layers) — the official MLP mask (``pruned_mlp_idx``): the application skips the
  shared MLP (with its ``pre_ff_norm``); the MLP has no residual path, so skipping it passes the
  attention output straight on: ``T = linear(attn(...))`` (with ``attention`` removed too,
  ``T = h``). The application's gate_up adapter goes.

* ``mlp_channel_group`` (hybrid layers) — the official narrowed MLP (``pruned_mlp_channels``, whose
  ordinals are the applications'): this application's MLP keeps the other channels; extraction gives
  it its own narrowed copy with its adapter merged, the other applications keep the shared MLP
  (``zamba2_mlp``; the parameter count can grow, and ``param_notes`` says by how much).

A plan must keep at least one attention: ``transformers`` derives the causal mask from the
cache's attention slots, so a Zamba2 without any cannot generate with a cache. Live masks keep
the removed applications' cache slots filled with placeholders for the same reason.

Shared weights stay shared: they disappear only when no remaining application uses them.
Extraction keeps one module per application with tied parameters, exactly like stock Zamba2.
When the result is expressible by a stock config (applications removed while the memory blocks
still alternate in the stock order, no mixer or MLP changes), the extracted config is a stock
one. Otherwise the ``PrunedSpec`` holds each layer's ``ssm`` / ``heads_per_group``, ``mamba=False``
(a hybrid layer without its Mamba mixer), ``attention=False`` (an application without attention)
``mlp=0`` (an application without its MLP) and ``mlp=width`` (an application with its own
narrowed MLP), and ``shared_blocks`` (the memory block of each
application, in order) when they no longer alternate; ``build`` recreates adapters,
pass-throughs, attention-free applications, mixer-free layers and ties from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import torch
import transformers
from torch import nn

from shedder.core.errors import ModelLoadError, PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import feed_forward, mamba2_mixer, zamba2_mlp
from shedder.arch.base import Adapter
from shedder.arch.feed_forward import default_mlp_group_size
from shedder.arch.layers import check_attention_left, record_length, skip_layer
from shedder.arch.mamba2_mixer import MixerLayout
from shedder.arch.spec import LayerSpec, PrunedSpec
from shedder.arch.stock_shape import adapter_shape, expand_for
from shedder.arch.shared_block import _add_transformer_output, _emptied, mask_application
from shedder.arch.zamba2_mlp import NarrowedMLP

_ADAPTER_LISTS = r"(self_attn\.linear_[qkv]_adapter_list|feed_forward\.gate_up_proj_adapter_list)"
#: a per-application adapter slot's parameter inside a shared block: (adapter list, slot, parameter)
_ADAPTER_KEY = re.compile(rf"^{_ADAPTER_LISTS}\.(\d+)\.(.+)$")
#: a per-application adapter slot (the module) inside a shared block: (adapter list, slot)
_ADAPTER_SLOT = re.compile(rf"^{_ADAPTER_LISTS}\.(\d+)$")


class PassThrough(nn.Module):
    """A skipped MLP inside the shared block (no residual there): the input goes on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _mlp_only(shared: nn.Module, cache_slot: int):
    """The forward of an application without attention (the official MHA mask):
    ``T = feed_forward(pre_ff_layernorm(h))``; the attention's cache slot records the length."""
    def forward(hidden_states, original_hidden_states=None, layer_idx=None, *args, **kwargs):
        record_length(kwargs.get("cache"), cache_slot, hidden_states)
        return shared.feed_forward(shared.pre_ff_layernorm(hidden_states), layer_idx)
    return forward





class AttentionFreeApplication(nn.Module):
    """An extracted application without attention: the shared MLP (and its norm) on the stream.
    ``cache_slot`` is the layer's index, whose key/value slot only records the sequence length."""

    def __init__(self, pre_ff_layernorm: nn.Module, feed_forward: nn.Module, block_id: int, cache_slot: int):
        super().__init__()
        self.pre_ff_layernorm, self.feed_forward, self.block_id = pre_ff_layernorm, feed_forward, block_id
        self._forward = _mlp_only(self, cache_slot)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


class MixerFreeMambaDecoder(nn.Module):
    """An extracted hybrid layer's Mamba side without its mixer: ``h + linear(T)``, no parameters."""

    def forward(self, *args, **kwargs):
        return _add_transformer_output(*args, **kwargs)


def _slot_of(shared: nn.Module, layer: int) -> int | None:
    """Which adapter slot of its shared block the application at ``layer`` uses (None: no adapters left)."""
    for part in (getattr(shared, "self_attn", None), shared.feed_forward):
        if hasattr(part, "layer_dic"):
            return part.layer_dic[layer]
    return None


def _is_hybrid(layer: nn.Module) -> bool:
    return hasattr(layer, "shared_transformer")


class Zamba2Adapter(Adapter):
    architectures = ("Zamba2ForCausalLM",)
    model_types = ("zamba2",)
    kinds = ("block", "mixer", "shared_block", "ssm", "head", "attention", "mlp", "mlp_channel_group")
    stock_kinds = ("head",)  # a narrowed MLP is an application's own copy: never a stock shape
    official_keys = {**Adapter.official_keys, "pruned_mamba_block_idx": "mixer"}
    model_class = transformers.Zamba2ForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "n_mamba_heads", "mamba_headdim",
                                                    "mamba_ngroups", "mamba_d_state", "chunk_size", "mamba_d_conv",
                                                    "mamba_expand", "num_attention_heads", "num_key_value_heads",
                                                    "attention_head_dim", "adapter_rank", "num_mem_blocks")

    def config_group_sizes(self) -> dict[str, int]:
        return {"mlp_channel_group": default_mlp_group_size(self.config.intermediate_size)}

    @property
    def mlp_group_size(self) -> int:
        return self.group_sizes["mlp_channel_group"]

    # ------------------------------------------------------------------ inventory
    @functools.cached_property
    def _hybrid(self) -> frozenset[int]:
        """Layers holding a shared-block application (read once: validation runs per search candidate)."""
        return frozenset(i for i, block in enumerate(self.layers()) if _is_hybrid(block))

    def is_hybrid(self, layer: int) -> bool:
        return layer in self._hybrid

    @functools.cached_property
    def _mlp_widths(self) -> dict[int, int]:
        """Intermediate channels of each application's MLP (0: skipped), read once from the modules."""
        out = {}
        for i in self._hybrid:
            ff = self.layers()[i].shared_transformer.feed_forward
            out[i] = 0 if isinstance(ff, PassThrough) else zamba2_mlp.width_of(ff)
        return out

    def has_mlp(self, layer: int) -> bool:
        return self.mlp_width(layer) > 0

    def mlp_width(self, layer: int) -> int:
        """Intermediate channels of the application's MLP at ``layer`` (0: none, or not a hybrid layer)."""
        return self._mlp_widths.get(layer, 0)

    def owns_mlp(self, layer: int) -> bool:
        """Whether the application at ``layer`` holds its own (narrowed) MLP instead of the shared one."""
        return self.has_mlp(layer) and isinstance(self.layers()[layer].shared_transformer.feed_forward, NarrowedMLP)

    def upgrade_schema1(self, plan: PruningPlan) -> PruningPlan:
        """Schema 1's ``attention`` removed the whole application: today's ``shared_block``."""
        return PruningPlan(frozenset(Component("shared_block", c.layer) if c.kind == "attention" else c
                                     for c in plan.components), plan.model, dict(plan.group_sizes), dict(plan.meta))

    def same_removal_as_official(self, comp: Component) -> Component:
        """A plain Mamba layer's ``block`` is its ``mixer`` (the official mamba block)."""
        return Component("mixer", comp.layer) if comp.kind == "block" and not self.is_hybrid(comp.layer) else comp

    def param_notes(self, plan: PruningPlan | None = None) -> list[str]:
        """The applications holding their own MLP, and the parameters a plan's narrowing adds or
        removes against the same plan on the shared MLPs (a shared MLP goes only with its last user)."""
        own = {i: self.layers()[i].shared_transformer.feed_forward for i in sorted(self._hybrid) if self.owns_mlp(i)}
        notes = [zamba2_mlp.own_copies_note(own)] if own else []
        plan = self.resolve(plan if plan is not None else PruningPlan())
        narrowed = {i: feed_forward.width_after(comps, self.mlp_width(i), self.mlp_group_size)
                    for i, comps in self.by_layer(plan).items() if any(c.kind == "mlp_channel_group" for c in comps)}
        if narrowed:
            shared = PruningPlan(frozenset(c for c in plan.components if c.kind != "mlp_channel_group"), plan.model)
            notes.append(zamba2_mlp.narrowing_note(narrowed, self.param_count(plan) - self.param_count(shared)))
        return notes

    def reorder_mlp_channels(self) -> int:
        raise PlanError("Zamba2ForCausalLM: --weight-reorder is not available: the official Zamba2 scripts have no "
                        "weight reorder, and the shared MLP's channels cannot be reordered for one application alone")

    def has_attention(self, layer: int) -> bool:
        return self.is_hybrid(layer) and not isinstance(self.layers()[layer].shared_transformer, AttentionFreeApplication)

    def has_mamba(self, layer: int) -> bool:
        return not (self.is_hybrid(layer) and isinstance(self.layers()[layer].mamba_decoder, MixerFreeMambaDecoder))

    def layer_kind(self, layer: int) -> str:
        return "hybrid" if self.is_hybrid(layer) else "mamba"

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mamba(layer):
            comps += [Component("mixer", layer)] + mamba2_mixer.components(layer, self.mamba(layer))
        if self.is_hybrid(layer):
            comps.append(Component("shared_block", layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        return comps + feed_forward.components(layer, self.mlp_width(layer), self.mlp_group_size,
                                               has_sub_block=self.has_mlp(layer))

    def layer_cost_modules(self, layer: int) -> list[nn.Module]:
        """The layer's modules minus the adapters of the other applications its shared block holds."""
        block = self.layers()[layer]
        if not _is_hybrid(block):
            return list(block.modules())
        own = _slot_of(block.shared_transformer, layer)
        others = set()
        for name, module in block.shared_transformer.named_modules():
            slot = _ADAPTER_SLOT.match(name)
            if slot and int(slot.group(2)) != own:
                others.update(id(m) for m in module.modules())
        return [m for m in block.modules() if id(m) not in others]

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if self.has_mamba(layer):
                mamba2_mixer.check(layer, self.mamba(layer), comps)
            if self.has_mlp(layer):
                feed_forward.check(layer, comps, self.mlp_width(layer), self.mlp_group_size)
        for c in plan.components:
            inside = {"mixer": ("ssm", "head"), "shared_block": ("attention", "mlp", "mlp_channel_group")}.get(c.kind, ())
            for other in plan.components:
                if other.layer == c.layer and other.kind in inside:
                    raise PlanError(f"{other} is redundant: the {c.kind} of layer {c.layer} is removed as a whole")
        attending = {i for i in self._hybrid if self.has_attention(i)}
        check_attention_left("Zamba2", "attention", attending,
                             [c.layer for c in plan.components if c.kind in ("block", "shared_block", "attention")])

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        return skip_layer(layer if self.is_hybrid(layer) else None)  # a hybrid layer's key/value slot stays

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        if self.has_mamba(layer):
            mamba2_mixer.mask(self.mamba(layer), comps, stack)  # ssm / head
        kinds = {c.kind for c in comps}
        block = self.layers()[layer]
        if mask_application(self, layer, kinds, getattr(block, "shared_transformer", None), _mlp_only, stack):
            return
        if "mlp" not in kinds and "mlp_channel_group" in kinds:
            shared = block.shared_transformer
            zamba2_mlp.mask(shared.feed_forward, _slot_of(shared, layer), self._kept_channels(layer, comps), stack)

    # ------------------------------------------------------------------ extraction
    def _applications(self, plan: PruningPlan) -> list[int]:
        """Old indices of the layers that keep their shared-block application, in order."""
        gone = {c.layer for c in plan.components if c.kind in ("block", "shared_block")}
        return [i for i in range(self.num_layers) if self.is_hybrid(i) and i not in gone]

    def _keeps_mlp(self, plan: PruningPlan, layer: int) -> bool:
        return self.has_mlp(layer) and Component("mlp", layer) not in plan

    def _uses_shared_mlp(self, plan: PruningPlan, layer: int) -> bool:
        return self._keeps_mlp(plan, layer) and not self._narrows(plan, layer)

    def _narrows(self, plan: PruningPlan, layer: int) -> bool:
        """Whether the extracted application at ``layer`` holds its own MLP (narrowed now or before)."""
        return self._keeps_mlp(plan, layer) and (self.owns_mlp(layer) or any(
            c.kind == "mlp_channel_group" and c.layer == layer for c in plan.components))

    def _kept_channels(self, layer: int, comps) -> torch.Tensor:
        return feed_forward.kept_channels(comps, self.mlp_width(layer), self.mlp_group_size)

    def _keeps_attention(self, plan: PruningPlan, layer: int) -> bool:
        return self.has_attention(layer) and Component("attention", layer) not in plan

    def _keeps_mixer(self, plan: PruningPlan, layer: int) -> bool:
        return self.has_mamba(layer) and Component("mixer", layer) not in plan

    def _block_id(self, layer: int) -> int:
        return self.layers()[layer].shared_transformer.block_id

    def mamba(self, layer: int) -> nn.Module:
        """The layer's Mamba-2 mixer."""
        block = self.layers()[layer]
        return block.mamba_decoder.mamba if _is_hybrid(block) else block.mamba

    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        kinds = {c.kind for c in comps}
        if _emptied(self.is_hybrid(layer), kinds):
            return None
        if "mixer" in kinds or not self.has_mamba(layer):
            fields = {"mamba": False}
        else:
            fields = mamba2_mixer.spec_fields(self.mamba(layer), comps, self.stock_layout(self.config))
        if self.is_hybrid(layer) and "shared_block" not in kinds:  # the application stays
            if not (self.has_mlp(layer) and "mlp" not in kinds):
                fields["mlp"] = 0
            elif self.owns_mlp(layer) or "mlp_channel_group" in kinds:  # its own narrowed copy
                fields["mlp"] = feed_forward.width_after(comps, self.mlp_width(layer), self.mlp_group_size)
            if not (self.has_attention(layer) and "attention" not in kinds):
                fields["attention"] = False
        return LayerSpec(**fields)

    def pruned_spec(self, plan: PruningPlan) -> PrunedSpec:
        spec = super().pruned_spec(plan)
        blocks = [self._block_id(i) for i in self._applications(plan)]
        stock_order = blocks == [k % self.config.num_mem_blocks for k in range(len(blocks))]
        return dataclasses.replace(spec, shared_blocks=None if stock_order else tuple(blocks))

    def configure(self, config, spec: PrunedSpec, plan) -> bool:
        kept, apps = list(self.layer_map(plan)), set(self._applications(plan))
        config.layers_block_type = ["hybrid" if i in apps else "linear_attention" for i in kept]
        config.hybrid_layer_ids = [j for j, i in enumerate(kept) if i in apps]
        config.num_hidden_layers = len(kept)
        shape = adapter_shape(self, spec)
        expand = shape and expand_for(shape.inner(config.mamba_headdim), config.hidden_size)
        if shape is None or shape.num_heads is None or expand is None or (shape.mlp, shape.experts) != (None, None):
            return False  # unchanged heads: the spec is stock or not by itself
        config.n_mamba_heads, config.mamba_expand = shape.num_heads, expand
        return True

    @staticmethod
    def stock_layout(config) -> MixerLayout:
        return mamba2_mixer.even_layout(config.n_mamba_heads, config.mamba_ngroups)

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size),
                                   num_mem_blocks=int(config.num_mem_blocks),
                                   heads_per_group=cls.stock_layout(config).heads_per_group)

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        kept, apps = list(self.layer_map(plan)), self._applications(plan)
        new_pos = {i: k for k, i in enumerate(apps)}
        old_app_at = {}  # adapter slot in the source model -> layer of that application
        for i in range(self.num_layers):
            if self.is_hybrid(i):
                old_app_at[_slot_of(self.layers()[i].shared_transformer, i)] = i
        prefix = self.layer_prefix
        out = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        for j, i in enumerate(kept):
            block = self.layers()[i]
            mamba_layer = block.mamba_decoder if self.is_hybrid(i) else block
            mamba_prefix = f"{prefix}{j}.mamba_decoder." if i in new_pos else f"{prefix}{j}."
            pruned = mamba2_mixer.pruned_state(mamba_layer.mamba, [c for c in plan.components if c.layer == i])
            keeps_mixer = self._keeps_mixer(plan, i)
            for name, t in (mamba_layer.state_dict() if keeps_mixer else {}).items():
                if not (pruned is not None and name.startswith("mamba.")):
                    out[mamba_prefix + name] = t
            if pruned is not None:
                for name, t in pruned.items():
                    out[f"{mamba_prefix}mamba.{name}"] = t
            if i not in new_pos:
                continue
            out[f"{prefix}{j}.linear.weight"] = block.linear.weight
            keeps_mlp, keeps_attention = self._keeps_mlp(plan, i), self._keeps_attention(plan, i)
            shared = block.shared_transformer
            if self._narrows(plan, i):  # its own MLP: the kept channels, its adapter merged
                kept = self._kept_channels(i, [c for c in plan.components if c.layer == i])
                for name, t in zamba2_mlp.narrowed_state(shared.feed_forward, _slot_of(shared, i), kept).items():
                    out[f"{prefix}{j}.shared_transformer.feed_forward.{name}"] = t
            for name, t in shared.state_dict().items():
                if not keeps_mlp and name.startswith(("feed_forward.", "pre_ff_layernorm.")):
                    continue
                if self._narrows(plan, i) and name.startswith("feed_forward."):
                    continue  # the shared MLP and its adapters: the other applications hold them
                if not keeps_attention and name.startswith(("self_attn.", "input_layernorm.")):
                    continue
                slot = _ADAPTER_KEY.match(name)
                if slot:
                    owner = old_app_at[int(slot.group(2))]
                    keeps = self._uses_shared_mlp if slot.group(1).startswith("feed_forward") else self._keeps_attention
                    if owner not in new_pos or not keeps(plan, owner):
                        continue
                    name = f"{slot.group(1)}.{new_pos[owner]}.{slot.group(3)}"
                out[f"{prefix}{j}.shared_transformer.{name}"] = t
        return out

    @classmethod
    def apply_spec(cls, model: nn.Module, spec: PrunedSpec) -> None:
        """Shared blocks first (which memory block each application uses, their adapters and MLPs),
        then each layer's mixer, then the ties between applications of one memory block."""
        config = model.config
        layers = model.model.layers
        apps = [j for j, layer in enumerate(layers) if _is_hybrid(layer)]
        blocks = spec.shared_blocks or tuple(k % config.num_mem_blocks for k in range(len(apps)))
        if len(blocks) != len(apps):
            raise ModelLoadError(f"config.json: shedder.shared_blocks names memory blocks for {len(blocks)} "
                                 f"applications, but the config has {len(apps)} hybrid layers")
        no_mlp = {k for k, j in enumerate(apps) if spec.layers[j].mlp == 0}
        own_mlp = {k: spec.layers[j].mlp for k, j in enumerate(apps) if spec.layers[j].mlp}
        no_attention = {k for k, j in enumerate(apps) if not spec.layers[j].attention}
        for k, j in enumerate(apps):
            shared = layers[j].shared_transformer
            users = {k2 for k2, b in enumerate(blocks) if b == blocks[k]}
            _set_block(shared, config, blocks[k], users - no_attention, users - no_mlp - set(own_mlp))
            if k in no_mlp:
                shared.pre_ff_layernorm = nn.Identity()
                shared.feed_forward = PassThrough()
            elif k in own_mlp:
                w = shared.pre_ff_layernorm.weight
                shared.feed_forward = NarrowedMLP(config, own_mlp[k], device=w.device, dtype=w.dtype)
            if k in no_attention:
                layers[j].shared_transformer = AttentionFreeApplication(shared.pre_ff_layernorm, shared.feed_forward,
                                                                        blocks[k], j)
        for layer, layer_spec in zip(layers, spec.layers):
            if not layer_spec.mamba:
                layer.mamba_decoder = MixerFreeMambaDecoder()
            else:
                host = layer.mamba_decoder if _is_hybrid(layer) else layer
                host.mamba = mamba2_mixer.build(host.mamba, layer_spec)
        tie_shared(model, apps, blocks)


def _set_block(shared: nn.Module, config, block_id: int, attn_slots: set[int], mlp_slots: set[int]) -> None:
    """Make a shared-block module belong to memory block ``block_id``, with adapters exactly in the
    slots (application positions) that use it; every other slot holds ``nn.Identity``."""
    shared.block_id = shared.self_attn.block_id = shared.feed_forward.block_id = block_id
    rank, width, hidden = config.adapter_rank, config.attention_hidden_size, config.hidden_size
    w = shared.feed_forward.gate_up_proj.weight
    factory = {"device": w.device, "dtype": w.dtype}

    def fill(slots: nn.ModuleList, used: set[int], d_in: int, d_out: int) -> None:
        for pos in range(len(slots)):
            if pos in used and isinstance(slots[pos], nn.Identity):
                slots[pos] = nn.Sequential(nn.Linear(d_in, rank, bias=False, **factory),
                                           nn.Linear(rank, d_out, bias=False, **factory))
            elif pos not in used:
                slots[pos] = nn.Identity()

    if config.use_shared_attention_adapter:
        for name in ("linear_q_adapter_list", "linear_k_adapter_list", "linear_v_adapter_list"):
            fill(getattr(shared.self_attn, name), attn_slots, width, width)
    fill(shared.feed_forward.gate_up_proj_adapter_list, mlp_slots, hidden, 2 * config.intermediate_size)


def tie_shared(model: nn.Module, apps: list[int], blocks: list[int], attr: str = "shared_transformer") -> None:
    """Tie every shared-block parameter (``layers[j].<attr>``, Zamba's ``shared_transf``) to the first
    application of its memory block that has it (explicit parameter names, since applications may
    now hold different subsets); an application's own narrowed MLP is tied to nothing."""
    tied, first = {}, {}
    for j, block_id in zip(apps, blocks):
        app = getattr(model.model.layers[j], attr)
        own = isinstance(getattr(app, "feed_forward", None), NarrowedMLP)
        for rel, _ in app.named_parameters():
            if own and rel.startswith("feed_forward."):
                continue
            name = f"layers.{j}.{attr}.{rel}"
            source = first.setdefault((block_id, rel), name)
            if source != name:
                tied[name] = source
    model.model._tied_weights_keys = tied
    model.model.all_tied_weights_keys = model.model.get_expanded_tied_weights_keys()
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    model.tie_weights()
