"""The engine's CPU SSD (Mamba-2) chunked scan, used by every Mamba-2-style mixer when the mamba-ssm
kernels are absent (or the tensors are not on CUDA).

Why its own: transformers' torch reference (``mamba2_chunk_scan``) spends most of its time on copies,
``repeat_interleave`` of B/C to every head, 6-D masks and ``cumsum``-based segment sums over chunks
of the config's size (256 for Mamba-2 130M), at a few GFLOP/s. This scan computes the same
quantities as batched matmuls over smaller chunks (``CHUNK``, picked by measurement, see
``docs/scan.md``): B/C stay per group (``C Bᵀ`` is computed once per group, heads of a group are a
view), the decay matrix is one masked ``exp`` of cumulative-sum differences, and the inter-chunk
recurrence is one small matmul. The results equal the reference's within float rounding (the
tests compare at 1e-4 relative in fp32); the chunk size changes only the rounding.

Every layer uses it: the engine's own mixer forward (masked and extracted layers) calls
``chunk_scan``, and on import this module puts the same dispatcher in place of the
``mamba2_chunk_scan`` module global of each transformers family (``FAMILIES``) so that unmasked stock
mixers use it too; the dispatcher calls that family's own function whenever the engine scan does not
apply. ``reference()`` switches every layer back to transformers' scan, so tests and ``bench scan``
can compare like for like; masked and extracted layers stay equal under either.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

#: Chunk length of the engine scan (64 and 128 measured fastest on the 130M shape; docs/scan.md).
CHUNK = 64

#: Whether mamba-ssm is installed: its kernels then serve CUDA tensors through transformers' wrapper.
HAVE_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None

#: transformers families whose stock mixers call a module-level ``mamba2_chunk_scan``.
FAMILIES = ("mamba2", "bamba", "nemotron_h", "zamba2", "falcon_h1", "granitemoehybrid")

_reference = [False]


@contextlib.contextmanager
def reference():
    """Within this block every Mamba-2 scan runs transformers' torch reference (for comparisons)."""
    before = _reference[0]
    _reference[0] = True
    try:
        yield
    finally:
        _reference[0] = before


def uses_engine_scan(x: torch.Tensor) -> bool:
    """True when a scan on ``x`` runs this module's code rather than transformers' function."""
    return not _reference[0] and not (HAVE_MAMBA_SSM and x.is_cuda)


def chunk_scan(hidden_states, dt, A, B, C, chunk_size: int, D=None, dt_bias=None, initial_states=None,
               dt_softplus: bool = False, dt_limit=(0.0, float("inf")), return_final_states: bool = False,
               _fallback=mamba2_chunk_scan, **kwargs):
    """Same signature and results as transformers' ``mamba2_chunk_scan``: hidden_states [b, l, H, P], dt [b, l, H],
    A [H], B/C [b, l, G, N] (H a multiple of G), D/dt_bias [H], initial_states [b, H, P, N].
    Returns y [b, l, H, P] in fp32 (and the final state [b, H, P, N] when asked). ``chunk_size`` (the
    config's) is honoured only on the reference path; results do not depend on it. ``kwargs`` (z,
    seq_idx, ...) are ignored, as transformers' torch function ignores them."""
    x = hidden_states
    if not uses_engine_scan(x):
        return _fallback(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias,
                         initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                         return_final_states=return_final_states, **kwargs)
    return _engine_scan(x, dt, A, B, C, CHUNK, D, dt_bias, initial_states, dt_softplus, dt_limit,
                        return_final_states)


