"""Which scan and conv implementations run, and a switch that forces the PyTorch ones.

``transformers`` (5.24) decorates each Mamba / Mamba-2 scan and conv function of its modeling modules
with ``use_kernel_func_from_hub_with_fallback``: at import, the wrapper resolves to the
``mamba-ssm`` / ``causal-conv1d`` kernel when that package imports, else to the PyTorch reference it
wraps (``__wrapped__``). There is no config switch for it (no ``use_mamba_kernels`` in 5.24), so
comparing the two paths on one machine means swapping the wrappers:

* ``resolved()`` reads what each wrapper resolved to (the wrapper's ``implementation`` closure cell);
* ``torch_path()`` replaces, while the block runs, every such wrapper by its reference, in the
  ``transformers`` modules and in the engine's modules that imported them by name
  (``mamba2_mixer``), and tells the engine's SSD dispatcher (``ssd_scan``) that mamba-ssm is absent.
  Every layer then runs exactly what a machine without the kernels runs: the engine SSD scan for
  Mamba-2 prefill, ``transformers``' PyTorch reference for the conv, the Mamba-1 scan and the
  decode steps. Everything is put back on exit.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
from typing import Iterator

from shedder.arch import mamba2_mixer, ssd_scan

#: Packages whose kernels ``transformers`` picks up by itself when they import.
KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
#: The ``transformers`` modules whose wrapped functions are swapped (the reference lives there).
HF_MODULES = ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2")

#: The names ``torch_path`` replaced while its block runs (None outside one).
_forced: list[list[str] | None] = [None]


def kernel_versions() -> dict[str, str | None]:
    """Each kernel package's installed version, None when it does not import (absent, or built for
    another torch / CUDA: ``transformers`` then falls back to the reference too)."""
    found = {}
    for name in KERNEL_PACKAGES:
        try:
            importlib.import_module(name)
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - an ImportError, or an OSError/RuntimeError of a mismatched build
            found[name] = None
    return found


def _wrappers(module) -> dict[str, object]:
    """The module globals that are ``transformers`` kernel wrappers: plain functions wrapping a
    reference defined in one of ``HF_MODULES`` (the engine's scan dispatcher, a ``partial``, is not one)."""
    found = {}
    for name, fn in vars(module).items():
        if inspect.isfunction(fn) and hasattr(fn, "__wrapped__"):
            ref = inspect.unwrap(fn)
            if ref is not fn and getattr(ref, "__module__", "") in HF_MODULES:
                found[name] = fn
    return found


def _modules() -> list:
    return [importlib.import_module(m) for m in HF_MODULES] + [mamba2_mixer]


def resolved() -> dict[str, str]:
    """``{module.function: what it runs on CUDA tensors}`` for every wrapper: ``"reference"``, or the
    kernel's module (e.g. ``"mamba_ssm.ops.selective_scan_interface"``); Mamba-2's chunk scan goes
    through the engine's dispatcher, which keeps its own scan unless mamba-ssm is installed. Inside
    ``torch_path`` the replaced functions read ``"reference (forced)"``."""
    out = dict.fromkeys(_forced[0] or (), "reference (forced)")
    for module in _modules()[: len(HF_MODULES)]:
        short = module.__name__.rsplit(".", 1)[-1]
        for name, fn in sorted(_wrappers(module).items()):
            out[f"{short}.{name}"] = _resolution(fn)
        dispatch = getattr(module, "mamba2_chunk_scan", None)
        if getattr(dispatch, "engine_dispatch", False):
            out[f"{short}.mamba2_chunk_scan"] = (_resolution(dispatch.keywords["_fallback"]) if ssd_scan.HAVE_MAMBA_SSM
                                                 else "engine SSD scan (shedder.arch.ssd_scan)")
    return out


def _resolution(wrapper) -> str:
    impl = inspect.getclosurevars(wrapper).nonlocals.get("implementation")
    if impl is None:
        return "unknown"
    return "reference" if impl is inspect.unwrap(wrapper) else getattr(impl, "__module__", None) or repr(impl)


def torch_forced() -> bool:
    """Whether a ``torch_path()`` block is running."""
    return _forced[0] is not None


@contextlib.contextmanager
def torch_path() -> Iterator[list[str]]:
    """Run every Mamba / Mamba-2 layer on the PyTorch path while the block runs, whatever is
    installed (see the module docstring). Yields the names replaced (``module.function``)."""
    saved: list[tuple[object, str, object]] = []
    replaced: list[str] = []
    before = _forced[0]
    try:
        for module in _modules():
            for name, fn in _wrappers(module).items():
                saved.append((module, name, fn))
                setattr(module, name, inspect.unwrap(fn))
                replaced.append(f"{module.__name__.rsplit('.', 1)[-1]}.{name}")
        saved.append((ssd_scan, "HAVE_MAMBA_SSM", ssd_scan.HAVE_MAMBA_SSM))
        ssd_scan.HAVE_MAMBA_SSM = False
        _forced[0] = replaced
        yield replaced
    finally:
        _forced[0] = before
        for module, name, value in reversed(saved):
            setattr(module, name, value)
