"""Mamba-1 mixer machinery shared by every family whose layers hold a Mamba-1 selective-scan mixer
(Mamba, Falcon-Mamba, and the Mamba layers of Jamba).

One forward, ``mamba1_forward(mixer, ..., ssm=..., kept=...)``, serves two roles:

* the live mask: patched onto a stock mixer instance, it gathers the kept inner channels from the
  stock weights on the fly (weights are read, never written);
* the forward of ``PrunedMamba1Mixer``, the mixer of extracted models, whose weights are already
  sliced (``kept=None``).

Because both roles run the same code on the same numbers, the masked model and the extracted model
agree exactly. Gathering instead of zeroing the removed channels gives the same function (a zeroed
channel has zero conv output, zero scan output and a zero out_proj contribution, and x_proj sees
zeros in its columns) while doing only the work of the smaller model.

Per-family differences are hooks, not copies:

* B/C/dt RMS norms (Falcon-Mamba, Jamba) are applied when the mixer has ``dt_layernorm``,
  ``b_layernorm`` and ``c_layernorm`` modules; ``PrunedMamba1Mixer.from_stock`` carries those
  modules over from the stock mixer (they act on the rank / state dimensions, never on inner
  channels).
* Attribute names (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``,
  ``intermediate_size``, ``ssm_state_size``, ``time_step_rank``, ``conv_kernel_size``,
  ``activation``, ``layer_idx``) are those all three ``transformers`` mixers share.

The scan and conv kernels are the ones ``transformers.models.mamba.modeling_mamba`` resolved at
import time (the PyTorch reference, or the ``mamba-ssm`` / ``causal-conv1d`` kernels when installed),
called exactly as the stock mixer calls them; the fused training-only path is never taken.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba import modeling_mamba as hf_mamba

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch.base import patch_forward
from shedder.arch.spec import LayerSpec

#: Parameters that belong to the selective scan: gone when a layer's SSM is removed.
SSM_PARAM_PREFIXES = ("x_proj.", "dt_proj.", "A_log", "D", "dt_layernorm.", "b_layernorm.", "c_layernorm.")

#: Dimension that indexes inner channels, per parameter name (in_proj holds x rows then z rows).
CHANNEL_DIMS = {
    "in_proj.weight": 0, "in_proj.bias": 0,       # [2 * I, H], [2 * I]
    "conv1d.weight": 0, "conv1d.bias": 0,         # [I, 1, K], [I]
    "x_proj.weight": 1,                           # [R + 2 * N, I]
    "dt_proj.weight": 0, "dt_proj.bias": 0,       # [I, R], [I]
    "A_log": 0, "D": 0,                           # [I, N], [I]
    "out_proj.weight": 1,                         # [H, I]
}

_NORMS = ("dt_layernorm", "b_layernorm", "c_layernorm")


def has_ssm(mixer: nn.Module) -> bool:
    """Whether a (stock or pruned) mixer still runs its selective scan."""
    return getattr(mixer, "A_log", None) is not None


def has_bcdt_norms(mixer: nn.Module) -> bool:
    """Falcon-Mamba and Jamba normalise dt, B and C after x_proj; Mamba does not."""
    return all(getattr(mixer, name, None) is not None for name in _NORMS)


def kept_channels(intermediate_size: int, group_size: int, removed_groups, device=None) -> torch.Tensor | None:
    """Indices of the inner channels left after removing ``removed_groups`` (``None``: all kept)."""
    removed = set(removed_groups)
    if not removed:
        return None
    keep = [c for c in range(intermediate_size) if c // group_size not in removed]
    return torch.tensor(keep, dtype=torch.long, device=device)


def slice_channels(name: str, tensor: torch.Tensor, kept: torch.Tensor | None, intermediate_size: int) -> torch.Tensor:
    """``tensor`` (mixer parameter ``name``) restricted to the ``kept`` inner channels."""
    dim = CHANNEL_DIMS.get(name)
    if kept is None or dim is None:
        return tensor
    index = kept.to(tensor.device)
    if name.startswith("in_proj."):
        index = torch.cat([index, index + intermediate_size])  # x rows, then the matching z rows
    return tensor.index_select(dim, index)


def pruned_mixer_state(mixer: nn.Module, remove_ssm: bool, kept: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The state dict (names relative to the mixer) of ``mixer`` with its SSM removed and/or
    restricted to ``kept`` inner channels (the Mamba-2 core's function takes the same booleans)."""
    out = {}
    for name, tensor in mixer.state_dict().items():
        if remove_ssm and name.startswith(SSM_PARAM_PREFIXES):
            continue
        out[name] = slice_channels(name, tensor, kept, mixer.intermediate_size)
    return out


