"""Zamba2's narrowed MLPs: one application of a shared block keeping only some of its MLP channels.

The official Zamba2 scripts (Mamba-Shedder ``hybrid/Zamba2-Pruning/preprocess.py``) first give each
hybrid application its own copy of the shared block it uses, with that application's LoRA-style
``gate_up`` adapter merged into the copy; ``pruned_mlp_channels`` then keeps the first ``width``
channels of one application's copy. Here the shared weights stay shared until extraction:

* **masked** — the application's MLP computes with its kept channels only: rows ``c`` and
  ``ffn + c`` of ``gate_up_proj`` (the gate and up halves) and of its adapter's output projection,
  column ``c`` of ``down_proj`` (``mask``; the other applications of the block are untouched, since
  each application is its own module with tied parameters);
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
from torch import nn
from transformers.activations import ACT2FN

from shedder.arch.feed_forward import mask_mlp_channels

GATE_UP = ("gate_up_proj",)
DOWN = ("down_proj",)


class NarrowedMLP(nn.Module):
    """An application's own MLP of ``width`` channels, with its adapter merged (no adapter list).

    Same call and computation as ``transformers``' ``Zamba2MLP`` without its adapter term:
    ``down(act(gate) * up)`` with ``[gate; up] = gate_up(h)``.
    """

    def __init__(self, config, width: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.intermediate_size = width
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * width, bias=config.add_bias_linear, **factory)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.add_bias_linear, **factory)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_state, layer_idx=None):
        gate, up = torch.chunk(self.gate_up_proj(hidden_state), 2, dim=-1)  # [..., width] each
        return self.down_proj(self.act_fn(gate) * up)


def width_of(feed_forward: nn.Module) -> int:
    """Intermediate channels of an application's MLP (shared or its own)."""
    return feed_forward.gate_up_proj.out_features // 2


def _adapter(feed_forward: nn.Module, slot: int | None) -> nn.Module | None:
    """The application's ``gate_up`` adapter (``Sequential(A, B)``), or None for its own copy."""
    adapters = getattr(feed_forward, "gate_up_proj_adapter_list", None)
    return None if adapters is None or slot is None else adapters[slot]


def mask(feed_forward: nn.Module, slot: int | None, kept: torch.Tensor, stack: contextlib.ExitStack) -> None:
    """Live mask: this application's MLP (the module of its layer) computes with ``kept`` channels."""
    mask_mlp_channels(feed_forward, kept, stack, rows=(), cols=DOWN, fused=GATE_UP)
    adapter = _adapter(feed_forward, slot)
    if adapter is not None:
        mask_mlp_channels(adapter, kept, stack, rows=(), cols=(), fused=("1",))  # B: [2 * ffn, rank]


@torch.no_grad()
def narrowed_state(feed_forward: nn.Module, slot: int | None, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the application's ``NarrowedMLP`` (named relative to it): the kept rows of
    ``gate_up_proj`` with the application's adapter merged (``W + B·A``, summed in float32), the
    kept columns of ``down_proj``."""
    gate_up, down = feed_forward.gate_up_proj, feed_forward.down_proj
    idx = kept.to(gate_up.weight.device)
    rows = torch.cat([idx, idx + width_of(feed_forward)])
    weight = gate_up.weight[rows].float()
    adapter = _adapter(feed_forward, slot)
    if adapter is not None:
        a, b = adapter[0].weight, adapter[1].weight  # A: [rank, hidden], B: [2 * ffn, rank]
        weight = weight + b[rows].float() @ a.float()
    out = {"gate_up_proj.weight": weight.to(gate_up.weight.dtype), "down_proj.weight": down.weight[:, idx]}
    if gate_up.bias is not None:
        out["gate_up_proj.bias"] = gate_up.bias[rows]
    if down.bias is not None:
        out["down_proj.bias"] = down.bias
    return {k: v.detach().clone() for k, v in out.items()}


def narrowing_note(narrowed: dict[int, int], delta: int) -> str:
    """The line ``extract`` and ``info`` print: which applications got their own narrowed MLP copy
    and what that did to the parameter count (``delta``: after minus the same plan without it)."""
    where = ", ".join(f"layer {layer} ({width:,})" for layer, width in sorted(narrowed.items()))
    effect = "adds" if delta > 0 else "removes"
    return (f"narrowed MLPs: {len(narrowed)} shared-block application(s) get their own MLP copy with its adapter "
            f"merged ({where}); this {effect} {abs(delta):,} parameters against keeping them on the shared MLP "
            "(a shared MLP goes only when none of its applications uses it)")


def own_copies_note(widths: dict[int, int], params: int) -> str:
    """The line ``info`` prints for a model whose applications already hold their own narrowed MLPs."""
    where = ", ".join(f"layer {layer} ({width:,})" for layer, width in sorted(widths.items()))
    return f"own narrowed MLPs: {where}; {params:,} parameters not shared with other applications"
