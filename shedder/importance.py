"""Single-removal importance: how much calibration perplexity rises when one component goes.

For every candidate of the requested kinds, the component is removed on top of ``base_plan`` and
the calibration perplexity measured (the heatmaps' numbers). Results are cached on disk under a key
made of the model's identity (config hash and a fingerprint of its weights), the exact token windows,
the kinds and the base plan, so reopening the same analysis is instant.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import torch

from .arch import adapter_for
from .data import windows_hash
from .evaluator import PlanEvaluator, check_kinds, removing
from .metrics import Progress
from .plan import KINDS, PruningPlan, config_hash

COLUMNS = ["layer", "kind", "index", "ppl", "delta_ppl", "params_removed"]
#: Elements sampled from each parameter tensor for the weights fingerprint.
_FINGERPRINT_SAMPLES = 256


def default_cache_dir() -> Path:
    """``$SHEDDER_CACHE_DIR``, else ``~/.cache/shedder``."""
    return Path(os.environ.get("SHEDDER_CACHE_DIR") or Path.home() / ".cache" / "shedder")


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Config hash plus a hash of every parameter's name, shape, dtype and a strided sample of its
    values: two checkpoints of one architecture get different keys, reading it costs no full pass."""
    h = hashlib.sha256(config_hash(model.config).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _FINGERPRINT_SAMPLES), device=flat.device).long()
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def plan_key(plan: PruningPlan) -> dict:
    """The parts of a plan that change what is measured (for cache keys and search logs)."""
    return {"components": [str(c) for c in plan.sorted()], "group_sizes": dict(sorted(plan.group_sizes.items()))}


def cache_key(model, windows: torch.Tensor, kinds: list[str], base: PruningPlan) -> str:
    blob = json.dumps({"model": model_fingerprint(model), "data": windows_hash(windows),
                       "kinds": sorted(kinds), "base": plan_key(base)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def score(model, windows: torch.Tensor, kinds, base_plan: PruningPlan | None = None,
          progress: Progress | None = None, cache_dir: str | Path | None = None,
          batch_size: int = 8, evaluator: PlanEvaluator | None = None) -> pd.DataFrame:
    """Single-removal scores ``[layer, kind, index, ppl, delta_ppl, params_removed]`` sorted by
    layer, kind (in ``KINDS`` order) and index; ``delta_ppl`` is over ``base_plan``'s perplexity."""
    base_plan = base_plan or PruningPlan()
    adapter = evaluator.adapter if evaluator else adapter_for(model, base_plan.group_sizes)
    kinds = check_kinds(adapter, kinds)
    base = adapter.validate(base_plan)
    path = Path(cache_dir or default_cache_dir()) / "scores" / f"{cache_key(model, windows, kinds, base)}.csv"
    if path.is_file():
        return pd.read_csv(path)
    ev = evaluator or PlanEvaluator(model, windows, adapter, batch_size)
    base_ppl = ev.perplexity(base)
    base_params = adapter.param_count(base)
    # Descending layers: consecutive plans differ late in the model, so the evaluator skips the most.
    order = sorted(adapter.candidates(base, kinds), key=lambda c: (-c.layer, KINDS.index(c.kind), c.index))
    rows = []
    for done, comp in enumerate(order, 1):
        plan = removing(base, comp)
        ppl = ev.perplexity(plan)
        rows.append({"layer": comp.layer, "kind": comp.kind, "index": comp.index, "ppl": ppl,
                     "delta_ppl": ppl - base_ppl, "params_removed": base_params - adapter.param_count(plan)})
        if progress:
            progress(done, len(order), f"scoring: {comp}")
    table = tidy(pd.DataFrame(rows, columns=COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)  # atomic: a cancelled run never leaves a half-written cache entry
    return table


def tidy(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by layer, kind (``KINDS`` order), index, with a fresh index."""
    order = table["kind"].map(KINDS.index)
    return (table.assign(_k=order).sort_values(["layer", "_k", "index"]).drop(columns="_k")
            .reset_index(drop=True))

