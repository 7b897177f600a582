"""The Streamlit app driven headlessly with AppTest, page by page, on the bundled default model.

Sessions start with small windows (4 × 64 tokens, 20 accuracy passages) so every page runs in
seconds on a CPU; everything else is the app's own defaults.
"""
import json
import os
from pathlib import Path

import pytest

from shedder.arch import count_parameters
from shedder.formats.loading import BUNDLED_MODELS, DEFAULT_MODEL, load_model
from shedder.core.plan import Component, PruningPlan
from shedder.api import RecoverConfig, Recovered

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app.state import WORKSPACE_KEY, Settings, Workspace  # noqa: E402

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
PAGES = {"model": "../pages/1_Model.py", "importance": "../pages/2_Importance.py", "prune": "../pages/3_Prune.py",
         "search": "../pages/4_Search_and_frontier.py", "export": "../pages/5_Export.py",
         "recover": "../pages/6_Recover.py"}

if not (BUNDLED_MODELS / DEFAULT_MODEL / "config.json").is_file() and not os.environ.get("SHEDDER_MODEL"):
    pytest.skip(f"the bundled {DEFAULT_MODEL} model is missing from {BUNDLED_MODELS}", allow_module_level=True)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Importance scores are cached on disk: keep each test's cache to itself."""
    monkeypatch.setenv("SHEDDER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SHEDDER_ALLOW_SAVE", "1")  # AppTest has no server address: saving would be off
    monkeypatch.setenv("SHEDDER_EXPORT_ROOT", str(tmp_path))


def open_app(page: str = "model") -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=240)
    at.session_state[WORKSPACE_KEY] = Workspace(settings=Settings(samples=4, seq_len=64, accuracy_passages=20))
    at.run()
    if page != "model":
        at.switch_page(PAGES[page]).run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def workspace(at: AppTest) -> Workspace:
    return at.session_state[WORKSPACE_KEY]


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_model_page_reports_a_bad_model_path_in_the_page():
    at = open_app()
    at.radio(key="model_how").set_value("local directory").run()
    at.text_input(key="model_path").set_value("/no/such/model").run()
    at.button(key="model_load").click().run()
    assert not at.exception
    assert any("/no/such/model" in e.value for e in at.error)
    assert workspace(at).settings.model != "/no/such/model"  # the working setup is kept


def test_model_page_load_applies_new_window_settings():
    at = open_app()
    at.number_input(key="model_samples").set_value(2).run()
    at.button(key="model_load").click().run()
    assert_clean(at)
    assert workspace(at).settings.samples == 2
    assert "2 non-overlapping windows" in " ".join(c.value for c in at.caption)


def test_importance_scores_every_block_and_offers_csv():
    at = open_app("importance")
    at.multiselect(key="imp_kinds").set_value(["block"]).run()
    at.button(key="imp_compute").click().run()
    assert_clean(at)
    scores = workspace(at).importance
    n_layers = workspace(at).loaded.adapter.num_layers
    assert sorted(scores["layer"]) == list(range(n_layers)) and set(scores["kind"]) == {"block"}
    baseline = scores["ppl"] - scores["delta_ppl"]  # one shared baseline
    assert baseline.max() - baseline.min() < 1e-6 * baseline.max()
    assert len(at.get("plotly_chart")) == 2  # heatmap and per-layer bars
    assert at.get("download_button")
    at.toggle(key="imp_log").set_value(False).run()  # linear colour scale
    assert_clean(at)


def test_toggling_a_component_changes_the_live_numbers_and_undo_restores_them():
    at = open_app("prune")
    before_ppl, before_params = metric(at, "perplexity"), metric(at, "parameters")
    at.multiselect(key="prune_pick_block").set_value([Component("block", 1)]).run()
    assert_clean(at)
    assert workspace(at).plan.components == {Component("block", 1)}
    assert metric(at, "perplexity") != before_ppl
    assert metric(at, "parameters") != before_params
    at.button(key="prune_undo").click().run()
    assert_clean(at)
    assert not workspace(at).plan.components
    assert metric(at, "perplexity") == before_ppl


