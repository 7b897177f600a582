"""What masking and extraction need from torch at run time, outside the adapter contract: building a
module tree in a dtype without process-wide defaults (``instantiate``, ``FloatDtype``), one lock per
model for masked forwards (``model_lock``), and the reversible ``forward`` patch (``patch_forward``)."""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def instantiate(adapter_cls: type, config, device="cpu", dtype=torch.float32) -> nn.Module:
    """Allocate (without the cost of random init) the module tree ``adapter_cls.build`` (an
    ``Adapter`` subclass) describes,
    on ``device`` and in ``dtype``. Both are set for this thread only (torch function modes), never
    process-wide, so concurrent sessions building models in other dtypes are unaffected."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device), FloatDtype(dtype):
        model = adapter_cls.build(config)
    for p in model.parameters():  # a parameter computed from integers (e.g. log(arange)) is float32
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


class FloatDtype(TorchFunctionMode):
    """Within the block, tensor factories called without a ``dtype`` create ``dtype`` instead of
    float32: a thread-local stand-in for ``torch.set_default_dtype``."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.empty_strided})

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model object. Masks patch shared module instances, so whoever runs a
    masked forward holds it: app sessions sharing cached weights never see each other's masks."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def patch_forward(module: nn.Module, forward: Callable, stack: contextlib.ExitStack) -> None:
    """Replace ``module.forward`` for the lifetime of ``stack`` (instance attribute, so the class and
    every other instance are untouched); restored exactly on exit, exceptions included."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward

    def restore():
        if had_own:
            module.forward = previous
        else:
            del module.forward

    stack.callback(restore)
