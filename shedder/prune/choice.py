"""How a search step picks its winner, wherever the candidates are evaluated.

A ``Chooser`` takes the plan so far, the candidates (in ``adapter.candidates`` order) and a
``tick(done, total, what)`` for progress, and returns the winning component with its complete
calibration NLL total (``None`` when every candidate is undefined). ``search.greedy_search`` builds
one on a ``PlanEvaluator``, ``search.reference_search`` one on full masked forwards,
``distributed.WorkerPool.choose`` is one across Ray workers; ``search.run_search`` runs the loop
around any of them. Every chooser decides with ``beats``, so the choice is the same whatever the
order in which totals are completed.
"""
from __future__ import annotations

import math
from typing import Callable

from shedder.core.plan import Component, PruningPlan

#: (plan, candidates, tick(done, total, what)) -> (component, nll)
Chooser = Callable[[PruningPlan, list[Component], Callable[[int, int, str], None]], tuple[Component | None, float]]


def sort_key(value: float) -> float:
    """NaN sorts last (it never wins a comparison)."""
    return math.inf if math.isnan(value) else value


def beats(value: float, rank: int, best_value: float, best_rank: int | None) -> bool:
    """Whether a candidate's complete NLL total ``value`` wins over the best so far: lower, or equal
    and listed earlier (``rank``: its position in ``adapter.candidates``), whatever the order in
    which candidates are completed. NaN never wins."""
    return value < best_value or (value == best_value and best_rank is not None and rank < best_rank)