def test_latency_button_times_the_extracted_model(monkeypatch):
    from shedder.prune import frontier

    monkeypatch.setitem(frontier.BENCH_DEFAULTS, "budget_s", 0.5)  # behaviour, not speed
    monkeypatch.setitem(frontier.BENCH_DEFAULTS, "new_tokens", 2)
    at = open_app("prune")
    at.multiselect(key="prune_pick_block").set_value([Component("block", 1), Component("block", 2)]).run()
    at.button(key="prune_latency").click().run()
    assert_clean(at)
    ws = workspace(at)
    measured = ws.known(ws.plan)
    assert measured["latency_ms"] > 0 and measured["bench"]["pruned"]["params"] == ws.metrics(ws.plan)["params"]
    shown = next(m.value for m in at.markdown if "Measured on the extracted model" in m.value)
    assert f"prefill speedup **{measured['prefill_speedup_text']}**" in shown and "× [" in shown
    assert "expected from FLOPs" in shown and "decode speedup" in shown
    assert any("[95 % interval]" in c.value for c in at.caption)


def test_prune_page_shows_an_invalid_toggle_as_a_message():
    at = open_app("prune")
    at.multiselect(key="prune_pick_block").set_value([Component("block", 2)]).run()
    at.multiselect(key="prune_pick_ssm").set_value([Component("ssm", 2)]).run()
    assert not at.exception
    assert any("block 2" in e.value for e in at.error)
    assert workspace(at).plan.components == {Component("block", 2)}


def test_search_runs_two_steps_and_a_step_loads_into_the_prune_page():
    at = open_app("prune")
    at.multiselect(key="prune_pick_ssm").set_value([Component("ssm", 4)]).run()
    at.text_input(key="prune_name").set_value("my ssm plan").run()
    at.button(key="prune_save").click().run()
    at.switch_page(PAGES["search"]).run()
    at.number_input(key="search_steps").set_value(2).run()
    at.button(key="search_run").click().run()
    assert_clean(at)
    result = workspace(at).search
    assert [s.step for s in result.steps] == [1, 2]
    assert len(at.get("plotly_chart")) == 2  # trajectory and frontier
    frontier = at.dataframe[1].value
    assert {"unpruned", "step 2: − " + result.steps[1].component.words(), "my ssm plan", "current plan"} <= set(frontier["name"])
    at.selectbox(key="frontier_pick").set_value(2).run()  # entry 2 = search step 2
    at.button(key="frontier_load_btn").click().run()
    assert_clean(at)
    assert workspace(at).plan.components == result.steps[1].plan.components
    at.switch_page(PAGES["prune"]).run()
    assert_clean(at)
    assert workspace(at).plan.components == result.steps[1].plan.components


def test_prune_page_takes_the_first_k_greedy_steps():
    at = open_app("prune")
    at.number_input(key="prune_k").set_value(2).run()
    at.button(key="prune_greedy").click().run()
    assert_clean(at)
    ws = workspace(at)
    assert len(ws.plan.components) == 2 and ws.plan.components == ws.search.steps[1].plan.components


