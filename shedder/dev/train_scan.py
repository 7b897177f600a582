"""A Mamba-1 selective scan that is fast to backpropagate through on a CPU, for training only.

The stock pure-PyTorch scan in ``transformers`` is a Python loop over time steps whose autograd
graph holds a few small ops per step; its backward pass is about 80x slower than its forward pass
on a CPU, and generic autograd keeps several (L, batch, d_inner, N) tensors alive per layer. Here
the whole scan is one autograd function with a hand-written backward: the forward pass runs the
recurrence without building a graph, and the backward pass runs the adjoint recurrence in reverse
(the adjoint of a linear recurrence is again a linear recurrence) and then forms every parameter
gradient with a few vectorised contractions.

``selective_scan`` has the signature of ``transformers``' ``mamba_selective_scan`` and computes the
same function; ``training_scan()`` swaps it in for the duration of a ``with`` block. Models saved
after training need nothing from this module.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.models.mamba import modeling_mamba


class SelectiveScan(torch.autograd.Function):
    """``y_t = C_t . h_t`` with ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, time on dimension 0.

    Shapes: u, dt (L, b, d); A (d, N); B, C (L, b, N); y (L, b, d). The states (L, b, d, N) are the
    only large tensor kept for backward; the decays are recomputed there.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C):
        decay = torch.exp(dt[..., None] * A)                         # (L, b, d, N)
        drive = (dt * u)[..., None] * B[:, :, None, :]               # (L, b, d, N)
        states = torch.empty_like(drive)
        h = torch.zeros_like(drive[0])
        for t in range(drive.shape[0]):
            h = torch.addcmul(drive[t], decay[t], h)
            states[t] = h
        ctx.save_for_backward(u, dt, A, B, C, states)
        return torch.einsum("lbdn,lbn->lbd", states, C)

    @staticmethod
    def backward(ctx, grad_y):
        u, dt, A, B, C, states = ctx.saved_tensors
        decay = torch.exp(dt[..., None] * A)
        # dLoss/dh_t: the direct term from y_t plus what flows back through h_{t+1} = decay_{t+1} h_t + ...
        grad_h = grad_y[..., None] * C[:, :, None, :]
        for t in range(grad_h.shape[0] - 2, -1, -1):
            grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])
        prev = torch.cat([torch.zeros_like(states[:1]), states[:-1]])
        grad_log_decay = grad_h * prev * decay                       # dLoss/d(dt A), (L, b, d, N)
        grad_drive = torch.einsum("lbdn,lbn->lbd", grad_h, B)        # dLoss/d(dt u)
        grad_dt = torch.einsum("lbdn,dn->lbd", grad_log_decay, A) + grad_drive * u
        grad_A = torch.einsum("lbdn,lbd->dn", grad_log_decay, dt)
        grad_B = torch.einsum("lbdn,lbd->lbn", grad_h, dt * u)
        grad_C = torch.einsum("lbd,lbdn->lbn", grad_y, states)
        return grad_drive * dt, grad_dt, grad_A, grad_B, grad_C


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_):
    """Drop-in for ``modeling_mamba.mamba_selective_scan`` (same arguments and shapes).

    hidden_states, dt, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L); D: (d_inner,).
    Internally time-major, so each step of the recurrence reads contiguous memory.
    """
    if return_last_state:
        raise NotImplementedError("the training scan does not produce a cache; call the model with use_cache=False")
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = SelectiveScan.apply(
        hidden_states.permute(2, 0, 1).float().contiguous(), dt.permute(2, 0, 1).float().contiguous(),
        A.float(), B.permute(2, 0, 1).float().contiguous(), C.permute(2, 0, 1).float().contiguous(),
    )
    scan_output = y.permute(1, 2, 0).to(input_dtype)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return scan_output


@contextlib.contextmanager
def training_scan():
    """Use ``selective_scan`` in every Mamba-1 mixer inside the block, the stock scan outside it."""
    stock = modeling_mamba.mamba_selective_scan
    modeling_mamba.mamba_selective_scan = selective_scan
    try:
        yield
    finally:
        modeling_mamba.mamba_selective_scan = stock
