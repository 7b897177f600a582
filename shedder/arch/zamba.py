"""Zamba v1 (``ZambaForCausalLM``, Zamba-7B-v1): multi-head Mamba-1 layers, some of which also apply
one shared transformer block.

Every decoder layer holds a Zamba Mamba mixer (Mamba-1 selective scans run per Mamba head,
``zamba_mixer``): ``h = h + mamba(norm(h + T))``. In a *hybrid* layer ``T`` is the output of one
**application** of the shared block: ``T = linear(mlp(pre_ff_norm(attn(input_norm([h, embeddings])))))``,
where the attention and MLP weights are shared by every application and ``linear`` belongs to one.
Unlike Zamba2 there is one shared block and no per-application LoRA adapters. Removing a component
means what it means on Zamba2 (``zamba2.py``), and reuses its stand-ins:

* ``block`` (every layer) — the whole layer is skipped, ``h = h``. Extraction deletes the layer.
* ``ssm`` (every layer) — every head's scan and D skip go: ``y = x * silu(z)`` (Mamba-1's meaning).
* ``head`` (every layer) — one Mamba head goes with its own x_proj / dt_proj, A_log, D, its in_proj
  rows, conv channels and out_proj columns; the other heads compute what they did.
* ``channel_group`` (every layer) — a group of inner channels inside one head (groups never straddle
  heads; the group size divides the head width), as Mamba-1's channel groups. A ``head`` may go on
  top of some of its groups (it takes the rest); groups inside a removed head are never candidates.
* ``mixer`` (every layer) — the official "mamba block" (``pruned_mamba_block_idx``): the mixer and its
  input norm go, the shared block still runs, ``h = h + linear(T)``; on a plain layer, as ``block``.
* ``attention`` (hybrid layers) — the official MHA mask (``pruned_mha_idx``): ``T = mlp(pre_ff_norm(h))``.
* ``mlp`` (hybrid layers) — the official MLP mask (``pruned_mlp_idx``): ``T = linear(attn(...))``.
* ``shared_block`` (hybrid layers) — the whole application goes (no official counterpart): the layer
  computes as a plain Mamba layer and is extracted as one.

MLP channel groups are not offered: the MLP is shared by every application. A plan keeps at least
one attention (``transformers`` derives the causal mask from the cache's attention slots).

Extraction keeps one module per application with tied parameters, as stock Zamba does; shared
weights disappear only when no remaining application uses them. A plan that only deletes layers
or whole applications gives a stock config (its ``layers_block_type`` lists the kept layers);
otherwise the ``PrunedSpec`` holds each layer's ``ssm`` / ``head_widths``, ``mamba=False``,
``attention=False`` and ``mlp=0``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import transformers
from torch import nn

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.arch import zamba_mixer
from shedder.arch.base import Adapter
from shedder.arch.layers import check_attention_left, record_length, skip_layer
from shedder.arch.mamba1_mixer import default_channel_group_size
from shedder.arch.spec import LayerSpec
from shedder.arch.shared_block import _emptied, mask_application
from shedder.arch.zamba2 import MixerFreeMambaDecoder, PassThrough, tie_shared


def _mlp_only(shared: nn.Module, cache_slot: int):
    """The forward of an application without attention (the official MHA mask):
    ``T = feed_forward(pre_ff_layernorm(h))`` (Zamba's MLP takes no layer index, Zamba2's does);
    the attention's cache slot records the length."""
    def forward(hidden_states, original_hidden_states=None, layer_idx=None, *args, **kwargs):
        record_length(kwargs.get("cache"), cache_slot, hidden_states)
        return shared.feed_forward(shared.pre_ff_layernorm(hidden_states))
    return forward


class AttentionFreeApplication(nn.Module):
    """An extracted application without attention: the shared MLP (and its norm) on the stream.
    ``cache_slot`` is the layer's index, whose key/value slot only records the sequence length."""

    def __init__(self, pre_ff_layernorm: nn.Module, feed_forward: nn.Module, cache_slot: int):
        super().__init__()
        self.pre_ff_layernorm, self.feed_forward = pre_ff_layernorm, feed_forward
        self._forward = _mlp_only(self, cache_slot)

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def _is_hybrid(layer: nn.Module) -> bool:
    return hasattr(layer, "shared_transf")


def _single_tied_application(config) -> bool:
    """Whether ``config`` builds one application of a tied shared block (``transformers`` ties the
    shared block only along with the embeddings, ``tie_word_embeddings``)."""
    return config.tie_word_embeddings and list(config.layers_block_type).count("hybrid") == 1


_MIXER_KINDS = ("ssm", "head", "channel_group")


