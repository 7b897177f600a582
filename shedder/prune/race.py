"""Racing search steps: score every candidate on a few calibration windows, keep the better half
rung after rung (successive halving), then finish only the survivors exactly on all windows.

Why: an exact greedy step scores every candidate on every window, yet most candidates are plainly
worse after a window or two. Racing spends the full evaluation only on the few that might win, at
the risk of dropping the true winner early (the regret ``bench search --race`` measures). Racing is
never the default, and every number it produces is labelled raced.

The race runs on its own ``PlanEvaluator`` over the first ``windows`` calibration windows, one
window per batch, so rung ``r`` sums exactly the first ``start * 2**r`` windows of each candidate
(the prefix cache reuses earlier rungs). Survivors are finished on the search's exact evaluator and
the winner chosen among them with ``choice.beats``: when ``finish`` is at least the number of
candidates nothing is dropped, and the step is the exact search's step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shedder.core.errors import ShedderError
from shedder.measure.evaluator import PlanEvaluator, removing
from shedder.prune.choice import beats, sort_key


@dataclass(frozen=True)
class Race:
    """How a raced step narrows its candidates: rungs start on ``start`` windows and double, never
    past ``windows``; each keeps the better half, until at most ``finish`` remain."""
    windows: int = 4
    start: int = 1
    finish: int = 2

    def __post_init__(self):
        for name in ("windows", "start", "finish"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShedderError(f"race {name} must be a positive integer, got {value!r}")
        if self.start > self.windows:
            raise ShedderError(f"race start ({self.start}) cannot exceed race windows ({self.windows})")

    def to_dict(self) -> dict:
        return {"windows": self.windows, "start": self.start, "finish": self.finish}


def race_chooser(model, windows, adapter, race: Race, exact: PlanEvaluator, stats: dict, finished: list):
    """A ``Chooser`` that races the candidates, finishes survivors on ``exact``; the components it
    finished exactly are left in ``finished`` (for the run log)."""
    racer = PlanEvaluator(model, windows[:race.windows], adapter, 1)
    n_race = min(race.windows, windows.shape[0])

    def choose(plan, cands, tick):
        rank = {c: r for r, c in enumerate(cands)}
        plans = {c: removing(plan, c) for c in cands}
        alive, k = list(cands), min(race.start, n_race)
        while len(alive) > race.finish:
            scores = {c: sort_key(racer.nll(plans[c], first_batches=k)) for c in alive}
            stats["raced"] += len(alive)
            keep = max(race.finish, math.ceil(len(alive) / 2))
            alive = sorted(alive, key=lambda c: (scores[c], rank[c]))[:keep]
            tick(len(cands) - len(alive), len(cands), f"raced on {k} windows, {len(alive)} left")
            if k >= n_race:  # no more windows to race on: keep only the finish set
                alive = alive[:race.finish]
            k = min(2 * k, n_race)
        best, best_nll = None, math.inf
        finished.clear()
        for c in sorted(alive, key=rank.__getitem__):
            value = exact.nll(plans[c])
            stats["evaluated"] += 1
            finished.append(c)
            if beats(value, rank[c], best_nll, None if best is None else rank[best]):
                best, best_nll = c, value
        tick(len(cands), len(cands), f"finished {len(finished)} exactly")
        return best, best_nll

    return choose
