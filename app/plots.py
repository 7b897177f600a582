"""Plotly figures built from engine results. Figures only: no numbers are computed here beyond
reshaping a DataFrame for display.

Interactive charts (switchboard, frontier) are scatter plots, because Streamlit's selection events
(``on_select="rerun"``) report clicked scatter points; each returns, with the figure, the list that
maps ``(curve_number, point_index)`` of a clicked point back to what it stands for.
"""
from __future__ import annotations

import math
import zlib

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan, in_kind_order

from .scales import DIVERGING, Scale

KIND_COLOURS = {"mamba": "#4C78A8", "attention": "#F58518", "mlp": "#54A24B", "moe": "#B279A2", "hybrid": "#9D755D"}


def architecture_strip(adapter) -> go.Figure:
    """One cell per decoder layer, coloured by what the layer is."""
    kinds = [adapter.layer_kind(i) for i in range(adapter.num_layers)]
    fig = go.Figure()
    for kind in dict.fromkeys(kinds):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        fig.add_bar(x=layers, y=[1] * len(layers), name=kind, marker_color=KIND_COLOURS.get(kind, "#888"),
                    hovertemplate=f"layer %{{x}}: {kind}<extra></extra>", width=0.95, showlegend=True)
    fig.update_layout(height=160, margin=dict(l=10, r=10, t=30, b=30), barmode="overlay", bargap=0,
                      legend=dict(orientation="h", y=1.1, yanchor="bottom"), yaxis=dict(visible=False),
                      xaxis=dict(title="layer", dtick=1, range=[-0.5, len(kinds) - 0.5]))
    return fig


def _panels(kinds: list[str], rows_per_kind: list[int], num_layers: int) -> go.Figure:
    """One panel per kind, each as tall as its number of component indices needs, all on one layer
    axis (a hybrid's attention layer sits under the same x as its neighbours' SSM heads)."""
    px = [40 + 26 * max(n, 1) for n in rows_per_kind]
    gap = 70
    height = sum(px) + gap * len(kinds) + 20
    fig = make_subplots(rows=len(kinds), cols=1, subplot_titles=kinds, row_heights=px, shared_xaxes=True,
                        vertical_spacing=gap / height if len(kinds) > 1 else 0)
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10))
    fig.update_xaxes(range=[-0.5, num_layers - 0.5], dtick=1, showticklabels=True)
    fig.update_xaxes(title_text="layer", row=len(kinds), col=1)
    return fig


def importance_heatmap(scores: pd.DataFrame, num_layers: int, log: bool = True, column: str = "delta_ppl",
                       label: str = "Δ ppl") -> go.Figure:
    """x: layer, y: component index within the layer, one panel per kind; colour: ``column`` of the
    scores (by default the perplexity increase when that component alone is removed), on the scale
    the values call for (``app.scales``)."""
    scale = Scale.of(scores[column], log, label)
    kinds = in_kind_order(scores["kind"])
    fig = _panels(kinds, [scores.loc[scores["kind"] == k, "index"].nunique() for k in kinds], num_layers)
    layers = list(range(num_layers))
    ppl = column == "delta_ppl"
    hover = ("<br>ppl without it %{customdata[0]:.4f}<br>Δ ppl %{customdata[1]:+.4f}<br>params removed %{customdata[2]:,}"
             if ppl else f"<br>{label} %{{customdata[1]:.4g}}<br>params removed %{{customdata[2]:,}}")
    for row, kind in enumerate(kinds, start=1):
        df = scores[scores["kind"] == kind]
        indices = sorted(df["index"].unique())
        cell = {(r.layer, r.index): r for r in df.itertuples()}
        z, custom = [], []
        for i in indices:
            z.append([scale.z(getattr(cell[(l, i)], column)) if (l, i) in cell else None for l in layers])
            custom.append([[cell[(l, i)].ppl if ppl else None, getattr(cell[(l, i)], column), cell[(l, i)].params_removed]
                           if (l, i) in cell else [None] * 3 for l in layers])
        fig.add_heatmap(x=layers, y=indices, z=z, customdata=custom, coloraxis="coloraxis", xgap=1, ygap=1,
                        hovertemplate=f"{kind} layer %{{x}} #%{{y}}{hover}<extra></extra>", row=row, col=1)
        fig.update_yaxes(title_text="index", dtick=1 if len(indices) <= 16 else None, row=row, col=1)
    fig.update_layout(coloraxis=scale.axis())
    return fig