def test_export_round_trip_and_bad_uploads(tmp_path):
    at = open_app("prune")
    at.multiselect(key="prune_pick_block").set_value([Component("block", 0), Component("block", 3)]).run()
    at.switch_page(PAGES["export"]).run()
    assert_clean(at)
    exported = at.code[0].value  # the JSON the download button serves
    plan = PruningPlan.from_json(exported)
    assert plan.components == {Component("block", 0), Component("block", 3)}
    assert json.loads(exported)["meta"]["measured"]["ppl"] > 1
    # The plan names the model as the visitor chose it, never by the server path it was loaded from.
    assert json.loads(exported)["model"]["name"] == DEFAULT_MODEL == json.loads(exported)["meta"]["source_model"]
    assert str(Path(__file__).parents[1]) not in exported
    # whole blocks gone, every kept layer stock: the page says plain transformers loads the result
    assert any("stock checkpoint: loads with transformers" in c.value for c in at.caption)

    workspace(at).reset()
    at.file_uploader(key="export_upload").set_value(("plan.json", exported.encode(), "application/json")).run()
    assert_clean(at)
    assert workspace(at).plan.components == plan.components

    out = tmp_path / "pruned"
    at.text_input(key="export_dir").set_value(str(out)).run()
    at.button(key="export_save").click().run()
    assert_clean(at)
    assert PruningPlan.load(out / "pruning_plan.json").components == plan.components
    card = (out / "README.md").read_text()
    assert "| block | 3 | 0 |" in card and "Measured on the extracted model" in card
    assert "stock checkpoint: loads with transformers" in card
    assert any(f'from_pretrained("{out.resolve()}")' in c.value for c in at.code)
    saved, _ = load_model(str(out))
    assert count_parameters(saved) == workspace(at).metrics(plan)["params"]
    assert PruningPlan.load(out / "pruning_plan.json").model.name == DEFAULT_MODEL and str(tmp_path) not in card

    at.file_uploader(key="export_upload").set_value(("bad.json", b"{not json", "application/json")).run()
    assert not at.exception
    assert any("not valid JSON" in e.value for e in at.error)
    foreign = json.loads(exported)
    foreign["model"]["config_hash"] = "0" * 16
    at.file_uploader(key="export_upload").set_value(("other.json", json.dumps(foreign).encode(), "application/json")).run()
    assert any("another" in e.value for e in at.error)
    assert workspace(at).plan.components == plan.components  # bad uploads change nothing


def test_two_sessions_never_see_each_others_plans():
    one, two = open_app("prune"), open_app("prune")
    baseline = metric(two, "perplexity")
    one.multiselect(key="prune_pick_block").set_value([Component("block", 1)]).run()
    two.run()
    assert workspace(one).loaded.model is workspace(two).loaded.model  # weights shared
    assert not workspace(two).plan.components
    assert metric(two, "perplexity") == baseline != metric(one, "perplexity")


def test_shared_server_exports_as_a_download_and_confines_saves(tmp_path, monkeypatch):
    import io
    import zipfile

    monkeypatch.setenv("SHEDDER_ALLOW_SAVE", "0")
    at = open_app("prune")
    at.multiselect(key="prune_pick_block").set_value([Component("block", 2)]).run()
    at.switch_page(PAGES["export"]).run()
    assert_clean(at)
    assert not [t for t in at.text_input if t.key == "export_dir"]  # no server path to type
    at.button(key="export_save").click().run()
    assert_clean(at)
    name, data = at.session_state["export_zip"]
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert {"config.json", "model.safetensors", "pruning_plan.json"} <= {Path(n).name for n in z.namelist()}
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]  # nothing saved on the server

    monkeypatch.setenv("SHEDDER_ALLOW_SAVE", "1")
    at.run()
    for bad in ("../escape", "/etc", "."):
        at.text_input(key="export_dir").set_value(bad).run()
        at.button(key="export_save").click().run()
        assert any("outside the export directory" in e.value for e in at.error), bad
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]


def test_a_search_another_session_is_running_is_refused_with_a_message():
    from conftest import lock_held_by_another_process
    from shedder.prune.runs import LOCK_FILE
    from shedder.prune.search import default_run_dir

    at = open_app("search")
    ws = workspace(at)
    kinds = at.multiselect(key="search_kinds").value
    run = default_run_dir(ws.loaded.model, ws.windows(ws.settings.calibration), list(kinds))
    at.number_input(key="search_steps").set_value(1).run()
    with lock_held_by_another_process(run / LOCK_FILE):
        at.button(key="search_run").click().run()
        assert not at.exception
        assert [e.value for e in at.error] == ["Another session is running this search right now. Try again when it "
                                               "has finished; its steps are reused."]
    assert workspace(at).search is None and not (run / "log.jsonl").exists()


