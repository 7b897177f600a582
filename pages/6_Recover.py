"""Recover page: fine-tune the current plan's pruned model (LoRA, full, or distillation from the
unpruned model) and compare it with the pruned and the unpruned model."""
import pandas as pd
import streamlit as st

from app import nav, ui
from shedder.api import METHODS, RecoverConfig, describe_protocol
from shedder.core.plan import PruningPlan

METHOD_HELP = {"lora": "low-rank adapters on the mixers' and MLPs' projections, merged at the end",
               "full": "every parameter of the pruned model",
               "distill": "every parameter, trained to match the unpruned model's next-token distribution"}

ws = ui.ready()
s = ws.settings
st.title("Recover")
st.write(f"**Current plan:** {ws.plan.describe()}")
st.write("Recovery trains the extracted pruned model on text that is never the evaluation text (by default the "
         "shipped training sample of the bundled corpus), then measures it like every other configuration.")

c1, c2, c3 = st.columns(3)
method = c1.selectbox("method", METHODS, format_func=lambda m: f"{m}: {METHOD_HELP[m]}", key="recover_method")
steps = c2.number_input("steps", min_value=1, max_value=100_000, value=30, key="recover_steps")
data = c3.text_input("training text", value="train", key="recover_data",
                     help="train (shipped training sample), a .txt/.jsonl path or hf:DATASET[:CONFIG]:SPLIT")
config = RecoverConfig(method=method, steps=int(steps), data=data.strip() or "train", batch_size=8,
                       seq_len=s.seq_len, eval_samples=s.samples)
st.caption(f"Recipe: {config.describe()}.")
run_col, cancel_col, _ = st.columns([2, 1, 5])
run = run_col.button("Recover", type="primary", key="recover_run", disabled=not ws.plan.components)
with cancel_col:
    ui.cancel_button("recover_cancel")
if run:
    with ui.shown_errors(), ui.progress("recovering") as cb:
        done = ws.recover(config, progress=cb)
        st.success(f"Recovered model saved in `{done.run_dir}`.")

rows = [{"model": "unpruned", **ws.metrics(PruningPlan())}]
if ws.plan.components:
    rows.append({"model": "pruned (current plan)", **ws.metrics(ws.plan)})
rows += [{"model": r.name, **r.metrics} for r in ws.recovered if r.plan == ws.plan]
table = pd.DataFrame(rows)[["model", "ppl", "params", "flops"]]
st.dataframe(table.rename(columns={"ppl": "perplexity", "flops": "FLOPs / token"}), hide_index=True, key="recover_table")
st.caption("Perplexity on the evaluation text: " + describe_protocol(ws.windows(s.evaluation), s.evaluation) + ".")
for r in ws.recovered:
    if r.plan == ws.plan:
        with st.expander(f"{r.name}: recipe and held-out numbers"):
            st.json(r.summary)
if ws.recovered:
    st.page_link(nav.page("search"), label="See recovered models on the frontier", icon=":material/show_chart:")
