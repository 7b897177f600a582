"""Analytic cost model: parameters, FLOPs per token and recurrent-state memory of a model under a plan.

``estimate(model, plan)`` is instant and needs no data: it builds the *extracted* model's module tree
on the meta device (``adapter.pruned_config(plan)`` + ``Adapter.build``, exactly as
``Adapter.param_count`` does) and reads every shape from the modules themselves, so uneven
per-layer widths, removed SSMs and removed heads are counted exactly as they will run.

Formulas (per token; ``L`` = ``seq_len``; one multiply-add = 2 FLOPs):

* ``nn.Linear`` (every one, ``lm_head`` included, even when tied to the embedding):
  ``2 · in_features · out_features``; biases are not counted. The embedding lookup is free.
* ``nn.Conv1d`` (the causal depthwise conv of a Mamba mixer): ``2 · weight.numel()``
  (= ``2 · kernel · channels`` for a depthwise conv).
* Projections held as plain parameters (Zamba's per-head ``x_proj_weight``, ``dt_proj_weight``):
  ``2 · weight.numel()``, as a Linear of that many weights.
* Mamba-1 selective scan (a mixer with a 2-D ``A_log`` of shape (channels D, state N); Zamba's
  per-head scans, ``A_log`` (heads, head_dim, N), count as D = heads · head_dim):
  ``9 · D · N + 2 · D``. The ``9 · D · N`` is the count of the reference implementation
  (``flops_selective_scan_ref`` in the official Mamba code): per state element, discretise
  ``exp(Δ·A)``, form ``Δ·B·x``, update ``h = dA·h + dBx`` and contract ``y = C·h``; ``2 · D`` is the
  ``D`` skip (a multiply-add per channel).
* Mamba-2 SSD (a mixer with a 1-D ``A_log`` of H heads, ``head_dim`` P, ``ssm_state_size`` N,
  ``chunk_size`` Q). Decode runs the recurrence: ``5 · H · P · N + 2 · H · P`` (per state element
  one multiply for ``x ⊗ B``, a multiply-add for ``h = dA·h + dBx`` and one for ``y = C·h``; plus the
  ``D`` skip). Prefill runs the chunked SSD algorithm (the reference scan and the ``mamba-ssm``
  kernels alike), whose per-token work per head is the in-chunk scores ``C·Bᵀ`` (Q·N multiply-adds),
  their application to x (Q·P), the chunk states ``Bᵀx`` (N·P) and the read-out from the carried
  states (N·P): ``2 · H · (Q · (N + P) + 2 · N · P) + 2 · H · P``; the state passing between chunks
  is O(chunks²) per sequence and left out.
* Self-attention (a module with ``q_proj``, ``k_proj``, ``v_proj`` Linears, Q width ``q = H·d``): the
  token at position ``t`` attends ``t`` keys (itself included) and costs ``2·t·q`` for the scores
  plus ``2·t·q`` for the weighted values. Prefill averages this over ``t = 1..L``:
  ``2 · q · (L + 1)``; decode is the next token after a context of ``L``: ``4 · q · L``.
* Mixture-of-experts weights stored as one 3-D parameter per projection (``experts`` modules with
  ``num_experts``): ``2 · top_k · numel / num_experts`` (only the routed experts run).
* Norms, activations, gating and residual adds are element-wise (O(width) next to the O(width²)
  matmuls) and are not counted.

State memory per sequence (in the model's dtype, as the ``transformers`` caches hold it):
SSM state ``D · N`` (Mamba-1) or ``H · P · N`` (Mamba-2); conv state ``channels · kernel`` (the
caches keep the last ``kernel`` inputs of every conv channel); KV cache ``L · (k_out + v_out)``
per attention layer. A layer without its SSM keeps only its conv state; a removed block keeps
nothing.

Which modules a decoder layer runs is the adapter's ``layer_cost_modules(layer)`` (default: all
modules under the layer). A block shared between several decoder layers (Zamba2's shared
transformer) is therefore counted in every layer that calls it, because every call costs FLOPs,
while its parameters count once in ``params``. Modules outside the decoder layers (embedding,
final norm, ``lm_head``) are counted once, in ``CostEstimate.other``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from shedder.arch import ResolvedPlan, adapter_for_plan, count_parameters
from shedder.arch.counting import pruned_skeleton
from shedder.core.plan import PruningPlan

#: Reference-implementation count of FLOPs per (channel, state) element of the Mamba-1 scan.
MAMBA1_SCAN_FLOPS = 9
#: FLOPs per (head, head_dim, state) element of the Mamba-2 recurrence (x⊗B, dA·h + dBx, C·h).
MAMBA2_SCAN_FLOPS = 5


@dataclass
class Cost:
    """FLOPs per token (by source) and state bytes of one part of a model."""

    params: int = 0
    linear: int = 0          # FLOPs/token of Linear layers
    conv: int = 0            # FLOPs/token of the causal convs
    scan_prefill: int = 0    # FLOPs/token of selective scans / SSD in a prefill
    scan_decode: int = 0     # the same for one decoded token (the recurrent form)
    attention_prefill: int = 0  # FLOPs/token of attention scores+values, averaged over the prefill
    attention_decode: int = 0   # the same for one decoded token after a context of seq_len
    ssm_state_bytes: int = 0
    conv_state_bytes: int = 0
    kv_cache_bytes: int = 0

    @property
    def flops_prefill(self) -> int:
        return self.linear + self.conv + self.scan_prefill + self.attention_prefill

    @property
    def flops_decode(self) -> int:
        return self.linear + self.conv + self.scan_decode + self.attention_decode

    @property
    def state_bytes(self) -> int:
        return self.ssm_state_bytes + self.conv_state_bytes + self.kv_cache_bytes

    def add(self, other: "Cost") -> None:
        for f in fields(Cost):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class LayerCost(Cost):
    """One decoder layer of the *original* numbering (a removed block has all zeros)."""

    layer: int = 0
    kind: str = ""
    removed: bool = False


@dataclass
class CostEstimate:
    """What a model costs under a plan; per-token figures are independent of the batch size."""

    params: int
    flops_per_token_prefill: int
    flops_per_token_decode: int
    state_bytes_per_sequence: int
    seq_len: int
    batch_size: int
    dtype_bytes: int
    layers: list[LayerCost] = field(default_factory=list)
    #: Everything outside the decoder layers (embedding, final norm, lm_head).
    other: Cost = field(default_factory=Cost)

    @property
    def flops_prefill(self) -> int:
        """FLOPs of one prefill of ``batch_size`` sequences of ``seq_len`` tokens."""
        return self.flops_per_token_prefill * self.seq_len * self.batch_size

    @property
    def state_bytes(self) -> int:
        """Cache memory for ``batch_size`` sequences at ``seq_len``."""
        return self.state_bytes_per_sequence * self.batch_size

    def to_dict(self) -> dict:
        def part(c: Cost) -> dict:
            return {**asdict(c), "flops_prefill": c.flops_prefill, "flops_decode": c.flops_decode,
                    "state_bytes": c.state_bytes}
        return {"params": self.params, "flops_per_token_prefill": self.flops_per_token_prefill,
                "flops_per_token_decode": self.flops_per_token_decode,
                "state_bytes_per_sequence": self.state_bytes_per_sequence, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "dtype_bytes": self.dtype_bytes,
                "layers": [part(c) for c in self.layers], "other": part(self.other)}


def estimate(model: nn.Module, plan: ResolvedPlan | PruningPlan | None = None, seq_len: int = 256, batch_size: int = 1,
             adapter=None) -> CostEstimate:
    """Cost of ``model`` extracted under ``plan`` (``None``: the model as it is); a plan not yet
    resolved for ``model`` is resolved once here."""
    adapter = adapter or adapter_for_plan(model, plan)
    plan = adapter.resolve(plan if plan is not None else PruningPlan())
    ref = next(model.parameters())
    dtype_bytes = ref.element_size()
    skeleton = pruned_skeleton(adapter, plan)
    skeleton_adapter = type(adapter)(skeleton, dict(adapter.group_sizes))
    skeleton_layers = skeleton_adapter.layers()

    n = adapter.num_layers
    where = adapter.layer_map(plan)  # old layer -> its index in the extracted model

    top_k = int(getattr(skeleton.config, "num_experts_per_tok", 1) or 1)
    layers, in_layers = [], set()
    for i in range(n):
        cost = LayerCost(layer=i, kind=adapter.layer_kind(i), removed=i not in where)
        if i in where:
            j = where[i]
            cost.add(_sum_costs(skeleton_adapter.layer_cost_modules(j), seq_len, dtype_bytes, top_k))
            cost.params = count_parameters(skeleton_layers[j])
        layers.append(cost)
    for module in skeleton_layers:
        in_layers.update(id(m) for m in module.modules())
    other = Cost()
    outside = [m for m in skeleton.modules() if id(m) not in in_layers]
    other.add(_sum_costs(outside, seq_len, dtype_bytes, top_k))
    params = count_parameters(skeleton)
    other.params = params - count_parameters(skeleton_layers)

    total = Cost()
    for c in [*layers, other]:
        total.add(c)
    return CostEstimate(params=params, flops_per_token_prefill=total.flops_prefill,
                        flops_per_token_decode=total.flops_decode, state_bytes_per_sequence=total.state_bytes,
                        seq_len=seq_len, batch_size=batch_size, dtype_bytes=dtype_bytes, layers=layers, other=other)


def expected_speedup(model: nn.Module, plan: PruningPlan | None, seq_len: int = 256, adapter=None) -> float:
    """Original / pruned prefill FLOPs: the speedup an ideal, compute-bound prefill would show."""
    adapter = adapter or adapter_for_plan(model, plan)
    base = estimate(model, None, seq_len, adapter=adapter).flops_per_token_prefill
    pruned = estimate(model, plan, seq_len, adapter=adapter).flops_per_token_prefill
    return base / pruned


def _sum_costs(modules: list[nn.Module], seq_len: int, dtype_bytes: int, top_k: int) -> Cost:
    total = Cost()
    for m in modules:
        total.add(_own_cost(m, seq_len, dtype_bytes, top_k))
    return total


#: Projection weights held as parameters, not ``nn.Linear`` (Zamba's per-head x_proj and dt_proj):
#: each weight element is one multiply-add per token.
PER_HEAD_PROJECTIONS = ("x_proj_weight", "dt_proj_weight")


def _own_cost(m: nn.Module, seq_len: int, dtype_bytes: int, top_k: int) -> Cost:
    """The cost a module adds itself (its children are counted separately)."""
    c = Cost()
    if isinstance(m, nn.Linear):
        c.linear = 2 * m.in_features * m.out_features
    elif isinstance(m, nn.Conv1d):
        c.conv = 2 * m.weight.numel()
        c.conv_state_bytes = m.in_channels * m.kernel_size[0] * dtype_bytes
    for name in PER_HEAD_PROJECTIONS:
        p = m._parameters.get(name)
        if p is not None:
            c.linear += 2 * p.numel()
    a_log = m._parameters.get("A_log")
    if a_log is not None:
        c.scan_prefill, c.scan_decode, state = _scan_cost(m, a_log)
        c.ssm_state_bytes = state * dtype_bytes
    if _is_attention(m):
        q = m.q_proj.out_features
        c.attention_prefill = 2 * q * (seq_len + 1)
        c.attention_decode = 4 * q * seq_len
        c.kv_cache_bytes = seq_len * (m.k_proj.out_features + m.v_proj.out_features) * dtype_bytes
    experts = getattr(m, "num_experts", None)
    if isinstance(experts, int) and experts > 0:
        for p in m._parameters.values():
            if p is not None and p.dim() == 3 and p.shape[0] == experts:
                c.linear += 2 * min(top_k, experts) * (p.numel() // experts)
    return c


def _scan_cost(m: nn.Module, a_log: torch.Tensor) -> tuple[int, int, int]:
    """(prefill FLOPs per token, decode FLOPs per token, state elements) of a mixer's scan, from its
    ``A_log`` and attributes."""
    if a_log.dim() in (2, 3):  # Mamba-1: A is (channels, state), or (heads, head_dim, state) in Zamba
        channels, state = a_log.numel() // a_log.shape[-1], a_log.shape[-1]
        flops = MAMBA1_SCAN_FLOPS * channels * state + 2 * channels
        return flops, flops, channels * state
    heads = a_log.numel()  # Mamba-2: one scalar decay per head
    head_dim = int(getattr(m, "head_dim", 0) or m.out_proj.in_features // heads)
    state = int(m.ssm_state_size)
    chunk = int(m.chunk_size)
    elements = heads * head_dim * state
    d_skip = 2 * heads * head_dim
    prefill = 2 * heads * (chunk * (state + head_dim) + 2 * state * head_dim) + d_skip
    return prefill, MAMBA2_SCAN_FLOPS * elements + d_skip, elements


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj"))
