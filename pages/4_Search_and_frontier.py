"""Search & frontier page: greedy searches and one-shot prunings as named series, every evaluated
plan on cost/quality axes (measured speed included), one Pareto front over all of them."""
import time

import pandas as pd
import streamlit as st

from app import nav, plots, ui
from shedder.api import (BENCH_DEFAULTS, MEASURED, PARETO_SPEED, REGISTRY, SPEED_COLUMNS, STOCK_STRATEGIES, X_AXES, Y_AXES,
                         applicable, describe_protocol, next_word_protocol, pareto, stock_kinds)
from shedder.core.plan import PruningPlan

LOAD = "frontier_load"  # index of a clicked point, recorded by the chart callback
GENERATION = "frontier_chart_gen"



def readable(points: pd.DataFrame) -> pd.DataFrame:
    """The frontier table for people: axis names as headers, a recovered model's source by name, each
    speedup as its printed interval, and no column that no point fills."""
    table = points.assign(recovered_from=points["recovered_from"].map(lambda j: points.loc[j, "name"] if pd.notna(j) else None))
    table = table.drop(columns=[c for c in SPEED_COLUMNS if not c.endswith("_text")])
    names = {"recovered_from": "recovered from", "pareto": "on the Pareto front", **X_AXES, **Y_AXES,
             **{f"{x}_text": f"{X_AXES[x]}, 95 % interval" for x in MEASURED}}
    return table.dropna(axis=1, how="all").rename(columns=names)


ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Search & frontier")
st.write("The greedy Shedder search removes, at each step, the component whose removal (together with everything "
         "removed before) raises calibration perplexity least.")

offered = list(adapter.kind_counts())
left, right = st.columns([3, 1])
kinds = left.multiselect("kinds to prune", offered, default=offered[:1], key="search_kinds")
available = len(adapter.candidates(PruningPlan(), kinds)) if kinds else 0
# Fixed bounds: a widget whose bounds change is reset by Streamlit, so the steps stay as typed.
steps = right.number_input("steps", min_value=1, max_value=10_000, value=4, key="search_steps")
s1, s2 = st.columns(2)
target = s1.number_input("stop once this share of parameters is gone (%, 0 = no limit)", min_value=0.0,
                         max_value=99.0, value=0.0, step=5.0, key="search_target",
                         help="As the CLI's --target-params: the search stops after the step that reaches it.")
max_ppl = s2.number_input("stop before perplexity would exceed (0 = no limit)", min_value=0.0, value=0.0,
                          step=10.0, key="search_max_ppl", help="As the CLI's --max-ppl.")
race = st.checkbox("race (faster, not exact)", value=False, key="search_race",
                   help="As the CLI's --race: each step scores every candidate on 4 windows, keeps the better half "
                        "rung after rung and finishes 2 exactly; a series of its own, labelled raced.")
limits = dict(target_params=target / 100 if target else None, max_ppl=max_ppl or None, race=race)
if kinds and steps > available:
    st.caption(f"{', '.join(kinds)} offer{'s' * (len(kinds) == 1)} {available} candidates: the search stops when they "
               "run out.")
if kinds:
    with ui.shown_errors():
        ui.cost_caption("greedy search", kinds, int(min(steps, max(available, 1))))
run_col, cancel_col, _ = st.columns([2, 1, 5])
run = run_col.button("Run greedy search", type="primary", key="search_run", disabled=not kinds)
with cancel_col:
    ui.cancel_button("search_cancel")
if run:
    with ui.shown_errors(busy=ui.BUSY_SEARCH), ui.progress("greedy search") as cb:
        ws.greedy(kinds, int(steps), progress=cb, **limits)

result = ws.search
if result is not None and result.steps:
    trail = pd.DataFrame([{"step": 0, "component": "(nothing)", "ppl": result.base_ppl, "params": result.base_params}]
                         + [{"step": x.step, "component": str(x.component), "ppl": x.ppl, "params": x.params}
                            for x in result.steps])
    st.subheader(f"Trajectory ({', '.join(ws.search_kinds)})")
    st.plotly_chart(plots.trajectory(trail), key="search_trajectory")
    st.caption(f"Stopped: {result.stopped}. Measured on the {ws.calibration_protocol()}.")
    st.dataframe(trail, hide_index=True, key="search_table")

# -- one-shot pruning by a metric: another strategy on the same frontier ---------------------------
st.subheader("One-shot pruning by an importance metric")
st.write("Score every component once and remove the k lowest at once (k = 1, 2, …): no greedy re-scoring, "
         "so the frontier shows what greed buys.")
o1, o2, o3 = st.columns([2, 3, 1])
metric = o1.selectbox("metric", list(REGISTRY), index=list(REGISTRY).index("block_influence"), key="oneshot_metric",
                      help="\n".join(f"{m.name}: {m.description}" for m in REGISTRY.values()))