def _engine_scan(x, dt, A, B, C, Q: int, D, dt_bias, initial_states, dt_softplus, dt_limit, return_final):
    b, l, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    hg = H // G
    if dt_bias is not None:  # dt in its own dtype until here, as in the reference
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    xf = x.float()
    pad = (Q - l % Q) % Q
    c = (l + pad) // Q
    # head-major chunked layouts: xdt [b, c, G, hg, Q, P], B/C [b, c, G, 1, Q, N], dA [b, c, G, hg, Q]
    xdt = F.pad(xf * dt[..., None], (0, 0, 0, 0, 0, pad))
    xdt = xdt.view(b, c, Q, G, hg, P).permute(0, 1, 3, 4, 2, 5)
    Bc = F.pad(B.float(), (0, 0, 0, 0, 0, pad)).view(b, c, Q, G, N).permute(0, 1, 3, 2, 4).unsqueeze(3)
    Cc = F.pad(C.float(), (0, 0, 0, 0, 0, pad)).view(b, c, Q, G, N).permute(0, 1, 3, 2, 4).unsqueeze(3)
    dA = F.pad(dt * A.float(), (0, 0, 0, pad)).view(b, c, Q, G, hg).permute(0, 1, 3, 4, 2)
    cum = torch.cumsum(dA, dim=-1)                                                # [b, c, G, hg, Q]

    # 1. within each chunk: y = (C Bᵀ ∘ decay) (x dt), decay[l, s] = exp(cum[l] - cum[s]) for s <= l
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg = (cum[..., :, None] - cum[..., None, :]).masked_fill_(~causal, -torch.inf).exp_()
    scores = Cc @ Bc.transpose(-1, -2)                                            # [b, c, G, 1, Q, Q]
    y = (seg * scores) @ xdt                                                      # [b, c, G, hg, Q, P]

    # 2. each chunk's own end state: Σ_s exp(cum[-1] - cum[s]) x dt[s] ⊗ B[s]  -> [b, c, G, hg, P, N]
    to_end = torch.exp(cum[..., -1:] - cum)
    states = (xdt * to_end[..., None]).transpose(-1, -2) @ Bc

    # 3. chunk-to-chunk recurrence as one matmul: start[k] = Σ_{j<k} exp(tot[j+1..k-1]) states[j] (+ init)
    if initial_states is None:
        start = xdt.new_zeros(b, 1, G, hg, P, N)
    else:
        start = initial_states.float().reshape(b, 1, G, hg, P, N)
    allst = torch.cat([start, states], dim=1)                                     # [b, c+1, G, hg, P, N]
    tot = F.pad(cum[..., -1], (0, 0, 0, 0, 1, 0)).permute(0, 2, 3, 1)       # [b, G, hg, c+1]
    tcum = torch.cumsum(tot, dim=-1)
    lower = torch.ones(c + 1, c + 1, dtype=torch.bool, device=x.device).tril()
    carry = (tcum[..., :, None] - tcum[..., None, :]).masked_fill_(~lower, -torch.inf).exp_()
    flat = allst.permute(0, 2, 3, 1, 4, 5).reshape(b, G, hg, c + 1, P * N)
    new = (carry @ flat).view(b, G, hg, c + 1, P, N)
    prev, final = new[:, :, :, :-1].permute(0, 3, 1, 2, 4, 5), new[:, :, :, -1]

    # 4. the carried-in state's contribution: exp(cum[l]) C[l] · start
    y += (Cc @ prev.transpose(-1, -2)) * cum.exp()[..., None]                     # [b, c, G, hg, Q, P]
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, H, P)[:, :l]
    if D is not None:
        y = y + D.float()[:, None] * xf
    y = y.contiguous()  # callers (Falcon-H1) ``view`` the result
    if return_final:
        return y, final.reshape(b, H, P, N).contiguous()
    return y


def _install() -> None:
    """Route each family's stock ``mamba2_chunk_scan`` through ``chunk_scan`` (idempotent)."""
    for family in FAMILIES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        own = module.mamba2_chunk_scan
        if getattr(own, "engine_dispatch", False):
            continue
        dispatch = functools.wraps(own)(functools.partial(chunk_scan, _fallback=own))
        dispatch.engine_dispatch = True
        module.mamba2_chunk_scan = dispatch


_install()
