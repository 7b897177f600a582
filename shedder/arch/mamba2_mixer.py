"""The Mamba-2 (SSD) mixer forward, written once for every family that uses it.

One function, ``ssd_forward``, computes a Mamba-2 mixer under a *layout* — which heads exist in
each B/C group and whether the SSD scan runs at all. It serves two purposes with the same code:

* **live mask**: on a stock mixer (``Mamba2Mixer``, ``NemotronHMamba2Mixer``, ``BambaMixer``,
  ``Zamba2MambaMixer``, ``FalconH1Mixer``) with a ``Selection`` of index tensors into its full
  parameters; the weights are sliced per call, never modified;
* **extracted model**: as the forward of ``PrunedMamba2Mixer``, whose parameters already have the
  kept shapes (no selection).

Because both paths run the same operations on the same numbers, masked logits equal extracted
logits. Removing a component means:

* ``ssm``: the SSD scan (with its D skip) is replaced by identity on the conv output's x part,
  ``y = x``; then the gated RMSNorm and out_proj as usual. A_log, D, dt_bias and the in_proj rows /
  conv channels that only feed B, C and dt are gone. An SSM-less layer caches only its conv state.
* ``head``: one head's ``head_dim`` channels of z and x (in_proj rows, conv channels, norm weight,
  out_proj columns), its dt row and its dt_bias / A_log / D entries are gone. B and C stay shared
  per group. Groups may keep unequal head counts: each kept head is mapped to its group by an index
  tensor, and the gated RMSNorm normalises each group over its kept channels only (zeroing channels
  would not be equivalent: it changes the group's RMS).

How a family uses this module: its adapter (a plain ``Adapter`` subclass) calls, for the layers
holding a Mamba-2 mixer, ``components`` (inventory), ``check`` (validation), ``mask`` (live mask),
``spec_fields`` (the ``ssm`` / ``heads_per_group`` fields of its ``LayerSpec``), ``pruned_state``
(extraction) and ``build`` (swaps in a ``PrunedMamba2Mixer`` when the spec changes the mixer);
``even_layout`` gives what a stock config builds.

Per-family differences (Falcon-H1's muP multipliers and optional norm) are a ``Mamba2Hooks`` value.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba2.modeling_mamba2 import (
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba2_selective_state_update,
)

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch.base import patch_forward
from shedder.arch.ssd_scan import chunk_scan
from shedder.arch.spec import LayerSpec


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class MixerLayout:
    """The structure a mixer computes with: heads per B/C group, and whether the scan runs."""

    heads_per_group: tuple[int, ...]
    ssm: bool = True

    @classmethod
    def of_stock(cls, mixer: nn.Module) -> "MixerLayout":
        """The full layout of a stock mixer (``num_heads`` split evenly over ``n_groups``)."""
        per = mixer.num_heads // mixer.n_groups
        return cls(tuple([per] * mixer.n_groups), True)

    @classmethod
    def of_spec(cls, spec: LayerSpec, stock: "MixerLayout") -> "MixerLayout":
        """The layout a ``LayerSpec`` asks of a layer whose stock layout is ``stock``."""
        return cls(spec.heads_per_group or stock.heads_per_group, spec.ssm)

    def spec_fields(self, stock: "MixerLayout") -> dict:
        """This layout as ``LayerSpec`` fields (only what differs from ``stock``)."""
        out = {} if self.ssm else {"ssm": False}
        if self.heads_per_group != stock.heads_per_group:
            out["heads_per_group"] = self.heads_per_group
        return out

    @property
    def num_heads(self) -> int:
        return sum(self.heads_per_group)

    @property
    def n_groups(self) -> int:
        return len(self.heads_per_group)

    @property
    def equal_groups(self) -> bool:
        return len(set(self.heads_per_group)) == 1

    @functools.cached_property
    def head_group(self) -> tuple[int, ...]:
        """Group of each head, in head order (heads of a group are contiguous)."""
        return tuple(g for g, n in enumerate(self.heads_per_group) for _ in range(n))

    def after_removing(self, remove_ssm: bool, remove_heads: Iterable[int]) -> "MixerLayout":
        """The layout left after removing the SSM and/or some heads (indices in this layout)."""
        gone = set(remove_heads)
        counts = [0] * self.n_groups
        for h, g in enumerate(self.head_group):
            if h not in gone:
                counts[g] += 1
        return MixerLayout(tuple(counts), self.ssm and not remove_ssm)


@functools.lru_cache(maxsize=256)
def _group_index(heads_per_group: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[H] group of each head, as a tensor on ``device`` (cached: built once per layout; a normal
    tensor even when first asked for under ``inference_mode``, so training can index with it too)."""
    with torch.inference_mode(False):
        return torch.tensor([g for g, n in enumerate(heads_per_group) for _ in range(n)], device=device)


