"""Zamba (v1) mixer machinery: Mamba-1 selective scans run independently per **Mamba head**.

``transformers``' ``ZambaMambaMixer`` splits its inner channels into ``n_mamba_heads`` heads of
``mamba_head_dim`` channels; each head has its own x_proj and dt_proj (``x_proj_weight``
[heads, R + 2N, head_dim], ``dt_proj_weight`` [heads, head_dim, R]) and runs its own scan, so B, C
and dt of one head are computed from that head's channels only. A head, or a group of channels
inside a head, is therefore an exact unit of removal: its x / gate rows of in_proj (interleaved per
channel: row ``2c`` is x, row ``2c + 1`` the gate), conv channels, its slice of x_proj's input and
dt_proj's output, A_log, D and out_proj columns go, and the other heads compute what they did.

One forward, ``zamba_mixer_forward(mixer, ..., ssm=..., kept=...)``, serves the live mask (patched
onto a stock mixer: the kept channels are gathered from the stock weights on the fly) and
``PrunedZambaMixer``, the mixer of extracted models (weights already sliced, ``kept=None``), so the
masked and the extracted model run the same code on the same numbers. Both see the per-head weights
*flat* over the kept channels (x_proj [R + 2N, I], dt_proj [I, R], dt bias [I], A_log [I, N], D [I])
with ``head_widths`` saying how many consecutive channels each remaining head has; heads may end up
with different widths, which the stock module cannot hold. ``ssm=False`` replaces every head's scan
and D skip by the gate it applies, ``y = x * silu(z)`` (the Mamba-1 meaning of removing the SSM).

The recurrent state of a masked or pruned mixer is kept flat too ([batch, I, N], the heads' states
side by side) instead of the stock [batch, heads, head_dim, N]; each layer's cache slot is written
and read by one forward only, so the layouts never meet.

The scan and conv kernels are those ``transformers.models.zamba.modeling_zamba`` resolved (the
PyTorch reference, or the ``mamba-ssm`` / ``causal-conv1d`` kernels), called as the stock mixer
calls them.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.zamba import modeling_zamba as hf_zamba

from shedder.core.errors import PlanError
from shedder.core.plan import Component
from shedder.arch.base import patch_forward
from shedder.arch.spec import LayerSpec

#: Parameters of the per-head selective scans: gone when a layer's SSM is removed.
SSM_PARAMS = ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D")


def has_ssm(mixer: nn.Module) -> bool:
    """Whether a (stock or pruned) mixer still runs its selective scans."""
    return getattr(mixer, "A_log", None) is not None


def head_widths(mixer: nn.Module) -> tuple[int, ...]:
    """Inner channels of each Mamba head, in order (a stock mixer's heads are all ``mamba_head_dim``)."""
    widths = getattr(mixer, "head_widths", None)
    return tuple(widths) if widths is not None else (int(mixer.mamba_head_dim),) * int(mixer.n_mamba_heads)


def _flat(mixer: nn.Module, name: str) -> torch.Tensor | None:
    """A per-head parameter over all inner channels: x_proj [R + 2N, I], dt_proj [I, R], the others
    [I, ...]. A pruned mixer stores them flat already; a stock one is [heads, ...]."""
    tensor = getattr(mixer, name, None)
    if tensor is None or isinstance(mixer, PrunedZambaMixer):
        return tensor
    if name == "x_proj_weight":  # [heads, R + 2N, head_dim] -> [R + 2N, I]
        return tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1)
    return tensor.reshape(-1, *tensor.shape[2:])


def _in_proj_rows(kept: torch.Tensor) -> torch.Tensor:
    """in_proj rows of the ``kept`` channels, interleaved as the stock layout is (x, gate, x, gate, ...)."""
    return torch.stack([2 * kept, 2 * kept + 1], dim=1).reshape(-1)


