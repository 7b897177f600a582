"""``bench search --workers 1,2``: the same greedy search on Ray pools of each size, timed."""
from __future__ import annotations

import time

import torch

from shedder.prune.distributed import WorkerPool, Workers
from shedder.prune.search import StopWhen, greedy_search


def bench_workers(model, windows: torch.Tensor, kinds, steps: int, counts: list[int], batch_size: int = 8,
                  address: str | None = None, progress=None, threads: int | None = None) -> dict:
    """The same greedy search on a pool of each size in ``counts``, timed (starting the workers and
    shipping the model are not), with the speed-up over the first size and whether every pool chose
    the same components with the same perplexities. ``threads``: per CPU worker (default: the
    cluster's CPUs shared out, so every pool uses the whole machine)."""
    runs = []
    for n in counts:
        with WorkerPool(model, windows, n, address, batch_size, threads=threads) as pool:
            pool.ready()
            started = time.perf_counter()
            result = greedy_search(model, windows, kinds, StopWhen(steps=steps), batch_size=batch_size,
                                   workers=Workers(pool=pool), progress=progress)
            runs.append({"workers": n, "seconds": time.perf_counter() - started,
                         "choices": [str(c) for c in result.components], "ppl": [s.ppl for s in result.steps],
                         "stats": result.stats})
    for run in runs:
        run["speedup"] = runs[0]["seconds"] / run["seconds"]
    same = all((r["choices"], r["ppl"]) == (runs[0]["choices"], runs[0]["ppl"]) for r in runs)
    return {"runs": runs, "identical": same}