def mixer_layout(mixer: nn.Module) -> MixerLayout:
    """The layout of a stock or pruned mixer."""
    return getattr(mixer, "layout", None) or MixerLayout.of_stock(mixer)


def head_group_problems(layout: MixerLayout, layer: int, removed_heads: Iterable[int]) -> list[str]:
    """Why removing ``removed_heads`` from a layer of ``layout`` is not allowed (empty if it is)."""
    gone = set(removed_heads)
    if gone and len(gone) >= layout.num_heads:
        return [f"layer {layer}: removing all its {layout.num_heads} heads leaves the mixer empty; "
                "remove the block instead"]
    out = []
    for g in range(layout.n_groups):
        heads = [h for h, hg in enumerate(layout.head_group) if hg == g]
        if heads and all(h in gone for h in heads):
            out.append(f"layer {layer}, group {g}: removing all its heads ({heads[0]}..{heads[-1]}) leaves the "
                       "group empty; remove the SSM or the block instead")
    return out


# ------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """Index tensors into a mixer's current parameters (its ``layout``) for a smaller layout.

    ``in_rows`` index in_proj's output rows (z, x[, B, C, dt] in the stock order), ``conv`` the
    conv1d channels (x[, B, C]), ``inner`` the x/z channels (norm weight, out_proj columns) and
    ``heads`` the per-head vectors (dt_bias, A_log, D; empty when the SSM is removed).
    """

    in_rows: torch.Tensor
    conv: torch.Tensor
    inner: torch.Tensor
    heads: torch.Tensor

    @classmethod
    def of(cls, layout: MixerLayout, head_dim: int, state_size: int, remove_ssm: bool,
           remove_heads: Iterable[int]) -> "Selection":
        gone = set(remove_heads)
        H, P, N, G = layout.num_heads, head_dim, state_size, layout.n_groups
        inner_size, bc = H * P, G * N
        heads = torch.tensor([h for h in range(H) if h not in gone], dtype=torch.long)
        inner = (heads[:, None] * P + torch.arange(P)).reshape(-1)                 # [H'*P]
        keep_ssm = layout.ssm and not remove_ssm
        if keep_ssm:
            bc_idx = inner_size + torch.arange(2 * bc)                             # B and C channels of xBC
            conv = torch.cat([inner, bc_idx])
            dt_rows = 2 * inner_size + 2 * bc + heads
            in_rows = torch.cat([inner, inner_size + conv, dt_rows])
        else:
            conv = inner
            in_rows = torch.cat([inner, inner_size + inner])
        return cls(in_rows, conv, inner, heads if keep_ssm else heads[:0])

    def to(self, device) -> "Selection":
        return Selection(*(t.to(device) for t in (self.in_rows, self.conv, self.inner, self.heads)))


def _proj_sizes(layout: MixerLayout, head_dim: int, state_size: int) -> tuple[int, int]:
    """(in_proj output rows, conv channels) of a mixer with this layout."""
    inner = layout.num_heads * head_dim
    conv = inner + (2 * layout.n_groups * state_size if layout.ssm else 0)
    return inner + conv + (layout.num_heads if layout.ssm else 0), conv


# -------------------------------------------------------------------------------------- hooks
def _project(mixer, hidden_states, weight, bias, select: Selection | None):
    """in_proj with (possibly) selected rows: [b, l, hidden] -> [b, l, rows]."""
    return F.linear(hidden_states, weight, bias)


def _gate_norm(mixer, y, gate, weight, layout: MixerLayout):
    """Gated RMSNorm normalising each group over its (kept) channels: [b, l, H*P] -> same."""
    return gated_group_rms_norm(y, gate, weight, _norm_eps(mixer), layout, mixer.head_dim)


def _no_init(pruned: nn.Module, template: nn.Module) -> None:
    pass


def _no_extra_state(mixer, select: Selection) -> dict[str, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class Mamba2Hooks:
    """Per-family differences around the shared forward, as plain functions (defaults: Mamba-2's,
    also Nemotron-H's, Bamba's and Zamba2's; Falcon-H1 gives its muP multipliers and optional norm):
    ``project`` (in_proj on the selected rows), ``gate_norm`` (the gated norm), ``init_pruned``
    (extra attributes / buffers of a new pruned mixer) and ``extra_state`` (its extra tensors)."""

    project: Callable = _project
    gate_norm: Callable = _gate_norm
    init_pruned: Callable = _no_init
    extra_state: Callable = _no_extra_state


MAMBA2_HOOKS = Mamba2Hooks()


def _norm_eps(mixer) -> float:
    return mixer.norm.variance_epsilon


def gated_group_rms_norm(y, gate, weight, eps: float, layout: MixerLayout, head_dim: int):
    """``weight * groupnorm(y * silu(gate))`` with the RMS of each group taken over its own
    channels. y, gate: [..., H*P] with heads in group order; weight: [H*P]."""
    in_dtype = y.dtype
    y = y.float()
    if gate is not None:
        y = y * F.silu(gate.float())
    *pre, width = y.shape
    if layout.equal_groups:  # the stock computation, bit for bit
        grouped = y.view(*pre, layout.n_groups, width // layout.n_groups)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
        y = grouped.view(*pre, width)
    else:
        heads = y.view(*pre, layout.num_heads, head_dim)                            # [..., H, P]
        group = _group_index(layout.heads_per_group, y.device)
        sums = heads.new_zeros(*pre, layout.n_groups).index_add_(-1, group, heads.pow(2).sum(-1))
        counts = torch.tensor(layout.heads_per_group, device=y.device, dtype=y.dtype) * head_dim
        var = (sums / counts)[..., group]                                          # [..., H]
        y = (heads * torch.rsqrt(var + eps)[..., None]).view(*pre, width)
    return weight * y.to(in_dtype)


# ------------------------------------------------------------------------------------ forward
@dataclass
class _Weights:
    in_w: torch.Tensor
    in_b: torch.Tensor | None
    conv_w: torch.Tensor          # [C, K]
    conv_b: torch.Tensor | None
    norm_w: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    dt_bias: torch.Tensor | None
    A_log: torch.Tensor | None
    D: torch.Tensor | None


def _take(t, idx, dim=0):
    return None if t is None else t.index_select(dim, idx)


def _weights(mixer, select: Selection | None, ssm: bool) -> _Weights:
    norm = getattr(mixer, "norm", None)
    norm_w = getattr(norm, "weight", None)
    conv_w = mixer.conv1d.weight.squeeze(1)
    if select is None:
        return _Weights(mixer.in_proj.weight, mixer.in_proj.bias, conv_w, mixer.conv1d.bias, norm_w,
                        mixer.out_proj.weight, mixer.out_proj.bias,
                        *((mixer.dt_bias, mixer.A_log, mixer.D) if ssm else (None, None, None)))
    return _Weights(
        _take(mixer.in_proj.weight, select.in_rows), _take(mixer.in_proj.bias, select.in_rows),
        _take(conv_w, select.conv), _take(mixer.conv1d.bias, select.conv), _take(norm_w, select.inner),
        _take(mixer.out_proj.weight, select.inner, 1), mixer.out_proj.bias,
        *((_take(mixer.dt_bias, select.heads), _take(mixer.A_log, select.heads), _take(mixer.D, select.heads))
          if ssm else (None, None, None)))


# Adapted from transformers.models.mamba2.modeling_mamba2.Mamba2Mixer.forward, v5.24
# (the same computation as BambaMixer, NemotronHMamba2Mixer and Zamba2MambaMixer; tests compare all four)
def ssd_forward(mixer: nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                layout: MixerLayout, select: Selection | None = None, hooks: Mamba2Hooks = MAMBA2_HOOKS,
                **kwargs) -> torch.Tensor:
    """A Mamba-2 mixer's forward under ``layout``: [b, l, hidden] -> [b, l, hidden].

    Reads the mixer's attributes (head_dim, ssm_state_size, chunk_size, time_step_limit,
    activation, conv_kernel_size, layer_idx, in_proj, conv1d, norm, out_proj, dt_bias, A_log, D).
    ``select`` maps a larger (stock) mixer's parameters onto ``layout``; None when the parameters
    already have ``layout``'s shapes. Supports the ``transformers`` cache (prefill and one-token
    decode) exactly like the stock mixers; an SSM-less layout only keeps a conv state.
    """
    _, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    H, P, N, G = layout.num_heads, mixer.head_dim, mixer.ssm_state_size, layout.n_groups
    inner = H * P
    idx = mixer.layer_idx
    w = _weights(mixer, select, layout.ssm)

    conv_state = recurrent_state = None
    if cache is not None:
        conv_state = cache.get_conv_state(idx, state_idx=0)
        recurrent_state = cache.get_recurrent_state(idx, state_idx=0)

    hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
    projected = hooks.project(mixer, hidden_states, w.in_w, w.in_b, select)       # [b, l, rows]
    if layout.ssm:
        gate, xBC, dt = projected.split([inner, inner + 2 * G * N, H], dim=-1)
    else:
        gate, xBC = projected.split([inner, inner], dim=-1)

    # depthwise causal conv over the kept channels: [b, l, C] -> [b, C, l] -> [b, l, C]
    xBC = xBC.transpose(1, 2)
    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(idx):
        xBC = causal_conv1d_update(xBC, conv_state, w.conv_w, w.conv_b, activation=mixer.activation)
    else:
        if cache is not None:
            xBC = cache.update_conv_state(xBC, idx, conv_kernel_size=mixer.conv_kernel_size)
        xBC = causal_conv1d_fn(xBC, w.conv_w, w.conv_b, activation=mixer.activation, **kwargs)
        if cache is not None:
            xBC = xBC[:, :, -seq_len:]
    xBC = apply_mask_to_padding_states(xBC.transpose(1, 2), attention_mask)

    if layout.ssm:
        x, B, C = xBC.split([inner, G * N, G * N], dim=-1)
        y = _scan(mixer, layout, x, B, C, dt, w, cache, recurrent_state, **kwargs)  # [b, l, H*P]
    else:
        y = xBC                                                                    # y = x
    y = hooks.gate_norm(mixer, y, gate, w.norm_w, layout)
    return F.linear(y.to(dtype), w.out_w, w.out_b)


# Adapted from transformers.models.mamba2.modeling_mamba2.Mamba2Mixer.forward, v5.24 (its scan part)
def _scan(mixer, layout: MixerLayout, x, B, C, dt, w: _Weights, cache, recurrent_state, **kwargs):
    """The SSD scan (chunked for prefill: ``ssd_scan.chunk_scan``; recurrent for decode) with D skip."""
    batch, seq_len, _ = x.shape
    H, P, N, G = layout.num_heads, mixer.head_dim, mixer.ssm_state_size, layout.n_groups
    B = B.reshape(batch, seq_len, G, N)
    C = C.reshape(batch, seq_len, G, N)
    if not layout.equal_groups:  # give every head its group's B/C: [b, l, G, N] -> [b, l, H, N]
        group = _group_index(layout.heads_per_group, x.device)
        B, C, G = B[:, :, group], C[:, :, group], H
    A = -torch.exp(w.A_log.float())
    if recurrent_state is not None and seq_len == 1:
        out = mamba2_selective_state_update(
            recurrent_state, x.view(batch, H, P), dt.transpose(1, 2).expand(-1, -1, P),
            A[:, None, None].expand(-1, P, N), B.view(batch, G, N), C.view(batch, G, N),
            w.D[:, None].expand(-1, P), z=None, dt_bias=w.dt_bias[:, None].expand(-1, P), dt_softplus=True,
            **kwargs)
        return out.view(batch, 1, -1)
    result = chunk_scan(  # the engine's CPU scan unless mamba-ssm serves CUDA tensors
        x.view(batch, seq_len, H, P), dt, A, B, C, chunk_size=mixer.chunk_size, D=w.D, z=None,
        return_final_states=cache is not None, dt_bias=w.dt_bias, dt_softplus=True,
        initial_states=recurrent_state, dt_limit=mixer.time_step_limit, **kwargs)
    if cache is not None:
        result, final_state = result
        cache.update_recurrent_state(final_state, layer_idx=mixer.layer_idx)
    return result.reshape(batch, seq_len, -1)


# -------------------------------------------------------------------------------- live masks
def mask(mixer: nn.Module, comps: Iterable[Component], stack: contextlib.ExitStack,
         hooks: Mamba2Hooks = MAMBA2_HOOKS) -> None:
    """Live mask: ``mixer`` (stock or pruned) computes without the SSM / heads ``comps`` remove until
    ``stack`` closes (untouched when they remove none). The patched forward takes the stock mixer's
    call signature."""
    remove_ssm, remove_heads = ssm_removals(comps)
    if not (remove_ssm or remove_heads):
        return
    layout = mixer_layout(mixer)
    new = layout.after_removing(remove_ssm, remove_heads)
    select = Selection.of(layout, mixer.head_dim, mixer.ssm_state_size, remove_ssm, remove_heads)
    select = select.to(mixer.in_proj.weight.device)

    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("cache_params", cache)  # the stock mixers' deprecated name
        return ssd_forward(mixer, hidden_states, cache, attention_mask, layout=new, select=select, hooks=hooks,
                           **kwargs)

    patch_forward(mixer, forward, stack)


# -------------------------------------------------------------------------------- extraction
def pruned_state(mixer: nn.Module, comps: Iterable[Component],
                 hooks: Mamba2Hooks = MAMBA2_HOOKS) -> dict[str, torch.Tensor] | None:
    """Extraction: the pruned mixer's tensors (names relative to the mixer, sliced copies of
    ``mixer``'s) when ``comps`` change it, else None (the mixer is kept as it is)."""
    remove_ssm, remove_heads = ssm_removals(comps)
    if not (remove_ssm or remove_heads):
        return None
    layout = mixer_layout(mixer)
    new = layout.after_removing(remove_ssm, remove_heads)
    select = Selection.of(layout, mixer.head_dim, mixer.ssm_state_size, remove_ssm, remove_heads)
    select = select.to(mixer.in_proj.weight.device)
    w = _weights(mixer, select, new.ssm)
    out = {"in_proj.weight": w.in_w, "conv1d.weight": w.conv_w.unsqueeze(1), "out_proj.weight": w.out_w}
    optional = {"in_proj.bias": w.in_b, "conv1d.bias": w.conv_b, "norm.weight": w.norm_w, "out_proj.bias": w.out_b,
                "dt_bias": w.dt_bias, "A_log": w.A_log, "D": w.D}
    out.update({k: v for k, v in optional.items() if v is not None})
    out.update(hooks.extra_state(mixer, select))
    return {k: v.detach().clone() for k, v in out.items()}


