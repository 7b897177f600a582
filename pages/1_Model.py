"""Model page: choose the model and the text, see the architecture and the baseline numbers."""
import contextlib
from dataclasses import replace

import streamlit as st
import torch

from app import plots, state, ui
from app.hosting import hosting
from shedder.api import (DEFAULT_MODEL, LOCAL_TASKS, OFFICIAL, PAPER_TASKS, PROTOCOLS, bundled_models, describe_protocol,
                         next_word_protocol, require_lm_eval)
from shedder.core.plan import PruningPlan

ws = state.workspace()
s = ws.settings
st.title("Model")
st.write("Pick a Mamba-family model and the text its numbers are measured on, then press **Load**. "
         "The defaults (the bundled `mamba2-tiny` and the bundled Austen text) work offline.")


def text_source(label: str, key: str, current: str) -> str | None:
    """A text source for ``shedder.measure.data.load_text``: bundled split, uploaded file or datasets id."""
    options = ["bundled", "upload a .txt/.jsonl", "datasets id"]
    start = 0 if current in ("calibration", "test") else (2 if current.startswith("hf:") else 1)
    how = st.radio(label, options, index=start, key=f"{key}_how", horizontal=True)
    if how == "bundled":
        splits = ["calibration", "test"]
        return st.selectbox("bundled split", splits, index=splits.index(current) if current in splits else 0,
                            key=f"{key}_split")
    if how == "datasets id":
        ds = st.text_input("dataset id", value="wikitext", key=f"{key}_ds")
        config = st.text_input("config (optional)", value="wikitext-2-raw-v1", key=f"{key}_cfg")
        split = st.text_input("split", value="test", key=f"{key}_dsplit")
        return f"hf:{ds}:{config}:{split}" if config.strip() else f"hf:{ds}:{split}"
    upload = st.file_uploader("text file", type=["txt", "jsonl"], key=f"{key}_file")
    return ws.stash_upload(upload.name, upload.getvalue()) if upload else None


left, right = st.columns(2)
with left:
    st.subheader("Model")
    bundled = bundled_models() or [DEFAULT_MODEL]
    where = st.radio("source", ["bundled", "local directory", "hub id"], horizontal=True, key="model_how",
                     index=0 if s.model in bundled else 1)
    if where == "bundled":
        model = st.selectbox("bundled model", bundled, key="model_bundled",
                             index=bundled.index(s.model) if s.model in bundled else 0)
    elif where == "local directory":
        model = st.text_input("model directory", value="" if s.model in bundled else s.model, key="model_path")
    else:
        model = st.text_input("hub id", value="state-spaces/mamba-130m-hf", key="model_hub")
    trust = where == "hub id" and hosting().allow_remote_code and st.checkbox(
        "trust remote code", value=False, key="model_trust",
        help="Only for checkpoints that need custom code; off by default.")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if torch.backends.mps.is_available() else [])
    device = st.selectbox("device", devices, index=devices.index(s.device) if s.device in devices else 0, key="model_device")
    dtypes = ["float32", "bfloat16", "float16"]
    dtype = st.selectbox("dtype", dtypes, index=dtypes.index(s.dtype), key="model_dtype")
with right:
    st.subheader("Text")
    calibration = text_source("calibration text (importance, search)", "calib", s.calibration)
    evaluation = text_source("evaluation text (live perplexity, accuracy)", "eval", s.evaluation)
    protocols = list(PROTOCOLS)
    protocol = st.radio("calibration protocol", protocols, index=protocols.index(s.protocol), horizontal=True,
                        key="model_protocol",
                        help="shedder: the first windows of the calibration text. official: the Mamba-Shedder "
                             f"code's sampling ({OFFICIAL.rows} rows of the 10 % part of an 80/10/10 split with seed "
                             f"{OFFICIAL.seed} of a datasets id or a .json/.jsonl with a 'text' field, e.g. "
                             f"{OFFICIAL.source}; joined, cut into {OFFICIAL.seq_len}-token windows, batch "
                             f"{OFFICIAL.batch_size}).")
    c1, c2, c3 = st.columns(3)
    samples = c1.number_input("windows", min_value=1, max_value=4096, value=s.samples, key="model_samples",
                              help="Non-overlapping windows per text (the official calibration protocol instead "
                                   f"samples {OFFICIAL.rows} rows and cuts {OFFICIAL.seq_len}-token windows).")
    seq_len = c2.number_input("window length", min_value=8, max_value=8192, value=s.seq_len, step=32, key="model_seq_len")
    passages = c3.number_input("accuracy passages", min_value=1, max_value=5000, value=s.accuracy_passages,
                               key="model_passages")

