"""The studio's figures answer their question: colour scales chosen by the metric's values (signed or
not, spanning decades or not), per-layer bars per kind on the heatmap's scale, a loss curve per run."""
import math

import pandas as pd
import pytest

pytest.importorskip("plotly")

from app import plots  # noqa: E402
from app.scales import SEQUENTIAL, Scale  # noqa: E402


def test_delta_ppl_gets_a_diverging_symmetric_log_scale_over_the_data_range_with_labelled_ticks():
    scale = Scale.of([-0.21, 0.003, 0.5, 12.0, 1445.0], log=True, label="Δ ppl")
    assert scale.signed and scale.log
    vals, text = scale.ticks()
    assert {"-0.1", "0", "1", "1000"} <= set(text) and "-1" not in text  # nothing beyond the data
    assert scale.lo == pytest.approx(scale.z(-0.21)) and vals == sorted(vals)
    axis = scale.axis()
    assert axis["cmin"] == scale.lo and axis["cmax"] == scale.hi
    # The small negative side is pale blue, the large positive side dark red; white sits at zero.
    (_, low), (_, high) = axis["colorscale"][0], axis["colorscale"][-1]
    red, green, blue = (int(c) for c in low[4:-1].split(","))
    assert blue > red and min(red, green) > 150
    assert high != low
    zero_at = -scale.lo / (scale.hi - scale.lo)
    assert 0 < zero_at < 0.25  # the negative side takes only the room its values need


def test_a_positive_metric_gets_a_sequential_scale_log_only_when_it_spans_decades():
    activation = Scale.of([1e-3, 0.2, 4.0, 30.0], log=True, label="activation")
    assert not activation.signed and activation.log and activation.colorscale() == SEQUENTIAL
    assert activation.ticks()[1] == ["0.001", "0.01", "0.1", "1", "10"]
    influence = Scale.of([0.02, 0.05, 0.11, 0.2], log=True, label="block_influence")
    assert not influence.log and influence.ticks() is None  # linear: plotly's several ticks, not one "0.1"
    assert influence.axis()["colorbar"]["nticks"] == 6
    assert "sequential, linear" in influence.describe()
    assert Scale.of([0.0, 0.0], log=True, label="x").axis()["cmax"] > 0  # a flat map still draws


def scores(kinds_values: dict) -> pd.DataFrame:
    rows = []
    for kind, values in kinds_values.items():
        for layer, v in enumerate(values):
            rows.append({"kind": kind, "layer": layer, "index": 0, "delta_ppl": v, "ppl": 100 + v,
                         "params_removed": 10})
    return pd.DataFrame(rows)


def test_layer_bars_give_each_kind_its_panel_on_the_heatmaps_scale():
    table = scores({"block": [1445.0, 0.4, -0.05], "ssm": [0.02, 0.01, 0.03]})
    fig = plots.layer_bars(table, 3, log=True)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2 and bars[0].yaxis != bars[1].yaxis  # one panel per kind
    scale = Scale.of(table.groupby(["layer", "kind"])["delta_ppl"].mean(), True, "x")
    assert list(bars[1].y) == pytest.approx([scale.z(v) for v in (0.02, 0.01, 0.03)])
    assert bars[0].marker.coloraxis == "coloraxis" and fig.layout.coloraxis.colorbar.ticktext
    heat = plots.importance_heatmap(table, 3, log=True)
    assert heat.layout.coloraxis.cmin == pytest.approx(Scale.of(table["delta_ppl"], True, "Δ ppl").lo)


def test_loss_curve_draws_training_and_held_out_series():
    rows = [{"step": 0, "series": "held-out", "loss": math.log(110)}, {"step": 10, "series": "train", "loss": 4.2},
            {"step": 10, "series": "held-out", "loss": 4.5}]
    fig = plots.loss_curve(rows, "distillation loss")
    assert [t.name for t in fig.data] == ["training (distillation loss)", "held-out next-token loss"]
    assert list(fig.data[1].x) == [0, 10]


def _points(series: list[str], params: list[float], ppl: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"name": [f"p{i}" for i in range(len(series))], "series": series, "params": params,
                         "ppl": ppl, "removed": ["removed: SSM of layer 2"] * len(series),
                         "recovered_from": [None] * len(series)})


def test_frontier_series_keep_their_style_when_a_series_is_added():
    labels = {"params": "parameters", "ppl": "perplexity"}
    one = _points(["baseline", "greedy ssm"], [2e5, 1.7e5], [100.0, 103.7])
    two = _points(["baseline", "one-shot x", "greedy ssm"], [2e5, 1.8e5, 1.7e5], [100.0, 101.0, 103.7])
    style = lambda fig: {t.name: (t.marker.color, t.marker.symbol) for t in fig.data}  # noqa: E731
    a = style(plots.frontier(one, "params", "ppl", pd.Series(False, one.index), labels))
    b = style(plots.frontier(two, "params", "ppl", pd.Series(False, two.index), labels))
    assert a["greedy ssm"] == b["greedy ssm"] and a["baseline"] == b["baseline"]
    trace = plots.frontier(one, "params", "ppl", pd.Series(False, one.index), labels).data[1]
    assert "parameters" in trace.hovertemplate and "perplexity" in trace.hovertemplate
    assert "removed: SSM of layer 2" in trace.text[0]


def test_frontier_pads_the_axes_of_a_single_point():
    one = _points(["baseline"], [1468736.0], [103.7])
    fig = plots.frontier(one, "params", "ppl", pd.Series(False, one.index), {"params": "parameters", "ppl": "perplexity"})
    low, high = fig.layout.xaxis.range
    assert high - low > 1e4 and low < 1468736.0 < high
    assert fig.layout.yaxis.range is not None


def test_a_delta_that_reads_as_zero_draws_no_arrow():
    from app import ui
    assert ui.delta("+0.000") is None and ui.delta("-0.0%") is None and ui.delta("+0.0 pts") is None
    assert ui.delta("+0.012") == "+0.012" and ui.delta("-16.1%") == "-16.1%"


def test_every_view_lists_kinds_in_one_order():
    from shedder.core.plan import in_kind_order
    assert in_kind_order(["attention", "ssm", "block", "ssm"]) == ["block", "ssm", "attention"]
    scores = pd.DataFrame({"layer": [0, 1, 1], "kind": ["attention", "block", "ssm"], "index": [0, 0, 0],
                           "delta_ppl": [0.1, 0.2, 0.3]})
    titles = [a.text for a in plots.layer_bars(scores, 2).layout.annotations]
    assert titles[:3] == ["block", "ssm", "attention"]


def test_switchboard_fades_what_sits_inside_a_removed_mlp():
    from shedder.arch import adapter_for
    from shedder.core.plan import Component, PruningPlan
    from tiny_models import make_tiny_model
    model = make_tiny_model("nemotron_h")
    adapter = adapter_for(model)
    mlp = next(c for c in adapter.components("mlp"))
    plan = PruningPlan().with_components([mlp])
    fig, lookup = plots.switchboard(adapter, plan, ["mlp_channel_group"], None)
    kept = fig.data[0]
    faded = {c.layer for c, o in zip(lookup[0], kept.marker.opacity) if o < 1}
    assert faded == {mlp.layer}
    assert all("inside a removed part" in t for c, t in zip(lookup[0], kept.text) if c.layer == mlp.layer)
    assert Component("mlp_channel_group", mlp.layer, 0) in lookup[0]
