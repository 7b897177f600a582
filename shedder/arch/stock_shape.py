"""When a Mamba-2 hybrid's pruned layers are stock-shaped: every Mamba-2 mixer keeps one head layout
(the same heads in every B/C group, SSM kept), every MLP one width, every mixture of experts one
expert count, and nothing else differs from the stock layer. The family's stock config then states
the whole model by its head count, mixer width and MLP width (``Adapter.configure``), so the
extracted checkpoint loads with plain ``transformers``; anything else needs a ``shedder`` section.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shedder.arch.mamba2_mixer import MixerLayout, uniform_layout
from shedder.arch.spec import PrunedSpec


@dataclass(frozen=True)
class StockShape:
    """The one shape of every layer: ``None`` where the stock config's value stays."""

    num_heads: int | None = None
    mlp: int | None = None
    experts: int | None = None

    def inner(self, head_dim: int) -> int | None:
        """The mixer width these heads make (``None``: heads unchanged)."""
        return None if self.num_heads is None else self.num_heads * head_dim


def stock_shape(spec: PrunedSpec, stock: MixerLayout, mixer_sources) -> StockShape | None:
    """The ``StockShape`` of ``spec`` when it has one, else ``None``. ``stock``: the config's full
    mixer layout; ``mixer_sources``: the source layers that hold a Mamba-2 mixer."""
    mixers = set(mixer_sources)
    rest = [dataclasses.replace(s, heads_per_group=None, mlp=None, experts=None) for s in spec.layers]
    if not all(r.stock for r in rest):
        return None
    layouts = {MixerLayout.of_spec(s, stock) for s in spec.layers if s.source in mixers}
    uniform = uniform_layout(list(layouts))
    widths, counts = {s.mlp for s in spec.layers}, {s.experts for s in spec.layers}
    if (layouts and uniform is None) or len(widths) > 1 or len(counts) > 1 or 0 in widths | counts:
        return None
    heads = uniform.num_heads if uniform is not None and uniform != stock else None
    return StockShape(heads, next(iter(widths), None), next(iter(counts), None))


def adapter_shape(adapter, spec: PrunedSpec) -> StockShape | None:
    """``stock_shape`` of ``spec`` for a Mamba-2 hybrid ``adapter`` (its full layout, its Mamba layers)."""
    return stock_shape(spec, adapter.stock_layout(adapter.config), filter(adapter.has_mamba, range(adapter.num_layers)))


def expand_for(inner: int | None, hidden: int) -> int | None:
    """The integer ``expand`` whose ``expand * hidden_size`` is ``inner`` (``None``: there is none,
    so a stock config that derives the mixer width from ``expand`` cannot state it)."""
    return inner // hidden if inner is not None and inner % hidden == 0 else None
