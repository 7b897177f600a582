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
from typing import Callable

import pandas as pd
import torch

from shedder.core.errors import ShedderError
from shedder.prune.importance_metrics import applicable, metric_scores
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


def compare(model, windows: torch.Tensor, kinds, metrics, *, stability: bool = True, top_k: int | None = None,
            progress: Progress | None = None, cache_dir=None, batch_size: int = 8,
            score: Callable = metric_scores) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Score ``kinds`` with every metric in ``metrics`` (each on the kinds it applies to), and with
    ``stability`` again on both halves of the windows; returns ``(tables, agreement rows)``.
    ``score`` computes one table (``metric_scores`` by default; a distributed runner may pass its own)."""
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ShedderError("compare needs at least one metric")
    tables, halves = {}, {}
    runnable = [m for m in metrics if applicable(m, kinds)]  # the progress total counts only these
    jobs = [(m, None) for m in runnable] + ([(m, h) for m in runnable for h in (0, 1)] if stability else [])
    parts = split_halves(windows) if stability else (windows, windows)
    for i, (metric, half) in enumerate(jobs):
        def tick(done, total, what, i=i):
            if progress:
                progress(i * 1000 + int(1000 * done / max(total, 1)), 1000 * len(jobs), f"{metric}: {what}")

        data = windows if half is None else parts[half]
        table = score(model, data, applicable(metric, kinds), metric, progress=tick, cache_dir=cache_dir,
                      batch_size=batch_size)
        if half is None:
            tables[metric] = table
        else:
            halves.setdefault(metric, [None, None])[half] = table
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