def _weights(mixer: nn.Module, ssm: bool, kept: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The mixer's parameters the forward needs, gathered to ``kept`` channels (views when kept is None).

    Read as attributes (``mixer.in_proj.weight``), not from ``named_parameters``, so a parametrized
    weight (e.g. LoRA factors during recovery) is seen with its parametrization applied."""
    names = ["in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "out_proj.weight", "out_proj.bias"]
    if ssm:
        names += ["x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D"]
    out = {}
    for n in names:
        module, _, attr = n.rpartition(".")
        tensor = getattr(mixer.get_submodule(module) if module else mixer, attr, None)
        out[n] = None if tensor is None else slice_channels(n, tensor, kept, mixer.intermediate_size)
    return out


# Adapted from transformers.models.mamba.modeling_mamba.MambaMixer.forward, v5.24
def mamba1_forward(mixer: nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                   ssm: bool = True, kept: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Mamba-1 mixer forward with a mask: ``ssm=False`` replaces the selective scan and its D skip by
    identity (``y = x * silu(z)``, the gate the scan applies); ``kept`` restricts the inner channels.

    hidden_states: [B, L, H] -> [B, L, H]. Supports the ``transformers`` linear-attention cache:
    prefill (any L) stores the conv state and, with an SSM, the recurrent state; decode (L == 1)
    updates them in place. Cache states are created lazily from tensor shapes, so layers of uneven
    width (and SSM-less layers, which keep only a conv state) need nothing special.
    """
    seq_len = hidden_states.shape[1]
    dtype = hidden_states.dtype
    layer_idx = mixer.layer_idx
    w = _weights(mixer, ssm, kept)
    conv_weight = w["conv1d.weight"].squeeze(1)  # [I, K]
    if cache is not None:
        conv_state = cache.get_conv_state(layer_idx, state_idx=0)
        recurrent_state = cache.get_recurrent_state(layer_idx, state_idx=0) if ssm else None
    else:
        conv_state, recurrent_state = None, None

    # 1. input projection: [B, L, H] -> x, z: [B, I, L]
    hidden_states = hf_mamba.apply_mask_to_padding_states(hidden_states, attention_mask)
    projected = F.linear(hidden_states, w["in_proj.weight"], w["in_proj.bias"]).transpose(1, 2)
    x, gate = projected.chunk(2, dim=1)

    # 2. causal depthwise conv + activation: [B, I, L]
    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(layer_idx):
        x = hf_mamba.causal_conv1d_update(x, conv_state, conv_weight, w["conv1d.bias"], activation=mixer.activation)
    else:
        if cache is not None:
            x = cache.update_conv_state(x, layer_idx, conv_kernel_size=mixer.conv_kernel_size)
        x = hf_mamba.causal_conv1d_fn(x, conv_weight, w["conv1d.bias"], activation=mixer.activation)
        if cache is not None:
            x = x[:, :, -seq_len:]
    x = hf_mamba.apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # [B, L, I]

    # 3. selective scan (or identity): y [B, I, L]
    if ssm:
        y = _selective_scan(mixer, w, x, gate, cache, recurrent_state)
    else:
        y = x.transpose(1, 2) * F.silu(gate)

    # 4. output projection: [B, L, I] -> [B, L, H]
    return F.linear(y.transpose(1, 2).to(dtype), w["out_proj.weight"], w["out_proj.bias"])


# Adapted from transformers.models.mamba.modeling_mamba.MambaMixer.forward, v5.24 (its step 3)
def _selective_scan(mixer, w, x, gate, cache, recurrent_state) -> torch.Tensor:
    """x: [B, L, I], gate: [B, I, L] -> [B, I, L], mirroring the stock mixer's step 3."""
    seq_len = x.shape[1]
    state_size, rank = mixer.ssm_state_size, mixer.time_step_rank
    A = -torch.exp(w["A_log"].float())  # [I, N]
    time_step, B, C = torch.split(F.linear(x, w["x_proj.weight"]), [rank, state_size, state_size], dim=-1)
    if has_bcdt_norms(mixer):
        time_step = mixer.dt_layernorm(time_step)
        B = mixer.b_layernorm(B)
        C = mixer.c_layernorm(C)
    time_step = w["dt_proj.weight"] @ time_step.transpose(1, 2)  # [B, I, L]
    dt_bias = w["dt_proj.bias"].float() if w["dt_proj.bias"] is not None else None

    if recurrent_state is not None and seq_len == 1:
        return hf_mamba.mamba_selective_state_update(
            recurrent_state, x.transpose(1, 2)[..., 0], time_step[..., 0], A, B[:, 0], C[:, 0], w["D"],
            z=gate[..., 0], dt_bias=dt_bias, dt_softplus=True,
        ).unsqueeze(-1)
    result = hf_mamba.mamba_selective_scan(
        x.transpose(1, 2), time_step, A, B.transpose(1, 2), C.transpose(1, 2), D=w["D"].float(), z=gate,
        delta_bias=dt_bias, delta_softplus=True, return_last_state=cache is not None,
        use_mambapy=mixer.use_mambapy, use_associative_scan=mixer.use_associative_scan,
    )
    if cache is None:
        return result
    y, final_state = result
    cache.update_recurrent_state(final_state, mixer.layer_idx)
    return y


@dataclasses.dataclass(frozen=True)
class Mamba1Dims:
    """The shape of a Mamba-1 mixer (everything ``PrunedMamba1Mixer`` needs to allocate one)."""

    hidden_size: int
    intermediate_size: int
    ssm_state_size: int
    time_step_rank: int
    conv_kernel_size: int
    use_bias: bool
    use_conv_bias: bool
    activation: str

    @classmethod
    def of(cls, mixer: nn.Module) -> "Mamba1Dims":
        return cls(int(mixer.hidden_size), int(mixer.intermediate_size), int(mixer.ssm_state_size),
                   int(mixer.time_step_rank), int(mixer.conv_kernel_size), mixer.in_proj.bias is not None,
                   mixer.conv1d.bias is not None, mixer.activation)


class PrunedMamba1Mixer(nn.Module):
    """A Mamba-1 mixer of an extracted model: fewer inner channels and/or no selective scan.

    Parameter names match the stock mixer's, so state dicts carry over; SSM parameters (x_proj,
    dt_proj, A_log, D and any dt/B/C norms) exist only when ``ssm`` is True.
    """

    def __init__(self, dims: Mamba1Dims, layer_idx: int, ssm: bool, norms: dict[str, nn.Module] | None = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        I, H, N, R, K = (dims.intermediate_size, dims.hidden_size, dims.ssm_state_size,
                         dims.time_step_rank, dims.conv_kernel_size)
        self.layer_idx = layer_idx
        self.hidden_size, self.intermediate_size, self.ssm_state_size = H, I, N
        self.time_step_rank, self.conv_kernel_size, self.activation = R, K, dims.activation
        self.use_mambapy = self.use_associative_scan = False
        self.in_proj = nn.Linear(H, 2 * I, bias=dims.use_bias, **factory)
        self.conv1d = nn.Conv1d(I, I, kernel_size=K, groups=I, padding=K - 1, bias=dims.use_conv_bias, **factory)
        if ssm:
            self.x_proj = nn.Linear(I, R + 2 * N, bias=False, **factory)
            self.dt_proj = nn.Linear(R, I, bias=True, **factory)
            self.A_log = nn.Parameter(torch.empty(I, N, **factory))
            self.D = nn.Parameter(torch.empty(I, **factory))
            for name, module in (norms or {}).items():
                self.add_module(name, module)
        self.out_proj = nn.Linear(I, H, bias=dims.use_bias, **factory)

    @classmethod
    def from_stock(cls, stock: nn.Module, intermediate_size: int, ssm: bool) -> "PrunedMamba1Mixer":
        """A pruned mixer shaped like ``stock`` but with ``intermediate_size`` channels and ``ssm`` on/off;
        the stock mixer's dt/B/C norms (if any) are carried over, as they do not depend on the width."""
        dims = dataclasses.replace(Mamba1Dims.of(stock), intermediate_size=intermediate_size)
        norms = {n: copy.deepcopy(getattr(stock, n)) for n in _NORMS} if has_bcdt_norms(stock) else None
        w = stock.in_proj.weight
        pruned = cls(dims, stock.layer_idx, ssm, norms, device=w.device, dtype=w.dtype)
        # the stock scan-implementation switches (mamba.py pscan, associative scan under torch.compile)
        pruned.use_mambapy = getattr(stock, "use_mambapy", False)
        pruned.use_associative_scan = getattr(stock, "use_associative_scan", False)
        return pruned

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return mamba1_forward(self, hidden_states, cache, attention_mask, ssm=has_ssm(self), **kwargs)

    def extra_repr(self) -> str:
        return f"intermediate_size={self.intermediate_size}, ssm={has_ssm(self)}"


def default_channel_group_size(intermediate_size: int, widths=()) -> int:
    """Channels per ``channel_group``: the largest power of two <= 64 that divides the inner width and
    leaves at least 4 groups (1 when none does). 64 keeps kernels aligned on real models (e.g. 80 groups
    for Mamba-2.8B's 5120 channels) while tiny test models still get several groups. ``widths`` are the
    actual layer widths of an already narrowed model: the size is halved until it tiles them all, so a
    model extracted with the default grouping keeps it."""
    size = 64
    while size > 1 and not (intermediate_size % size == 0 and intermediate_size // size >= 4):
        size //= 2
    while size > 1 and any(w % size for w in widths):
        size //= 2
    return size

# ---------------------------------------------------------------------------- adapter helpers
# Per-mixer pieces of an adapter, shared by every family with Mamba-1 mixers. ``comps`` are the
# plan's components of one layer (never a ``block``); what a pruned mixer keeps is the ``ssm`` and
# ``inner`` fields of its layer's ``LayerSpec``.

def mixer_components(mixer: nn.Module, layer: int, group_size: int) -> list[Component]:
    """The ssm (if the mixer still has one) and channel groups of one mixer."""
    comps = [Component("ssm", layer)] if has_ssm(mixer) else []
    return comps + [Component("channel_group", layer, g) for g in range(mixer.intermediate_size // group_size)]


def check_group_size(mixer: nn.Module, layer: int, group_size: int) -> None:
    if group_size <= 0 or mixer.intermediate_size % group_size:
        raise PlanError(f"channel_group size {group_size} does not divide the {mixer.intermediate_size} "
                        f"inner channels of layer {layer}")


def check_mixer(mixer: nn.Module, layer: int, comps: list[Component], group_size: int) -> None:
    """Refuse removing every channel group of a layer (a mixer without channels is a removed block)."""
    groups = mixer.intermediate_size // group_size
    removed = {c.index for c in comps if c.kind == "channel_group"}
    if len(removed) >= groups:
        raise PlanError(f"layer {layer}: removing all {groups} channel groups leaves no channels; "
                        f"remove the block instead (block:{layer})")


def mixer_mask(mixer: nn.Module, comps: list[Component], group_size: int) -> tuple[bool, torch.Tensor | None]:
    """``(ssm, kept)`` for ``mamba1_forward`` when ``comps`` are removed from this mixer."""
    ssm = has_ssm(mixer) and not any(c.kind == "ssm" for c in comps)
    device = mixer.in_proj.weight.device
    kept = kept_channels(mixer.intermediate_size, group_size,
                         [c.index for c in comps if c.kind == "channel_group"], device=device)
    return ssm, kept


def mask_mixer(mixer: nn.Module, comps: list[Component], group_size: int, stack) -> None:
    """Live mask: patch ``mixer.forward`` (undone when ``stack`` closes); weights stay untouched."""
    ssm, kept = mixer_mask(mixer, comps, group_size)
    patch_forward(mixer, functools.partial(mamba1_forward, mixer, ssm=ssm, kept=kept), stack)


def mixer_spec(mixer: nn.Module, comps: list[Component], group_size: int, stock_inner: int) -> dict:
    """``LayerSpec`` fields of a mixer after removing ``comps`` (what differs from a stock mixer of
    ``stock_inner`` channels)."""
    ssm, kept = mixer_mask(mixer, comps, group_size)
    inner = mixer.intermediate_size if kept is None else int(kept.numel())
    return {**({} if ssm else {"ssm": False}), **({} if inner == stock_inner else {"inner": inner})}


def pruned_mixer_weights(mixer: nn.Module, comps: list[Component], group_size: int) -> dict[str, torch.Tensor]:
    """Extracted weights of one mixer (names relative to it)."""
    ssm, kept = mixer_mask(mixer, comps, group_size)
    return pruned_mixer_state(mixer, not ssm, kept)


def build_mixer(stock: nn.Module, spec: LayerSpec) -> nn.Module:
    """The mixer a freshly built stock layer should hold for ``spec``: the stock one when the spec
    asks for its full structure, else a ``PrunedMamba1Mixer``."""
    inner = spec.inner or stock.intermediate_size
    if spec.ssm and inner == stock.intermediate_size:
        return stock
    return PrunedMamba1Mixer.from_stock(stock, inner, spec.ssm)
