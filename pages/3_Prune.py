"""Prune page: a switchboard of components; every change re-measures the model live."""
import streamlit as st

from app import plots, ui
from shedder.api import describe_protocol, next_word_protocol
from shedder.core.plan import PruningPlan, in_kind_order

PENDING = "prune_pending"      # a change requested by a widget callback, applied by the page body
GENERATION = "prune_chart_gen"  # bumped after each chart click so the next chart starts unselected

ws = ui.ready()
s, loaded = ws.settings, ws.loaded
adapter = loaded.adapter
st.title("Prune")
st.write("Click a square to remove or restore that component (or use the pickers below it). The numbers "
         "are re-measured after every change; grey crosses are removed, faded squares sit inside a removed block.")

# -- apply what the widgets asked for (callbacks only record it, so errors show in the page) --------
pending = st.session_state.pop(PENDING, None)
if pending:
    with ui.shown_errors():
        action, *args = pending
        {"toggle": ws.toggle, "kind": ws.replace_kind, "undo": ws.undo, "reset": ws.reset}[action](*args)

# -- live numbers --------------------------------------------------------------------------------
with ui.shown_errors():
    base = ws.metrics(PruningPlan())
    with st.spinner("Measuring…"):
        now = ws.metrics(ws.plan)
    cols = st.columns(4)
    changed = bool(ws.plan.components)  # nothing removed: no arrows (a red "↑ +0.000" would say a change)
    cols[0].metric("perplexity", f"{now['ppl']:.3f}", delta=ui.delta(f"{now['ppl'] - base['ppl']:+.3f}") if changed else None,
                   delta_color="inverse")
    cols[1].metric("parameters", ui.fmt_count(now["params"]),
                   delta=ui.delta(f"{now['params'] / base['params'] - 1:+.1%}") if changed else None, delta_color="inverse")
    cols[2].metric("FLOPs / token", ui.fmt_count(now["flops"]),
                   delta=ui.delta(f"{now['flops'] / base['flops'] - 1:+.1%}") if changed else None, delta_color="inverse")
    with_accuracy = cols[3].toggle("next-word accuracy", value=False, key="prune_accuracy",
                                   help="Slower: one forward per passage.")
    if with_accuracy:
        with ui.progress("next-word accuracy") as cb:
            acc, acc0 = ws.accuracy(ws.plan, progress=cb), ws.accuracy(PruningPlan(), progress=cb)
        cols[3].metric("next-word accuracy", f"{acc:.1%}", delta=ui.delta(f"{(acc - acc0) * 100:+.1f} pts"))
    st.caption(f"**Removed:** {ws.plan.describe()}. Perplexity: "
               + describe_protocol(ws.windows(s.evaluation), ws.label(s.evaluation)) + "; deltas vs the unpruned model."
               + (f" Accuracy: {next_word_protocol(ws.label(s.evaluation), s.accuracy_passages)}." if with_accuracy else ""))
    st.caption(ui.defaults_note())
    latency = ws.known(ws.plan)
    if st.button("Measure latency of the extracted model", key="prune_latency"):
        with ui.progress("timing the extracted model") as cb:
            latency = ws.latency(ws.plan, progress=cb)
    if "latency_ms" in latency:
        st.write(f"Measured on the extracted model ({s.seq_len}-token prompt, {s.device}, {s.dtype}): prefill speedup "
                 f"**{latency['prefill_speedup_text']}**, {latency['expected_prefill_speedup']:.2f}× expected from FLOPs; decode "
                 f"speedup **{latency['decode_speedup_text']}**, {latency['expected_decode_speedup']:.2f}× expected.")
        st.caption("Speedup: median of paired rounds (original and extracted timed back to back, order alternating) "
                   "[95 % interval], rounds. Supporting figure, per model: time to first token "
                   f"{latency['latency_ms']:.1f} ms extracted, {latency['original_latency_ms']:.1f} ms original (medians).")
        for reason in latency.get("gap_reasons", []):
            st.caption(f"Why measured and expected differ: {reason}")

