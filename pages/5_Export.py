"""Export page: the plan as JSON (down and up), and the physically smaller model on disk."""
import json
from pathlib import Path

import streamlit as st

from app import card, ui
from shedder.errors import PlanError
from shedder.extract import extract, save
from shedder.metrics import describe_protocol, perplexity
from shedder.official import to_official
from shedder.plan import PruningPlan

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Export")
st.write(f"**Current plan:** {ws.plan.describe()}")

st.subheader("Plan file")
name = Path(s.model).name
known = {k: v for k, v in ws.known(ws.plan).items() if k in ("ppl", "params", "flops", "accuracy", "latency_ms")}
recorded = PruningPlan(ws.plan.components, ws.plan.model, dict(ws.plan.group_sizes),
                       {**ws.plan.meta, "source_model": s.model, "measured": known,
                        "protocol": describe_protocol(ws.windows(s.evaluation), s.evaluation)})
st.download_button("Download plan (JSON)", recorded.to_json(), file_name=f"{name}-plan.json", mime="application/json",
                   key="export_download", type="primary")
with st.expander("Show the JSON"):
    st.code(recorded.to_json(), language="json")
try:
    official = json.dumps(to_official(adapter, ws.plan), indent=4)
except PlanError as e:  # a kind with no official counterpart: say which instead of a button
    st.caption(f"No official Mamba-Shedder config for this plan: {e}")
else:
    st.download_button("Download as an official Mamba-Shedder config", official, file_name=f"{name}-pruning_config.json",
                       mime="application/json", key="export_download_official")
upload = st.file_uploader("Load a plan (our JSON, or an official Mamba-Shedder config)", type=["json"], key="export_upload")
if upload is not None:
    with ui.shown_errors():
        plan = adapter.validate(PruningPlan.from_json(upload.getvalue().decode("utf-8", errors="replace")))
        if st.session_state.get("export_upload_id") != upload.file_id:  # apply each upload once
            st.session_state["export_upload_id"] = upload.file_id
            ws.set_plan(plan)
        st.success(f"Loaded {upload.name}: {plan.describe()}.")

st.subheader("Pruned model")
out_dir = st.text_input("save to directory", value=f"pruned/{name}-{len(ws.plan)}-removed", key="export_dir")
timed = st.checkbox("also measure latency (slower)", value=False, key="export_timed")
if st.button("Extract and save", key="export_save", disabled=not out_dir.strip()):
    with ui.shown_errors(), st.spinner("Extracting…"):
        windows = ws.windows(s.evaluation)
        base, now = ws.metrics(PruningPlan()), ws.metrics(ws.plan)
        pruned = extract(loaded.model, ws.plan, adapter)
        measured = {"ppl": perplexity(pruned, windows), "ppl_original": base["ppl"], "params": now["params"],
                    "params_original": base["params"], "flops": now["flops"], "flops_original": base["flops"]}
        if timed:
            with ui.progress("timing the extracted model") as cb:
                measured.update(ws.latency(ws.plan, progress=cb))
        text = card.model_card(s.model, type(loaded.model).__name__, ws.plan, measured,
                               describe_protocol(windows, s.evaluation))
        path = save(pruned, loaded.tokenizer, out_dir.strip(), plan=ws.plan, card=text)
        st.success(f"Saved to `{path.resolve()}`; load it with `shedder.loading.load_model('{path}')`.")
        with st.expander("Model card (README.md)", expanded=True):
            st.markdown(text)
