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

A run directory holds ``log.jsonl`` (a header with the settings, then one line per finished step)
and ``step_XX/pruning_config.json`` (the plan after step XX). ``resume=True`` continues an
interrupted run without redoing its finished steps; the settings that decide the choices (model,
data, kinds, base plan) must match, the limits (steps, target_params, max_ppl) may change.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from shedder.arch import adapter_for
from shedder.measure.data import windows_hash
from shedder.core.errors import ShedderError
from shedder.measure.evaluator import PlanEvaluator, check_kinds, removing
from shedder.core.fileio import RUN_LOCK, atomic_write_text, claim_run_dir, drop_torn_tail, exclusive, model_dirs
from shedder.prune.importance import cache_key, default_cache_dir, model_fingerprint, plan_key
from shedder.measure.masking import masked
from shedder.measure.metrics import nll_sum, perplexity_of, predicted_tokens
from shedder.core.progress import Progress
from shedder.core.plan import Component, PruningPlan

LOG_FILE = "log.jsonl"
#: Held (``fileio.exclusive``) while a search writes its run directory: one writer per run.
LOCK_FILE = RUN_LOCK
PLAN_FILE = "pruning_config.json"
LOG_VERSION = 1


@dataclass(frozen=True)
class SearchStep:
    step: int  # 1-based
    component: Component  # removed at this step
    plan: PruningPlan  # everything removed after this step
    ppl: float  # calibration perplexity of ``plan``
    params: int  # parameters of the model extracted under ``plan``


@dataclass
class SearchResult:
    steps: list[SearchStep]
    base_ppl: float  # calibration perplexity of the base plan
    base_params: int
    stopped: str  # why the search ended, in words
    run_dir: Path | None = None
    stats: dict = field(default_factory=dict)  # candidates evaluated / abandoned, layers run

    @property
    def plan(self) -> PruningPlan | None:
        """The final plan (None when no step was taken)."""
        return self.steps[-1].plan if self.steps else None

    @property
    def components(self) -> list[Component]:
        return [s.component for s in self.steps]


# A chooser picks the next component: (plan, candidates, tick(done, total, what)) -> (component, nll)
Chooser = Callable[[PruningPlan, list[Component], Callable[[int, int, str], None]], tuple[Component, float]]


def greedy_search(model, windows: torch.Tensor, kinds, steps: int | None = None, target_params: float | None = None,
                  max_ppl: float | None = None, run_dir: str | Path | None = None, resume: bool = False,
                  progress: Progress | None = None, base_plan: PruningPlan | None = None, batch_size: int = 8,
                  on_step: Callable[[SearchStep], None] | None = None, workers: int | None = None,
                  ray_address: str | None = None, pool=None, evaluator: PlanEvaluator | None = None) -> SearchResult:
    """The greedy search with the prefix cache and exact early abandoning (same choices as
    ``reference_search``).

    ``workers`` / ``ray_address``: evaluate the candidates on that many Ray workers (a local Ray is
    started unless ``ray_address`` names a cluster), or ``pool``: on an open
    ``shedder.prune.distributed.WorkerPool`` (reused across calls). The choices, the logged numbers and
    the run log are the same as without them (see ``shedder.prune.distributed``). ``evaluator``: one
    already built on ``windows`` (e.g. after timing its first pass for the cost announcement),
    whose cache the search then reuses."""
    adapter = evaluator.adapter if evaluator else adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    if workers is not None or ray_address is not None or pool is not None:
        from shedder.prune.distributed import pool_stats, pooled

        with pooled(model, windows, batch_size, adapter.group_sizes, workers, ray_address, pool) as pool:
            result = _search(model, windows, kinds, pool.choose, steps, target_params, max_ppl, run_dir, resume,
                             progress, base_plan, on_step, adapter, base_nll=pool.nll)
            result.stats = pool_stats(pool)
        return result
    ev = evaluator or PlanEvaluator(model, windows, adapter, batch_size)
    stats = {"evaluated": 0, "abandoned": 0}

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
            tick(done, 2 * n, str(c))
        return best, best_nll

    result = _search(model, windows, kinds, choose, steps, target_params, max_ppl, run_dir, resume, progress,
                     base_plan, on_step, adapter, base_nll=lambda plan: ev.nll(plan))
    result.stats = {**stats, "layers_run": ev.layers_run, "windows_scored": ev.windows_scored}
    return result