# -- what the change means in words --------------------------------------------------------------
with st.expander("See the text: the original and the current plan continue the same prompt", expanded=False):
    t1, t2 = st.columns([4, 1])
    prompt = t1.text_input("prompt", value="It is a truth universally acknowledged, that", key="prune_prompt")
    tokens = t2.number_input("tokens", min_value=1, max_value=128, value=32, key="prune_tokens")
    asked = st.button("Continue the prompt", key="prune_continue", disabled=not prompt.strip())
    # Shown again on later reruns (another click on the page) while the prompt and plan are the ones generated for.
    known = all(ws.has_continuation(plan, prompt, int(tokens)) for plan in (PruningPlan(), ws.plan))
    if asked or (known and prompt.strip()):
        with ui.shown_errors(), st.spinner("Generating…"):
            original, pruned = (ws.continuation(plan, prompt, int(tokens)) for plan in (PruningPlan(), ws.plan))
            o, p = st.columns(2)
            o.markdown("**Original model**")
            o.text(prompt + original)
            p.markdown(f"**Current plan** ({ws.plan.describe()})")
            p.text(prompt + pruned)
            st.caption(f"Greedy decoding of {int(tokens)} tokens; the current plan runs as a live mask, which computes "
                       "what the extracted model computes.")

# -- switchboard ---------------------------------------------------------------------------------
offered = list(adapter.kind_counts())
kinds = in_kind_order(st.multiselect("show kinds", offered, default=offered, key="prune_kinds") or offered[:1])
fig, lookup = plots.switchboard(adapter, ws.plan, kinds, ws.importance)
chart_key = f"prune_chart_{st.session_state.setdefault(GENERATION, 0)}"


def clicked() -> None:
    points = st.session_state[chart_key].selection.points
    if points:
        p = points[0]
        st.session_state[PENDING] = ("toggle", lookup[p["curve_number"]][p["point_index"]])
    st.session_state[GENERATION] += 1


st.plotly_chart(fig, key=chart_key, on_select=clicked, selection_mode="points")


def picked(kind: str) -> None:
    st.session_state[PENDING] = ("kind", kind, st.session_state[f"prune_pick_{kind}"])


pickers = st.columns(min(3, len(kinds)))
for i, kind in enumerate(kinds):
    col = pickers[i % len(pickers)]
    st.session_state[f"prune_pick_{kind}"] = ws.plan.of_kind(kind)  # the pickers mirror the current plan
    col.multiselect(f"removed {ui.KIND_LABELS.get(kind, kind)}", adapter.components(kind), key=f"prune_pick_{kind}",
                    format_func=lambda c: f"layer {c.layer}" if c.kind in ui.WHOLE_KINDS else f"layer {c.layer} #{c.index}",
                    on_change=picked, args=(kind,))

# -- plan actions --------------------------------------------------------------------------------
a, b, c, d = st.columns([1, 1, 3, 3])
a.button("Undo", key="prune_undo", disabled=not ws.history, on_click=lambda: st.session_state.update({PENDING: ("undo",)}))
b.button("Reset", key="prune_reset", disabled=not ws.plan.components, on_click=lambda: st.session_state.update({PENDING: ("reset",)}))
with c:
    greedy_kinds = st.multiselect("greedy search kinds", offered, default=offered[:1], key="prune_greedy_kinds")
    k = st.number_input("K", min_value=1, max_value=10_000, value=1, key="prune_k")  # fixed bounds: never reset
    go, stop = st.columns([3, 1])
    with stop:
        ui.cancel_button("prune_greedy_cancel")
    if go.button("Take the first K greedy steps", key="prune_greedy", disabled=not greedy_kinds):
        with ui.shown_errors(busy=ui.BUSY_SEARCH), ui.progress("greedy search") as cb:
            steps = ws.greedy(greedy_kinds, int(k), progress=cb).steps
        if steps:
            ws.set_plan(steps[min(int(k), len(steps)) - 1].plan)
            st.rerun()
with d:
    name = st.text_input("plan name", value=f"plan {len(ws.saved) + 1}", key="prune_name")
    if st.button("Save for the frontier", key="prune_save", disabled=not name.strip()):
        ws.save_plan(name.strip())
        st.success(f"Saved “{name.strip()}”: it appears on the Search & frontier page.")
