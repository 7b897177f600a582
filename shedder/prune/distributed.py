"""Scoring and searching on a Ray cluster: workers evaluate candidate plans, this process decides.

Each worker is a Ray actor holding one replica of the model (one GPU each when the workers run on
GPUs, CPU threads otherwise) and its own ``PlanEvaluator``, so each keeps its own prefix cache. The
driver (the process that calls ``greedy_search`` or ``score``) hands out candidate plans, collects
their NLL totals and makes every decision itself: the greedy choice, the run log and its resume,
progress. Nothing about the search loop changes: ``WorkerPool.choose`` is one more ``Chooser``
(``shedder.prune.choice``) for ``search.run_search``, the search's extension point, and
``WorkerPool.nlls`` feeds ``importance.score``. A search asks for workers with ``Workers``.

Why the results are identical to the single process's, bit for bit:

* a worker computes a plan's NLL with the same evaluator code on the same weights and windows, and
  the evaluator's total does not depend on what its cache held (that is its own exactness
  property), so every total equals the single process's on the same kind of device (another GPU
  model may round differently; the tests compare CPU workers with the single process);
* the choice is the lowest total, exact ties to the candidate ``adapter.candidates`` lists first
  (``search.beats``), whatever order the results arrive in;
* abandoning stays exact with the bound shared between workers: a candidate is abandoned only once
  its partial sum exceeds the total of a candidate some worker has completed, so it can neither win
  nor tie. Each request carries the best total known when it is sent; which candidates get
  abandoned depends on timing, the choice and every logged number do not.

Assignment: a step's candidates (in layer order) are cut into one contiguous share per worker,
balanced by the layers each candidate re-runs, so a worker's plans share prefixes and its cache
stays useful (its first candidate of a step re-runs from the previous choice's layer unless this
worker evaluated that choice; the next ones resume from their neighbours' plans). As in the single process, the first batch of every candidate is scored first, then each worker
completes its share best-first. A worker whose share is done takes work from the end of the longest
remaining share. A worker that dies (killed, node lost, out of memory) is replaced by a fresh one
and its unfinished candidate is run again.

The model reaches the workers once per pool (``ray.put``: one copy in the object store that every
worker reads), not once per candidate; the windows likewise.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.measure.evaluator import PlanEvaluator, removing
from shedder.prune.choice import beats, sort_key

INSTALL_HINT = "scoring or searching with Ray workers needs Ray: pip install 'shedder-studio[distributed]'"
#: The pip extra a ``ray://`` address needs (minimal Ray lacks the client's gRPC).
CLIENT_EXTRA = "ray[client]"
#: Replacements allowed per worker over a pool's life before giving up (a worker that dies each
#: time it starts, e.g. out of memory, must not be replaced forever).
MAX_REPLACEMENTS_PER_WORKER = 3


@dataclass(frozen=True)
class Workers:
    """Where a search or a score evaluates its candidates: ``count`` Ray workers (default: one per
    GPU, or per node), on the cluster at ``address`` (default: a local Ray), or on an open
    ``pool`` (reused across calls; then neither of the others)."""
    count: int | None = None
    address: str | None = None
    pool: "WorkerPool | None" = None


def import_ray():
    """The ``ray`` module, or a ShedderError saying in one line how to install it."""
    try:
        import ray  # lazy: optional extra (shedder-studio[distributed])
    except ImportError:
        raise ShedderError(INSTALL_HINT) from None
    return ray


class Worker:
    """One model replica and its evaluator; runs inside a Ray actor."""

    def __init__(self, model, windows: torch.Tensor, group_sizes: dict, batch_size: int, device: str,
                 threads: int, max_cache_bytes: int | None):
        if threads:
            torch.set_num_threads(threads)
        if not device.startswith("cuda"):  # the GPU kernels' install advice is no use on a CPU worker
            logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
        model = model.to(device)
        self.ev = PlanEvaluator(model, windows, adapter_for(model, group_sizes), batch_size, max_cache_bytes)

    def nll(self, plan: PruningPlan, bound: float | None = None, first_batches: int | None = None):
        """(``PlanEvaluator.nll``, layer forwards run, windows scored) for one plan."""
        layers, scored = self.ev.layers_run, self.ev.windows_scored
        value = self.ev.nll(plan, bound=bound, first_batches=first_batches)
        return value, self.ev.layers_run - layers, self.ev.windows_scored - scored

    def ready(self) -> bool:
        return True


class WorkerPool:
    """Ray actors, each with a replica of ``model`` and a ``PlanEvaluator`` over ``windows``.

    ``workers``: how many (default: one per GPU of the cluster when ``device`` is a GPU, else one
    per node). ``address``: an existing Ray cluster (``ray://host:10001``, ``host:6379`` or
    ``auto``); without it a local Ray is started, unless this process is already connected to one.
    ``device``: where the workers run (default: where ``model`` is); the driver's own copy of the
    model is only read for its weights. ``threads``: CPU threads of each CPU worker (default: the
    cluster's CPUs shared out). Use as a context manager, or call ``close``.
    """

    def __init__(self, model, windows: torch.Tensor, workers: int | None = None, address: str | None = None,
                 batch_size: int = 8, group_sizes: dict | None = None, device: str | None = None,
                 max_cache_bytes: int | None = None, threads: int | None = None):
        ray = import_ray()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ShedderError(f"workers must be a positive number, got {workers!r}")
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False) if address else ray.init(include_dashboard=False)
            except ConnectionError as e:
                raise ShedderError(f"cannot reach the Ray cluster at {address}: {e}") from None
            except ValueError as e:  # how Ray says a ray:// address needs its client extra
                if CLIENT_EXTRA not in str(e):
                    raise
                raise ShedderError(f"the Ray address {address} needs the Ray client: pip install "
                                   f"'{CLIENT_EXTRA}'") from None
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.group_sizes = adapter_for(model, group_sizes).group_sizes  # with the family's defaults
        self.device = str(device or next(model.parameters()).device)
        self.stats = _zero_stats()
        gpus = self.device.startswith("cuda")
        resources = ray.cluster_resources()
        if workers is None:
            workers = int(resources.get("GPU", 0)) if gpus else len([n for n in ray.nodes() if n.get("Alive")])
        if gpus and resources.get("GPU", 0) < max(workers, 1):
            raise ShedderError(f"{max(workers, 1)} GPU workers need as many GPUs; the Ray cluster has "
                               f"{int(resources.get('GPU', 0))} (run fewer workers, or on the CPU)")
        cpus = threads or resources.get("CPU", 1) / workers
        self._options = {"num_gpus": 1, "num_cpus": min(1, cpus)} if gpus else {"num_cpus": cpus}
        self._threads = 0 if gpus else max(1, int(cpus))
        self._max_cache_bytes = max_cache_bytes
        shipped = model if not any(p.is_cuda for p in model.parameters()) else copy.deepcopy(model).cpu()
        self._model_ref = ray.put(shipped)  # once per pool; every worker reads this one copy
        self._windows_ref = ray.put(windows.cpu())
        self._name = f"shedder-{uuid.uuid4().hex[:8]}"
        self._started = 0
        self.replaced = 0
        self.actors = [self._start() for _ in range(workers)]

    # ------------------------------------------------------------------ life cycle
    def _start(self):
        ray = import_ray()
        actor = ray.remote(Worker).options(name=f"{self._name}-{self._started}", **self._options)
        self._started += 1
        return actor.remote(self._model_ref, self._windows_ref, self.group_sizes, self.batch_size, self.device,
                            self._threads, self._max_cache_bytes)

    def _replace(self, i: int, error: Exception) -> None:
        self.replaced += 1
        self.stats["replaced"] += 1
        if self.replaced > MAX_REPLACEMENTS_PER_WORKER * len(self.actors):
            raise ShedderError(f"Ray workers keep dying ({self.replaced} replaced so far); last: {error}")
        import_ray().kill(self.actors[i])
        self.actors[i] = self._start()

    def ready(self) -> None:
        """Wait until every worker holds its replica (e.g. before timing)."""
        for _ in self._run([[i] for i in range(len(self.actors))], lambda actor, i: actor.ready.remote()):
            pass

    def close(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def matches(self, model, windows: torch.Tensor, batch_size: int, group_sizes: dict | None) -> bool:
        """Whether this pool evaluates what a single process with these inputs would."""
        return (model is self.model and batch_size == self.batch_size
                and adapter_for(model, group_sizes).group_sizes == self.group_sizes
                and windows.shape == self.windows.shape and torch.equal(windows.cpu(), self.windows.cpu()))

    # ------------------------------------------------------------------ evaluation
    def nll(self, plan: PruningPlan) -> float:
        """Total NLL of one plan (on the first worker)."""
        for _, value in self._run([[0]] + [[] for _ in self.actors[1:]], lambda actor, i: actor.nll.remote(plan)):
            return value

    def nlls(self, plans: list[PruningPlan], base: PruningPlan | None = None) -> Iterator[tuple[int, float]]:
        """``(index into plans, total NLL)`` for every plan, as they finish; with ``base`` (the plan
        all of them extend) each worker gets plans that change nearby layers."""
        return self._run(self._shares(plans, base), lambda actor, i: actor.nll.remote(plans[i]))

    def choose(self, plan: PruningPlan, cands: list, tick: Callable[[int, int, str], None]):
        """The greedy step as ``search.run_search`` takes it, across the pool (a ``Chooser``)."""
        plans = [removing(plan, c) for c in cands]
        n, workers = len(cands), f"{len(self.actors)} workers"
        shares = self._shares(plans, plan)
        first: dict[int, float] = {}
        for i, value in self._run(shares, lambda actor, i: actor.nll.remote(plans[i], first_batches=1)):
            first[i] = sort_key(value)
            tick(len(first), 2 * n, f"{cands[i]} (first batch; {workers})")
        best, best_nll = None, math.inf
        ordered = [sorted(share, key=lambda i: (first[i], i)) for share in shares]
        for done, (i, value) in enumerate(self._run(ordered, lambda actor, i: actor.nll.remote(plans[i], bound=best_nll)),
                                          n + 1):
            self.stats["evaluated"] += 1
            if value is None:
                self.stats["abandoned"] += 1
            elif beats(value, i, best_nll, best):
                best, best_nll = i, value
            tick(done, 2 * n, f"{cands[i]} ({workers})")
        return (None if best is None else cands[best]), best_nll

    # ------------------------------------------------------------------ scheduling
    def _shares(self, plans: list[PruningPlan], base: PruningPlan | None) -> list[list[int]]:
        """One contiguous run of plan indices per worker, balanced by the layers each plan re-runs
        (from its first change relative to ``base`` to the end)."""
        n_layers = adapter_for(self.model, self.group_sizes).num_layers
        common = base.components if base is not None else frozenset()
        cost = [n_layers - min((c.layer for c in p.components ^ common), default=0) for p in plans]
        total, shares, acc = sum(cost) or 1, [[] for _ in self.actors], 0
        for i, c in enumerate(cost):
            shares[min(len(shares) - 1, int((acc + c / 2) * len(shares) / total))].append(i)
            acc += c
        return shares

    def _run(self, shares: list[list[int]], request) -> Iterator[tuple[int, object]]:
        """Run every task: worker ``k`` works through ``shares[k]`` in order, then takes tasks from
        the end of the longest share left; ``request(actor, task)`` sends one. Yields ``(task,
        value)`` as results arrive; the next request is sent after the caller has seen the result
        (so it can carry a tighter bound). A dead worker is replaced and its task re-run."""
        ray = import_ray()
        queues = [deque(s) for s in shares]
        pending: dict = {}

        def send(k: int) -> None:
            queue = queues[k] if queues[k] else max(queues, key=len)
            if queue:
                task = queue.popleft() if queue is queues[k] else queue.pop()
                pending[request(self.actors[k], task)] = (k, task)

        for k in range(len(self.actors)):
            send(k)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k, task = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self._replace(k, e)
                queues[k].appendleft(task)
                send(k)
                continue
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ShedderError):
                    raise e.cause from None
                raise
            if isinstance(result, tuple):
                result, layers, scored = result
                self.stats["layers_run"] += layers
                self.stats["windows_scored"] += scored
            yield task, result
            send(k)


def _zero_stats() -> dict:
    return {"evaluated": 0, "abandoned": 0, "layers_run": 0, "windows_scored": 0, "replaced": 0}


@contextlib.contextmanager
def pooled(model, windows: torch.Tensor, batch_size: int, group_sizes: dict | None, workers: int | None = None,
           address: str | None = None, pool: WorkerPool | None = None) -> Iterator[WorkerPool]:
    """``pool`` (checked to fit these inputs; its counters restarted), or a new pool for the call."""
    if pool is not None:
        if workers is not None or address is not None:
            raise ShedderError("give either a worker pool or workers / a Ray address, not both")
        if not pool.matches(model, windows, batch_size, group_sizes):
            raise ShedderError("this worker pool was started for another model, other windows or another batch size")
        pool.stats = _zero_stats()
        yield pool
        return
    with WorkerPool(model, windows, workers, address, batch_size, group_sizes) as new:
        yield new


def pool_stats(pool: WorkerPool) -> dict:
    """A search's counters (workers replaced during it included), with the pool's size."""
    return {**pool.stats, "workers": len(pool.actors)}
