"""The state of the studio's controls, driven headlessly with AppTest: values that stay as typed, the
CLI's stop criteria reaching the search, a Cancel beside every long action, buttons disabled when
they would do nothing, no arrow for a change that is not there, and the defaults stated where the
numbers show. Same small windows as ``test_app``."""
import pytest

from shedder.core.plan import Component

from app import ui
from app.state import Workspace
from test_app import assert_clean, open_app, private_cache, workspace

pytestmark = pytest.mark.usefixtures(private_cache.__name__)  # each test its own score cache and export root

#: The long actions of each page and the Cancel drawn beside them (a click on it interrupts the work).
LONG_ACTIONS = {
    "model": {"model_accuracy": "model_accuracy_cancel", "model_run_lm_eval": "model_lm_eval_cancel"},
    "importance": {"imp_compute": "imp_cancel", "agree_run": "agree_cancel"},
    "prune": {"prune_greedy": "prune_greedy_cancel"},
    "search": {"search_run": "search_cancel", "oneshot_run": "oneshot_cancel", "stock_run": "stock_cancel"},
    "recover": {"recover_run": "recover_cancel"},
}


def keys(at) -> set:
    return {b.key for b in at.button}


def test_steps_keep_their_value_when_the_kinds_change():
    at = open_app("search")
    at.number_input(key="search_steps").set_value(3).run()
    for kinds in (["ssm"], ["block", "ssm"], ["block"]):
        at.multiselect(key="search_kinds").set_value(kinds).run()
        assert at.number_input(key="search_steps").value == 3, kinds
    assert_clean(at)


def test_stop_criteria_are_offered_and_reach_the_search(monkeypatch):
    asked = []
    monkeypatch.setattr(Workspace, "greedy",
                        lambda self, kinds, steps, progress=None, **limits: asked.append((kinds, steps, limits)))
    at = open_app("search")
    assert {"search_target", "search_max_ppl"} <= {n.key for n in at.number_input}
    at.button(key="search_run").click().run()  # 0 = no limit
    at.number_input(key="search_target").set_value(25.0).run()
    at.number_input(key="search_max_ppl").set_value(150.0).run()
    at.button(key="search_run").click().run()
    assert [a[2] for a in asked] == [dict(target_params=None, max_ppl=None, race=False),
                                     dict(target_params=0.25, max_ppl=150.0, race=False)]


def test_a_perplexity_limit_stops_the_search_before_the_step_that_exceeds_it():
    at = open_app("search")
    at.multiselect(key="search_kinds").set_value(["block"]).run()
    at.number_input(key="search_max_ppl").set_value(1.5).run()  # every removal of a block is above it
    at.button(key="search_run").click().run()
    assert_clean(at)
    result = workspace(at).search
    assert not result.steps and "> max_ppl 1.5" in result.stopped


@pytest.mark.parametrize("page", LONG_ACTIONS)
def test_every_long_action_has_a_cancel_beside_it(page):
    at = open_app(page)
    if page == "recover":  # Recover trains the current plan: give it one
        workspace(at).toggle(Component("block", 1))
        at.run()
    if page == "model":  # lm-eval's button shows once a task is chosen
        at.multiselect(key="model_tasks").set_value(["shedder_lastword"]).run()
    shown = keys(at)
    for action, cancel in LONG_ACTIONS[page].items():
        assert action in shown and cancel in shown, (action, cancel)
        assert at.button(key=cancel).label == "Cancel"


def test_measuring_every_frontier_point_can_be_cancelled():
    at = open_app("search")
    assert "frontier_lat_cancel" not in keys(at)  # drawn with its button only
    at.selectbox(key="frontier_x").set_value("prefill_speedup").run()
    assert {"frontier_lat", "frontier_lat_cancel"} <= keys(at)


def test_reset_and_undo_are_disabled_with_nothing_removed():
    at = open_app("prune")
    assert at.button(key="prune_reset").disabled and at.button(key="prune_undo").disabled
    at.multiselect(key="prune_pick_block").set_value([Component("block", 1)]).run()
    assert not at.button(key="prune_reset").disabled and not at.button(key="prune_undo").disabled
    at.button(key="prune_reset").click().run()
    assert_clean(at)
    assert not workspace(at).plan.components and at.button(key="prune_reset").disabled


def test_no_change_is_shown_without_an_arrow():
    at = open_app("prune")
    assert [m.delta for m in at.metric] == ["", "", ""]  # nothing removed: no delta, so no arrow
    at.multiselect(key="prune_pick_block").set_value([Component("block", 1)]).run()
    assert all(m.delta and m.delta[0] in "+-" and any(c in "123456789" for c in m.delta) for m in at.metric)
    assert ui.delta("+0.000") is None and ui.delta("-0.0%") is None and ui.delta("+0.0 pts") is None
    assert ui.delta("+0.012") == "+0.012"


@pytest.mark.parametrize("page", ["model", "prune", "search"])
def test_pages_with_perplexity_say_the_app_and_cli_defaults(page):
    at = open_app(page)
    note = ui.defaults_note()
    assert any(note in c.value for c in at.caption), [c.value for c in at.caption]
    assert "8 × 128-token windows" in note and "`eval`" in note and "256" in note
