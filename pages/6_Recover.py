"""Recover page: fine-tune the current plan's pruned model (LoRA, full, or distillation from the
unpruned model), watch its training and held-out loss, and judge it against the pruned and the
unpruned model: the share of the lost perplexity it won back, and a warning when it made things worse."""
import pandas as pd
import streamlit as st

from app import nav, plots, ui
from shedder import api
from shedder.api import METHODS, RecoverConfig, describe_protocol
from shedder.core.plan import PruningPlan

METHOD_HELP = {"lora": "low-rank adapters on the mixers' and MLPs' projections, merged at the end",
               "full": "every parameter of the pruned model",
               "distill": "every parameter, trained to match the unpruned model's next-token distribution"}
#: What the training curve of each method measures.
OBJECTIVE = {"lora": "next-token loss", "full": "next-token loss", "distill": "distillation loss"}

ws = ui.ready()
s = ws.settings
st.title("Recover")
st.write(f"**Current plan:** {ws.plan.describe()}")
st.write("Recovery trains the extracted pruned model on text that is never the evaluation text (by default the "
         "shipped training sample of the bundled corpus), then measures it like every other configuration.")

c1, c2, c3 = st.columns(3)
method = c1.selectbox("method", METHODS, key="recover_method")
c1.caption(METHOD_HELP[method])
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
    chart = st.empty()
    run_dir = api.plan_run_dir(s.model, ws.plan, config)

    with ui.shown_errors(), ui.progress("recovering") as bar:
        def cb(done: int, total: int, message: str = "") -> None:
            bar(done, total, message)
            if done % 10 == 0 or done == total:  # the log has a new point every 10 steps
                chart.plotly_chart(plots.loss_curve(api.curve(run_dir), OBJECTIVE[method]), key=f"recover_live_{done}")

        done = ws.recover(config, progress=cb)
        chart.empty()
        st.success(f"{done.name.capitalize()} is kept with this session's runs; the Export page exports it.")

rows = [{"model": "unpruned", **ws.metrics(PruningPlan())}]
if ws.plan.components:
    rows.append({"model": "pruned (current plan)", **ws.metrics(ws.plan)})
mine = [r for r in ws.recovered if r.plan == ws.plan]
rows += [{"model": r.name, **r.metrics} for r in mine]
table = pd.DataFrame(rows)[["model", "ppl", "params", "flops"]]
st.dataframe(table.rename(columns={"ppl": "perplexity", "params": "parameters", "flops": "FLOPs / token"}),
             hide_index=True, key="recover_table")
st.caption("Perplexity on the evaluation text: " + describe_protocol(ws.windows(s.evaluation), s.evaluation) + ".")
for i, r in enumerate(mine):
    st.subheader(r.name)
    ppl = r.summary.get("ppl", {})
    if r.worse:
        st.warning(f"This recovery made the model worse: held-out perplexity {ppl['pruned']:.4f} before, "
                   f"{ppl['recovered']:.4f} after. Try fewer steps, a lower learning rate or another method.")
    elif r.fraction is not None:
        st.success(f"Recovered {100 * r.fraction:.1f}% of the log-perplexity lost to pruning "
                   f"(held-out perplexity {ppl['unpruned']:.4f} unpruned, {ppl['pruned']:.4f} pruned, "
                   f"{ppl['recovered']:.4f} recovered).")
    elif {"unpruned", "pruned", "recovered"} <= set(ppl):  # pruning cost nothing there: no share to state
        st.info(f"Pruning cost nothing on the held-out windows (perplexity {ppl['unpruned']:.4f} unpruned, "
                f"{ppl['pruned']:.4f} pruned), so no share of a loss can be stated; recovered: "
                f"{ppl['recovered']:.4f}.")
    st.caption(f"Held-out protocol: {r.summary.get('protocol', '')}.")
    st.plotly_chart(plots.loss_curve(r.curve(), OBJECTIVE[r.config.method]), key=f"recover_curve_{i}")
    with st.expander("recipe and held-out numbers"):
        st.json(r.summary)
if ws.recovered:
    st.page_link(nav.page("search"), label="See recovered models on the frontier", icon=":material/show_chart:")