def sort_key(value: float) -> float:
    """NaN sorts last (it never wins a comparison)."""
    return math.inf if math.isnan(value) else value


def beats(value: float, rank: int, best_value: float, best_rank: int | None) -> bool:
    """Whether a candidate's complete NLL total ``value`` wins over the best so far: lower, or equal
    and listed earlier (``rank``: its position in ``adapter.candidates``), whatever the order in
    which candidates are completed. NaN never wins."""
    return value < best_value or (value == best_value and best_rank is not None and rank < best_rank)


def reference_search(model, windows: torch.Tensor, kinds, steps: int | None = None, target_params: float | None = None,
                     max_ppl: float | None = None, run_dir: str | Path | None = None, resume: bool = False,
                     progress: Progress | None = None, base_plan: PruningPlan | None = None, batch_size: int = 8,
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
            tick(done, len(cands), str(c))
        return best, best_nll

    result = _search(model, windows, kinds, choose, steps, target_params, max_ppl, run_dir, resume, progress,
                     base_plan, on_step, adapter, base_nll=full_nll)
    result.stats = stats
    return result


def default_run_dir(model, windows: torch.Tensor, kinds, base_plan: PruningPlan | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """A run directory under the cache, keyed by model weights, data, kinds and base plan (like the
    importance cache): a caller without a place of its own for the run (the app) passes it with
    ``resume=True``, so a cancelled search continues where it stopped and a longer one extends it."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    base = adapter.resolve(base_plan or PruningPlan())
    key = cache_key(model, windows, check_kinds(adapter, kinds), base)
    return Path(cache_dir or default_cache_dir()) / "searches" / key


# ---------------------------------------------------------------------------- the shared loop
def _search(model, windows, kinds, choose: Chooser, steps, target_params, max_ppl, run_dir, resume, progress,
            base_plan, on_step, adapter, base_nll) -> SearchResult:
    """The loop, holding the run directory's lock when there is one: a second process on the same
    directory is refused (``Busy``) and a second app session waits, instead of interleaving steps."""
    args = (model, windows, kinds, choose, steps, target_params, max_ppl, run_dir, resume, progress, base_plan,
            on_step, adapter, base_nll)
    if run_dir is None:
        return _search_loop(*args)
    _check_limits(steps, target_params, max_ppl)
    claim_search_dir(run_dir, model)
    with exclusive(Path(run_dir) / LOCK_FILE, f"the search run {run_dir}", progress):
        return _search_loop(*args)


def claim_search_dir(run_dir: str | Path, model) -> Path:
    """The output policy for a search run directory (``fileio.claim_run_dir``): never the working
    directory, the model's directory or a directory of someone else's files."""
    return claim_run_dir(run_dir, model_dirs(model), "search run", legacy=(LOG_FILE,))


def _search_loop(model, windows, kinds, choose: Chooser, steps, target_params, max_ppl, run_dir, resume, progress,
                 base_plan, on_step, adapter, base_nll) -> SearchResult:
    kinds = check_kinds(adapter, kinds)
    _check_limits(steps, target_params, max_ppl)
    base = adapter.resolve(base_plan or PruningPlan())
    tokens = predicted_tokens(windows)
    full_params = adapter.param_count()
    target = None if target_params is None else (
        target_params * full_params if target_params < 1 else target_params)
    settings = {"model": adapter.identity().to_dict(), "weights": model_fingerprint(model),
                "data": windows_hash(windows), "windows": list(windows.shape), "kinds": kinds,
                "base_plan": plan_key(base)}
    limits = {"steps": steps, "target_params": target_params, "max_ppl": max_ppl}
    log = _RunLog(Path(run_dir)) if run_dir is not None else None

    done_steps: list[SearchStep] = []
    if log is not None and log.exists():
        if not resume:
            raise ShedderError(f"{log.dir} already holds a search ({LOG_FILE}); resume it (--resume) or choose another directory")
        header, records = log.read()
        log.check_settings(header["settings"], settings)
        base_ppl, base_params = header["base_ppl"], header["base_params"]
        plan = base
        for rec in records:
            comp = Component.parse(rec["component"])
            plan = removing(plan, comp)
            done_steps.append(SearchStep(rec["step"], comp, _step_plan(plan, rec, settings), rec["ppl"], rec["params"]))
        plan = done_steps[-1].plan if done_steps else base
    else:
        base_ppl = perplexity_of(base_nll(base), tokens)
        base_params = adapter.param_count(base)
        if log is not None:
            log.start({"type": "header", "version": LOG_VERSION, "settings": settings, "limits": limits,
                       "base_ppl": base_ppl, "base_params": base_params, "created": _now()})
        plan = base

    def stop_reason() -> str | None:
        params = done_steps[-1].params if done_steps else base_params
        if steps is not None and len(done_steps) >= steps:
            return f"{steps} steps done"
        if target is not None and full_params - params >= target:
            return f"parameter target reached ({full_params - params:,} of {full_params:,} removed)"
        return None

    reason = stop_reason()
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
        if max_ppl is not None and ppl > max_ppl:
            reason = f"next step ({comp}) would reach perplexity {ppl:.3f} > max_ppl {max_ppl}"
            break
        plan = removing(plan, comp)
        params = adapter.param_count(plan)
        rec = {"type": "step", "step": k, "component": str(comp), "ppl": ppl, "params": params,
               "candidates": len(cands), "seconds": round(time.perf_counter() - started, 3)}
        step = SearchStep(k, comp, _step_plan(plan, rec, settings), ppl, params)
        if log is not None:
            log.add_step(step, rec)
        done_steps.append(step)
        if on_step:
            on_step(step)
        reason = stop_reason()
    return SearchResult(done_steps, base_ppl, base_params, reason, log.dir if log else None)


def _check_limits(steps, target_params, max_ppl) -> None:
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ShedderError(f"steps must be a non-negative integer, got {steps!r}")
    if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, (int, float))
                                      or not (0 < target_params < 1 or (target_params >= 1 and float(target_params).is_integer()))):
        raise ShedderError("target_params takes an integer count ≥ 1, a fraction in (0, 1), or a percentage in "
                           f"(0, 100%) given as a fraction; got {target_params!r}")
    if max_ppl is not None and not max_ppl > 0:
        raise ShedderError(f"max_ppl must be positive, got {max_ppl!r}")


def _step_plan(plan: PruningPlan, rec: dict, settings: dict) -> PruningPlan:
    """The plan after a step, with its provenance in ``meta``."""
    meta = {"search_step": rec["step"], "calibration_ppl": rec["ppl"], "params": rec["params"],
            "search_kinds": settings["kinds"], "calibration_data": settings["data"]}
    return PruningPlan(plan.components, plan.model, dict(plan.group_sizes), meta)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class _RunLog:
    """``log.jsonl`` + ``step_XX/pruning_config.json`` in a run directory."""

    def __init__(self, path: Path):
        self.dir = path
        self.path = path / LOG_FILE

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def start(self, header: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(header) + "\n")

    def add_step(self, step: SearchStep, rec: dict) -> None:
        step_dir = self.dir / f"step_{step.step:02d}"
        step_dir.mkdir(exist_ok=True)
        step.plan.save(step_dir / PLAN_FILE)
        with self.path.open("a") as f:  # the log line goes last: a step counts once its plan is on disk
            f.write(json.dumps(rec) + "\n")

    def read(self) -> tuple[dict, list[dict]]:
        """Header and steps. What follows the last record (a line cut short by an interruption,
        garbage, blank lines) is first moved aside into ``log.jsonl.damaged``
        (``fileio.drop_torn_tail``), so that step is redone and the next append starts on a line
        of its own; a bad line followed by records is refused as damage, naming the line."""
        drop_torn_tail(self.path)
        records = [json.loads(line) for line in self.path.read_bytes().split(b"\n") if line]  # all objects now
        if not records or records[0].get("type") != "header" or records[0].get("version") != LOG_VERSION:
            raise ShedderError(f"{self.path} is not a search log of this version (no header line)")
        steps = [r for r in records[1:] if r.get("type") == "step"]
        for expected, r in enumerate(steps, 1):
            if r.get("step") != expected:
                raise ShedderError(f"{self.path}: step {r.get('step')} found where step {expected} was expected")
            if not (isinstance(r.get("component"), str) and isinstance(r.get("ppl"), float)
                    and _is_count(r.get("params"))):
                raise ShedderError(f"{self.path}: step {expected} lacks its component, ppl or params; the log is damaged")
        return records[0], steps

    def check_settings(self, old: dict, new: dict) -> None:
        differ = [k for k in new if old.get(k) != new[k]]
        if differ:
            what = "; ".join(f"{k}: run has {_short(old.get(k))}, now {_short(new[k])}" for k in differ)
            raise ShedderError(f"cannot resume {self.dir}: it was started with different settings ({what})")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
