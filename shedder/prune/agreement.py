"""How much importance rankings agree: between metrics, and between two halves of the calibration set.

Before trusting a ranking a user wants to know whether another metric, or other calibration text,
would rank the components the same way. For each kind this gives:

* Spearman and Kendall rank correlation between every pair of metrics scoring that kind (over the
  components both score);
* stability: the same correlations between one metric computed on two disjoint halves of the
  calibration windows (even and odd windows);
* top-k overlap: the share of the k lowest-scored components (the first a one-shot pruning would
  remove) that two rankings have in common.

Rank correlations are pandas' (Kendall through scipy), ties ranked by their average.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.measure.evaluator import check_kinds
from shedder.prune.importance_metrics import REGISTRY, applicable, metric_scores
from shedder.measure.metrics import Progress

COLUMNS = ["kind", "a", "b", "spearman", "kendall", "top_k_overlap", "k", "n"]
#: Label of the two calibration halves in ``a`` / ``b`` of a stability row ("taylor (even)" ...).
HALVES = ("even windows", "odd windows")


def correlate(a: pd.DataFrame, b: pd.DataFrame, kind: str, top_k: int | None = None) -> dict:
    """Spearman, Kendall and top-k overlap of the scores of ``kind`` in two metric tables, over the
    components both hold (``n`` of them; correlations are None below 2). ``top_k`` defaults to a
    quarter of them (at least 1)."""
    keys = ["layer", "kind", "index"]
    both = (a[a["kind"] == kind][keys + ["score"]]
            .merge(b[b["kind"] == kind][keys + ["score"]], on=keys, suffixes=("_a", "_b")))
    n = len(both)
    k = min(n, top_k if top_k is not None else max(1, n // 4))
    if n < 2:
        return {"spearman": None, "kendall": None, "top_k_overlap": None, "k": k, "n": n}
    sa, sb = both["score_a"], both["score_b"]
    low_a = set(both.sort_values("score_a", kind="stable").index[:k])
    low_b = set(both.sort_values("score_b", kind="stable").index[:k])
    return {"spearman": _nan_none(sa.corr(sb, method="spearman")), "kendall": _nan_none(sa.corr(sb, method="kendall")),
            "top_k_overlap": len(low_a & low_b) / k if k else None, "k": k, "n": n}


def _nan_none(x: float):
    return None if pd.isna(x) else float(x)


def agreement(tables: dict[str, pd.DataFrame], halves: dict[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None,
              top_k: int | None = None) -> pd.DataFrame:
    """One row per kind and pair (``COLUMNS``): every pair of metrics in ``tables`` that score the
    kind, then each metric of ``halves`` against itself on the other half of the windows."""
    rows = []
    kinds = list(dict.fromkeys(k for t in tables.values() for k in t["kind"]))
    for kind in kinds:
        scoring = [m for m, t in tables.items() if (t["kind"] == kind).any()]
        for a, b in itertools.combinations(scoring, 2):
            rows.append({"kind": kind, "a": a, "b": b, **correlate(tables[a], tables[b], kind, top_k)})
        for metric, (first, second) in (halves or {}).items():
            if (first["kind"] == kind).any():
                rows.append({"kind": kind, "a": f"{metric} ({HALVES[0]})", "b": f"{metric} ({HALVES[1]})",
                             **correlate(first, second, kind, top_k)})
    return pd.DataFrame(rows, columns=COLUMNS)


def matrix(rows: pd.DataFrame, kind: str, method: str = "spearman") -> pd.DataFrame:
    """Square metric × metric matrix of ``method`` for one kind, from ``agreement``'s rows: the
    diagonal holds each metric's stability (its two halves) when measured, else 1."""
    pairs = rows[rows["kind"] == kind]
    names = list(dict.fromkeys(n for n in pd.concat([pairs["a"], pairs["b"]]) if " (" not in n))
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for r in pairs.itertuples():
        value = getattr(r, method)
        if " (" in r.a:  # a stability row: the diagonal
            metric = r.a.split(" (")[0]
            if metric in out.index:
                out.loc[metric, metric] = value
        else:
            out.loc[r.a, r.b] = out.loc[r.b, r.a] = value
    for name in names:
        if pd.isna(out.loc[name, name]):
            out.loc[name, name] = 1.0
    return out