scorable = applicable(metric, offered)
oneshot_kinds = o2.multiselect("kinds", scorable, default=scorable[:1], key="oneshot_kinds")
oneshot_k = o3.number_input("up to k", min_value=1, max_value=10_000, value=4, key="oneshot_k")
oneshot_run, oneshot_cancel, _ = st.columns([2, 1, 5])
if oneshot_run.button("Add one-shot series", key="oneshot_run", disabled=not oneshot_kinds):
    with ui.shown_errors(), ui.progress(f"scoring by {metric}") as cb:
        ws.one_shot(metric, oneshot_kinds, int(oneshot_k), progress=cb)
with oneshot_cancel:
    ui.cancel_button("oneshot_cancel")

# -- stock-shaped width pruning: one width in every layer, so the result is a stock checkpoint ------
stockable = stock_kinds(adapter)
if stockable:
    st.subheader("Stock-shaped width pruning")
    st.write("Remove the same number of SSM heads from every group and / or MLP channel groups from every MLP, each "
             "layer choosing its own (as NVIDIA's Minitron prunes): the extracted model keeps a stock config that plain "
             "transformers loads. One-shot ranks by a metric; greedy measures every step.")
    t1, t2, t3, t4 = st.columns([3, 2, 2, 1])
    stock_kinds_chosen = t1.multiselect("kinds", stockable, default=stockable[:1], key="stock_kinds")
    strategy = t2.selectbox("strategy", STOCK_STRATEGIES, key="stock_strategy")
    ranked_by = [m for m in REGISTRY if stock_kinds_chosen and applicable(m, stock_kinds_chosen) == stock_kinds_chosen]
    stock_metric = t3.selectbox("metric (one-shot)", ranked_by, index=ranked_by.index("ppl") if "ppl" in ranked_by else 0,
                                key="stock_metric", disabled=strategy != "one-shot")
    stock_k = t4.number_input("per unit, at most", min_value=1, max_value=10_000, value=2, key="stock_k",
                              help="components removed per group / MLP at the last point (fewer if a unit runs out)")
    stock_run, stock_cancel, _ = st.columns([2, 1, 5])
    if stock_run.button("Add stock-shaped series", key="stock_run", disabled=not stock_kinds_chosen):
        with ui.shown_errors(busy=ui.BUSY_SEARCH), ui.progress(f"stock-shaped {strategy}") as cb:
            made = ws.stock(strategy, stock_kinds_chosen, int(stock_k), stock_metric or "ppl", progress=cb)
        st.info(f"{made.name}: {len(made.points)} stock-shaped plan{'s' * (len(made.points) != 1)} for k = 1 to "
                f"{int(stock_k)}. A k whose widths a stock config cannot state (heads × head size a whole multiple "
                "of the model width; one MLP width) is passed over.")
    with stock_cancel:
        ui.cancel_button("stock_cancel")

# -- the frontier: every strategy's configurations, measured the same way ---------------------------
entries = [("unpruned", "baseline", PruningPlan())]
for series in ws.series.values():
    entries += [(p.label, series.name, p.plan) for p in series.points]
entries += [(name, "saved", plan) for name, plan in ws.saved.items()]
entries.append(("current plan", "current", ws.plan))
# Recovered models (Recover page): their own quality numbers; the same structure, so the same cost.
recovered = {len(entries) + k: r for k, r in enumerate(ws.recovered)}
entries += [(r.name, "recovered", r.plan) for r in ws.recovered]

