"""The Recover page's judgement when pruning cost nothing on the held-out windows: no share of a loss
can be stated, and the page says so instead of saying nothing."""
import pytest

pytest.importorskip("streamlit")

from test_app import assert_clean, open_app, private_cache, workspace  # noqa: E402

from shedder.api import RecoverConfig, Recovered  # noqa: E402
from shedder.core.plan import Component, PruningPlan  # noqa: E402

pytestmark = pytest.mark.usefixtures(private_cache.__name__)


def test_recover_page_says_when_pruning_lost_nothing_to_recover():
    at = open_app("recover")
    ws = workspace(at)
    ws.set_plan(PruningPlan(frozenset({Component("block", 4)})))
    summary = {"ppl": {"unpruned": 100.0, "pruned": 99.5, "recovered": 98.0}, "recovered_fraction": None,
               "tokens": 512, "protocol": "p"}
    ws.recovered = [Recovered(ws.plan, RecoverConfig(steps=2), "/nonexistent-run", summary,
                              {"ppl": 98.1, "params": 1, "flops": 1.0})]
    at.run()
    assert_clean(at)
    assert any("Pruning cost nothing on the held-out windows" in i.value and "98.0000" in i.value for i in at.info)
    assert not at.warning and not at.success
