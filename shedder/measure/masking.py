"""Reversible live masks: ``with masked(model, plan): ...`` runs the model as if the plan's
components were removed, without copying a single weight, and restores it exactly on exit.

Masks patch shared module instances, so one mask at a time per model: whoever applies one holds the
model's lock (other threads, e.g. other app sessions on the same cached weights, wait; the wait is
reported through ``progress``, which may raise ``Cancelled`` to stop waiting), and a mask of another
plan inside a mask on the same model is refused instead of stacking two plans' patches (the same
plan again is a no-op: the model already computes it).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

from shedder.arch import ResolvedPlan, adapter_for_plan
from shedder.arch.resolved import PlanSource
from shedder.arch.runtime import model_lock
from shedder.core.errors import PlanError
from shedder.core.plan import PruningPlan
from shedder.core.progress import Progress

#: What ``progress`` is told while another thread holds the model.
WAITING = "waiting for the model: another session is using it"
#: Models with a live mask applied right now -> (components, group sizes) of its plan.
_MASKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: Models held through ``holding`` right now -> [the holding thread, its depth of nested holds].
_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def holding(model, progress: Progress | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold ``model``'s lock for the block; while another thread has it, call
    ``progress(0, 1, WAITING)`` every ``poll_s`` seconds (it may raise to give up waiting).
    ``holder(model)`` names the thread holding it meanwhile (a waiting app can tell whose it is)."""
    lock = model_lock(model)
    while not lock.acquire(timeout=poll_s):
        if progress:
            progress(0, 1, WAITING)
    entry = _HOLDERS.setdefault(model, [threading.current_thread(), 0])
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            _HOLDERS.pop(model, None)
        lock.release()


def holder(model) -> threading.Thread | None:
    """The thread holding ``model`` through ``holding`` now, or None."""
    entry = _HOLDERS.get(model)
    return entry[0] if entry else None


@contextlib.contextmanager
def masked(model, plan: ResolvedPlan | PruningPlan | PlanSource, adapter=None,
           progress: Progress | None = None) -> Iterator[ResolvedPlan]:
    """Apply ``plan`` to ``model`` for the duration of the block; yields the resolved plan (a
    ``ResolvedPlan`` for this model is used as it is, anything else resolved once here)."""
    adapter = adapter or adapter_for_plan(model, plan)
    with holding(model, progress):
        if model in _MASKED:
            resolved = adapter.resolve(plan)
            if _MASKED[model] != _key(resolved):
                raise PlanError("this model already has a live mask of another plan applied; nested masks are "
                                "refused (finish the outer masked block first, or combine the plans into one)")
            yield resolved
            return
        try:
            with adapter.apply(plan) as resolved:
                _MASKED[model] = _key(resolved)
                yield resolved
        finally:
            _MASKED.pop(model, None)


def _key(plan: PruningPlan) -> tuple:
    return plan.components, tuple(sorted(plan.group_sizes.items()))
