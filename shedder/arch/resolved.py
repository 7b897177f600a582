"""A plan resolved against one model: the only plan state masking, extraction, cost and counting
accept.

``PruningPlan`` (``shedder.core.plan``) is what a user writes; an official Mamba-Shedder config is an
``OfficialConfig`` (``shedder.formats.official``), turned into components only against a model.
``Adapter.resolve`` takes either, upgrades a schema-1 plan, attaches the model's identity to an
anonymous plan, checks everything here (``check_plan``) and the family's rules (``Adapter.check``),
and returns a ``ResolvedPlan``: a frozen plan that remembers the adapter it was checked against, so
resolving it again for the same model is free. Changing its components (``with_components``, ...)
gives a plain ``PruningPlan`` again, to be resolved anew.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from shedder.core.errors import PlanError
from shedder.core.plan import ModelIdentity, PruningPlan


class PlanSource(Protocol):
    """Something that becomes a plan only against a model (an official config: what its keys remove
    depends on the family)."""

    def plan_for(self, adapter) -> PruningPlan: ...


@dataclass(frozen=True, eq=False)
class ResolvedPlan(PruningPlan):
    """A plan checked against ``adapter``'s model, in today's schema, with that model's identity.

    Pickled or copied it becomes the plain ``PruningPlan`` it holds (the adapter, and its model,
    stay behind: a plan sent to a worker is resolved there against the worker's model)."""

    #: The ``Adapter`` (``base.py``, which builds every ResolvedPlan) the plan was checked against.
    adapter: Any = field(kw_only=True, repr=False)

    def resolved_for(self, adapter) -> bool:
        """Whether this plan was resolved for ``adapter``'s model with the same group sizes."""
        return self.adapter is adapter or (self.adapter.model is adapter.model
                                           and self.adapter.group_sizes == adapter.group_sizes)

    def plain(self) -> PruningPlan:
        return PruningPlan(self.components, self.model, dict(self.group_sizes), dict(self.meta), self.schema_version)

    def __reduce__(self):
        return (PruningPlan, (self.components, self.model, dict(self.group_sizes), dict(self.meta), self.schema_version))


def check_plan(adapter, plan: PruningPlan) -> None:
    """Everything generic about ``plan`` on ``adapter``'s model (identity, group sizes, membership,
    redundancy, something left); ``PlanError`` naming the component at fault."""
    mine = adapter.identity()
    theirs = plan.model
    if theirs.architecture != mine.architecture:
        raise PlanError(f"the plan was made for {theirs.architecture}, but this model is {mine.architecture}")
    if theirs.num_layers != mine.num_layers:
        raise PlanError(f"the plan was made for a model with {theirs.num_layers} layers; this one has {mine.num_layers}")
    if theirs.config_hash != mine.config_hash:
        raise PlanError(f"the plan was made for another {mine.architecture} configuration "
                        f"(config hash {theirs.config_hash}, this model {mine.config_hash}{_named(theirs)})")
    for kind, size in plan.group_sizes.items():
        if kind in adapter.group_sizes and size != adapter.group_sizes[kind]:
            raise PlanError(f"the plan uses {kind} groups of {size} channels; this adapter was set up for {adapter.group_sizes[kind]}")
    offered = set(adapter.components())
    n = adapter.num_layers
    for c in plan.sorted():
        if c.kind not in adapter.kinds:
            raise PlanError(f"{c}: {mine.architecture} has no component kind {c.kind!r} (it offers {', '.join(adapter.kinds)})")
        if not 0 <= c.layer < n:
            raise PlanError(f"{c}: layer {c.layer} is out of range (the model has layers 0..{n - 1})")
        if c not in offered:
            have = [x.index for x in adapter.layer_components(c.layer) if x.kind == c.kind]
            if not have:
                raise PlanError(f"{c}: layer {c.layer} ({adapter.layer_kind(c.layer)}) has no {c.kind}")
            raise PlanError(f"{c}: layer {c.layer} has {c.kind} indices 0..{max(have)}, not {c.index}")
        if plan.in_removed_block(c):
            raise PlanError(f"{c} is redundant: block {c.layer} is removed as a whole")
    if not adapter.layer_map(plan):
        raise PlanError(f"the plan removes all {n} layers (all {n} blocks, or everything "
                        "inside them); nothing would be left of the model")
    adapter.check(plan)


def _named(identity: ModelIdentity) -> str:
    return f", made for {identity.name}" if identity.name else ""