if st.button("Load", type="primary", key="model_load"):
    if not model or not calibration or not evaluation:
        st.error("Choose a model and both texts first (an upload source needs a file).")
    else:
        with ui.shown_errors():
            ws.configure(replace(ws.settings, model=model.strip(), dtype=dtype, device=device, trust_remote_code=trust,
                                 calibration=calibration, protocol=protocol, evaluation=evaluation, samples=int(samples),
                                 seq_len=int(seq_len), accuracy_passages=int(passages)))
            st.success(f"Loaded {model}.")

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.divider()
st.subheader(f"{s.model} · {type(loaded.model).__name__}")
st.plotly_chart(plots.architecture_strip(adapter), key="arch_strip")
with ui.shown_errors():
    base = ws.metrics(PruningPlan())
    cols = st.columns(4)
    cols[0].metric("parameters", ui.fmt_count(base["params"]))
    cols[1].metric("layers", adapter.num_layers)
    cols[2].metric("FLOPs / token (prefill)", ui.fmt_count(base["flops"]))
    cols[3].metric("perplexity", f"{base['ppl']:.3f}")
    st.caption("Perplexity: " + describe_protocol(ws.windows(s.evaluation), ws.label(s.evaluation))
               + ". FLOPs: analytic count of the model at this window length.")
    st.caption(ui.defaults_note())
    counts = adapter.kind_counts()
    st.write("**Removable components:** " + ", ".join(f"{n} {ui.KIND_LABELS.get(k, k)} (`{k}`)" for k, n in counts.items()))
    # Measured on request only (one forward per passage: slow on a loaded machine), then known to every session.
    acc = ws.known(PruningPlan()).get("accuracy")  # measured here before, or kept on disk by an earlier session
    slot = st.empty()
    if acc is None:
        with slot.container():  # the Cancel stays beside the button while the passages run
            measure_col, stop_col, _ = st.columns([2, 1, 5])
            measure = measure_col.button("Measure next-word accuracy", key="model_accuracy",
                                         help=f"One forward per passage ({s.accuracy_passages} passages); "
                                              "remembered on disk.")
            with stop_col:
                ui.cancel_button("model_accuracy_cancel")
        if measure:
            with ui.progress("next-word accuracy") as cb:
                acc = ws.accuracy(PruningPlan(), progress=cb)
            slot.empty()
    if acc is not None:
        st.metric("next-word accuracy", f"{acc:.1%}")
        st.caption(next_word_protocol(ws.label(s.evaluation), s.accuracy_passages))

# -- lm-eval accuracy (run on request only; results come back from the session or the disk cache) ----------
st.divider()
st.subheader("Downstream accuracy (lm-eval)")
task_options = list(LOCAL_TASKS + PAPER_TASKS)
tasks = st.multiselect("tasks", task_options, default=[], key="model_tasks",
                       help="Zero-shot lm-eval tasks. shedder_lastword and shedder_choice are bundled and run offline; "
                            "the paper's seven download their data from the hub.")
limit = st.number_input("examples per task (0 = all)", min_value=0, value=50, step=10, key="model_task_limit")
if tasks:
    limit_or_all = int(limit) or None
    plans = {"unpruned": PruningPlan()} | ({"current plan": ws.plan} if ws.plan.components else {})
    run_col, stop_col, _ = st.columns([2, 1, 5])
    run = run_col.button("Run lm-eval", key="model_run_lm_eval", type="primary")
    with stop_col:
        ui.cancel_button("model_lm_eval_cancel")
    with ui.shown_errors():
        if run:
            require_lm_eval()
        found = {}
        for name, plan in plans.items():
            with (ui.progress(f"lm-eval: {name}") if run else contextlib.nullcontext(None)) as cb:
                found[name] = ws.downstream(plan, tuple(tasks), limit_or_all, progress=cb, run=run)
        base = found["unpruned"]
        if base is None:
            st.info("Press **Run lm-eval** to score the chosen tasks (results are cached on disk).")
        else:
            for name, result in found.items():
                if result is None:
                    continue
                st.write(f"**{name}**: average {result.average:.4f}, relative accuracy {result.relative_text(base)}")
                st.dataframe(result.rows(base), hide_index=True, key=f"model_lm_eval_{name}")
            st.caption(base.protocol())
