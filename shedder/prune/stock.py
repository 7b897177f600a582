"""Stock-shaped width pruning, as NVIDIA's Minitron / ModelOpt prune: every B/C group of every layer
loses the same number of SSM heads, each group choosing its own by importance. The extracted model
then has one shape throughout, and its config is a stock one (``num_heads`` / ``expand`` changed)
that ``transformers.AutoModelForCausalLM.from_pretrained`` (and every tool reading stock configs)
loads unchanged; a Mamba-Shedder plan, which removes heads where they matter least model-wide,
usually needs our loader instead.

Two strategies, each a frontier ``Series`` whose plan k removes k heads from every group:
``stock_one_shot`` ranks heads by an importance table (``importance_metrics``; higher = more
important), ``stock_greedy`` picks, at every step and in every group, the head whose removal on
top of the plan so far costs the least calibration NLL (each group measured on its own, then all
picks removed together). Only plans whose extraction is stock-shaped become points: a width the
stock config cannot say (``num_heads * head_dim`` not a multiple of ``hidden_size``) is passed over.
"""
from __future__ import annotations

import pandas as pd

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import Component, PruningPlan
from shedder.core.progress import Progress
from shedder.measure.evaluator import PlanEvaluator
from shedder.prune.frontier import Point, Series


def stock_shaped(adapter, plan: PruningPlan) -> bool:
    """Whether ``plan``'s extracted model has a stock config (no per-layer ``shedder`` section)."""
    return not hasattr(adapter.pruned_config(adapter.resolve(plan)), "shedder")


def _units(adapter, plan: PruningPlan) -> dict[tuple[int, int], list[int]]:
    """(layer, B/C group) → heads still kept there under ``plan`` (stock head indices)."""
    if "head" not in adapter.kinds or not hasattr(adapter, "stock_layout"):
        raise ShedderError(f"{type(adapter.model).__name__} has no SSM heads: stock-shaped width pruning removes heads")
    if any(c.kind != "head" for c in plan.components if c.kind not in ("block",)):
        raise ShedderError("stock-shaped pruning starts from the unpruned model or a plan of whole blocks only")
    group = adapter.stock_layout(adapter.config).head_group
    units: dict[tuple[int, int], list[int]] = {}
    for c in adapter.components("head"):
        if c not in plan and not plan.in_removed_block(c):
            units.setdefault((c.layer, group[c.index]), []).append(c.index)
    return units


def _steps(units: dict, steps: int | None) -> int:
    most = min(len(h) for h in units.values()) - 1  # every group keeps a head
    return most if steps is None else min(steps, most)


def _point(adapter, plan: PruningPlan, k: int, points: list[Point]) -> PruningPlan:
    plan = adapter.resolve(plan)
    if stock_shaped(adapter, plan):
        points.append(Point(f"−{k} heads per group", plan))
    return plan


def stock_one_shot(model, scores: pd.DataFrame, steps: int | None = None, base_plan: PruningPlan | None = None,
                   name: str | None = None) -> Series:
    """Plan k removes, in every group of every layer, its k lowest-scored heads (k = 1..``steps``,
    at most all but one head per group); only stock-shaped plans are points."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    base = adapter.resolve(base_plan or PruningPlan())
    units = _units(adapter, base)
    column = "score" if "score" in scores else "delta_ppl"  # the single-removal table's own column
    heads_table = scores[scores["kind"] == "head"]
    score = {(int(r.layer), int(r.index)): v for r, v in zip(heads_table.itertuples(), heads_table[column])}
    missing = [(layer, h) for (layer, _), heads in units.items() for h in heads if (layer, h) not in score]
    if missing:
        raise ShedderError(f"the score table has no head {missing[0][1]} of layer {missing[0][0]}: score kind head first")
    ranked = {u: sorted(heads, key=lambda h, u=u: score[(u[0], h)]) for u, heads in units.items()}
    metric = scores.attrs.get("metric", "ppl" if column == "delta_ppl" else "score")
    points: list[Point] = []
    for k in range(1, _steps(units, steps) + 1):
        gone = [Component("head", layer, h) for (layer, _), heads in ranked.items() for h in heads[:k]]
        _point(adapter, base.with_components(gone), k, points)
    return Series(name or f"stock one-shot {metric} (head)", "stock one-shot", points)


def stock_greedy(model, windows, steps: int | None = None, base_plan: PruningPlan | None = None,
                 batch_size: int = 8, progress: Progress | None = None, evaluator: PlanEvaluator | None = None,
                 name: str | None = None) -> Series:
    """At every step, each group removes the head whose removal (alone, on top of the plan so far)
    gives the lowest calibration NLL; then all groups' picks go together (ties: lowest index)."""
    ev = evaluator or PlanEvaluator(model, windows, batch_size=batch_size)
    adapter = ev.adapter
    plan = adapter.resolve(base_plan or PruningPlan())
    units = _units(adapter, plan)
    total = _steps(units, steps)
    points: list[Point] = []
    done, work = 0, sum(len(h) - i for h in units.values() for i in range(total))
    for k in range(1, total + 1):
        picks = []
        for (layer, group), heads in units.items():
            nll = {h: ev.nll(plan.with_components([Component("head", layer, h)])) for h in heads}
            best = min(heads, key=lambda h: (nll[h], h))
            heads.remove(best)
            picks.append(Component("head", layer, best))
            done += len(nll)
            if progress is not None:
                progress(done, work, f"step {k}/{total}: layer {layer} group {group}")
        plan = _point(adapter, plan.with_components(picks), k, points)
    return Series(name or "stock greedy (head)", "stock greedy", points)
