"""Stock-shaped width pruning, as NVIDIA's Minitron / ModelOpt prune: every unit of a kind loses the
same number of components, each unit choosing its own by importance. The units: for ``head``, each
B/C group of each Mamba-2 layer (its SSM heads); for ``mlp_channel_group``, each per-layer MLP (its
channel groups). The extracted model then has one shape throughout, and its config is a stock one
(``num_heads`` / ``expand`` / ``intermediate_size`` changed) that
``transformers.AutoModelForCausalLM.from_pretrained`` (and every tool reading stock configs) loads
unchanged; a Mamba-Shedder plan, which removes components where they matter least model-wide,
usually needs our loader instead.

Two strategies, each a frontier ``Series`` whose plan k removes k components from every unit of
every chosen kind: ``stock_one_shot`` ranks them by an importance table (``importance_metrics``;
higher = more important), ``stock_greedy`` picks, at every step and in every unit, the component
whose removal on top of the plan so far costs the least calibration NLL (each unit measured on its
own, then all picks removed together). Only plans whose extraction is stock-shaped become points: a
width the stock config cannot say (``num_heads * head_dim`` not a multiple of ``hidden_size``, or a
MLPs of different widths) is passed over, and a short last MLP channel group is never removed.
"""
from __future__ import annotations

import pandas as pd

from shedder.arch import adapter_for
from shedder.arch.feed_forward import mlp_groups
from shedder.core.defaults import STOCK_KINDS as KINDS  # the kinds pruned stock-shaped, and how a label counts each
from shedder.core.errors import ShedderError
from shedder.core.plan import Component, PruningPlan
from shedder.core.progress import Progress
from shedder.measure.evaluator import PlanEvaluator
from shedder.prune.frontier import Point, Series


def stock_shaped(adapter, plan: PruningPlan) -> bool:
    """Whether ``plan``'s extracted model has a stock config (no per-layer ``shedder`` section)."""
    return not hasattr(adapter.pruned_config(adapter.resolve(plan)), "shedder")


def check_kinds(adapter, kinds) -> tuple[str, ...]:
    """``kinds`` as a tuple, refused unless each is a stock-shaped kind this family has."""
    kinds = tuple(dict.fromkeys(kinds))
    if not kinds:
        raise ShedderError("no kind to prune: one or more of " + ", ".join(KINDS))
    for kind in kinds:
        if kind not in KINDS:
            raise ShedderError(f"{kind!r} cannot be pruned stock-shaped: one of {', '.join(KINDS)}")
        if kind not in adapter.kinds:
            what = "SSM heads" if kind == "head" else "per-layer MLP channel groups"
            raise ShedderError(f"{type(adapter.model).__name__} has no {what}: stock-shaped pruning of {kind} needs them")
        if kind not in adapter.stock_kinds:
            raise ShedderError(f"{type(adapter.model).__name__}'s stock config cannot state an equal removal of {kind} "
                               "in every layer, so its result would not be stock-shaped")
    return kinds


def offered_kinds(adapter) -> list[str]:
    """The stock-shaped kinds this family has, in ``KINDS`` order (what ``check_kinds`` accepts)."""
    offered = []
    for kind in KINDS:
        try:
            offered += check_kinds(adapter, [kind])
        except ShedderError:
            pass
    return offered


def _units(adapter, plan: PruningPlan, kinds) -> dict[tuple[str, int, int], list[int]]:
    """(kind, layer, unit) → component indices still kept there under ``plan``; a unit is a B/C group
    of heads or one MLP's channel groups (unit 0)."""
    if any(c.kind != "block" for c in plan.components):
        raise ShedderError("stock-shaped pruning starts from the unpruned model or a plan of whole blocks only")
    units: dict[tuple[str, int, int], list[int]] = {}
    for kind in check_kinds(adapter, kinds):
        group = adapter.stock_layout(adapter.config).head_group if kind == "head" else None
        for c in adapter.components(kind):
            if c not in plan and not plan.in_removed_block(c) and (group or _full_group(adapter, c)):
                units.setdefault((kind, c.layer, group[c.index] if group else 0), []).append(c.index)
    if not units:
        raise ShedderError("nothing left to prune stock-shaped: every unit's layer is removed")
    return units