def test_model_page_runs_lm_eval_only_on_request_and_reuses_the_result():
    at = open_app()
    at.multiselect(key="model_tasks").set_value(["shedder_lastword"]).run()
    at.number_input(key="model_task_limit").set_value(2).run()
    assert_clean(at)
    assert not at.dataframe and any("Run lm-eval" in i.value for i in at.info)  # choosing tasks runs nothing
    at.button(key="model_run_lm_eval").click().run()
    assert_clean(at)
    result = workspace(at).downstream(PruningPlan(), ("shedder_lastword",), 2)
    assert result is not None and result.samples == {"shedder_lastword": 2}
    assert len(at.dataframe) == 1 and "relative accuracy" in " ".join(m.value for m in at.markdown)
    assert "lm-eval" in " ".join(c.value for c in at.caption)
    workspace(at)._downstream.clear()
    at.run()  # a new session with the same choice finds the result in the disk cache
    assert len(at.dataframe) == 1


def test_recover_page_trains_the_current_plan_and_the_frontier_links_it_to_its_pruned_point():
    at = open_app("recover")
    assert at.button(key="recover_run").disabled  # nothing removed yet
    workspace(at).set_plan(PruningPlan(frozenset({Component("block", 4)})))
    at.run()
    at.selectbox(key="recover_method").set_value("lora").run()
    at.number_input(key="recover_steps").set_value(2).run()
    at.button(key="recover_run").click().run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["model"])[:2] == ["unpruned", "pruned (current plan)"] and len(table) == 3
    recovered = workspace(at).recovered[0]
    assert recovered.summary["steps"] == 2 and recovered.metrics["ppl"] == pytest.approx(table["perplexity"].iloc[2])
    # Judged: the share won back or a warning that it got worse, the curve, the method's text in full.
    said = " ".join(m.value for m in [*at.success, *at.warning])
    assert ("Recovered" in said and "of the log-perplexity lost" in said) if not recovered.worse else "worse" in said
    assert METHOD_TEXT in " ".join(c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 1
    at.switch_page(PAGES["search"]).run()
    assert_clean(at)
    frontier = at.dataframe[0].value
    row = frontier[frontier["name"] == recovered.name].iloc[0]
    assert row["recovered from"] == "current plan"


def test_importance_page_scores_by_another_metric():
    """(The four-metric agreement matrix is walked by the browser test.)"""
    at = open_app("importance")
    at.selectbox(key="imp_metric").set_value("block_influence").run()
    assert [o for o in at.multiselect(key="imp_kinds_block_influence").options] == ["block (8)"]
    assert any("does not score ssm, head" in c.value for c in at.caption)
    at.button(key="imp_compute").click().run()
    assert_clean(at)
    assert any("1 forward pass" in c.value for c in at.caption)
    table = workspace(at).metric_tables[("block_influence", ("block",))]
    assert list(table["layer"]) == list(range(8)) and table["score"].between(0, 2).all()


@pytest.mark.parametrize("metric", ["ppl", "block_influence", "activation", "taylor"])
def test_importance_page_draws_every_metric_on_the_scale_its_values_call_for(metric):
    at = open_app("importance")
    at.selectbox(key="imp_metric").set_value(metric).run()
    kinds_key = "imp_kinds" if metric == "ppl" else f"imp_kinds_{metric}"
    at.multiselect(key=kinds_key).set_value([at.multiselect(key=kinds_key).options[0].split(" ")[0]]).run()
    at.button(key="imp_compute").click().run()
    assert_clean(at)
    said = " ".join(c.value for c in at.caption)
    ws = workspace(at)
    table = ws.importance if metric == "ppl" else next(iter(ws.metric_tables.values()))
    column = "delta_ppl" if metric == "ppl" else "score"
    signed = (table[column] < 0).any()
    assert ("diverging around zero" in said) == signed and ("sequential" in said) == (not signed)
    assert len(at.get("plotly_chart")) == 2  # the heatmap and the per-layer bars


def test_frontier_puts_strategies_side_by_side_with_measured_speed(monkeypatch):
    from shedder.prune import frontier

    monkeypatch.setitem(frontier.BENCH_DEFAULTS, "min_rounds", 1)  # one timed round per point: behaviour, not speed
    monkeypatch.setitem(frontier.BENCH_DEFAULTS, "budget_s", 0.01)
    monkeypatch.setitem(frontier.BENCH_DEFAULTS, "new_tokens", 2)
    at = open_app("search")
    at.multiselect(key="search_kinds").set_value(["ssm"]).run()
    at.number_input(key="search_steps").set_value(1).run()
    at.button(key="search_run").click().run()
    at.number_input(key="oneshot_k").set_value(1).run()
    at.button(key="oneshot_run").click().run()
    assert_clean(at)
    assert list(workspace(at).series) == ["greedy ssm", "one-shot block_influence (block)"]
    at.selectbox(key="frontier_x").set_value("prefill_speedup").run()
    at.button(key="frontier_lat").click().run()
    assert_clean(at)
    table = next(d.value for d in at.dataframe if "series" in d.value.columns)  # the frontier table
    assert set(table["series"]) == {"baseline", "greedy ssm", "one-shot block_influence (block)", "current"}
    speed = "measured prefill speedup (×)"  # human headers (X_AXES), not column ids
    assert table[speed].notna().all() and table["on the Pareto front"].any()
    assert table[f"{speed}, 95 % interval"].str.contains(r"× \[").all()  # every point with its interval
    assert "recovered from" not in table and "state_bytes" not in table  # no all-None or raw columns
    figure = json.loads(at.get("plotly_chart")[-1].proto.spec)
    series = [t for t in figure["data"] if t.get("name") not in ("Pareto front (all series)", None)]
    assert series and all("error_x" in t for t in series)  # error bars of the 95 % intervals
    assert any(any(str(m).endswith("-open") for m in t["marker"]["symbol"]) for t in series)  # unresolved points drawn hollow
    assert any("lower end of each measured speedup" in c.value for c in at.caption)

    at.switch_page(PAGES["prune"]).run()
    at.multiselect(key="prune_pick_block").set_value([Component("block", 0)]).run()
    at.button(key="prune_continue").click().run()
    assert_clean(at)
    original, pruned = [t.value for t in at.text][-2:]
    assert original.startswith("It is a truth") and pruned.startswith("It is a truth") and original != pruned


@pytest.mark.parametrize("bad,problem", [("a\x00b", "NUL byte"), ("x" * 300, "longer than 255 bytes"),
                                         ("new\nline", "control character"), ("...", "only dots")])
def test_export_page_refuses_an_unusable_name_with_one_message(tmp_path, bad, problem):
    at = open_app("export")
    at.text_input(key="export_dir").set_value(bad).run()
    at.button(key="export_save").click().run()
    assert not at.exception
    assert len(at.error) == 1 and problem in at.error[0].value and "a name is 1 to 255 bytes" in at.error[0].value
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]  # nothing written


