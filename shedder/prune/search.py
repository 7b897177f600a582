"""The Mamba-Shedder greedy search: remove, one step at a time, the component whose removal hurts
calibration perplexity least.

At every step each remaining candidate (of one kind, or of several kinds at once) is removed on top
of everything removed so far and the calibration NLL measured; the lowest wins (ties go to the
candidate listed first by ``adapter.candidates``) and is removed for good. The search stops after
``steps`` steps, once at least ``target_params`` parameters are gone (counted from the unpruned
model; a value below 1 is a fraction of its parameters), before a step would exceed ``max_ppl``, or
when nothing is left to remove.

``greedy_search`` gets the reference loop's choices, faster. Candidates are evaluated through
``PlanEvaluator``: only the layers a candidate changes are re-run, and the loss head runs window by
window. Visiting is best-first: the first batch of every candidate is scored (cheap, and reused),
then candidates are completed in order of that partial NLL, so the likely winner comes first and
gives a tight bound; every later candidate is abandoned once its partial NLL sum exceeds the best
complete one (sums of non-negative NLLs only grow, so it cannot win). The totals that are compared
are summed exactly as the reference sums them, and exact ties go to the candidate listed first, as
in the reference. ``reference_search`` is the plain loop with a full masked forward per candidate.

What a search takes: the kinds, ``StopWhen`` (the limits, checked when built), ``RunDir`` (where
the run is logged, and whether to resume it) and, for Ray, ``distributed.Workers``. A run directory
holds ``log.jsonl`` and ``step_XX/pruning_config.json`` (``shedder.prune.runs``).
``RunDir(path, resume=True)`` continues an interrupted run without redoing its finished steps; the
settings that decide the choices (model, data, kinds, base plan) must match, the limits may change.

``run_search`` is the loop both searches share, and the extension point: a new way of evaluating
candidates (``distributed.WorkerPool.choose`` is one) is a ``Chooser`` (``shedder.prune.choice``)
handed to it; the loop keeps the run log, the stopping rules and the progress.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.core.progress import Progress
from shedder.measure.evaluator import PlanEvaluator, check_kinds, removing
from shedder.measure.masking import masked
from shedder.measure.metrics import nll_sum, perplexity_of, predicted_tokens
from shedder.prune.choice import Chooser, beats, sort_key
from shedder.prune.distributed import Workers, pool_stats, pooled
from shedder.prune.race import Race, race_chooser
from shedder.core.cache import cache_key, default_cache_dir, model_fingerprint, plan_key, windows_hash
from shedder.prune.runs import LOG_FILE, RunLog, SearchStep, claim_search_dir, run_settings, search_step


@dataclass(frozen=True)
class StopWhen:
    """When a search stops: after ``steps`` steps, once at least ``target_params`` parameters are
    gone (counted from the unpruned model; below 1: a fraction of its parameters), or before a
    step would exceed ``max_ppl`` perplexity. None: no such limit. Checked when built."""
    steps: int | None = None
    target_params: float | None = None
    max_ppl: float | None = None

    def __post_init__(self):
        steps, target_params, max_ppl = self.steps, self.target_params, self.max_ppl
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ShedderError(f"steps must be a non-negative integer, got {steps!r}")
        if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, (int, float))
                                          or not (0 < target_params < 1 or (target_params >= 1 and float(target_params).is_integer()))):
            raise ShedderError("target_params takes an integer count ≥ 1, a fraction in (0, 1), or a percentage in "
                               f"(0, 100%) given as a fraction; got {target_params!r}")
        if max_ppl is not None and not max_ppl > 0:
            raise ShedderError(f"max_ppl must be positive, got {max_ppl!r}")

    def limits(self) -> dict:
        """As the run log's header records them."""
        return {"steps": self.steps, "target_params": self.target_params, "max_ppl": self.max_ppl}

    def reached(self, done: int, params: int, full_params: int) -> str | None:
        """Why the search stops after ``done`` steps leaving ``params`` parameters, or None."""
        if self.steps is not None and done >= self.steps:
            return f"{self.steps} steps done"
        t = self.target_params
        target = None if t is None else (t * full_params if t < 1 else t)
        if target is not None and full_params - params >= target:
            return f"parameter target reached ({full_params - params:,} of {full_params:,} removed)"
        return None

    def over_ppl(self, comp, ppl: float) -> str | None:
        """Why a step removing ``comp`` at perplexity ``ppl`` is not taken, or None."""
        if self.max_ppl is not None and ppl > self.max_ppl:
            return f"next step ({comp}) would reach perplexity {ppl:.3f} > max_ppl {self.max_ppl}"
        return None

    def allowed(self, steps: list, base_params: int, full_params: int) -> tuple[list, str | None]:
        """The leading ``steps`` (of a run's log) these limits allow, and why they stop there (None: all
        allowed and no limit reached): resuming a longer logged search under tighter limits."""
        kept, reason = [], self.reached(0, base_params, full_params)
        for step in steps:
            reason = reason or self.over_ppl(step.component, step.ppl)
            if reason is not None:
                break
            kept.append(step)
            reason = self.reached(len(kept), step.params, full_params)
        return kept, reason


