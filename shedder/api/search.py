"""The greedy search (resumable, optionally on Ray workers), the reference-vs-fast comparison, and
the plan files: converting between our format and the official one, importing an official run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.fileio import check_output_file, exclusive, write_output_file
from shedder.core.plan import PruningPlan
from shedder.formats.official import check_official_kinds, import_run, to_official, write_official_run
from shedder.measure.metrics import nll_sum
from shedder.formats.official import OfficialConfig
from shedder.prune.distributed import Workers
from shedder.prune.runs import LOCK_FILE, SearchStep, claim_search_dir
from shedder.prune.race import Race
from shedder.prune.search import RunDir, SearchResult, StopWhen, default_run_dir, greedy_search, reference_search


def check_official_layout(adapter, kinds, base: PruningPlan | None) -> None:
    """Refuse now (not once the whole search has run) a search the official layout cannot write."""
    check_official_kinds(adapter, kinds)
    to_official(adapter, base or PruningPlan())


def claim_run(run_dir, model) -> None:
    """Make ``run_dir`` this model's search run, refused while another process holds it."""
    claim_search_dir(run_dir, model)
    with exclusive(Path(run_dir) / LOCK_FILE, f"the search run {run_dir}"):
        pass  # another process on this run: refused now, before the cost is measured and announced


def search(model, windows, kinds, stop: StopWhen, run_dir=None, resume: bool = False, progress=None,
           base: PruningPlan | None = None, batch_size: int = 8, on_step=None, evaluator=None,
           pool=None, race: Race | None = None) -> SearchResult:
    """The greedy Mamba-Shedder search (``shedder.prune.search.greedy_search``); ``race``: raced
    steps (``shedder.prune.race``), never the default."""
    return greedy_search(model, windows, list(kinds), stop, run=None if run_dir is None else RunDir(run_dir, resume),
                         progress=progress, base_plan=base, batch_size=batch_size, on_step=on_step, evaluator=evaluator,
                         workers=None if pool is None else Workers(pool=pool), race=race)


def cached_search(model, windows, kinds, steps: int | None, progress=None, batch_size: int = 8, pool=None,
                  target_params: float | None = None, max_ppl: float | None = None,
                  race: Race | None = None) -> SearchResult:
    """The studio's search: logged under the cache, so a cancelled or shorter one is continued, not redone,
    and a longer one is read back as far as the limits (``steps``, ``target_params``, ``max_ppl``, as the
    CLI's ``search``) allow. A raced search is logged in a directory of its own."""
    run_dir = default_run_dir(model, windows, list(kinds))
    if race is not None:
        run_dir = run_dir.with_name(run_dir.name + "-raced-" + "-".join(map(str, race.to_dict().values())))
    return search(model, windows, kinds, StopWhen(steps=steps, target_params=target_params, max_ppl=max_ppl),
                  run_dir=run_dir, resume=True, progress=progress, batch_size=batch_size, pool=None if race else pool,
                  race=race)


def write_official_layout(adapter, result: SearchResult, kinds, settings: dict) -> None:
    """The official run layout (log.json, pruning_config.json, pruned_model_configs/) beside ours."""
    write_official_run(adapter, result.run_dir, result.steps, kinds, settings)


def step_rows(steps) -> list[dict]:
    return [{"step": s.step, "component": str(s.component), "ppl": s.ppl, "params": s.params} for s in steps]


def compare_searches(model, windows, kinds, steps: int, batch_size: int = 8, progress=None) -> dict:
    """Reference and fast search on the same model and windows: wall and CPU times, and their choices."""
    with torch.inference_mode():
        nll_sum(model, windows[:batch_size], batch_size)  # warm-up, untimed
    timings, cpu, results = {}, {}, {}
    for name, fn in (("reference", reference_search), ("fast", greedy_search)):
        started, started_cpu = time.perf_counter(), time.process_time()
        results[name] = fn(model, windows, kinds, StopWhen(steps=steps), progress=progress, batch_size=batch_size)
        timings[name] = time.perf_counter() - started
        cpu[name] = time.process_time() - started_cpu  # less sensitive to other processes' load
        if progress is not None:
            progress.close()
    return {"timings": timings, "cpu": cpu, "results": results}


def compare_race(model, windows, kinds, steps: int, race: Race, batch_size: int = 8, progress=None) -> dict:
    """Exact and raced greedy search side by side: times, choices, and the regret (the raced final
    calibration perplexity relative to the exact one; 0 when both choose the same)."""
    with torch.inference_mode():
        nll_sum(model, windows[:batch_size], batch_size)  # warm-up, untimed
    timings, cpu, results = {}, {}, {}
    for name, r in (("exact", None), ("raced", race)):
        started, started_cpu = time.perf_counter(), time.process_time()
        results[name] = greedy_search(model, windows, kinds, StopWhen(steps=steps), progress=progress,
                                      batch_size=batch_size, race=r)
        timings[name] = time.perf_counter() - started
        cpu[name] = time.process_time() - started_cpu
        if progress is not None:
            progress.close()
    exact, raced = results["exact"], results["raced"]
    final = {name: res.steps[-1].ppl if res.steps else res.base_ppl for name, res in results.items()}
    same = sum(a == b for a, b in zip(exact.components, raced.components))
    return {"timings": timings, "cpu": cpu, "results": results, "identical_choices": same,
            "race_speedup": timings["exact"] / timings["raced"], "race_cpu_speedup": cpu["exact"] / cpu["raced"],
            "race_regret": final["raced"] / final["exact"] - 1, "final_ppl": final}


def convert_plan(model, plan: PruningPlan | OfficialConfig, to: str, out, overwrite: bool = False,
                 protected=()) -> tuple[PruningPlan, dict, Path]:
    """Our plan -> official config (``to="official"``), or official config -> our plan, for one
    model: (resolved plan, what was written, the file)."""
    adapter = adapter_for(model, None if isinstance(plan, OfficialConfig) else plan.group_sizes)
    resolved = adapter.resolve(plan)
    data = to_official(adapter, resolved) if to == "official" else resolved.to_dict()
    path = write_output_file(out, json.dumps(data, indent=4, default=str), overwrite, list(protected))
    return resolved, data, path


def check_conversion(plan: PruningPlan | OfficialConfig, path: str, to: str, out, overwrite: bool,
                     protected=()) -> None:
    """Refuse a conversion before the model is loaded: the output, or a plan already in ``to``'s format."""
    check_output_file(out, overwrite, list(protected))
    official_in = isinstance(plan, OfficialConfig)
    if to == "official" and official_in:
        raise ShedderError(f"{path} is already an official config")
    if to == "shedder" and not official_in:
        raise ShedderError(f"{path} is already a plan of ours")


def import_official_run(model, run, out) -> list[SearchStep]:
    """An official Mamba-Shedder run directory as a run of ours (log.jsonl, step_XX/pruning_config.json)."""
    return import_run(model, run, out)
