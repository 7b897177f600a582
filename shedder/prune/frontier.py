"""The accuracy–efficiency frontier: strategies as named series of plans, measured the same way.

A ``Series`` is one strategy's trail of plans: the steps of a greedy search (over some kinds), a
one-shot pruning by an importance metric (the k lowest-scored components removed at once, for
k = 1, 2, ...), the plans a user saved, or models recovered after pruning. Any producer adds its
own series; the Pareto front is taken over the points of every series together (``pareto_mask``).

Speed is measured, never guessed: ``measure`` extracts a point's plan and runs the side-by-side
bench (``shedder.measure.bench.bench_models``: prefill and decode throughput ratios, time to first token,
recurrent state and, on request, peak memory). Results are cached on disk under the cache
directory, keyed by the model's weights fingerprint, the plan, the device, the dtype and the bench
settings, so a point measured once is known in every later session; ``measured`` reads that cache
without measuring.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from shedder.arch import adapter_for
from shedder.core.fileio import atomic_write_text
from shedder.core.cache import default_cache_dir, model_fingerprint, plan_key
from shedder.measure.bench import bench_models, speedup_text
from shedder.measure.masking import holding
from shedder.measure.metrics import Progress, pareto_mask
from shedder.measure.timing import MIN_ROUNDS, Protocol
from shedder.core.plan import Component, PruningPlan

#: Cost axes (x) and quality axes (y) a frontier can be drawn on; quality axes that are higher-better.
X_AXES = {"params": "parameters", "flops": "FLOPs / token (prefill, cost model)",
          "prefill_speedup": "measured prefill speedup (×)", "decode_speedup": "measured decode speedup (×)",
          "state_bytes": "recurrent state per sequence (bytes, cost model)"}
Y_AXES = {"ppl": "perplexity", "accuracy": "next-word accuracy", "lm_eval_average": "lm-eval average accuracy",
          "relative_accuracy": "relative accuracy (pruned / unpruned lm-eval average)"}
HIGHER_BETTER = {"accuracy", "lm_eval_average", "relative_accuracy"}
#: Cost axes where more is better (a speedup), so the Pareto front takes them negated.
FASTER_BETTER = {"prefill_speedup", "decode_speedup"}
MEASURED = ("prefill_speedup", "decode_speedup")
#: The columns beside each measured speedup: its 95 % interval, whether it is resolved, its printed form.
SPEED_COLUMNS = [f"{x}{suffix}" for x in MEASURED for suffix in ("_low", "_high", "_resolved", "_text")]
#: Version of a cached measured point (2: speedups with their 95 % interval), part of its cache key.
MEASURED_SCHEMA = 2
#: Bench settings for frontier points: short, so a whole search can be measured in minutes (the
#: protocol's ±3 % target still stops a point early; its time budget bounds the rest).
BENCH_DEFAULTS = {"seq_len": 128, "new_tokens": 8, "budget_s": 5.0, "min_rounds": MIN_ROUNDS, "warmup": 1,
                  "memory": False}
#: How the Pareto front reads an uncertain speedup: by the lower end of its 95 % interval, so a
#: point is on the front only for the speed it has beyond doubt.
PARETO_SPEED = "the lower end of each measured speedup's 95 % interval"


@dataclass(frozen=True)
class Point:
    label: str
    plan: PruningPlan


@dataclass
class Series:
    """One strategy's plans, in order (e.g. search steps 1..n)."""

    name: str
    origin: str  # "baseline", "greedy search", "one-shot", "saved", "recovered", ...
    points: list[Point] = field(default_factory=list)


def search_series(result, kinds) -> Series:
    """The steps of a ``greedy_search`` result as a series named after its kinds (a raced one its own
    series, named so)."""
    raced = result.raced
    name = f"greedy {'+'.join(kinds)}" + (" (raced)" if raced else "")
    return Series(name, "raced greedy search" if raced else "greedy search",
                  [Point(f"step {s.step}: − {s.component.words()}", s.plan) for s in result.steps])


def one_shot(model, scores: pd.DataFrame, steps: int, kinds=None, base_plan: PruningPlan | None = None,
             name: str | None = None) -> Series:
    """Remove the k lowest-scored components at once, for k = 1..``steps`` (``scores`` from
    ``importance_metrics.metric_scores``; higher = more important). Components that cannot go on
    top of the ones before (the last head of a group, a part of a removed block) are passed over,
    so every plan is valid; plan k+1 contains plan k."""
    adapter = adapter_for(model, (base_plan or PruningPlan()).group_sizes)
    plan = adapter.resolve(base_plan or PruningPlan())
    kinds = list(dict.fromkeys(kinds or scores["kind"]))
    metric = scores.attrs.get("metric", "score")
    name = name or f"one-shot {metric} ({'+'.join(kinds)})"
    ranked = scores[scores["kind"].isin(kinds)].sort_values("score", kind="stable")
    order = [Component(r.kind, int(r.layer), int(r.index)) for r in ranked.itertuples()]
    points = []
    for comp in order:
        if len(points) >= steps:
            break
        if comp in adapter.candidates(plan, kinds):
            plan = adapter.resolve(plan.with_components([comp]))
            points.append(Point(f"k={len(points) + 1}: − {comp.words()}", plan))
    return Series(name, "one-shot", points)