def split_halves(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint calibration subsets: even and odd windows (each needs at least one)."""
    if windows.shape[0] < 2:
        raise ShedderError("stability needs at least 2 calibration windows (one per half)")
    return windows[0::2], windows[1::2]


@dataclass(frozen=True)
class Job:
    """One scoring run of ``compare``: ``metric`` on all windows (``half`` None) or on one half,
    ``forwards`` and ``backwards`` passes over its ``windows`` (ppl: one per component, plus the base)."""

    metric: str
    half: int | None
    windows: int
    forwards: int
    backwards: int

    @property
    def work(self) -> int:
        """Windows passed through the model, forward or backward: the job's share of the progress."""
        return (self.forwards + self.backwards) * self.windows


def jobs(model, windows: torch.Tensor, kinds, metrics, stability: bool = True) -> list[Job]:
    """What ``compare`` runs, in order: each metric that scores some of ``kinds`` on all windows,
    then (``stability``) each again on both halves. The cost announcement and the progress total
    both come from this list."""
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ShedderError("compare needs at least one metric")
    adapter = adapter_for(model)
    kinds = check_kinds(adapter, kinds)
    runnable = [m for m in metrics if applicable(m, kinds)]
    sizes = [len(h) for h in split_halves(windows)] if stability else []
    out = []
    for half, n in [(None, len(windows))] + list(enumerate(sizes)):
        for m in runnable:
            metric = REGISTRY[m]
            forwards = 1 if metric.one_pass else len(adapter.candidates(PruningPlan(), applicable(m, kinds))) + 1
            out.append(Job(m, half, n, forwards, metric.backwards))
    return out


def compare(model, windows: torch.Tensor, kinds, metrics, *, stability: bool = True, top_k: int | None = None,
            progress: Progress | None = None, cache_dir=None, batch_size: int = 8,
            score: Callable = metric_scores) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Score ``kinds`` with every metric in ``metrics`` (each on the kinds it applies to), and with
    ``stability`` again on both halves of the windows; returns ``(tables, agreement rows)``.
    ``score`` computes one table (``metric_scores`` by default; a distributed runner may pass its own).
    Progress counts windows passed through the model (``Job.work``), so a ppl map weighs what it costs."""
    tables, halves = {}, {}
    todo = jobs(model, windows, kinds, metrics, stability)
    parts = split_halves(windows) if stability else (windows, windows)
    total = sum(j.work for j in todo)
    done_before, reached = 0, [0]
    for job in todo:
        def tick(done, of, what, job=job, before=done_before):
            # a metric may report phases (taylor: gradients, then components): the bar never goes back
            reached[0] = max(reached[0], before + job.work * min(done, of) // max(of, 1))
            if progress:
                progress(reached[0], total, f"{job.metric}: {what}")

        data = windows if job.half is None else parts[job.half]
        table = score(model, data, applicable(job.metric, kinds), job.metric, progress=tick, cache_dir=cache_dir,
                      batch_size=batch_size)
        if job.half is None:
            tables[job.metric] = table
        else:
            halves.setdefault(job.metric, [None, None])[job.half] = table
        done_before += job.work
    return tables, agreement(tables, {m: tuple(h) for m, h in halves.items()}, top_k)


def format_agreement(rows: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> str:
    """Plain text for ``score --compare``: each metric's cost, then per kind the Spearman and
    Kendall matrices and the pair rows with top-k overlap."""
    lines = ["metric costs (whole map):"]
    for name, t in tables.items():
        a = t.attrs
        lines.append(f"  {name:<16} {a.get('seconds', float('nan')):8.2f} s   {a.get('forwards', '?')} forward(s), "
                     f"{a.get('backwards', 0)} backward(s); {len(t)} components")
    for kind in dict.fromkeys(rows["kind"]):
        for method in ("spearman", "kendall"):
            lines += ["", f"{kind}: {method} rank correlation (diagonal: stability across calibration halves)",
                      matrix(rows, kind, method).to_string(float_format=lambda x: f"{x:+.3f}")]
        pairs = rows[rows["kind"] == kind]
        lines += ["", f"{kind}: top-k overlap of the lowest-scored components"]
        for r in pairs.itertuples():
            overlap = "n/a" if r.top_k_overlap is None or pd.isna(r.top_k_overlap) else f"{r.top_k_overlap:.0%}"
            lines.append(f"  {r.a} vs {r.b}: {overlap} of k={r.k} (n={r.n})")
    return "\n".join(lines)