def layer_bars(scores: pd.DataFrame, num_layers: int, log: bool = True, column: str = "delta_ppl",
               label: str = "Δ ppl") -> go.Figure:
    """Per-layer view of the same scores: the mean ``column`` of each layer's components, one panel
    per kind (a first block's +1000 does not flatten the heads' +0.01 of another kind), bar heights
    and colours on the heatmap's scale and palette."""
    means = scores.groupby(["layer", "kind"], sort=True)[column].mean().reset_index()
    scale = Scale.of(means[column], log, f"mean {label}")
    kinds = in_kind_order(scores["kind"])
    fig = make_subplots(rows=len(kinds), cols=1, subplot_titles=kinds, shared_xaxes=True,
                        vertical_spacing=0.12 / max(len(kinds), 1))
    # Signed values grow from zero; positive ones on a log scale from the lowest tick below them.
    base = 0.0 if scale.signed or not scale.log else math.floor(scale.lo)
    ticks = scale.ticks()
    for row, kind in enumerate(kinds, start=1):
        d = means[means["kind"] == kind]
        z = [scale.z(v) for v in d[column]]
        fig.add_bar(x=d["layer"], y=[v - base for v in z], base=base, customdata=d[column], showlegend=False,
                    marker=dict(color=z, coloraxis="coloraxis"),
                    hovertemplate=f"{kind} layer %{{x}}: mean {label} %{{customdata:+.4g}}<extra></extra>",
                    row=row, col=1)
        if ticks is not None:
            fig.update_yaxes(tickvals=ticks[0], ticktext=ticks[1], row=row, col=1)
        fig.update_yaxes(title_text=f"mean {label}", row=row, col=1)
    fig.update_xaxes(range=[-0.5, num_layers - 0.5], dtick=1)
    fig.update_xaxes(title_text="layer", row=len(kinds), col=1)
    fig.update_layout(height=80 + 170 * len(kinds), margin=dict(l=10, r=10, t=40, b=10), coloraxis=scale.axis(),
                      bargap=0.15)
    return fig


def agreement_matrix(matrix: pd.DataFrame, title: str) -> go.Figure:
    """A metric × metric rank-correlation matrix, values written in the cells (−1 .. 1)."""
    text = [[("n/a" if pd.isna(v) else f"{v:+.2f}") for v in row] for row in matrix.values]
    fig = go.Figure(go.Heatmap(z=matrix.values, x=list(matrix.columns), y=list(matrix.index), zmin=-1, zmax=1,
                               colorscale=DIVERGING, text=text, texttemplate="%{text}",
                               hovertemplate="%{y} vs %{x}: %{text}<extra></extra>"))
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed"))
    return fig


def _covered(adapter, plan: PruningPlan, comp: Component) -> bool:
    """Whether ``comp`` sits inside something the plan removes as a whole (a block, a mixer, an MLP),
    so removing it too is redundant: the adapter's own check says so. Only layers the plan touches
    are checked, which keeps a rerun cheap on large models."""
    if plan.in_removed_block(comp):
        return True
    if not any(p.layer == comp.layer for p in plan.components):
        return False
    try:
        adapter.check(plan.with_components([comp]))
    except PlanError as error:
        return "redundant" in str(error)
    return False