def pareto(rows: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Bool per row: on the front of cost ``x`` (speedups: higher better, read at ``PARETO_SPEED``
    when the rows carry their ``{x}_low`` column) and quality ``y``."""
    column = f"{x}_low" if x in FASTER_BETTER and f"{x}_low" in rows else x
    xs = [-v if x in FASTER_BETTER else v for v in rows[column].fillna(rows[x])]
    return pd.Series(pareto_mask(xs, list(rows[y]), y in HIGHER_BETTER), index=rows.index)


# ---------------------------------------------------------------------------- measured speed
def _bench_settings(device: str, dtype: str, settings: dict) -> dict:
    return {**BENCH_DEFAULTS, **settings, "device": device, "dtype": dtype}


def _cache_path(model, plan: PruningPlan, device: str, dtype: str, settings: dict, cache_dir) -> Path:
    blob = json.dumps({"result": MEASURED_SCHEMA, "model": model_fingerprint(model), "plan": plan_key(plan),
                       "bench": _bench_settings(device, dtype, settings)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / "measured" / f"{key}.json"


def measured(model, plan: PruningPlan, device: str = "cpu", dtype: str = "float32", cache_dir=None,
             **settings) -> dict | None:
    """What ``measure`` found for this point before (in any session), or None."""
    plan = adapter_for(model, plan.group_sizes).resolve(plan)
    if not plan.components:
        return _unpruned()
    path = _cache_path(model, plan, device, dtype, settings, cache_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def measure(model_name: str, model, plan: PruningPlan, device: str = "cpu", dtype: str = "float32",
            cache_dir=None, progress: Progress | None = None, tokenizer=None, **settings) -> dict:
    """Measured speed of ``plan``'s extracted model next to the original (cached on disk):
    ``prefill_speedup``, ``decode_speedup``, ``ttft_ratio``, ``state_ratio``, ``expected_prefill_speedup``,
    ``peak_memory_ratio`` (None unless ``memory=True``) and the full ``bench`` result.
    ``model`` is the loaded original (``model_name`` names it), on ``device`` in ``dtype``; the bench
    times a copy of it and the extracted model, both taken under the model's lock (no other session's
    live mask is in them). ``tokenizer`` gives the pad id (default: the config's)."""
    adapter = adapter_for(model, plan.group_sizes)
    plan = adapter.resolve(plan)
    known = measured(model, plan, device, dtype, cache_dir, **settings)
    if known is not None:
        return known
    s = _bench_settings(device, dtype, settings)
    protocol = Protocol(**{k: s.pop(k) for k in ("budget_s", "min_rounds", "warmup")})
    with holding(model, progress):
        original, pruned = copy.deepcopy(model), adapter.extract(plan)
    result = bench_models(original, pruned, tokenizer, plan, model_name=model_name, progress=progress,
                          protocol=protocol, **s)
    r = result["ratios"]
    out = {**point_speeds(result), "ttft_ratio": r["ttft_ms"], "state_ratio": r["state_bytes_per_sequence"],
           "peak_memory_ratio": r.get("memory_peak_bytes"), "bench": result}
    path = _cache_path(model, plan, device, dtype, settings, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out))
    return out


def point_speeds(result: dict) -> dict:
    """A bench result's speedups as the frontier's columns, exactly ``bench``'s numbers: for each of
    prefill and decode the median (``prefill_speedup``), its 95 % interval (``_low``, ``_high``),
    whether it is resolved, and the printed form (``_text``, ``bench.speedup_text``); the expectations beside."""
    out = {}
    for phase in ("prefill", "decode"):
        m = result[f"measured_{phase}_speedup"]
        out.update({f"{phase}_speedup": m["median"], f"{phase}_speedup_low": m["ci95"][0],
                    f"{phase}_speedup_high": m["ci95"][1], f"{phase}_speedup_resolved": m["resolved"],
                    f"{phase}_speedup_text": speedup_text(m), f"expected_{phase}_speedup": result[f"expected_{phase}_speedup"]})
    out["gap_reasons"] = result["gap_reasons"]
    return out


UNPRUNED_TEXT = "1.00× [1.00–1.00] (the model itself, nothing timed)"


def _unpruned() -> dict:
    """The unpruned model against itself: every ratio is 1 by definition, nothing to time."""
    exact = {f"{phase}_speedup{suffix}": 1.0 for phase in ("prefill", "decode") for suffix in ("", "_low", "_high")}
    return {**exact, "prefill_speedup_resolved": False, "decode_speedup_resolved": False,
            "prefill_speedup_text": UNPRUNED_TEXT, "decode_speedup_text": UNPRUNED_TEXT,
            "expected_prefill_speedup": 1.0, "expected_decode_speedup": 1.0, "gap_reasons": [],
            "ttft_ratio": 1.0, "state_ratio": 1.0, "peak_memory_ratio": 1.0, "bench": None}
