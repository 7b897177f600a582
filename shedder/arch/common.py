"""Helpers every family's extraction uses, whatever its mixer: renumbering layers in a state dict."""
from __future__ import annotations

import torch


def sliced_state_dict(state: dict[str, torch.Tensor], prefix: str, layer_map: dict[int, int],
                      replace: dict[int, dict[str, dict[str, torch.Tensor]]] | None = None) -> dict[str, torch.Tensor]:
    """A model state dict with layers renumbered and some sub-modules' tensors replaced.

    ``prefix`` is the layer list's key prefix (``"backbone.layers."``); ``layer_map`` the adapter's
    old → new layer index map (layers not in it are dropped); ``replace[old][module]`` the new
    tensors of sub-module ``module`` of layer ``old`` (e.g. ``{"mixer": pruned_mixer_state(...)}``),
    replacing all its old tensors (an empty dict drops the sub-module's tensors).
    """
    replace = replace or {}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        num, rest = key[len(prefix):].split(".", 1)
        old = int(num)
        if old not in layer_map:
            continue
        if any(rest.startswith(module + ".") for module in replace.get(old, {})):
            continue
        out[f"{prefix}{layer_map[old]}.{rest}"] = value
    for old, modules in replace.items():
        if old in layer_map:
            for module, tensors in modules.items():
                out.update({f"{prefix}{layer_map[old]}.{module}.{k}": v for k, v in tensors.items()})
    return out