st.subheader("Frontier")
st.caption("Series: " + ", ".join(["baseline", *ws.series, "saved", "current"]) + ". The Pareto front is over all of them.")
c1, c2 = st.columns(2)
x_axis = c1.selectbox("x axis (cost)", list(X_AXES), format_func=X_AXES.get, key="frontier_x")
with ui.shown_errors():
    rows = []
    for i, (name, series_name, plan) in enumerate(entries):
        m = {**ws.metrics(plan), **ws.measured(plan), **ws.known(plan)}
        if i in recovered:  # quality of the recovered model, cost of its (pruned) structure
            m = {**{k: m.get(k) for k in [*X_AXES, *SPEED_COLUMNS]}, **recovered[i].metrics}
        pruned_from = next((j for j, (_, o, p) in enumerate(entries) if o != "recovered" and p == plan), None)
        rows.append({"name": name, "series": series_name, "entry": i, "removed": plan.in_words(),
                     "recovered_from": pruned_from if i in recovered else None,
                     **{k: m.get(k) for k in [*X_AXES, *SPEED_COLUMNS, *Y_AXES]}})
    points = pd.DataFrame(rows).set_index("entry")
    offered_y = [y for y in Y_AXES if y in ("ppl", "accuracy") or points[y].notna().any()]
    y_axis = c2.selectbox("y axis (quality)", offered_y, format_func=Y_AXES.get, key="frontier_y")
    if y_axis == "accuracy" and st.button("Measure next-word accuracy of every point", key="frontier_acc"):
        with ui.progress("next-word accuracy") as cb:
            for _, _, plan in entries:
                ws.accuracy(plan, progress=cb)
        st.rerun()
    measure_all = x_axis in MEASURED and st.button("Measure all points (extracts and benchmarks each model)",
                                                   key="frontier_lat")
    if x_axis in MEASURED:
        ui.cancel_button("frontier_lat_cancel")
    if measure_all:
        with ui.progress("measuring extracted models") as cb:
            for n, (_, _, plan) in enumerate(entries):
                ws.latency(plan, progress=lambda d, t, msg, n=n: cb(n * t + d, len(entries) * t, msg))
        st.rerun()
    shown = points.dropna(subset=[x_axis, y_axis])
    if len(shown) < len(points):
        missing = X_AXES[x_axis] if points[x_axis].isna().any() else Y_AXES[y_axis]
        st.info(f"{len(points) - len(shown)} of {len(points)} configurations have no {missing} "
                "yet: use the button above.")
    if len(shown):
        chart_key = f"frontier_chart_{st.session_state.setdefault(GENERATION, 0)}"

        def clicked() -> None:
            picked = [p for p in st.session_state[chart_key].selection.points if p.get("customdata") is not None]
            if picked:
                st.session_state[LOAD] = int(picked[0]["customdata"])
            st.session_state[GENERATION] += 1  # the next chart starts unselected

        front = pareto(shown, x_axis, y_axis)
        st.plotly_chart(plots.frontier(shown, x_axis, y_axis, front, {**X_AXES, **Y_AXES}), key=chart_key,
                        on_select=clicked, selection_mode="points")
        st.caption("Every point is measured on the evaluation text: " + describe_protocol(ws.windows(s.evaluation), ws.label(s.evaluation))
                   + (f"; {next_word_protocol(ws.label(s.evaluation), s.accuracy_passages)}" if y_axis == "accuracy" else "")
                   + (f"; speed: extracted vs original model in paired interleaved rounds, {s.seq_len}-token prompt, "
                      f"{s.device}, {s.dtype}, median with its 95 % interval (error bars; up to "
                      f"{BENCH_DEFAULTS['budget_s']:g} s per point, at least {BENCH_DEFAULTS['min_rounds']} rounds); "
                      "hollow points are not resolved (their interval contains 1×); the Pareto front reads each speedup "
                      f"at {PARETO_SPEED}" if x_axis in MEASURED else "")
                   + ". Click a point to load its plan into the Prune page.")
        st.caption(ui.defaults_note())
        points = points.assign(pareto=front.reindex(points.index, fill_value=False))
    st.dataframe(readable(points), hide_index=True, key="frontier_table")

    a, b = st.columns([3, 1])
    choice = a.selectbox("load a configuration into the Prune page", points.index, format_func=lambda i: points.loc[i, "name"],
                         key="frontier_pick")
    if b.button("Load", key="frontier_load_btn"):
        st.session_state[LOAD] = int(choice)
    index = st.session_state.pop(LOAD, None)
    if index is not None:
        name, _, plan = entries[index]
        ws.set_plan(plan)
        st.success(f"Loaded “{name}” ({plan.describe()}).")
        st.page_link(nav.page("prune"), label="Open it on the Prune page", icon=":material/content_cut:")

# -- the runs list: what was done for this model and text, in any session, restorable ----------------
runs = ws.runs()
if runs:
    with st.expander(f"Runs for this model and calibration text ({len(runs)})", expanded=True):
        st.caption("Searches, one-shot series, saved plans and recoveries made on this model and text, in this or "
                   "an earlier session. Restoring reads them back from the cache (nothing is recomputed) onto the "
                   "frontier below; load any point into the Prune page from there.")
        st.dataframe([{"run": r["label"], "type": r["type"], "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("at", 0)))}
                      for r in runs], hide_index=True, key="runs_table")
        r1, r2, _ = st.columns([3, 1, 1])
        pick = r1.selectbox("run", range(len(runs)), format_func=lambda i: runs[i]["label"], key="runs_pick",
                            label_visibility="collapsed")
        one, every = r2.button("Restore", key="runs_restore"), st.button("Restore all", key="runs_restore_all")
        if one or every:
            with ui.shown_errors(busy=ui.BUSY_SEARCH), ui.progress("restoring runs") as cb:
                chosen = runs if every else [runs[pick]]
                for n, entry in enumerate(chosen):
                    ws.restore(entry, progress=lambda d, t, m, n=n: cb(n * t + d, len(chosen) * t, m))
            # the frontier above was drawn before the restore: draw the page again, with the note
            st.session_state["runs_restored"] = f"Restored {len(chosen)} run{'s' * (len(chosen) != 1)}."
            st.rerun()
        if "runs_restored" in st.session_state:
            st.success(st.session_state.pop("runs_restored"))