class GroupedGatedNorm(nn.Module):
    """Holds the pruned mixer's gated-norm weight (named ``norm.weight`` as in the stock mixers)."""

    def __init__(self, width: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.variance_epsilon = eps


class PrunedMamba2Mixer(nn.Module):
    """A Mamba-2 mixer with a pruned layout; parameter names match the stock mixers', so a pruned
    state dict is a row/column subset of the stock one. Scalars are copied from ``template`` (a
    stock mixer of the same family and layer); the forward is ``ssd_forward``."""

    _SCALARS = ("hidden_size", "head_dim", "ssm_state_size", "conv_kernel_size", "layer_idx", "activation",
                "chunk_size", "time_step_limit", "layer_type")

    def __init__(self, template: nn.Module, layout: MixerLayout, hooks: Mamba2Hooks = MAMBA2_HOOKS):
        super().__init__()
        for name in self._SCALARS:
            if hasattr(template, name):
                setattr(self, name, getattr(template, name))
        self.layout = layout
        self.hooks = hooks
        self.num_heads, self.n_groups = layout.num_heads, layout.n_groups
        self.intermediate_size = layout.num_heads * self.head_dim
        rows, self.conv_dim = _proj_sizes(layout, self.head_dim, self.ssm_state_size)
        hidden = template.in_proj.in_features
        w = template.in_proj.weight
        factory = {"device": w.device, "dtype": w.dtype}  # the template's, never a process-wide default
        self.in_proj = nn.Linear(hidden, rows, bias=template.in_proj.bias is not None, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.conv_kernel_size, groups=self.conv_dim,
                                padding=self.conv_kernel_size - 1, bias=template.conv1d.bias is not None, **factory)
        if getattr(getattr(template, "norm", None), "weight", None) is not None:  # not None / nn.Identity
            self.norm = GroupedGatedNorm(self.intermediate_size, _norm_eps(template), **factory)
        if layout.ssm:
            self.dt_bias = nn.Parameter(torch.empty(layout.num_heads, **factory))
            self.A_log = nn.Parameter(torch.empty(layout.num_heads, **factory))
            self.D = nn.Parameter(torch.empty(layout.num_heads, **factory))
        self.out_proj = nn.Linear(self.intermediate_size, template.out_proj.out_features,
                                  bias=template.out_proj.bias is not None, **factory)
        hooks.init_pruned(self, template)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("cache_params", cache)  # the stock mixers' deprecated name
        return ssd_forward(self, hidden_states, cache, attention_mask, layout=self.layout, hooks=self.hooks, **kwargs)


# ------------------------------------------------------------------- per-kind steps of a family
# With ``mask`` and ``pruned_state`` above: what a family file calls for the ``ssm`` / ``head`` kinds
# of a layer holding a Mamba-2 mixer. ``comps`` are the plan's components of that layer (other kinds
# are ignored).

def even_layout(num_heads: int, n_groups: int) -> MixerLayout:
    """The layout a stock config builds: ``num_heads`` split evenly over ``n_groups``."""
    return MixerLayout((num_heads // n_groups,) * n_groups)


def components(layer: int, mixer: nn.Module) -> list[Component]:
    """Inventory: the ``ssm`` and ``head`` components ``mixer`` (stock or pruned) still offers."""
    layout = mixer_layout(mixer)
    return ([Component("ssm", layer)] if layout.ssm else []) + [Component("head", layer, h) for h in range(layout.num_heads)]


def ssm_removals(comps: Iterable[Component]) -> tuple[bool, list[int]]:
    """(remove the SSM?, heads to remove) from one layer's components (other kinds ignored)."""
    comps = list(comps)
    return any(c.kind == "ssm" for c in comps), sorted(c.index for c in comps if c.kind == "head")


def check(layer: int, mixer: nn.Module, comps: Iterable[Component]) -> None:
    """Validation: refuse head removals that would empty the mixer or one of its B/C groups."""
    _, heads = ssm_removals(comps)
    if heads:
        problems = head_group_problems(mixer_layout(mixer), layer, heads)
        if problems:
            raise PlanError(problems[0])


def spec_fields(mixer: nn.Module, comps: Iterable[Component], stock: MixerLayout) -> dict:
    """Spec: ``LayerSpec`` fields of the mixer after removing ``comps`` (what differs from ``stock``)."""
    return mixer_layout(mixer).after_removing(*ssm_removals(comps)).spec_fields(stock)


def build(stock: nn.Module, spec: LayerSpec, hooks: Mamba2Hooks = MAMBA2_HOOKS) -> nn.Module:
    """Build time: the mixer a freshly built stock layer holds for ``spec``: ``stock`` itself when
    the spec keeps its layout, else a ``PrunedMamba2Mixer``."""
    full = MixerLayout.of_stock(stock)
    layout = MixerLayout.of_spec(spec, full)
    return stock if layout == full else PrunedMamba2Mixer(stock, layout, hooks)


def uniform_layout(layouts: list[MixerLayout]) -> MixerLayout | None:
    """The one layout all ``layouts`` share if a stock config can express it (SSM kept, equal groups)."""
    if not layouts or len(set(layouts)) != 1:
        return None
    layout = layouts[0]
    return layout if layout.ssm and layout.equal_groups else None
