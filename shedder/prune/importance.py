"""Single-removal importance: how much calibration perplexity rises when one component goes.

For every candidate of the requested kinds, the component is removed on top of ``base_plan`` and
the calibration perplexity measured (the heatmaps' numbers). Results are cached on disk under a key
made of the model's identity (config hash and a fingerprint of its weights), the exact token windows,
the kinds and the base plan, so reopening the same analysis is instant.

Scoring a real checkpoint takes hours, so it is resumable: every finished component's row is appended
to ``<key>.partial.jsonl`` next to the cache entry as soon as it is measured (before the progress
callback, which may raise ``Cancelled``). A later call with the same key reuses those rows and
measures only the rest; the finished table replaces the partial file. JSON lines, not CSV, because
Python's float repr round-trips exactly (a resumed table equals an uninterrupted one bit for bit)
and a line torn by a kill mid-write fails to parse instead of passing for a shorter number.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pandas as pd
import torch

from shedder.arch import adapter_for
from shedder.core.cache import cache_key, default_cache_dir
from shedder.core.errors import NonFiniteError
from shedder.measure.evaluator import PlanEvaluator, check_kinds, removing
from shedder.core.fileio import atomic_write_text, exclusive
from shedder.measure.metrics import predicted_tokens
from shedder.core.progress import Progress
from shedder.core.plan import KINDS, Component, PruningPlan
from shedder.prune.distributed import pooled

COLUMNS = ["layer", "kind", "index", "ppl", "delta_ppl", "params_removed"]


def score(model, windows: torch.Tensor, kinds, base_plan: PruningPlan | None = None,
          progress: Progress | None = None, cache_dir: str | Path | None = None,
          batch_size: int = 8, evaluator: PlanEvaluator | None = None, workers: int | None = None,
          ray_address: str | None = None, pool=None) -> pd.DataFrame:
    """Single-removal scores ``[layer, kind, index, ppl, delta_ppl, params_removed]`` sorted by
    layer, kind (in ``KINDS`` order) and index; ``delta_ppl`` is over ``base_plan``'s perplexity.

    ``table.attrs["resumed"]`` counts the rows taken over from an interrupted run with the same key
    (0 when none, or when the finished table came from the cache).

    ``workers`` / ``ray_address`` / ``pool``: measure on Ray workers, as ``search.greedy_search``
    does; the table is the same.
    """
    base_plan = base_plan or PruningPlan()
    adapter = evaluator.adapter if evaluator else adapter_for(model, base_plan.group_sizes)
    kinds = check_kinds(adapter, kinds)
    base = adapter.resolve(base_plan)
    path = _cache_path(model, windows, kinds, base, cache_dir)
    if path.is_file():
        return _resumed(pd.read_csv(path), 0)
    # One writer per cache entry: a second process is refused, a second session waits.
    with exclusive(path.with_name(f"{path.stem}.lock"), f"the importance cache entry {path.stem}", progress):
        if path.is_file():  # finished while we waited to look
            return _resumed(pd.read_csv(path), 0)
        with _measuring(model, windows, adapter, batch_size, evaluator, workers, ray_address, pool) as perplexities:
            return _score(adapter, kinds, base, path, progress, perplexities)


@contextlib.contextmanager
def _measuring(model, windows, adapter, batch_size, evaluator, workers, ray_address, pool):
    """``perplexities(plans, base)``: ``(index, calibration perplexity)`` of every plan (each
    extending ``base``) as they finish, in this process or on Ray workers (``shedder.prune.distributed``)."""
    if workers is None and ray_address is None and pool is None:
        ev = evaluator or PlanEvaluator(model, windows, adapter, batch_size)
        yield lambda plans, base=None: ((i, _score_of(ev, plan)) for i, plan in enumerate(plans))
        return
    tokens = predicted_tokens(windows)
    with pooled(model, windows, batch_size, adapter.group_sizes, workers, ray_address, pool) as pool:
        # exp(total / tokens), as PlanEvaluator.perplexity computes it
        yield lambda plans, base=None: ((i, math.exp(nll / tokens)) for i, nll in pool.nlls(plans, base))


def _score_of(ev: PlanEvaluator, plan: PruningPlan) -> float:
    """The calibration perplexity under ``plan``; nan where the removal breaks the model (nan or
    inf logits): here that is a score to rank, not an error, as on Ray workers."""
    try:
        return ev.perplexity(plan)
    except NonFiniteError:
        return math.nan


def _score(adapter, kinds, base, path, progress, perplexities) -> pd.DataFrame:
    # Descending layers: consecutive plans differ late in the model, so the evaluator skips the most.
    order = sorted(adapter.candidates(base, kinds), key=lambda c: (-c.layer, KINDS.index(c.kind), c.index))
    partial = partial_path(path)
    base_ppl, finished = _read_partial(partial, order)
    if base_ppl is None:
        [(_, base_ppl)] = perplexities([base])
    base_params = adapter.param_count(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Rewritten with only its valid lines, so appends never continue a line torn by a kill.
    atomic_write_text(partial, "".join(_line(r) for r in [{"base_ppl": base_ppl}, *finished.values()]))
    rows = list(finished.values())
    if rows and progress:
        progress(len(rows), len(order), f"scoring: resumed {len(rows)} of {len(order)} components")
    todo = [comp for comp in order if comp not in finished]
    plans = [removing(base, comp) for comp in todo]
    with partial.open("a", encoding="utf-8") as log:
        for i, ppl in perplexities(plans, base):
            comp, plan = todo[i], plans[i]
            row = {"layer": comp.layer, "kind": comp.kind, "index": comp.index, "ppl": ppl,
                   "delta_ppl": ppl - base_ppl, "params_removed": base_params - adapter.param_count(plan)}
            log.write(_line(row))
            log.flush()
            os.fsync(log.fileno())  # hours of work: the row survives even a power cut
            rows.append(row)
            if progress:
                progress(len(rows), len(order), f"scoring: {comp.words()}")
    table = tidy(pd.DataFrame(rows, columns=COLUMNS))
    atomic_write_text(path, table.to_csv(index=False))  # a cancelled run never leaves a half-written entry
    partial.unlink(missing_ok=True)
    return _resumed(table, len(finished))


def cache_status(model, windows: torch.Tensor, kinds, base_plan: PruningPlan | None = None,
                 cache_dir: str | Path | None = None) -> str | None:
    """What the disk cache holds for these scores, in words for the user: the finished table, the
    rows of an interrupted run that ``score`` will resume from, or nothing (``None``)."""
    base_plan = base_plan or PruningPlan()
    adapter = adapter_for(model, base_plan.group_sizes)
    kinds = check_kinds(adapter, kinds)
    base = adapter.resolve(base_plan)
    path = _cache_path(model, windows, kinds, base, cache_dir)
    if path.is_file():
        return "These scores are cached on disk: computing them again is instant."
    order = adapter.candidates(base, kinds)
    _, finished = _read_partial(partial_path(path), order)
    if finished:
        return (f"An interrupted run scored {len(finished)} of {len(order)} components; "
                "computing resumes from there.")
    return None


def _cache_path(model, windows: torch.Tensor, kinds: list[str], base: PruningPlan, cache_dir) -> Path:
    return Path(cache_dir or default_cache_dir()) / "scores" / f"{cache_key(model, windows, kinds, base)}.csv"


def partial_path(path: Path) -> Path:
    """Where the rows of an unfinished score table with cache entry ``path`` are logged."""
    return path.with_name(f"{path.stem}.partial.jsonl")


def _read_partial(path: Path, order: list[Component]) -> tuple[float | None, dict[Component, dict]]:
    """(base perplexity, finished rows by component) of an interrupted run, or (None, {}).

    Reading stops at the first line that is torn, malformed or names no candidate: everything
    before it was written whole (each line is flushed before the next one starts)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the last piece lacks its newline
    except (OSError, UnicodeDecodeError):
        return None, {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    if not records or not isinstance(records[0], dict) or not isinstance(records[0].get("base_ppl"), float):
        return None, {}
    wanted = set(order)
    finished: dict[Component, dict] = {}
    for rec in records[1:]:
        try:
            comp = Component(rec["kind"], rec["layer"], rec["index"])
            row = {c: rec[c] for c in COLUMNS}
            if comp not in wanted:
                break
        except (TypeError, KeyError):  # not a row of this table (hand-edited or corrupt)
            break
        finished.setdefault(comp, row)
    return records[0]["base_ppl"], finished


def _line(record: dict) -> str:
    return json.dumps(record) + "\n"


def _resumed(table: pd.DataFrame, count: int) -> pd.DataFrame:
    table.attrs["resumed"] = count
    return table


def tidy(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by layer, kind (``KINDS`` order), index, with a fresh index."""
    order = table["kind"].map(KINDS.index)
    return (table.assign(_k=order).sort_values(["layer", "_k", "index"]).drop(columns="_k")
            .reset_index(drop=True))

