"""Importance page: how much each component matters, by the metric the user picks, and how much
the metrics' rankings agree."""
import streamlit as st

from app import plots, ui
from shedder import api
from shedder.api import REGISTRY, applicable, matrix

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Importance")
st.write("How much the model needs each component. **ppl** removes each component **on its own** and measures "
         "the calibration perplexity (one pass per component); the other metrics read one forward (and, for taylor, "
         "one backward) pass over the calibration text for the whole map. A high score means the model needs it; "
         "the lowest scores mark candidates for pruning.")

metric = st.selectbox("metric", list(REGISTRY), format_func=lambda m: f"{m} — {REGISTRY[m].description}",
                      key="imp_metric")
offered = [k for k in adapter.kind_counts() if k in applicable(metric, adapter.kind_counts())]
left_out = [k for k in adapter.kind_counts() if k not in offered]
kinds = st.multiselect("component kinds", offered, default=offered, key="imp_kinds" if metric == "ppl" else f"imp_kinds_{metric}",
                       format_func=lambda k: f"{k} ({adapter.kind_counts()[k]})")
if left_out:
    st.caption(f"{metric} does not score {', '.join(left_out)}.")
calibration = ws.calibration()
st.caption("Scored by " + ws.calibration_protocol() + ".")

if kinds and metric == "ppl":
    with ui.shown_errors():
        status = api.cached(loaded.model, calibration, kinds)
        if status:
            st.caption(status)

if kinds:
    with ui.shown_errors():
        ui.cost_caption("scoring", kinds, metric=metric)
left, right, _ = st.columns([2, 1, 5])
compute = left.button("Compute importance", type="primary", key="imp_compute", disabled=not kinds)
with right:
    ui.cancel_button("imp_cancel")
if compute:
    with ui.shown_errors(busy=ui.BUSY_SCORES), ui.progress(f"scoring components by {metric}") as cb:
        if metric == "ppl":
            ws.importance = api.score(loaded.model, calibration, kinds, "ppl", progress=cb,
                                      batch_size=s.calibration_batch_size, pool=ws.pool())
        else:
            ws.metric_table(metric, kinds, progress=cb)

if metric == "ppl":
    scores, column, label = ws.importance, "delta_ppl", "Δ ppl"
else:
    scores, column, label = ws.metric_tables.get((metric, tuple(kinds))), "score", metric
if scores is None:
    st.info("Press **Compute importance** to score the chosen kinds.")
else:
    if metric == "ppl":
        st.caption(f"Cost: one calibration pass per component ({len(scores) + 1} passes for {len(scores)} components); "
                   "cached on disk, so reopening is instant.")
    else:
        a = scores.attrs
        st.caption(f"Cost: measured {a['seconds']:.2f} s for all {len(scores)} components: {a['forwards']} forward"
                   + (f" and {a['backwards']} backward" if a["backwards"] else "") + " pass over the calibration windows.")
    log = st.toggle("log colour scale", value=True, key="imp_log",
                    help="Where the values span orders of magnitude: symmetric log for values of both signs "
                         "(Δ ppl), log10 for positive ones; a narrow range stays linear.")
    st.plotly_chart(plots.importance_heatmap(scores, adapter.num_layers, log=log, column=column, label=label),
                    key="imp_heatmap")
    st.caption(plots.Scale.of(scores[column], log, label).describe() + ("; red: removing it hurts, blue: removing it "
               "helps (white: no change)" if (scores[column] < 0).any() else "; darker: more important") + ".")
    st.markdown("**Per layer** (mean of the layer's components, one panel per kind)")
    st.plotly_chart(plots.layer_bars(scores, adapter.num_layers, log=log, column=column, label=label), key="imp_bars")
    st.subheader("All scores")
    st.dataframe(scores.sort_values(column), hide_index=True, key="imp_table",
                 column_config={"ppl": st.column_config.NumberColumn("ppl without it", format="%.4f"),
                                "delta_ppl": st.column_config.NumberColumn("Δ ppl", format="%+.4f"),
                                "params_removed": st.column_config.NumberColumn("params removed", format="%d")})
    st.download_button("Download CSV", scores.to_csv(index=False),
                       file_name=f"importance-{metric}-{s.model.replace('/', '_')}.csv", mime="text/csv", key="imp_csv")

# -- agreement between metrics ------------------------------------------------------------------
st.subheader("Do the metrics agree?")
st.write("Rank correlation (Spearman and Kendall) between every two metrics, per kind; on the diagonal, the "
         "stability of each metric: the same metric computed on two disjoint halves of the calibration windows. "
         "Top-k overlap: the share of the k lowest-scored components (the first to go) two rankings have in common.")
all_kinds = list(adapter.kind_counts())
a1, a2 = st.columns(2)
compared = a1.multiselect("metrics", list(REGISTRY), default=list(REGISTRY), key="agree_metrics")
compared_kinds = a2.multiselect("kinds", all_kinds, default=all_kinds[:1], key="agree_kinds")
runnable = False
if compared and compared_kinds:
    with ui.shown_errors():
        runnable = ui.compare_caption(compared_kinds, compared)
compare_col, stop_col, _ = st.columns([2, 1, 5])
compare = compare_col.button("Compare metrics", key="agree_run", disabled=not runnable)
with stop_col:
    ui.cancel_button("agree_cancel")
if compare:
    with ui.shown_errors(), ui.progress("scoring with every metric") as cb:
        ws.compare(compared_kinds, compared, progress=cb)
if ws.agreement is not None:
    tables, rows = ws.agreement
    st.dataframe([{"metric": m, "seconds": t.attrs["seconds"], "forwards": t.attrs["forwards"],
                   "backwards": t.attrs["backwards"], "components": len(t), "kinds": ", ".join(dict.fromkeys(t["kind"]))}
                  for m, t in tables.items()], hide_index=True, key="agree_costs",
                 column_config={"seconds": st.column_config.NumberColumn("measured cost (s)", format="%.2f")})
    for kind in dict.fromkeys(rows["kind"]):
        st.markdown(f"**{ui.KIND_LABELS.get(kind, kind)}**")
        c1, c2 = st.columns(2)
        c1.plotly_chart(plots.agreement_matrix(matrix(rows, kind, "spearman"), f"{kind}: Spearman"), key=f"agree_sp_{kind}")
        c2.plotly_chart(plots.agreement_matrix(matrix(rows, kind, "kendall"), f"{kind}: Kendall"), key=f"agree_kt_{kind}")
        st.dataframe(rows[rows["kind"] == kind], hide_index=True, key=f"agree_rows_{kind}",
                     column_config={"top_k_overlap": st.column_config.NumberColumn("top-k overlap", format="%.2f")})