def _select(name: str, tensor: torch.Tensor | None, kept: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor`` (flat parameter ``name``) restricted to the ``kept`` inner channels."""
    if tensor is None or kept is None:
        return tensor
    kept = kept.to(tensor.device)
    if name.startswith("in_proj."):
        return tensor.index_select(0, _in_proj_rows(kept))
    if name in ("x_proj_weight", "out_proj.weight"):
        return tensor.index_select(1, kept)
    if name == "out_proj.bias":
        return tensor
    return tensor.index_select(0, kept)


_NAMES = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "out_proj.weight", "out_proj.bias")


def _weights(mixer: nn.Module, ssm: bool, kept: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The flat parameters the forward needs, gathered to ``kept`` channels (read as attributes, so a
    parametrized weight, e.g. LoRA factors during recovery, is seen with its parametrization)."""
    out = {}
    for n in _NAMES:
        module, _, attr = n.rpartition(".")
        out[n] = _select(n, getattr(mixer.get_submodule(module), attr, None), kept)
    for n in SSM_PARAMS if ssm else ():
        out[n] = _select(n, _flat(mixer, n), kept)
    return out


# Adapted from transformers.models.zamba.modeling_zamba.ZambaMambaMixer.forward, v5.24
def zamba_mixer_forward(mixer: nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, *,
                        ssm: bool = True, kept: torch.Tensor | None = None,
                        widths: tuple[int, ...] | None = None, **kwargs) -> torch.Tensor:
    """Zamba mixer forward with a mask: ``ssm=False`` replaces every head's scan by ``x * silu(z)``;
    ``kept`` restricts the inner channels and ``widths`` are the kept channels of each remaining head.

    hidden_states: [B, L, H] -> [B, L, H]; prefill stores the conv and (with an SSM) recurrent
    states in the ``transformers`` cache, decode (L == 1) updates them in place.
    """
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    layer_idx = mixer.layer_idx
    widths = widths if widths is not None else head_widths(mixer)
    w = _weights(mixer, ssm, kept)
    conv_weight = w["conv1d.weight"].squeeze(1)  # [I, K]
    if cache is not None:
        conv_state = cache.get_conv_state(layer_idx, state_idx=0)
        recurrent_state = cache.get_recurrent_state(layer_idx, state_idx=0) if ssm else None
    else:
        conv_state, recurrent_state = None, None

    # 1. input projection, rows interleaved per channel: [B, L, H] -> x, gate: [B, I, L]
    hidden_states = hf_zamba.apply_mask_to_padding_states(hidden_states, attention_mask)
    projected = F.linear(hidden_states, w["in_proj.weight"], w["in_proj.bias"]).transpose(1, 2)
    x, gate = projected.view(batch, -1, 2, seq_len).chunk(2, dim=2)
    x, gate = x.squeeze(2).contiguous(), gate.squeeze(2)

    # 2. causal depthwise conv + activation: [B, I, L]
    if conv_state is not None and seq_len == 1 and not cache.is_recording_past(layer_idx):
        x = hf_zamba.causal_conv1d_update(x, conv_state, conv_weight, w["conv1d.bias"], activation=mixer.activation)
    else:
        if cache is not None:
            x = cache.update_conv_state(x, layer_idx, conv_kernel_size=mixer.conv_kernel_size)
        x = hf_zamba.causal_conv1d_fn(x, conv_weight, w["conv1d.bias"], activation=mixer.activation)
        if cache is not None:
            x = x[:, :, -seq_len:]
    x = hf_zamba.apply_mask_to_padding_states(x.transpose(1, 2), attention_mask).transpose(1, 2)

    # 3. per-head selective scans (or identity): y [B, I, L]
    y = _scans(mixer, w, x, gate, widths, cache, recurrent_state) if ssm else x * F.silu(gate)

    # 4. output projection: [B, L, I] -> [B, L, H]
    return F.linear(y.transpose(1, 2).to(dtype), w["out_proj.weight"], w["out_proj.bias"])


# Adapted from transformers.models.zamba.modeling_zamba.ZambaMambaMixer.forward, v5.24 (its step 3)
def _scans(mixer, w, x, gate, widths, cache, recurrent_state) -> torch.Tensor:
    """x, gate: [B, I, L] -> [B, I, L], one scan per head over its ``widths[h]`` channels."""
    seq_len = x.shape[-1]
    rank, state_size = mixer.time_step_rank, mixer.ssm_state_size
    A = -torch.exp(w["A_log"].float())  # [I, N]
    bias = w["dt_proj_bias"].float() if w["dt_proj_bias"] is not None else None
    outputs, finals, start = [], [], 0
    for width in widths:
        heads = slice(start, start + width)
        start += width
        x_h = x[:, heads]  # [B, w, L]
        params = (w["x_proj_weight"][:, heads] @ x_h).transpose(-1, -2)  # [B, L, R + 2N]
        time_step, B, C = torch.split(params, [rank, state_size, state_size], dim=-1)
        time_step = w["dt_proj_weight"][heads] @ time_step.transpose(-1, -2)  # [B, w, L]
        dt_bias = bias[heads] if bias is not None else None
        if recurrent_state is not None and seq_len == 1:
            outputs.append(hf_zamba.mamba_selective_state_update(
                recurrent_state[:, heads], x_h[..., 0], time_step[..., 0], A[heads], B[:, 0], C[:, 0], w["D"][heads],
                z=gate[:, heads, 0], dt_bias=dt_bias, dt_softplus=True).unsqueeze(-1))
            continue
        result = hf_zamba.mamba_selective_scan(
            x_h, time_step, A[heads], B.transpose(1, 2), C.transpose(1, 2), D=w["D"][heads].float(),
            z=gate[:, heads], delta_bias=dt_bias, delta_softplus=True, return_last_state=cache is not None,
            use_mambapy=False, use_associative_scan=mixer.use_associative_scan)
        if cache is not None:
            result, final = result
            finals.append(final)
        outputs.append(result)
    if finals:
        cache.update_recurrent_state(torch.cat(finals, dim=1), mixer.layer_idx)  # [B, I, N]
    return torch.cat(outputs, dim=1)


@dataclasses.dataclass(frozen=True)
class ZambaMixerDims:
    """The shape of a Zamba mixer apart from its heads (what ``PrunedZambaMixer`` allocates with)."""

    hidden_size: int
    ssm_state_size: int
    time_step_rank: int
    conv_kernel_size: int
    use_bias: bool
    use_conv_bias: bool
    activation: str

    @classmethod
    def of(cls, mixer: nn.Module) -> "ZambaMixerDims":
        return cls(int(mixer.hidden_size), int(mixer.ssm_state_size), int(mixer.time_step_rank),
                   int(mixer.conv_kernel_size), mixer.in_proj.bias is not None, mixer.conv1d.bias is not None,
                   mixer.activation)


class PrunedZambaMixer(nn.Module):
    """A Zamba mixer of an extracted model: heads of their own widths and/or no selective scans.

    Parameter names are the stock mixer's; the per-head ones are stored flat over the kept channels
    (see the module docstring) and exist only when ``ssm`` is True.
    """

    def __init__(self, dims: ZambaMixerDims, widths: tuple[int, ...], layer_idx: int, ssm: bool,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        I, H, N, R, K = sum(widths), dims.hidden_size, dims.ssm_state_size, dims.time_step_rank, dims.conv_kernel_size
        self.layer_idx, self.head_widths = layer_idx, tuple(widths)
        self.hidden_size, self.intermediate_size, self.ssm_state_size = H, I, N
        self.time_step_rank, self.conv_kernel_size, self.activation = R, K, dims.activation
        self.use_associative_scan = False
        self.in_proj = nn.Linear(H, 2 * I, bias=dims.use_bias, **factory)
        self.conv1d = nn.Conv1d(I, I, kernel_size=K, groups=I, padding=K - 1, bias=dims.use_conv_bias, **factory)
        if ssm:
            self.x_proj_weight = nn.Parameter(torch.empty(R + 2 * N, I, **factory))
            self.dt_proj_weight = nn.Parameter(torch.empty(I, R, **factory))
            self.dt_proj_bias = nn.Parameter(torch.empty(I, **factory))
            self.A_log = nn.Parameter(torch.empty(I, N, **factory))
            self.D = nn.Parameter(torch.empty(I, **factory))
        self.out_proj = nn.Linear(I, H, bias=dims.use_bias, **factory)

    @classmethod
    def from_stock(cls, stock: nn.Module, widths: tuple[int, ...], ssm: bool) -> "PrunedZambaMixer":
        w = stock.in_proj.weight
        pruned = cls(ZambaMixerDims.of(stock), widths, stock.layer_idx, ssm, device=w.device, dtype=w.dtype)
        pruned.use_associative_scan = getattr(stock, "use_associative_scan", False)
        return pruned

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return zamba_mixer_forward(self, hidden_states, cache, attention_mask, ssm=has_ssm(self), **kwargs)

    def extra_repr(self) -> str:
        return f"head_widths={self.head_widths}, ssm={has_ssm(self)}"


# ---------------------------------------------------------------------------- adapter helpers
# ``comps`` are the plan's components of one layer (never a ``block``); what a pruned mixer keeps
# is its layer's ``LayerSpec.ssm`` and ``LayerSpec.head_widths``.

def components(mixer: nn.Module, layer: int, group_size: int) -> list[Component]:
    """The ssm (if the mixer still has one), the heads and the channel groups of one mixer."""
    comps = [Component("ssm", layer)] if has_ssm(mixer) else []
    comps += [Component("head", layer, h) for h in range(len(head_widths(mixer)))]
    return comps + [Component("channel_group", layer, g) for g in range(sum(head_widths(mixer)) // group_size)]


def check_group_size(mixer: nn.Module, layer: int, group_size: int) -> None:
    """Channel groups never straddle two heads: the size divides every head's width."""
    widths = head_widths(mixer)
    if group_size <= 0 or any(w % group_size for w in widths):
        raise PlanError(f"channel_group size {group_size} does not divide the Mamba head widths "
                        f"{', '.join(map(str, widths))} of layer {layer}")


def _removed(comps: list[Component]) -> tuple[set[int], set[int]]:
    """(removed heads, removed channel groups) of one mixer's components."""
    return ({c.index for c in comps if c.kind == "head"}, {c.index for c in comps if c.kind == "channel_group"})


def _head_of_group(widths: tuple[int, ...], group: int, group_size: int) -> int:
    """The head holding channel group ``group`` (groups never straddle heads)."""
    return bisect.bisect_right(list(itertools.accumulate(widths)), group * group_size)


def check(mixer: nn.Module, layer: int, comps: list[Component], group_size: int) -> None:
    """Refuse a mixer left without channels (cheap: the search calls it for every candidate). A head
    may go on top of some of its channel groups: it takes the rest of them along."""
    heads, groups = _removed(comps)
    if not _kept_widths(head_widths(mixer), heads, groups, group_size):
        raise PlanError(f"layer {layer}: removing every Mamba head / channel group leaves no channels; "
                        f"remove the mixer instead (mixer:{layer})")


def in_removed_head(mixer: nn.Module, comp: Component, comps: list[Component], group_size: int) -> bool:
    """Whether ``comp`` is a channel group inside a head that ``comps`` remove (removing it changes nothing)."""
    heads, _ = _removed(comps)
    return comp.kind == "channel_group" and _head_of_group(head_widths(mixer), comp.index, group_size) in heads


def _kept_widths(widths: tuple[int, ...], heads: set[int], groups: set[int], group_size: int) -> tuple[int, ...]:
    """The width of each head left (heads with no channel left are gone)."""
    lost = collections.Counter(_head_of_group(widths, g, group_size) for g in groups)
    left = [w - group_size * lost[h] for h, w in enumerate(widths) if h not in heads]
    return tuple(w for w in left if w > 0)


def _mask(mixer: nn.Module, comps: list[Component], group_size: int):
    """``(ssm, kept, widths)``: kept channel indices (None: all) and each remaining head's width."""
    ssm = has_ssm(mixer) and not any(c.kind == "ssm" for c in comps)
    heads, groups = _removed(comps)
    widths = head_widths(mixer)
    if not heads and not groups:
        return ssm, None, widths
    device = mixer.in_proj.weight.device
    channel = torch.arange(sum(widths), device=device)
    head_of = torch.repeat_interleave(torch.arange(len(widths), device=device), torch.tensor(widths, device=device))
    drop = torch.isin(head_of, torch.tensor(sorted(heads), dtype=torch.long, device=device)) | torch.isin(
        channel // group_size, torch.tensor(sorted(groups), dtype=torch.long, device=device))
    return ssm, channel[~drop], _kept_widths(widths, heads, groups, group_size)


def mask(mixer: nn.Module, comps: list[Component], group_size: int, stack) -> None:
    """Live mask: patch ``mixer.forward`` (undone when ``stack`` closes); weights stay untouched."""
    ssm, kept, widths = _mask(mixer, comps, group_size)
    patch_forward(mixer, functools.partial(zamba_mixer_forward, mixer, ssm=ssm, kept=kept, widths=widths), stack)


def spec_fields(mixer: nn.Module, comps: list[Component], group_size: int, stock_widths: tuple[int, ...]) -> dict:
    """``LayerSpec`` fields of a mixer after removing ``comps`` (what differs from a stock mixer)."""
    ssm, _, widths = _mask(mixer, comps, group_size)
    return {**({} if ssm else {"ssm": False}), **({} if widths == stock_widths else {"head_widths": widths})}


def pruned_state(mixer: nn.Module, comps: list[Component], group_size: int) -> dict[str, torch.Tensor] | None:
    """Extracted weights of one mixer (names relative to it); None when it stays as it is."""
    ssm, kept, widths = _mask(mixer, comps, group_size)
    if ssm == has_ssm(mixer) and kept is None:
        return None
    out = {}
    for name, tensor in mixer.state_dict().items():
        if name in SSM_PARAMS:
            if ssm:
                out[name] = _select(name, _flat(mixer, name), kept)
        else:
            out[name] = _select(name, tensor, kept)
    return {k: v.contiguous() for k, v in out.items()}


def build(stock: nn.Module, spec: LayerSpec) -> nn.Module:
    """The mixer a freshly built stock layer holds for ``spec``: the stock one when the spec keeps
    its whole structure, else a ``PrunedZambaMixer``."""
    widths = spec.head_widths or head_widths(stock)
    if spec.ssm and widths == head_widths(stock):
        return stock
    return PrunedZambaMixer.from_stock(stock, widths, spec.ssm)
