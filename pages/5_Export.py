"""Export page: the plan as JSON (down and up), and the physically smaller model (extracted from the
current plan, or a recovered model of this session) as a zip download and, where the server allows it
(``app.hosting``), on the server's disk under its export directory. Nothing exported names a server
path: plans carry the model's public name."""
import json
from pathlib import Path

import streamlit as st

from app import ui
from app.hosting import hosting
from shedder import api
from shedder.core.errors import PlanError
from shedder.core.fileio import check_output_dir, inside
from shedder.core.plan import PruningPlan

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Export")
st.write(f"**Current plan:** {ws.plan.describe()}")

st.subheader("Plan file")
name = s.model_name  # never a server path
known = {k: v for k, v in ws.known(ws.plan).items() if k in ("ppl", "params", "flops", "accuracy", "latency_ms")}
recorded = PruningPlan(ws.plan.components, api.public_plan(ws.plan, name).model, dict(ws.plan.group_sizes),
                       {**ws.plan.meta, "source_model": name, "measured": known,
                        "protocol": api.describe_protocol(ws.windows(s.evaluation), ws.label(s.evaluation))})
st.download_button("Download plan (JSON)", recorded.to_json(), file_name=f"{name}-plan.json", mime="application/json",
                   key="export_download", type="primary")
with st.expander("Show the JSON"):
    st.code(recorded.to_json(), language="json")
try:
    official = json.dumps(api.to_official(adapter, ws.plan), indent=4)
except PlanError as e:  # a kind with no official counterpart: say which instead of a button
    st.caption(f"No official Mamba-Shedder config for this plan: {e}")
else:
    st.download_button("Download as an official Mamba-Shedder config", official, file_name=f"{name}-pruning_config.json",
                       mime="application/json", key="export_download_official")
upload = st.file_uploader("Load a plan (our JSON, or an official Mamba-Shedder config)", type=["json"], key="export_upload")
if upload is not None:
    with ui.shown_errors():
        plan = adapter.resolve(api.read_plan(upload.getvalue()))
        if st.session_state.get("export_upload_id") != upload.file_id:  # apply each upload once
            st.session_state["export_upload_id"] = upload.file_id
            ws.set_plan(plan)
        st.success(f"Loaded {upload.name}: {plan.describe()}.")

st.subheader("Pruned model")
host = hosting()
recovered = {f"{r.name} of: {r.plan.describe()}": r for r in ws.recovered}
which = st.radio("export", ["the current plan, extracted", *recovered], key="export_which",
                 help="A recovered model (Recover page) is exported as it was saved after training.")
chosen = recovered.get(which)
st.caption("The exported model: " + api.load_line(api.stock_shaped(adapter, chosen.plan if chosen else ws.plan),
                                                  "<the saved directory>"))
default_dir = (f"{name}-{len(chosen.plan.components)}-removed-{chosen.config.method}" if chosen else
               f"{name}-{len(ws.plan.components)}-removed")
if host.allow_save:
    out_dir = st.text_input(f"save to directory (inside `{host.export_root}`)", value=default_dir, key="export_dir")
    overwrite = st.checkbox("replace it if it is a previous export", value=False, key="export_overwrite",
                            help="Only a directory this tool exported is ever replaced.")
else:
    out_dir, overwrite = "", False
    st.info("Saving on the server is off here: the model is offered as a zip download. "
            "(Whoever runs the server can allow saves with SHEDDER_ALLOW_SAVE=1; see docs/serving.md.)")
timed = chosen is None and st.checkbox("also measure latency (slower)", value=False, key="export_timed")
label = ("Save" if host.allow_save else "Prepare the download") if chosen else \
    ("Extract and save" if host.allow_save else "Extract")
if chosen and st.button(label, key="export_save_recovered", disabled=host.allow_save and not out_dir.strip()):
    with ui.shown_errors(), st.spinner("Copying the recovered model…"):
        target = inside(host.export_root, out_dir.strip()) if host.allow_save else None
        folder = default_dir if target is None else target.name
        path, text, data = api.export_recovered(chosen.run_dir, folder, target=target, overwrite=overwrite)
        st.session_state["export_zip"] = (f"{folder}.zip", data)
        if path is not None:
            st.success(f"Saved to `{path}`.")
        with st.expander("Model card (README.md)", expanded=True):
            st.markdown(text)
if not chosen and st.button(label, key="export_save", disabled=host.allow_save and not out_dir.strip()):
    with ui.shown_errors(), st.spinner("Extracting…"):
        target = inside(host.export_root, out_dir.strip()) if host.allow_save else None
        if target is not None:
            check_output_dir(target, overwrite)  # before the work, so a refusal costs nothing
        windows = ws.windows(s.evaluation)
        base, now = ws.metrics(PruningPlan()), ws.metrics(ws.plan)
        measured = {"ppl_original": base["ppl"], "params": now["params"], "params_original": base["params"],
                    "flops": now["flops"], "flops_original": base["flops"]}
        if timed:
            with ui.progress("timing the extracted model") as cb:
                measured.update(ws.latency(ws.plan, progress=cb))
        folder = default_dir if target is None else target.name
        source = api.resolve(s.model)
        done, data = api.export_zip(loaded.model, loaded.tokenizer, adapter, api.public_plan(ws.plan, name), folder, name,
                                    target=target,
                                    overwrite=overwrite, protected=[source] if Path(source).exists() else [],
                                    measured=measured, windows=windows,
                                    protocol=api.describe_protocol(windows, ws.label(s.evaluation)))
        path, text = done.out, done.card
        st.session_state["export_zip"] = (f"{folder}.zip", data)
        if target is not None:
            st.success(f"Saved to `{path}`.")
        st.code(done.load_line if target is not None else api.load_line(done.stock), language="text")
        with st.expander("Model card (README.md)", expanded=True):
            st.markdown(text)
if "export_zip" in st.session_state:
    zip_name, data = st.session_state["export_zip"]
    st.download_button(f"Download the model ({zip_name}, {len(data) / 2**20:.1f} MiB)", data, file_name=zip_name,
                       mime="application/zip", key="export_zip_download")