def switchboard(adapter, plan: PruningPlan, kinds: list[str], scores: pd.DataFrame | None,
                log: bool = True) -> tuple[go.Figure, list[list[Component]]]:
    """Every component of ``kinds`` as a clickable square; removed ones are grey crosses, components
    inside a removed block, mixer or MLP are faded. Colour: importance score when one is known.

    Each kind gets two traces, kept and removed, so the kept squares share one numeric colour axis.
    """
    fig = _panels(kinds, [len({c.index for c in adapter.components(k)}) for k in kinds], adapter.num_layers)
    score = {} if scores is None else {(r.kind, r.layer, r.index): r.delta_ppl for r in scores.itertuples()}
    scale = Scale.of(score.values(), log, "Δ ppl")
    lookup: list[list[Component]] = []
    coloured = False
    for row, kind in enumerate(kinds, start=1):
        comps = adapter.components(kind)
        kept = [c for c in comps if c not in plan]
        removed = [c for c in comps if c in plan]
        known = [score.get((c.kind, c.layer, c.index)) for c in kept]
        if kept:
            if all(v is not None for v in known) and scores is not None:
                coloured = True
                marker = dict(color=[scale.z(v) for v in known], coloraxis="coloraxis")
            else:
                marker = dict(color="#4C78A8")
            inside = [_covered(adapter, plan, c) for c in kept]
            text = [f"{c}: {'inside a removed part (restore that first)' if gone else 'kept'}" + ("" if v is None else f"<br>Δ ppl alone {v:+.4f}")
                    for c, gone, v in zip(kept, inside, known)]
            fig.add_scatter(x=[c.layer for c in kept], y=[c.index for c in kept], mode="markers", text=text,
                            hovertemplate="%{text}<br>click to remove<extra></extra>", showlegend=False,
                            marker=dict(size=22, symbol="square", opacity=[0.25 if g else 1.0 for g in inside],
                                        line=dict(width=1, color="#333"), **marker),
                            row=row, col=1)
            lookup.append(kept)
        if removed:
            fig.add_scatter(x=[c.layer for c in removed], y=[c.index for c in removed], mode="markers",
                            text=[f"{c}: removed" for c in removed], showlegend=False,
                            hovertemplate="%{text}<br>click to restore<extra></extra>",
                            marker=dict(size=22, symbol="x", color="#9e9e9e", line=dict(width=1, color="#333")),
                            row=row, col=1)
            lookup.append(removed)
        top = max((c.index for c in comps), default=0)
        fig.update_yaxes(title_text="index", dtick=1, range=[-0.6, top + 0.6], row=row, col=1)
    if coloured:
        fig.update_layout(coloraxis=scale.axis())
    fig.update_layout(clickmode="event+select", dragmode=False)
    return fig, lookup


