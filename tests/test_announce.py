"""Cost announcements hold: the announced activation cache matches what the evaluator keeps."""
from __future__ import annotations

import pytest

from shedder import api
from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.measure.evaluator import PlanEvaluator
from shedder.prune.agreement import split_halves
from test_search import windows


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return tiny_model_factory("mamba2")


def _held_bytes(ev: PlanEvaluator) -> int:
    unique = {id(t): t for entries in ev._cache for e in entries.values() for t in e.inputs.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def test_announced_activation_cache_is_within_1_5x_of_what_one_search_step_keeps(model):
    adapter = adapter_for(model)
    data = windows(vocab=model.config.vocab_size, n=4, seq=16)
    ev = PlanEvaluator(model, data, adapter, batch_size=4, max_cache_bytes=1 << 30)
    announced = api.cost("search", model, adapter, data, "ssm", None, 1, 4, 1 << 30).cache_bytes
    ev.perplexity(PruningPlan())
    for comp in adapter.candidates(PruningPlan(), ["ssm"]):
        ev.perplexity(PruningPlan().with_components([comp]))
    held = _held_bytes(ev)
    assert held / 1.5 <= announced <= held * 1.5


def test_one_window_has_no_stability_halves():
    with pytest.raises(ShedderError, match="at least 2 calibration windows"):
        split_halves(windows(n=1))


def test_one_pass_metrics_are_announced_as_one_pass(model):
    adapter = adapter_for(model)
    data = windows(vocab=model.config.vocab_size, n=4, seq=16)
    text = api.cost("scoring", model, adapter, data, "ssm", metric="taylor", budget_bytes=1 << 30).describe()
    assert "one forward pass" in text and "81" not in text