def _full_group(adapter, c: Component) -> bool:
    """Whether MLP channel group ``c`` has the full group size: a short last group stays, since
    removing it in some MLPs and a full one in others leaves widths no stock config can say."""
    size = adapter.group_sizes["mlp_channel_group"]
    return len(mlp_groups(adapter.mlp_width(c.layer), size)[c.index]) == size


def _steps(units: dict, steps: int | None) -> int:
    most = min(len(h) for h in units.values()) - 1  # every unit keeps a component
    return most if steps is None else min(steps, most)


def _label(kinds, k: int) -> str:
    return ", ".join(f"−{k} {KINDS[kind]}" for kind in kinds)


def _name(strategy: str, kinds, metric: str | None = None) -> str:
    return f"stock {strategy}{f' {metric}' if metric else ''} ({', '.join(kinds)})"


def _point(adapter, plan: PruningPlan, label: str, points: list[Point]) -> PruningPlan:
    plan = adapter.resolve(plan)
    if stock_shaped(adapter, plan):
        points.append(Point(label, plan))
    return plan


def stock_one_shot(model, scores: pd.DataFrame, steps: int | None = None, base_plan: PruningPlan | None = None,
                   name: str | None = None, kinds=("head",)) -> Series:
    """Plan k removes, in every unit of every kind, its k lowest-scored components (k = 1..``steps``,
    at most all but one per unit); only stock-shaped plans are points."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    base = adapter.resolve(base_plan or PruningPlan())
    kinds = check_kinds(adapter, kinds)
    units = _units(adapter, base, kinds)
    column = "score" if "score" in scores else "delta_ppl"  # the single-removal table's own column
    table = scores[scores["kind"].isin(kinds)]
    score = {(r.kind, int(r.layer), int(r.index)): v for r, v in zip(table.itertuples(), table[column])}
    missing = [(kind, layer, i) for (kind, layer, _), idx in units.items() for i in idx if (kind, layer, i) not in score]
    if missing:
        kind, layer, i = missing[0]
        raise ShedderError(f"the score table has no {kind} {i} of layer {layer}: score kind {kind} first")
    ranked = {u: sorted(idx, key=lambda i, u=u: score[(u[0], u[1], i)]) for u, idx in units.items()}
    metric = scores.attrs.get("metric", "ppl" if column == "delta_ppl" else "score")
    points: list[Point] = []
    for k in range(1, _steps(units, steps) + 1):
        gone = [Component(kind, layer, i) for (kind, layer, _), idx in ranked.items() for i in idx[:k]]
        _point(adapter, base.with_components(gone), _label(kinds, k), points)
    return Series(name or _name("one-shot", kinds, metric), "stock one-shot", points)


def stock_greedy(model, windows, steps: int | None = None, base_plan: PruningPlan | None = None,
                 batch_size: int = 8, progress: Progress | None = None, evaluator: PlanEvaluator | None = None,
                 name: str | None = None, kinds=("head",)) -> Series:
    """At every step, each unit removes the component whose removal (alone, on top of the plan so
    far) gives the lowest calibration NLL; then all units' picks go together (ties: lowest index)."""
    base_plan = base_plan or PruningPlan()
    ev = evaluator or PlanEvaluator(model, windows, adapter_for(model, base_plan.group_sizes), batch_size=batch_size)
    adapter = ev.adapter
    plan = adapter.resolve(base_plan)
    kinds = check_kinds(adapter, kinds)
    units = _units(adapter, plan, kinds)
    total = _steps(units, steps)
    points: list[Point] = []
    done, work = 0, sum(len(h) - i for h in units.values() for i in range(total))
    for k in range(1, total + 1):
        picks = []
        for (kind, layer, unit), idx in units.items():
            nll = {i: ev.nll(plan.with_components([Component(kind, layer, i)])) for i in idx}
            best = min(idx, key=lambda i: (nll[i], i))
            idx.remove(best)
            picks.append(Component(kind, layer, best))
            done += len(nll)
            if progress is not None:
                progress(done, work, f"step {k}/{total}: {kind} of layer {layer}" + (f" group {unit}" if kind == "head" else ""))
        plan = _point(adapter, plan.with_components(picks), _label(kinds, k), points)
    return Series(name or _name("greedy", kinds), "stock greedy", points)
