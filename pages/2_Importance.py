"""Importance page: how much calibration perplexity rises when each component alone is removed."""
import streamlit as st

from app import plots, ui
from shedder import importance

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Importance")
st.write("Each component is removed **on its own** and the calibration perplexity measured: a large increase "
         "means the model needs it; a small one marks a candidate for pruning.")

offered = list(adapter.kind_counts())
kinds = st.multiselect("component kinds", offered, default=offered, key="imp_kinds",
                       format_func=lambda k: f"{k} ({adapter.kind_counts()[k]})")
calibration = ws.calibration()
st.caption("Scored by " + ws.calibration_protocol() + ".")

if kinds:
    with ui.shown_errors():
        status = importance.cache_status(loaded.model, calibration, kinds)
        if status:
            st.caption(status)

if kinds:
    with ui.shown_errors():
        ui.cost_caption("scoring", kinds)
left, right, _ = st.columns([2, 1, 5])
compute = left.button("Compute importance", type="primary", key="imp_compute", disabled=not kinds)
with right:
    ui.cancel_button("imp_cancel")
if compute:
    with ui.shown_errors(), ui.progress("scoring components") as cb:
        ws.importance = importance.score(loaded.model, calibration, kinds, progress=cb,
                                         batch_size=s.calibration_batch_size, pool=ws.pool())

scores = ws.importance
if scores is None:
    st.info("Press **Compute importance** to score the chosen kinds.")
    st.stop()

log = st.toggle("log colour scale", value=True, key="imp_log",
                help="Symmetric log: small and large increases (and decreases) stay distinguishable.")
st.plotly_chart(plots.importance_heatmap(scores, adapter.num_layers, log=log), key="imp_heatmap")
st.plotly_chart(plots.layer_bars(scores), key="imp_bars")
st.subheader("All scores")
st.dataframe(scores.sort_values("delta_ppl"), hide_index=True, key="imp_table",
             column_config={"ppl": st.column_config.NumberColumn("ppl without it", format="%.4f"),
                            "delta_ppl": st.column_config.NumberColumn("Δ ppl", format="%+.4f"),
                            "params_removed": st.column_config.NumberColumn("params removed", format="%d")})
st.download_button("Download CSV", scores.to_csv(index=False), file_name=f"importance-{s.model.replace('/', '_')}.csv",
                   mime="text/csv", key="imp_csv")