def test_an_upload_with_an_unusable_name_is_stashed_and_named_as_uploaded(tmp_path):
    at = open_app()
    at.radio(key="calib_how").set_value("upload a .txt/.jsonl").run()
    name = "é" * 150 + "\x1b.txt"
    at.file_uploader(key="calib_file").set_value((name, b"Some words to read. " * 200, "text/plain")).run()
    at.button(key="model_load").click().run()
    assert_clean(at)
    ws = workspace(at)
    source = Path(ws.settings.calibration)
    assert source.is_file() and source.is_relative_to(tmp_path / "cache" / "uploads")
    assert len(source.name.encode()) <= 120 and ws.label(str(source)) == "upload " + "é" * 150 + "\\x1b.txt"


METHOD_TEXT = "low-rank adapters on the mixers' and MLPs' projections, merged at the end"


def test_recover_page_warns_when_recovery_made_the_model_worse():
    at = open_app("recover")
    ws = workspace(at)
    ws.set_plan(PruningPlan(frozenset({Component("block", 4)})))
    config = RecoverConfig(steps=2)
    summary = {"ppl": {"unpruned": 100.0, "pruned": 103.7, "recovered": 104.17}, "recovered_fraction": -0.13,
               "tokens": 512, "protocol": "p"}
    ws.recovered = [Recovered(ws.plan, config, "/nonexistent-run", summary, {"ppl": 104.2, "params": 1, "flops": 1.0})]
    at.run()
    assert_clean(at)
    assert any("made the model worse" in w.value and "103.7000 before, 104.1700 after" in w.value for w in at.warning)
    assert not at.success


