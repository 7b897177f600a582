"""Loading a model with its text: the model, its tokenizer, its adapter and a plan resolved for it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from shedder.arch import adapter_for
from shedder.core.plan import PruningPlan
from shedder.formats.extract import saved_plan
from shedder.formats.loading import load_model, require_tokenizer, resolve
from shedder.formats.official import read_plan


def load(name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
         tokenizer: str | None = None, threads: int | None = None, weight_reorder: bool = False):
    """(model, tokenizer or None) of a bundled name, local directory or hub id; ``weight_reorder``:
    the MLP channels sorted by L1 norm first (the official ``--weight_reorder``, function unchanged)."""
    if not str(device).startswith("cuda"):
        # The GPU kernels' "install mamba-ssm / causal-conv1d" advice is no use on a CPU run.
        logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    if threads is not None:
        torch.set_num_threads(threads)
    model, tok = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    if weight_reorder:
        adapter_for(model).reorder_mlp_channels()
    return model, tok


def sources(*names: str | None) -> list[str]:
    """The local directories models are read from: no output may go into (or over) them."""
    return [resolve(n) for n in names if n and Path(resolve(n)).is_dir()]


def text_tokenizer(tokenizer, name: str):
    """The tokenizer of a use case that reads text (one clear error when the model has none)."""
    return require_tokenizer(tokenizer, name)


def plan_for(model, path: str | None):
    """(adapter, resolved plan or None) for a plan file (ours or an official config)."""
    plan = read_plan(path) if path else None
    adapter = adapter_for(model, plan.group_sizes if isinstance(plan, PruningPlan) else None)
    return adapter, (adapter.resolve(plan) if plan is not None else None)


def pruned_with(name: str) -> PruningPlan | None:
    """The plan a pruned directory was extracted with (None for anything else)."""
    return saved_plan(resolve(name)) if Path(resolve(name)).is_dir() else None


def baseline(name: str, given: str | None, dtype: str, device: str, trust_remote_code: bool):
    """(model, tokenizer) of the unpruned model: ``given``, or the source model a pruned directory's
    plan names when that directory exists here; None when neither applies."""
    source = given
    if source is None:
        plan = pruned_with(name)
        recorded = plan.model.name if plan is not None else ""
        source = recorded if recorded and Path(recorded).is_dir() else None
    if source is None:
        return None
    return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
