"""What recovery trains: the student (``student_for``), and for ``lora`` the low-rank factors.

The factors are a ``torch.nn.utils.parametrize`` parametrization of the weight itself (``weight = W
+ alpha/r · B @ A``): every read of ``layer.weight`` sees them, the stock forward as well as our
pruned mixers and live masks, which call ``F.linear(x, mixer.in_proj.weight)`` directly. They are
merged into the weights at the end, so the saved result is an ordinary checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.prune.recover.config import RecoverConfig


def student_for(model, plan, adapter=None) -> nn.Module:
    """The model recovery trains: the extracted pruned model, a separate copy (``model`` is left as
    it is, to serve as the teacher and the unpruned baseline). ``model`` itself when nothing is removed."""
    if plan is None or not plan.components:
        return model
    adapter = adapter or adapter_for(model, plan.group_sizes)
    return adapter.extract(plan)


class LoraDelta(nn.Module):
    """``weight -> weight + scale · B @ A`` (``A [r, in]``, ``B [out, r]``, B starting at zero, so the
    model starts exactly as pruned); registered as a parametrization, it applies to every read."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out_features, in_features = weight.shape
        a = torch.empty(rank, in_features, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # peft's / LoRA paper's init
        self.A = nn.Parameter(a.to(weight.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


def lora_targets(model, names: tuple[str, ...] | None = None) -> list[str]:
    """Names of the linear modules LoRA adapts: those whose last name part is in ``names`` (default:
    the family adapter's ``lora_targets``); the LM head and embeddings never."""
    names = tuple(names or adapter_for(model).lora_targets)
    found = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names and "lm_head" not in n]
    if not found:
        raise ShedderError(f"no linear layer of this {model.config.model_type} model is named "
                           f"{', '.join(names)}; pick LoRA targets among: {', '.join(_linear_names(model))}")
    return found


def _linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model, rank: int, alpha: float, targets: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, LoraDelta]:
    """Freeze ``model`` and attach LoRA factors to its target layers; returns them by layer name."""
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    deltas = {}
    for name in lora_targets(model, targets):
        linear = model.get_submodule(name)
        delta = LoraDelta(linear.weight, rank, alpha, gen)
        parametrize.register_parametrization(linear, "weight", delta)
        deltas[name] = delta
    return deltas


def merge_lora(model) -> int:
    """Fold every LoRA factor pair into its weight and remove the parametrizations; returns how many."""
    merged = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LoraDelta) for p in module.parametrizations["weight"]):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged


def trainable_parameters(model, config: RecoverConfig) -> dict[str, nn.Parameter]:
    """The tensors the method trains, by name (LoRA: the factors; otherwise every kept parameter)."""
    if config.method == "lora":
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
        return {n: p for n, p in model.named_parameters() if ".parametrizations.weight.0." in n}
    model.requires_grad_(True)
    return dict(model.named_parameters())
