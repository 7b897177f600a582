"""Do cost announcements hold? ``bench announce``: announced against actual, side by side.

    python -m shedder bench announce [--layers 24] [--samples 4 --seq-len 256] [--json]

A ``search`` announces, before it runs, the activation memory its evaluator will keep and, once the
base pass is timed, how long the rest will take (``shedder.api.cost``, ``RunCost.eta_text``). This
benchmark runs exactly that on a random-weight model in the Mamba-2 130M shape (``realshape``; the
first ``--layers`` layers) and one greedy SSM step, and puts the announced figures next to what
happened: the most bytes the evaluator's cache held during the step (``PlanEvaluator.held_bytes``,
read after every candidate) and the process's peak RSS growth over the run (``PeakMemory``), and the
announced ETA next to the step's wall time after the base pass. It is a measurement of one run on
this machine (the load average is printed with it), not a test: nothing here asserts a time.
"""
from __future__ import annotations

import os
import time

import torch

from shedder import api
from shedder.arch import adapter_for
from shedder.core.plan import PruningPlan
from shedder.dev.realshape import build
from shedder.dev.scale import PeakMemory
from shedder.measure.budget import human_bytes, human_seconds
from shedder.measure.evaluator import PlanEvaluator
from shedder.prune.search import StopWhen, greedy_search

#: What an announcement must stay within, either way (issue 21).
TARGET = 1.5


def measure(layers: int = 24, samples: int = 4, seq_len: int = 256, batch_size: int = 4, kinds=("ssm",)) -> dict:
    """Announce one greedy step on the Mamba-2 130M shape (its first ``layers`` layers) and run it;
    the announced and actual memory and time, in bytes and seconds."""
    model = build("mamba2", layers)
    adapter = adapter_for(model)
    windows = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    ev = PlanEvaluator(model, windows, adapter, batch_size)
    announced = api.cost("search", model, adapter, windows, list(kinds), None, 1, batch_size, ev.max_cache_bytes)
    load_start = os.getloadavg()[0]
    held = [0]

    def watch(done, total, what):
        held[0] = max(held[0], ev.held_bytes())

    with PeakMemory("cpu") as peak:
        timing = ev.timed_pass(PruningPlan())
        started = time.perf_counter()
        result = greedy_search(model, windows, list(kinds), StopWhen(steps=1), batch_size=batch_size, evaluator=ev,
                               progress=watch)
        took = time.perf_counter() - started
    return {"shape": "mamba2-130m", "layers": adapter.num_layers,
            "hidden": model.config.hidden_size, "vocab": model.config.vocab_size, "windows": [samples, seq_len],
            "batch_size": batch_size, "kinds": list(kinds), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_start": load_start, "load_end": os.getloadavg()[0],
            "announcement": announced.describe(timing),
            "announced_cache_bytes": announced.cache_bytes, "announced_logits_bytes": announced.logits_bytes,
            "announced_peak_bytes": announced.peak_bytes,
            "held_cache_bytes": held[0], "rss_growth_bytes": peak.added,
            "first_pass_s": timing.seconds, "first_pass_head_s": timing.head,
            "announced_eta_s": announced.eta_seconds(timing), "actual_s": took,
            "choice": str(result.steps[0].component) if result.steps else None}


def ratios(r: dict) -> dict:
    """Announced ÷ actual for the cache, the peak RSS growth (against ``RunCost.peak_bytes``) and
    the ETA; ``within`` whether each is within ``TARGET`` either way."""
    out = {"cache": r["announced_cache_bytes"] / max(r["held_cache_bytes"], 1),
           "eta": r["announced_eta_s"] / max(r["actual_s"], 1e-9)}
    if r["rss_growth_bytes"]:
        out["rss"] = r["announced_peak_bytes"] / r["rss_growth_bytes"]
    return {**out, "within": {k: 1 / TARGET <= v <= TARGET for k, v in out.items()}}


def format_report(r: dict) -> str:
    q = ratios(r)
    mark = lambda k: f"{q[k]:.2f}× {'ok' if q['within'][k] else f'OUTSIDE {TARGET}×'}"  # noqa: E731
    rss = (f"{human_bytes(r['announced_peak_bytes']):>12}   {human_bytes(r['rss_growth_bytes']):>12}   "
           f"(announced peak: cache, logits and their log-softmax; {mark('rss')})"
           if r["rss_growth_bytes"] else "n/a (no /proc/self/clear_refs here)")
    return "\n".join([
        f"bench announce: {r['shape']}, {r['layers']} layers, {r['windows'][0]} × {r['windows'][1]} tokens, batch "
        f"{r['batch_size']}, one greedy {','.join(r['kinds'])} step; {r['threads']} threads on {r['cpu_count']} CPUs, "
        f"load average {r['load_start']:.2f} at the start, {r['load_end']:.2f} at the end",
        f"announced: {r['announcement']}",
        "                      announced      actual",
        f"activation cache      {human_bytes(r['announced_cache_bytes']):>12}   {human_bytes(r['held_cache_bytes']):>12}"
        f"   (most the evaluator held; {mark('cache')})",
        f"peak RSS growth       {rss}",
        f"time after base pass  {human_seconds(r['announced_eta_s']):>12}   {human_seconds(r['actual_s']):>12}"
        f"   ({r['actual_s']:.1f} s wall; {mark('eta')})",
        f"chose {r['choice']}"])