@dataclass(frozen=True)
class RunDir:
    """Where a search logs its run (``shedder.prune.runs``); ``resume``: continue the run there."""
    path: Path
    resume: bool = False

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))


@dataclass
class SearchResult:
    steps: list[SearchStep]
    base_ppl: float  # calibration perplexity of the base plan
    base_params: int
    stopped: str  # why the search ended, in words
    run_dir: Path | None = None
    stats: dict = field(default_factory=dict)  # candidates evaluated / abandoned, layers run
    raced: bool = False  # steps chosen by racing (shedder.prune.race), not exactly

    @property
    def plan(self) -> PruningPlan | None:
        """The final plan (None when no step was taken)."""
        return self.steps[-1].plan if self.steps else None

    @property
    def components(self) -> list:
        return [s.component for s in self.steps]


def greedy_search(model, windows: torch.Tensor, kinds, stop: StopWhen | None = None, *, run: RunDir | None = None,
                  base_plan: PruningPlan | None = None, batch_size: int = 8, progress: Progress | None = None,
                  on_step: Callable[[SearchStep], None] | None = None, workers: Workers | None = None,
                  evaluator: PlanEvaluator | None = None, race: Race | None = None) -> SearchResult:
    """The greedy search with the prefix cache and exact early abandoning (same choices as
    ``reference_search``).

    ``workers``: evaluate the candidates on Ray workers (``distributed.Workers``: a number of them,
    a cluster's address, or an open ``WorkerPool`` reused across calls). The choices, the logged
    numbers and the run log are the same as without them (see ``shedder.prune.distributed``).
    ``evaluator``: one already built on ``windows`` (e.g. after timing its first pass for the cost
    announcement), whose cache the search then reuses.
    ``race``: race each step (``shedder.prune.race``) instead of finishing every candidate; not the
    same choices in general, and the run log says so."""
    adapter = evaluator.adapter if evaluator else adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    common = dict(adapter=adapter, stop=stop, run=run, base_plan=base_plan, progress=progress, on_step=on_step)
    if workers is not None and race is not None:
        raise ShedderError("a raced search runs in this process: drop the workers or the race")
    if workers is not None:
        with pooled(model, windows, batch_size, adapter.group_sizes, workers.count, workers.address,
                    workers.pool) as pool:
            result = run_search(model, windows, kinds, pool.choose, pool.nll, **common)
            result.stats = pool_stats(pool)
        return result
    ev = evaluator or PlanEvaluator(model, windows, adapter, batch_size)
    stats = {"evaluated": 0, "abandoned": 0}
    if race is not None:
        stats["raced"], finished = 0, []
        choose = race_chooser(model, windows, adapter, race, ev, stats, finished)
        result = run_search(model, windows, kinds, choose, lambda plan: ev.nll(plan), race=race,
                            finished=finished, **common)
        result.stats = {**stats, "layers_run": ev.layers_run, "windows_scored": ev.windows_scored}
        return result

    def choose(plan, cands, tick):
        rank = {c: r for r, c in enumerate(cands)}
        plans = {c: removing(plan, c) for c in cands}
        n = len(cands)
        first = {}
        for done, c in enumerate(cands, 1):  # the first batch of each: an estimate to order by
            first[c] = sort_key(ev.nll(plans[c], first_batches=1))
            tick(done, 2 * n, f"{c} (first batch)")
        best, best_nll = None, math.inf
        for done, c in enumerate(sorted(cands, key=lambda c: (first[c], rank[c])), n + 1):
            value = ev.nll(plans[c], bound=best_nll)
            stats["evaluated"] += 1
            if value is None:
                stats["abandoned"] += 1
            elif beats(value, rank[c], best_nll, None if best is None else rank[best]):
                best, best_nll = c, value
            tick(done, 2 * n, c.words())
        if best is not None:
            ev.keep_for_next_step(plans[best], [plans[c] for c in cands if c != best], best.layer)
        return best, best_nll

    result = run_search(model, windows, kinds, choose, lambda plan: ev.nll(plan), **common)
    result.stats = {**stats, "layers_run": ev.layers_run, "windows_scored": ev.windows_scored}
    return result


