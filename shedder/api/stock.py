"""Stock-shaped width pruning as a use case: the same number of SSM heads gone from every group of
every layer and / or of MLP channel groups from every MLP (``shedder.prune.stock``), one-shot from an
importance table or greedy, as a frontier series."""
from __future__ import annotations

from shedder.api.scoring import score
from shedder.core.defaults import STOCK_STRATEGIES as STRATEGIES
from shedder.core.errors import ShedderError
from shedder.prune.frontier import Series
from shedder.prune.stock import KINDS, offered_kinds, stock_greedy, stock_one_shot, stock_shaped

__all__ = ["KINDS", "STRATEGIES", "offered_kinds", "stock", "stock_shaped"]


def stock(model, windows, strategy: str = "one-shot", steps: int | None = None, metric: str = "ppl", base=None,
          batch_size: int = 8, progress=None, cache_dir=None, kinds=("head",)) -> Series:
    """The stock-shaped plans of ``strategy``: plan k removes k components of each of ``kinds`` per
    unit everywhere (heads per B/C group, MLP channel groups per MLP; one-shot: the ``metric``
    importance table's lowest; greedy: measured step by step on ``windows``)."""
    if strategy == "one-shot":
        table = score(model, windows, list(kinds), metric, base=base, progress=progress, cache_dir=cache_dir,
                      batch_size=batch_size)
        return stock_one_shot(model, table, steps, base, kinds=kinds)
    if strategy == "greedy":
        return stock_greedy(model, windows, steps, base, batch_size=batch_size, progress=progress, kinds=kinds)
    raise ShedderError(f"unknown stock strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