class ZambaAdapter(Adapter):
    architectures = ("ZambaForCausalLM",)
    model_types = ("zamba",)
    kinds = ("block", "mixer", "shared_block", "ssm", "head", "channel_group", "attention", "mlp")
    official_keys = {**Adapter.official_keys, "pruned_mamba_block_idx": "mixer"}
    model_class = transformers.ZambaForCausalLM
    layers_path = "model.layers"
    size_fields = Adapter.size_fields + ("intermediate_size", "n_mamba_heads", "mamba_d_state", "mamba_d_conv",
                                         "mamba_expand", "mamba_dt_rank", "num_attention_heads", "num_key_value_heads",
                                         "attention_head_dim", "attention_hidden_size")

    def __init__(self, model: nn.Module, group_sizes: dict[str, int] | None = None):
        super().__init__(model, group_sizes)
        widths = [w for i in range(self.num_layers) if self.has_mamba(i)
                  for w in zamba_mixer.head_widths(self.mamba(i))]
        self.group_sizes.setdefault("channel_group", default_channel_group_size(self._stock_head_dim(self.config), widths))
        for i in range(self.num_layers):
            if self.has_mamba(i):
                zamba_mixer.check_group_size(self.mamba(i), i, self.group_size)

    @property
    def group_size(self) -> int:
        return self.group_sizes["channel_group"]

    @staticmethod
    def _stock_head_dim(config) -> int:
        return config.mamba_expand * config.hidden_size // config.n_mamba_heads

    # ------------------------------------------------------------------ inventory
    @functools.cached_property
    def _hybrid(self) -> frozenset[int]:
        return frozenset(i for i, block in enumerate(self.layers()) if _is_hybrid(block))

    def is_hybrid(self, layer: int) -> bool:
        return layer in self._hybrid

    def has_mlp(self, layer: int) -> bool:
        return self.is_hybrid(layer) and not isinstance(self.layers()[layer].shared_transf.feed_forward, PassThrough)

    def has_attention(self, layer: int) -> bool:
        return self.is_hybrid(layer) and not isinstance(self.layers()[layer].shared_transf, AttentionFreeApplication)

    def has_mamba(self, layer: int) -> bool:
        return not (self.is_hybrid(layer) and isinstance(self.layers()[layer].mamba_decoder, MixerFreeMambaDecoder))

    def mamba(self, layer: int) -> nn.Module:
        """The layer's Zamba mixer."""
        block = self.layers()[layer]
        return block.mamba_decoder.mamba if _is_hybrid(block) else block.mamba

    def same_removal_as_official(self, comp: Component) -> Component:
        """A plain Mamba layer's ``block`` is its ``mixer`` (the official mamba block)."""
        return Component("mixer", comp.layer) if comp.kind == "block" and not self.is_hybrid(comp.layer) else comp

    def official_mlp_width(self, layer: int) -> int:
        return self.config.intermediate_size  # every application runs the shared block's full MLP

    def layer_kind(self, layer: int) -> str:
        return "hybrid" if self.is_hybrid(layer) else "mamba"

    def layer_components(self, layer: int) -> list[Component]:
        comps = [Component("block", layer)]
        if self.has_mamba(layer):
            comps += [Component("mixer", layer)] + zamba_mixer.components(self.mamba(layer), layer, self.group_size)
        if self.is_hybrid(layer):
            comps.append(Component("shared_block", layer))
        if self.has_attention(layer):
            comps.append(Component("attention", layer))
        if self.has_mlp(layer):
            comps.append(Component("mlp", layer))
        return comps

    def check(self, plan: PruningPlan) -> None:
        for layer, comps in self.by_layer(plan).items():
            if self.has_mamba(layer) and any(c.kind in _MIXER_KINDS for c in comps):
                zamba_mixer.check(self.mamba(layer), layer, comps, self.group_size)
        for c in plan.components:
            inside = {"mixer": _MIXER_KINDS, "shared_block": ("attention", "mlp")}.get(c.kind, ())
            for other in plan.components:
                if other.layer == c.layer and other.kind in inside:
                    raise PlanError(f"{other} is redundant: the {c.kind} of layer {c.layer} is removed as a whole")
        attending = {i for i in self._hybrid if self.has_attention(i)}
        check_attention_left("Zamba", "attention", attending,
                             [c.layer for c in plan.components if c.kind in ("block", "shared_block", "attention")])

    def candidates(self, plan: PruningPlan, kinds: list[str]) -> list[Component]:
        """As the base, without channel groups inside a removed head (no-ops)."""
        by_layer = self.by_layer(plan)
        return [c for c in super().candidates(plan, kinds)
                if not (c.kind == "channel_group" and
                        zamba_mixer.in_removed_head(self.mamba(c.layer), c, by_layer.get(c.layer, []), self.group_size))]

    # ------------------------------------------------------------------ live masks
    def skip_forward(self, layer: int):
        return skip_layer(layer if self.is_hybrid(layer) else None)  # a hybrid layer's key/value slot stays

    def mask_layer(self, layer: int, comps: list[Component], stack: contextlib.ExitStack) -> None:
        kinds = {c.kind for c in comps}
        block = self.layers()[layer]
        if self.has_mamba(layer) and kinds & set(_MIXER_KINDS):
            zamba_mixer.mask(self.mamba(layer), comps, self.group_size, stack)
        mask_application(self, layer, kinds, getattr(block, "shared_transf", None), _mlp_only, stack)

    # ------------------------------------------------------------------ extraction
    def _applications(self, plan: PruningPlan) -> list[int]:
        """Old indices of the layers that keep their shared-block application, in order."""
        gone = {c.layer for c in plan.components if c.kind in ("block", "shared_block")}
        return [i for i in range(self.num_layers) if self.is_hybrid(i) and i not in gone]

    def layer_spec(self, layer: int, comps: list[Component]) -> LayerSpec | None:
        kinds = {c.kind for c in comps}
        if _emptied(self.is_hybrid(layer), kinds):
            return None
        if "mixer" in kinds or not self.has_mamba(layer):
            fields = {"mamba": False}
        else:
            stock = (self._stock_head_dim(self.config),) * self.config.n_mamba_heads
            fields = zamba_mixer.spec_fields(self.mamba(layer), comps, self.group_size, stock)
        if self.is_hybrid(layer) and "shared_block" not in kinds:  # the application stays
            if not (self.has_mlp(layer) and "mlp" not in kinds):
                fields["mlp"] = 0
            if not (self.has_attention(layer) and "attention" not in kinds):
                fields["attention"] = False
        return LayerSpec(**fields)

    def configure(self, config, spec, plan) -> bool:
        kept, apps = list(self.layer_map(plan)), set(self._applications(plan))
        config.layers_block_type = ["hybrid" if i in apps else "linear_attention" for i in kept]
        config.num_hidden_layers = len(kept)
        return False

    def pruned_config(self, plan: PruningPlan):
        """As the base, but a model left with one application keeps a ``shedder`` section: stock
        ``transformers`` cannot build it (``stock_model``), so it must not pass for a stock checkpoint."""
        config = super().pruned_config(plan)
        if _single_tied_application(config) and not getattr(config, "shedder", None):
            config.shedder = self.pruned_spec(plan).to_json()
        return config

    @classmethod
    def stock_model(cls, config, spec):
        """The stock model; with one application built untied first: ``transformers`` ties every
        application to the first by a pattern that raises when there is no other one."""
        if not _single_tied_application(config):
            return cls.model_class(config)
        config.tie_word_embeddings = False
        try:
            model = cls.model_class(config)
        finally:
            config.tie_word_embeddings = True
        apps = [j for j, layer in enumerate(model.model.layers) if _is_hybrid(layer)]
        tie_shared(model, apps, [0] * len(apps), attr="shared_transf")  # ties the embeddings again
        return model

    @classmethod
    def limits(cls, config):
        return dataclasses.replace(super().limits(config), mlp=int(config.intermediate_size),
                                   mamba_heads=(int(config.n_mamba_heads), cls._stock_head_dim(config)))

    def pruned_state_dict(self, plan: PruningPlan) -> dict[str, torch.Tensor]:
        kept, apps = list(self.layer_map(plan)), set(self._applications(plan))
        by_layer = self.by_layer(plan)
        prefix = self.layer_prefix
        out = {k: v for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        for j, i in enumerate(kept):
            block, comps = self.layers()[i], by_layer.get(i, [])
            kinds = {c.kind for c in comps}
            mamba_layer = block.mamba_decoder if self.is_hybrid(i) else block
            mamba_prefix = f"{prefix}{j}.mamba_decoder." if i in apps else f"{prefix}{j}."
            if self.has_mamba(i) and "mixer" not in kinds:
                pruned = zamba_mixer.pruned_state(mamba_layer.mamba, comps, self.group_size)
                for name, t in mamba_layer.state_dict().items():
                    if not (pruned is not None and name.startswith("mamba.")):
                        out[mamba_prefix + name] = t
                for name, t in (pruned or {}).items():
                    out[f"{mamba_prefix}mamba.{name}"] = t
            if i not in apps:
                continue
            out[f"{prefix}{j}.linear.weight"] = block.linear.weight
            drop = (() if self.has_mlp(i) and "mlp" not in kinds else ("feed_forward.", "pre_ff_layernorm.")) + \
                   (() if self.has_attention(i) and "attention" not in kinds else ("self_attn.", "input_layernorm."))
            for name, t in block.shared_transf.state_dict().items():
                if not name.startswith(drop):
                    out[f"{prefix}{j}.shared_transf.{name}"] = t
        return out

    @classmethod
    def apply_spec(cls, model: nn.Module, spec) -> None:
        """Applications first (their MLP and attention), then each layer's mixer, then the ties
        between applications."""
        layers = model.model.layers
        apps = [j for j, layer in enumerate(layers) if _is_hybrid(layer)]
        for j in apps:
            shared = layers[j].shared_transf
            if spec.layers[j].mlp == 0:
                shared.pre_ff_layernorm = nn.Identity()
                shared.feed_forward = PassThrough()
            if not spec.layers[j].attention:
                layers[j].shared_transf = AttentionFreeApplication(shared.pre_ff_layernorm, shared.feed_forward, j)
        for layer, layer_spec in zip(layers, spec.layers):
            if not layer_spec.mamba:
                layer.mamba_decoder = MixerFreeMambaDecoder()
            else:
                host = layer.mamba_decoder if _is_hybrid(layer) else layer
                host.mamba = zamba_mixer.build(host.mamba, layer_spec)
        tie_shared(model, apps, [0] * len(apps), attr="shared_transf")
