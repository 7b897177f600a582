"""``bench dtype``: what ``--dtype bfloat16`` buys on this machine for eval, score and search, and how
closely it agrees with float32.

One model is loaded twice, in float32 and in bfloat16, and given the same calibration windows.

* **Speed** of a calibration pass (what one ``eval`` is, and what ``score`` and the search repeat per
  candidate): paired interleaved rounds of both copies by the protocol of ``shedder.measure.timing``,
  so the speed-up carries its 95 % interval and round count.
* **Agreement**: the unpruned calibration perplexity of both; the single-removal importance table of
  ``kinds`` in both (how many of the float32 top ``top`` components bfloat16 also ranks there, and the
  rank correlation); a greedy search of ``steps`` steps in both (identical choices, final perplexity of
  each). The score and search timings are single runs, reported as such.

bfloat16 keeps float32's exponent range with an 8-bit mantissa, so per-token log-probabilities round
at about 3 significant digits; whether that reorders near-tied candidates is what the agreement shows.
"""
from __future__ import annotations

import tempfile
import time

import torch

from shedder.measure.metrics import nll_sum, perplexity
from shedder.measure.timing import Protocol, paired_rounds
from shedder.prune.agreement import correlate
from shedder.prune.importance import score
from shedder.prune.search import StopWhen, greedy_search

DTYPES = ("float32", "bfloat16")


def compare_dtypes(models: dict, windows: torch.Tensor, kinds: list[str], steps: int = 2, top: int = 5,
                   protocol: Protocol = Protocol(), batch_size: int = 8, on_round=None) -> dict:
    """``models``: ``{"float32": model, "bfloat16": model}``, the same weights. See the module docstring."""
    out: dict = {"windows": list(windows.shape), "kinds": kinds, "steps": steps, "top": top}
    with torch.inference_mode():
        out["ppl"] = {d: perplexity(models[d], windows, batch_size) for d in DTYPES}
    out["ppl_rel_diff"] = abs(out["ppl"]["bfloat16"] / out["ppl"]["float32"] - 1)

    def sample(d):
        def run():
            start = time.perf_counter()
            nll_sum(models[d], windows, batch_size)
            return {"s": time.perf_counter() - start}
        return run

    with torch.inference_mode():
        run = paired_rounds({d: [sample(d)] for d in DTYPES}, ["s"], protocol, on_round=on_round)
    out["eval_speedup"] = {**run.speedup("s").to_dict(),  # float32 time / bfloat16 time
                           "seconds": {d: sorted(run.times[d]["s"])[len(run.times[d]["s"]) // 2] for d in DTYPES},
                           "load_per_cpu": run.load}
    out["protocol"] = protocol.describe()

    tables, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="shedder-dtype-") as fresh:  # no cached table: time the work
        for d in DTYPES:
            start = time.perf_counter()
            tables[d] = score(models[d], windows, kinds, batch_size=batch_size, cache_dir=f"{fresh}/{d}")
            seconds[d] = time.perf_counter() - start
    # one pseudo-kind, so the agreement's correlation runs over every scored component at once
    overall = {d: tables[d].assign(kind="all", score=tables[d]["delta_ppl"]) for d in DTYPES}
    agree = correlate(overall["float32"], overall["bfloat16"], "all", top_k=top)
    out["score"] = {"components": agree["n"], "spearman": agree["spearman"],
                    "top_overlap": round(agree["top_k_overlap"] * agree["k"]), "seconds": seconds,
                    "speedup_single_run": seconds["float32"] / seconds["bfloat16"]}

    results, seconds = {}, {}
    for d in DTYPES:
        start = time.perf_counter()
        results[d] = greedy_search(models[d], windows, kinds, StopWhen(steps=steps), batch_size=batch_size)
        seconds[d] = time.perf_counter() - start
    chosen = {d: [str(c) for c in results[d].components] for d in DTYPES}
    out["search"] = {"choices": chosen,
                     "identical_steps": sum(a == b for a, b in zip(chosen["float32"], chosen["bfloat16"])),
                     "final_ppl": {d: results[d].steps[-1].ppl if results[d].steps else out["ppl"][d] for d in DTYPES},
                     "seconds": seconds, "speedup_single_run": seconds["float32"] / seconds["bfloat16"]}
    return out
