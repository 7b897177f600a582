"""Stock-shaped width pruning on the Search & frontier page: a series of its own, on the runs list,
restored from its entry alone (nothing recomputed), every point a stock-shaped plan."""
import pytest

pytest.importorskip("streamlit")

from test_app import assert_clean, open_app, private_cache, workspace  # noqa: E402

from shedder.api import stock_kinds, stock_shaped  # noqa: E402

pytestmark = pytest.mark.usefixtures(private_cache.__name__)  # each test's cache to itself, as in test_app


def test_stock_series_goes_on_the_frontier_and_comes_back_from_the_runs_list(monkeypatch):
    at = open_app("search")
    ws = workspace(at)
    assert at.multiselect(key="stock_kinds").options == stock_kinds(ws.loaded.adapter) == ["head"]
    at.selectbox(key="stock_strategy").set_value("greedy").run()
    assert at.selectbox(key="stock_metric").disabled  # the metric only ranks a one-shot series
    at.number_input(key="stock_k").set_value(2).run()
    at.button(key="stock_run").click().run()
    assert_clean(at)
    series = ws.series["stock greedy (head)"]
    # 8 heads of 32 in 2 groups, width 128: only 2 heads gone per group leaves a stock width (expand 1)
    assert series.origin == "stock greedy" and [p.label for p in series.points] == ["−2 heads per group"]
    assert "1 stock-shaped plan for k = 1 to 2" in at.info[0].value
    assert all(stock_shaped(ws.loaded.adapter, p.plan) for p in series.points)
    table = next(d.value for d in at.dataframe if "series" in d.value.columns)
    assert "stock greedy (head)" in set(table["series"])
    entry = next(r for r in ws.runs() if r["type"] == "stock")
    assert entry["label"] == "stock greedy (head): 1 plans" and "/" not in str(entry["points"][0]["plan"].get("model"))

    # a new session (a reload) restores it from the entry: the greedy steps are not run again
    fresh = open_app("search")
    monkeypatch.setattr("shedder.api.stock", lambda *a, **k: pytest.fail("restoring recomputed the series"))
    fresh.selectbox(key="runs_pick").set_value(next(i for i, r in enumerate(workspace(fresh).runs())
                                                    if r["type"] == "stock")).run()
    fresh.button(key="runs_restore").click().run()
    assert_clean(fresh)
    restored = workspace(fresh).series["stock greedy (head)"]
    assert [p.plan for p in restored.points] == [p.plan for p in series.points]


def test_one_shot_stock_series_ranks_by_the_chosen_metric():
    at = open_app("search")
    at.selectbox(key="stock_metric").set_value("ppl").run()
    at.number_input(key="stock_k").set_value(3).run()
    at.button(key="stock_run").click().run()
    assert_clean(at)
    ws = workspace(at)
    points = ws.series["stock one-shot ppl (head)"].points
    assert [p.label for p in points] == ["−2 heads per group"]
    ranked = ws.metric_table("ppl", ["head"]).sort_values("delta_ppl")  # the page's table: the same scores
    per_group = {}
    for r in ranked.itertuples():  # the two lowest of each group (4 heads per group)
        per_group.setdefault((r.layer, r.index // 4), []).append(r.index)
    assert {(c.layer, c.index) for c in points[0].plan.components} == {
        (layer, i) for (layer, _), idx in per_group.items() for i in idx[:2]}
