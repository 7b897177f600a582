"""What a layer with a shared-block application does under a mask, the same in Zamba and Zamba2:
``h = h + mamba(norm(h + T))`` with ``T`` the application's output. Removing its ``mixer`` keeps
``h + linear(T)``, its ``shared_block`` makes it a plain Mamba layer, its ``attention`` or ``mlp``
leaves the other half of ``T``; the stand-in forwards for those live here."""
from __future__ import annotations

from torch import nn

from shedder.arch.base import patch_forward
from shedder.arch.layers import record_length


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def _add_transformer_output(hidden_states, *args, transformer_hidden_states=None, **kwargs):
    """The forward of a hybrid layer's Mamba side without its mixer (the official mamba-block
    mask): the shared block's output still joins the stream, ``h + linear(T)``."""
    return hidden_states + transformer_hidden_states


def _emptied(hybrid: bool, kinds: set[str]) -> bool:
    """Whether a layer losing ``kinds`` keeps nothing (its mixer goes, and it has no application or
    loses it): it computes the identity and extraction deletes it, like a ``block``."""
    return "mixer" in kinds and (not hybrid or "shared_block" in kinds)


def mask_application(adapter, layer: int, kinds: set[str], shared: nn.Module, mlp_only, stack) -> bool:
    """The shared-block half of ``mask_layer``, the same in Zamba and Zamba2 (``shared``: the layer's
    application, ``mlp_only``: the family's attention-free forward): ``mixer``, ``shared_block``,
    ``attention`` and ``mlp``. True when the layer is done (it became a skip or a plain Mamba layer)."""
    block = adapter.layers()[layer]
    if "mixer" in kinds:
        if _emptied(adapter.is_hybrid(layer), kinds):  # nothing left: as ``block``
            patch_forward(block, adapter.skip_forward(layer), stack)
            return True
        patch_forward(block.mamba_decoder, _add_transformer_output, stack)
    if "shared_block" in kinds:  # the layer runs as its own plain Mamba layer (same call signature)
        mamba_layer = block.mamba_decoder

        def forward(hidden_states, *args, **kwargs):
            record_length(kwargs.get("cache"), layer, hidden_states)  # its key/value slot stays in the cache
            return mamba_layer(hidden_states, *args, **kwargs)
        patch_forward(block, forward, stack)
        return True
    if "attention" in kinds:
        patch_forward(shared, mlp_only(shared, layer), stack)
    if "mlp" in kinds:
        patch_forward(shared.pre_ff_layernorm, _pass_through, stack)
        patch_forward(shared.feed_forward, _pass_through, stack)
    return False
