"""Zamba2's narrowed MLPs: one application of a shared block keeping only some of its MLP channels.

The official Zamba2 scripts (Mamba-Shedder ``hybrid/Zamba2-Pruning/preprocess.py``) first give each
hybrid application its own copy of the shared block it uses, with that application's LoRA-style
``gate_up`` adapter merged into the copy; ``pruned_mlp_channels`` then keeps the first ``width``
channels of one application's copy. Here the shared weights stay shared until extraction:

* **masked** — the application's MLP computes with its kept channels only: rows ``c`` and
  ``ffn + c`` of ``gate_up_proj`` (the gate and up halves) with the same rows of its adapter merged,
  column ``c`` of ``down_proj`` (``mask``; the other applications of the block are untouched, since
  each application is its own module with tied parameters). The merge is computed per call, so the
  mask and the extracted copy run one forward on the same tensors (``narrowed_forward``);
* **extracted** — the application gets its own ``NarrowedMLP``: ``gate_up`` rows of
  ``W + B·A`` (its adapter merged, as the official preprocess does) and the kept ``down_proj``
  columns; the other applications keep the shared MLP (``narrowed_state``). A shared MLP that no
  application uses any more disappears, so narrowing can add parameters (a copy of ``3 · width ·
  hidden``) or remove them (when the last user of a shared MLP gets its own copy):
  ``narrowing_note`` says which.

The official scripts have no weight reorder for Zamba2, so ``--weight-reorder`` is refused there.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from shedder.arch.counting import count_parameters
from shedder.arch.runtime import patch_forward


def narrowed_forward(hidden_state, gate_up: dict[str, torch.Tensor], down: dict[str, torch.Tensor], act):
    """``down(act(gate) * up)`` with ``[gate; up] = gate_up(h)``: the one forward of a narrowed MLP,
    live (tensors sliced and merged per call) and extracted (its own parameters)."""
    gate, up = torch.chunk(F.linear(hidden_state, gate_up["weight"], gate_up.get("bias")), 2, dim=-1)  # [..., width]
    return F.linear(act(gate) * up, down["weight"], down.get("bias"))


class NarrowedMLP(nn.Module):
    """An application's own MLP of ``width`` channels, with its adapter merged (no adapter list);
    called as ``transformers``' ``Zamba2MLP`` is."""

    def __init__(self, config, width: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.intermediate_size = width
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=config.add_bias_linear, **factory)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.add_bias_linear, **factory)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_state, layer_idx=None):
        return narrowed_forward(hidden_state, dict(self.gate_up_proj.named_parameters()),
                                dict(self.down_proj.named_parameters()), self.act_fn)


def width_of(feed_forward: nn.Module) -> int:
    """Intermediate channels of an application's MLP (shared or its own)."""
    return feed_forward.gate_up_proj.out_features // 2


def _adapter(feed_forward: nn.Module, slot: int | None) -> nn.Module | None:
    """The application's ``gate_up`` adapter (``Sequential(A, B)``), or None for its own copy."""
    adapters = getattr(feed_forward, "gate_up_proj_adapter_list", None)
    return None if adapters is None or slot is None else adapters[slot]


def _narrowed(feed_forward: nn.Module, slot: int | None, kept: torch.Tensor):
    """(gate_up, down) tensors of the application's MLP narrowed to ``kept`` channels: rows ``c`` and
    ``ffn + c`` of ``gate_up_proj`` with the application's adapter merged (``W + B·A``, summed in
    float32 and rounded once to the weight's dtype), columns ``c`` of ``down_proj``."""
    gate_up, down = feed_forward.gate_up_proj, feed_forward.down_proj
    idx = kept.to(gate_up.weight.device)
    rows = torch.cat([idx, idx + width_of(feed_forward)])
    weight = gate_up.weight[rows]
    adapter = _adapter(feed_forward, slot)
    if adapter is not None:
        a, b = adapter[0].weight, adapter[1].weight  # A: [rank, hidden], B: [2 * ffn, rank]
        weight = (weight.float() + b[rows].float() @ a.float()).to(weight.dtype)
    first = {"weight": weight} if gate_up.bias is None else {"weight": weight, "bias": gate_up.bias[rows]}
    second = {"weight": down.weight[:, idx]} if down.bias is None else {"weight": down.weight[:, idx], "bias": down.bias}
    return first, second


def mask(feed_forward: nn.Module, slot: int | None, kept: torch.Tensor, stack: contextlib.ExitStack) -> None:
    """Live mask: this application's MLP (the module of its layer; the other applications are other
    modules) computes what its extracted ``NarrowedMLP`` computes, slicing and merging per call."""
    act = feed_forward.act_fn

    def forward(hidden_state, layer_idx=None):
        return narrowed_forward(hidden_state, *_narrowed(feed_forward, slot, kept), act)
    patch_forward(feed_forward, forward, stack)


@torch.no_grad()
def narrowed_state(feed_forward: nn.Module, slot: int | None, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the application's extracted ``NarrowedMLP``, named relative to it."""
    gate_up, down = _narrowed(feed_forward, slot, kept)
    out = {f"gate_up_proj.{k}": v for k, v in gate_up.items()} | {f"down_proj.{k}": v for k, v in down.items()}
    return {k: v.detach().clone() for k, v in out.items()}


def narrowing_note(narrowed: dict[int, int], delta: int) -> str:
    """The line ``extract`` and ``info`` print: which applications got their own narrowed MLP copy
    and what that did to the parameter count (``delta``: after minus the same plan without it)."""
    where = ", ".join(f"layer {layer} ({width:,})" for layer, width in sorted(narrowed.items()))
    effect = "adds" if delta > 0 else "removes"
    return (f"narrowed MLPs: {len(narrowed)} shared-block application(s) get their own MLP copy with its adapter "
            f"merged ({where}); this {effect} {abs(delta):,} parameters against keeping them on the shared MLP "
            "(a shared MLP goes only when none of its applications uses it)")


def own_copies_note(own: dict[int, nn.Module]) -> str:
    """The line ``info`` prints for a model whose applications (layer -> own MLP) already hold their
    own narrowed MLPs."""
    where = ", ".join(f"layer {layer} ({width_of(mlp):,})" for layer, mlp in sorted(own.items()))
    return f"own narrowed MLPs: {where}; {sum(count_parameters(m) for m in own.values()):,} parameters not shared " \
           "with other applications"