def test_a_recovered_model_is_exported_from_the_export_page(tmp_path):
    import io
    import zipfile

    at = open_app("recover")
    workspace(at).set_plan(PruningPlan(frozenset({Component("block", 3)})))
    at.run()
    at.number_input(key="recover_steps").set_value(2).run()
    at.button(key="recover_run").click().run()
    assert_clean(at)
    recovered = workspace(at).recovered[0]
    at.switch_page(PAGES["export"]).run()
    assert_clean(at)
    at.radio(key="export_which").set_value(next(o for o in at.radio(key="export_which").options
                                                if o.startswith("recovered"))).run()
    out = tmp_path / "recovered-export"
    at.text_input(key="export_dir").set_value(str(out)).run()
    at.button(key="export_save_recovered").click().run()
    assert_clean(at)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pruning_plan.json", "recovery.json", "README.md"} <= names
    assert not names & {".lock", ".shedder-run"}
    assert str(Path(__file__).parents[1]) not in (out / "pruning_plan.json").read_text()
    reloaded, _ = load_model(str(out))
    assert count_parameters(reloaded) == recovered.metrics["params"]
    _, data = at.session_state["export_zip"]
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert "model.safetensors" in {Path(n).name for n in z.namelist()}


def test_searches_survive_a_model_switch_and_a_reload_through_the_runs_list():
    at = open_app("search")
    at.multiselect(key="search_kinds").set_value(["ssm"]).run()
    at.number_input(key="search_steps").set_value(2).run()
    at.multiselect(key="search_kinds").set_value(["block"]).run()
    assert at.number_input(key="search_steps").value == 2  # changing the kinds keeps the steps
    at.button(key="search_run").click().run()
    assert_clean(at)
    ws = workspace(at)
    assert [s.step for s in ws.search.steps] == [1, 2]
    ws.save_plan("mine", ws.search.steps[0].plan)
    series = set(ws.series)
    ws.configure(Settings(model="hybrid-tiny", samples=4, seq_len=64, accuracy_passages=20))
    assert not ws.series and not ws.saved
    ws.configure(Settings(samples=4, seq_len=64, accuracy_passages=20))
    assert set(ws.series) == series and "mine" in ws.saved  # switching back restores everything
    fresh = open_app("search")  # a reload: a new session, same model and text
    assert not workspace(fresh).series
    assert {r["type"] for r in workspace(fresh).runs()} >= {"search", "saved"}
    fresh.button(key="runs_restore_all").click().run()
    assert_clean(fresh)
    assert any("Restored" in m.value for m in fresh.success)
    series_caption = next(c.value for c in fresh.caption if c.value.startswith("Series: "))
    assert all(name in series_caption for name in series)  # the frontier is drawn after the restore
    assert set(workspace(fresh).series) == series and "mine" in workspace(fresh).saved


def test_search_stops_at_a_parameter_target_as_the_cli_does():
    at = open_app("search")
    at.multiselect(key="search_kinds").set_value(["block"]).run()
    at.number_input(key="search_steps").set_value(8).run()
    at.number_input(key="search_target").set_value(20.0).run()
    at.button(key="search_run").click().run()
    assert_clean(at)
    result = workspace(at).search
    assert "parameter target reached" in result.stopped and len(result.steps) < 8