def reference_search(model, windows: torch.Tensor, kinds, stop: StopWhen | None = None, *, run: RunDir | None = None,
                     base_plan: PruningPlan | None = None, batch_size: int = 8, progress: Progress | None = None,
                     on_step: Callable[[SearchStep], None] | None = None) -> SearchResult:
    """The plain loop: one full masked forward over all windows per candidate."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)

    stats = {"evaluated": 0, "abandoned": 0, "layers_run": 0, "windows_scored": 0}
    n_batches = -(-windows.shape[0] // batch_size)

    def full_nll(plan):
        stats["evaluated"] += 1
        stats["layers_run"] += n_batches * (adapter.num_layers - len(plan.of_kind("block")))
        stats["windows_scored"] += windows.shape[0]
        with masked(model, plan, adapter):
            return nll_sum(model, windows, batch_size)[0]

    def choose(plan, cands, tick):
        best, best_nll = None, math.inf
        for done, c in enumerate(cands, 1):
            value = full_nll(removing(plan, c))
            if value < best_nll:  # strict: ties keep the earlier candidate
                best, best_nll = c, value
            tick(done, len(cands), c.words())
        return best, best_nll

    result = run_search(model, windows, kinds, choose, full_nll, adapter=adapter, stop=stop, run=run,
                        base_plan=base_plan, progress=progress, on_step=on_step)
    result.stats = stats
    return result


def default_run_dir(model, windows: torch.Tensor, kinds, base_plan: PruningPlan | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """A run directory under the cache, keyed by model weights, data, kinds and base plan (like the
    importance cache): a caller without a place of its own for the run (the app) passes it as
    ``RunDir(path, resume=True)``, so a cancelled search continues where it stopped and a longer one extends it."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    base = adapter.resolve(base_plan or PruningPlan())
    key = cache_key(model, windows, check_kinds(adapter, kinds), base)
    return Path(cache_dir or default_cache_dir()) / "searches" / key


# ---------------------------------------------------------------------------- the shared loop
def run_search(model, windows: torch.Tensor, kinds, choose: Chooser, base_nll: Callable[[PruningPlan], float], *,
               adapter, stop: StopWhen | None = None, run: RunDir | None = None, base_plan: PruningPlan | None = None,
               progress: Progress | None = None, on_step: Callable[[SearchStep], None] | None = None,
               race: Race | None = None, finished: list | None = None) -> SearchResult:
    """The greedy loop around ``choose`` (the extension point: see the module docstring).
    ``base_nll(plan)``: the calibration NLL total of the base plan (when the run does not resume).
    ``race``, ``finished``: a raced run's settings and the list its chooser leaves the components it
    finished exactly in, both logged.

    With a run directory the loop holds its lock: a second process on the same directory is
    refused (``Busy``) and a second app session waits, instead of interleaving steps."""
    stop = stop or StopWhen()
    args = (model, windows, kinds, choose, base_nll, adapter, stop, run, base_plan, progress, on_step, race, finished)
    if run is None:
        return _loop(*args)
    claim_search_dir(run.path, model)
    log = RunLog(run.path)
    with log.locked(progress):
        return _loop(*args)


def _loop(model, windows, kinds, choose, base_nll, adapter, stop: StopWhen, run: RunDir | None, base_plan, progress,
          on_step, race, finished) -> SearchResult:
    kinds = check_kinds(adapter, kinds)
    base = adapter.resolve(base_plan or PruningPlan())
    tokens = predicted_tokens(windows)
    full_params = adapter.param_count()
    settings = run_settings(adapter, model_fingerprint(model), windows_hash(windows), list(windows.shape), kinds,
                            plan_key(base), None if race is None else race.to_dict())
    log = RunLog(run.path) if run is not None else None

    done_steps: list[SearchStep] = []
    logged_reason = None  # a limit a logged step already meets (max_ppl included): no step is re-evaluated
    if log is not None and log.exists():
        if not run.resume:
            raise ShedderError(f"{log.dir} already holds a search ({LOG_FILE}); resume it (--resume) or choose another directory")
        header, logged = log.resume(settings, base)
        base_ppl, base_params = header["base_ppl"], header["base_params"]
        done_steps, logged_reason = stop.allowed(logged, base_params, full_params)  # the log may hold more
        plan = done_steps[-1].plan if done_steps else base
    else:
        base_ppl = perplexity_of(base_nll(base), tokens)
        base_params = adapter.param_count(base)
        if log is not None:
            log.start(settings, stop.limits(), base_ppl, base_params)
        plan = base

    def stop_reason() -> str | None:
        return stop.reached(len(done_steps), done_steps[-1].params if done_steps else base_params, full_params)

    reason = logged_reason or stop_reason()
    while reason is None:
        cands = adapter.candidates(plan, kinds)
        if not cands:
            reason = "no candidates left"
            break
        k = len(done_steps) + 1
        started = time.perf_counter()

        def tick(done, total, what, k=k):
            if progress:
                progress(done, total, f"step {k}: {what}")

        comp, nll = choose(plan, cands, tick)
        if comp is None:
            raise ShedderError(f"step {k}: every candidate gives an undefined or infinite perplexity "
                               "(try float32, or check the model)")
        ppl = math.exp(nll / tokens)
        reason = stop.over_ppl(comp, ppl)
        if reason is not None:
            break
        plan = removing(plan, comp)
        params = adapter.param_count(plan)
        step = search_step(k, comp, plan, ppl, params, settings)
        if log is not None:
            log.add_step(step, len(cands), round(time.perf_counter() - started, 3),
                         None if finished is None else list(finished))
        done_steps.append(step)
        if on_step:
            on_step(step)
        reason = stop_reason()
    return SearchResult(done_steps, base_ppl, base_params, reason, log.dir if log else None, raced=race is not None)