def trajectory(steps: pd.DataFrame) -> go.Figure:
    """Greedy search: calibration perplexity and parameters after each step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=steps["step"], y=steps["ppl"], name="calibration perplexity", mode="lines+markers",
                    text=steps["component"], hovertemplate="step %{x}: removed %{text}<br>ppl %{y:.4f}<extra></extra>")
    fig.add_scatter(x=steps["step"], y=steps["params"], name="parameters", mode="lines+markers", line=dict(dash="dot"),
                    hovertemplate="step %{x}: %{y:,} params<extra></extra>", secondary_y=True)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.15))
    fig.update_xaxes(title_text="step", dtick=1)
    fig.update_yaxes(title_text="perplexity", secondary_y=False)
    fig.update_yaxes(title_text="parameters", secondary_y=True)
    return fig


#: Okabe–Ito colours safe for colour-blind readers, without its reddish purple (no red/pink pairs).
SERIES_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#56B4E9", "#D55E00", "#8C6D1F", "#666666")
SERIES_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "cross", "star", "triangle-down", "pentagon")
#: The series every frontier has keep one look; others take theirs from a hash of their name.
FIXED_SERIES = {"baseline": ("#000000", "x"), "current": ("#D55E00", "star"), "saved": ("#009E73", "square"),
                "recovered": ("#56B4E9", "hexagram")}


def series_style(name: str) -> tuple[str, str]:
    """Colour and marker of a series, from its name alone: adding a series never restyles another."""
    if name in FIXED_SERIES:
        return FIXED_SERIES[name]
    h = zlib.crc32(name.encode())
    return SERIES_COLOURS[h % len(SERIES_COLOURS)], SERIES_SYMBOLS[(h // len(SERIES_COLOURS)) % len(SERIES_SYMBOLS)]


def _padded(values: pd.Series, log: bool = False) -> list[float] | None:
    """An axis range around values that (nearly) coincide, so one point does not get ticks
    1.468735M…1.4687365M; None (plotly's own range) when they spread."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo > 1e-3 * max(abs(hi), 1e-12):
        return None
    if log and lo > 0:
        return [math.log10(lo) - 0.05, math.log10(hi) + 0.05]
    pad = 0.05 * max(abs(hi), 1.0)
    return [lo - pad, hi + pad]


def frontier(points: pd.DataFrame, x: str, y: str, front: pd.Series, labels: dict) -> go.Figure:
    """Every evaluated configuration on (cost, quality) axes, one colour, marker and legend entry per
    series (strategy, styled by ``series_style``), with the Pareto front over all of them (``front``:
    bool per row, from the engine); a recovered model (``recovered_from``: the index of its pruned
    point) is joined to that point. Hovers name both axes and the plan in words (``removed``). On a
    measured speedup axis (rows with ``{x}_low`` / ``_high`` / ``_resolved`` / ``_text``) every point
    has an error bar of its 95 % interval, and a point whose interval contains 1.0 is drawn hollow.
    Markers are outlined and shrink slightly per series so coincident points of two series both show."""
    fig = go.Figure()
    measured = f"{x}_low" in points  # a measured speedup: error bars of its 95 % interval
    for n, series in enumerate(dict.fromkeys(points["series"])):
        d = points[points["series"] == series]
        colour, symbol = series_style(series)
        size = max(16 - 2 * n, 8)
        text = d["name"] + "<br>" + d["removed"]
        symbols = symbol
        extra = {}
        if measured:
            unresolved = ~d[f"{x}_resolved"].fillna(False).astype(bool)
            extra = dict(error_x=dict(type="data", symmetric=False, array=d[f"{x}_high"] - d[x],
                                      arrayminus=d[x] - d[f"{x}_low"], thickness=1.5))
            symbols = [f"{symbol}-open" if u else symbol for u in unresolved]
            text = text + "<br>" + d[f"{x}_text"].fillna("")
        fig.add_scatter(x=d[x], y=d[y], mode="lines+markers" if len(d) > 1 else "markers", name=series,
                        customdata=d.index, text=text, line=dict(width=1, color=colour),
                        marker=dict(size=size, symbol=symbols, color=colour, line=dict(width=1.5, color="white")),
                        hovertemplate=(f"<b>{series}</b> · %{{text}}<br>{labels[x]} %{{x:.3~s}} · "
                                       f"{labels[y]} %{{y:.2f}}<br>click to load<extra></extra>"), **extra)
    for _, r in points[points["recovered_from"].notna()].iterrows():  # recovered point <- its pruned point
        if r["recovered_from"] in points.index:
            src = points.loc[r["recovered_from"]]
            fig.add_scatter(x=[src[x], r[x]], y=[src[y], r[y]], mode="lines", showlegend=False, hoverinfo="skip",
                            line=dict(color="#56B4E9", dash="dot"))
    on_front = points[front.reindex(points.index, fill_value=False)].sort_values(x)
    fig.add_scatter(x=on_front[x], y=on_front[y], mode="lines+markers", name="Pareto front (all series)",
                    hoverinfo="skip", line=dict(color="#222", dash="dash"),
                    marker=dict(size=22, symbol="circle-open", color="#222"))
    # The legend sits under the plot: the plotly toolbar owns the top right corner.
    fig.update_layout(height=500, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=labels[x], yaxis_title=labels[y],
                      clickmode="event+select", dragmode=False,
                      legend=dict(orientation="h", y=-0.18, yanchor="top", x=0, xanchor="left"))
    log_y = y == "ppl"  # perplexities of pruned models span orders of magnitude; ratios are what matter
    fig.update_xaxes(range=_padded(points[x]))
    fig.update_yaxes(type="log" if log_y else None, range=_padded(points[y], log_y))
    return fig


def loss_curve(rows: list[dict], objective: str) -> go.Figure:
    """A recovery run's curve: the training objective (smoothed, as logged) and the held-out
    next-token loss by step; the held-out point at step 0 is the pruned model before training."""
    fig = go.Figure()
    for series, name, style in (("train", f"training ({objective})", dict(width=2)),
                                ("held-out", "held-out next-token loss", dict(width=2, dash="dot"))):
        d = [r for r in rows if r["series"] == series]
        if d:
            fig.add_scatter(x=[r["step"] for r in d], y=[r["loss"] for r in d], name=name, mode="lines+markers",
                            line=style, hovertemplate=f"{name}<br>step %{{x}}: loss %{{y:.4f}}<extra></extra>")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=1.15),
                      xaxis_title="optimizer step", yaxis_title="loss (nats per token)")
    return fig
