"""Search & frontier page: the greedy Shedder search, and every evaluated plan on cost/quality axes."""
import pandas as pd
import streamlit as st

from app import nav, plots, ui
from shedder.metrics import describe_protocol, next_word_protocol
from shedder.plan import PruningPlan

LOAD = "frontier_load"  # index of a clicked point, recorded by the chart callback
GENERATION = "frontier_chart_gen"
AXES = {"params": "parameters", "flops": "FLOPs / token (prefill)", "latency_ms": "measured time to first token (ms)",
        "ppl": "perplexity", "accuracy": "next-word accuracy"}

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Search & frontier")
st.write("The greedy Shedder search removes, at each step, the component whose removal (together with everything "
         "removed before) raises calibration perplexity least.")

offered = list(adapter.kind_counts())
left, right = st.columns([3, 1])
kinds = left.multiselect("kinds to prune", offered, default=offered[:1], key="search_kinds")
available = len(adapter.candidates(PruningPlan(), kinds)) if kinds else 1
steps = right.number_input("steps", min_value=1, max_value=max(1, available), value=min(4, max(1, available)),
                           key="search_steps")
if kinds:
    with ui.shown_errors():
        ui.cost_caption("greedy search", kinds, int(steps))
run_col, cancel_col, _ = st.columns([2, 1, 5])
run = run_col.button("Run greedy search", type="primary", key="search_run", disabled=not kinds)
with cancel_col:
    ui.cancel_button("search_cancel")
if run:
    with ui.shown_errors(), ui.progress("greedy search") as cb:
        ws.greedy(kinds, int(steps), progress=cb)

result = ws.search
if result is not None and result.steps:
    trail = pd.DataFrame([{"step": 0, "component": "(nothing)", "ppl": result.base_ppl, "params": result.base_params}]
                         + [{"step": x.step, "component": str(x.component), "ppl": x.ppl, "params": x.params}
                            for x in result.steps])
    st.subheader(f"Trajectory ({', '.join(ws.search_kinds)})")
    st.plotly_chart(plots.trajectory(trail), key="search_trajectory")
    st.caption(f"Stopped: {result.stopped}. Measured on the {ws.calibration_protocol()}.")
    st.dataframe(trail, hide_index=True, key="search_table")

# -- the frontier: every configuration evaluated so far, measured the same way --------------------
entries = [("unpruned", "baseline", PruningPlan())]
if result is not None:
    entries += [(f"step {x.step}: −{x.component}", "search", x.plan) for x in result.steps]
entries += [(name, "saved", plan) for name, plan in ws.saved.items()]
entries.append(("current plan", "current", ws.plan))

st.subheader("Frontier")
c1, c2 = st.columns(2)
x_axis = c1.selectbox("x axis (cost)", ["params", "flops", "latency_ms"], format_func=AXES.get, key="frontier_x")
y_axis = c2.selectbox("y axis (quality)", ["ppl", "accuracy"], format_func=AXES.get, key="frontier_y")
with ui.shown_errors():
    if y_axis == "accuracy" and st.button("Measure next-word accuracy of every point", key="frontier_acc"):
        with ui.progress("next-word accuracy") as cb:
            for _, _, plan in entries:
                ws.accuracy(plan, progress=cb)
    if x_axis == "latency_ms" and st.button("Measure latency of every point (extracts each model)", key="frontier_lat"):
        with ui.progress("timing extracted models") as cb:
            for _, _, plan in entries:
                ws.latency(plan, progress=cb)
    rows = []
    for i, (name, origin, plan) in enumerate(entries):
        m = {**ws.metrics(plan), **ws.known(plan)}
        rows.append({"name": name, "origin": origin, "entry": i, "removed": plan.describe(),
                     **{k: m.get(k) for k in AXES}})
    points = pd.DataFrame(rows).set_index("entry")
    shown = points.dropna(subset=[x_axis, y_axis])
    if len(shown) < len(points):
        missing = AXES[x_axis if x_axis == "latency_ms" else y_axis]
        st.info(f"{len(points) - len(shown)} of {len(points)} configurations have no {missing} "
                "yet: use the button above.")
    if len(shown):
        chart_key = f"frontier_chart_{st.session_state.setdefault(GENERATION, 0)}"

        def clicked() -> None:
            picked = [p for p in st.session_state[chart_key].selection.points if p.get("customdata") is not None]
            if picked:
                st.session_state[LOAD] = int(picked[0]["customdata"])
            st.session_state[GENERATION] += 1  # the next chart starts unselected

        st.plotly_chart(plots.frontier(shown, x_axis, y_axis, y_axis == "accuracy", AXES), key=chart_key,
                        on_select=clicked, selection_mode="points")
        st.caption("Every point is measured on the evaluation text: " + describe_protocol(ws.windows(s.evaluation), s.evaluation)
                   + (f"; {next_word_protocol(s.evaluation, s.accuracy_passages)}" if y_axis == "accuracy" else "")
                   + ". Click a point to load its plan into the Prune page.")
    st.dataframe(points.drop(columns=["origin"]), hide_index=True, key="frontier_table")

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
