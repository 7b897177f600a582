"""Importance: announce a run's cost, score every component by a metric, compare metrics."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable

from shedder.core.plan import PruningPlan
from shedder.measure.budget import RunCost, run_cost
from shedder.measure.evaluator import PlanEvaluator, check_kinds
from shedder.prune.agreement import compare as agreement, format_agreement, jobs
from shedder.prune.distributed import WorkerPool
from shedder.prune.importance import cache_status, score as ppl_scores
from shedder.prune.importance_metrics import metric_names, metric_scores


def cost(what: str, model, adapter, windows, kinds, base: PruningPlan | None = None, steps: int | None = 1,
         batch_size: int = 8, budget_bytes: int | None = None, metric: str = "ppl"):
    """What a score or search over ``windows`` will cost (``shedder.measure.budget.RunCost``); a
    metric other than ``ppl`` scores every component from one pass, so it is announced as one."""
    candidates = adapter.candidates(base or PruningPlan(), check_kinds(adapter, kinds))
    if metric != "ppl":
        candidates = []
    return run_cost(what, model, windows, len(candidates), steps, batch_size, budget_bytes,
                    [c.layer for c in candidates])


def announce(what: str, model, adapter, windows, kinds, base: PruningPlan | None, steps: int | None,
             batch_size: int, say: Callable[[str], None]) -> PlanEvaluator:
    """Say what a score or search will cost before it runs, then an ETA from timing the base plan's
    pass; returns the evaluator, whose cache keeps that pass for the run itself."""
    base = base or PruningPlan()
    ev = PlanEvaluator(model, windows, adapter, batch_size)
    estimate = cost(what, model, adapter, windows, kinds, base, steps, batch_size, ev.max_cache_bytes)
    say(estimate.describe())
    say(f"{what}: {estimate.eta_text(ev.timed_pass(base))}")
    return ev


def compare_cost(model, adapter, windows, kinds, metrics, stability: bool = True, batch_size: int = 8,
                 budget_bytes: int | None = None) -> RunCost:
    """What ``compare`` will cost: its jobs' passes and tokens (``shedder.prune.agreement.jobs``, the
    list its progress total counts too), and the memory of its largest job (a ppl map's evaluator
    cache over all windows, when ppl is compared)."""
    metrics = list(metric_names()) if list(metrics) == ["all"] else list(metrics)
    todo = jobs(model, windows, kinds, metrics, stability)
    seq = windows.shape[1]
    ppl_map = cost("scoring", model, adapter, windows, kinds, batch_size=batch_size, budget_bytes=budget_bytes)
    return replace(ppl_map, what="comparison", passes=sum(j.forwards for j in todo), layer_passes=None,
                   backwards=sum(j.backwards for j in todo), total_tokens=sum(j.forwards * j.windows * seq for j in todo),
                   cache_bytes=ppl_map.cache_bytes if any(j.metric == "ppl" for j in todo) else 0)


def cached(model, windows, kinds, base: PruningPlan | None = None, cache_dir=None):
    """How much of a ``ppl`` score is already in the cache (``shedder.prune.importance.cache_status``)."""
    return cache_status(model, windows, kinds, base, cache_dir)


@contextlib.contextmanager
def worker_pool(model, windows, workers: int | None, address: str | None, batch_size: int, group_sizes=None,
                device: str = "cpu"):
    """Ray workers holding the model and the windows (None when neither count nor address is given)."""
    if workers is None and address is None:
        yield None
        return
    with WorkerPool(model, windows, workers, address, batch_size, group_sizes, device=device) as pool:
        yield pool


def score(model, windows, kinds, metric: str = "ppl", base: PruningPlan | None = None, progress=None,
          cache_dir=None, batch_size: int = 8, evaluator=None, pool=None):
    """Every component's importance by ``metric``: ``ppl`` is the single-removal table (on Ray
    workers with a ``pool``); other metrics run one pass in this process."""
    if metric == "ppl":
        return ppl_scores(model, windows, kinds, base_plan=base, progress=progress, cache_dir=cache_dir,
                          batch_size=batch_size, evaluator=evaluator, pool=pool)
    return metric_scores(model, windows, kinds, metric, base_plan=base, progress=progress, cache_dir=cache_dir,
                         batch_size=batch_size)


def compare(model, windows, kinds, metrics, stability: bool = True, top_k: int | None = None, progress=None,
            cache_dir=None, batch_size: int = 8):
    """(tables, rows): rank agreement between ``metrics`` (``["all"]``: every one) and across two
    halves of the calibration windows."""
    metrics = list(metric_names()) if list(metrics) == ["all"] else list(metrics)
    return agreement(model, windows, kinds, metrics, stability=stability, top_k=top_k, progress=progress,
                     cache_dir=cache_dir, batch_size=batch_size)


__all__ = ["announce", "cached", "compare", "compare_cost", "cost", "format_agreement", "score", "worker_pool"]
