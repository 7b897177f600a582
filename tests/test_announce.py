"""Cost announcements hold: the announced activation cache matches what the evaluator keeps."""
from __future__ import annotations

import pytest

from shedder import api
from shedder.arch import adapter_for
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.measure.evaluator import PlanEvaluator
from shedder.prune.agreement import split_halves
from shedder.prune.search import StopWhen, greedy_search, reference_search
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


def test_a_search_keeps_only_what_the_next_step_needs_and_the_announcement_counts_it(model):
    adapter = adapter_for(model)
    data = windows(vocab=model.config.vocab_size, n=4, seq=16)
    ev = PlanEvaluator(model, data, adapter, batch_size=4, max_cache_bytes=1 << 30)
    announced = api.cost("search", model, adapter, data, "ssm", None, 3, 4, 1 << 30).cache_bytes
    peak = [0]

    def watch(done, total, what):
        peak[0] = max(peak[0], _held_bytes(ev))

    result = greedy_search(model, data, ["ssm"], StopWhen(steps=3), evaluator=ev, progress=watch)
    assert len(result.steps) == 3
    assert peak[0] / 1.5 <= announced <= peak[0] * 1.5
    winner = result.steps[-1].component.layer
    for entries in ev._cache:  # the winner's plan whole; every other plan one input, at the winner's layer at most
        others = [e for key, e in entries.items() if key != (result.plan.components, ())]
        assert all(len(e.inputs) == 1 and max(e.inputs) <= winner for e in others)


def test_after_a_step_a_loser_keeps_only_its_input_at_the_winners_layer(model):
    adapter = adapter_for(model)
    data = windows(vocab=model.config.vocab_size, n=4, seq=16)
    ev = PlanEvaluator(model, data, adapter, batch_size=4, max_cache_bytes=1 << 30)
    ev.perplexity(PruningPlan())
    cands = adapter.candidates(PruningPlan(), ["ssm"])
    plans = {c: PruningPlan().with_components([c]) for c in cands}
    for plan in plans.values():
        ev.perplexity(plan)
    winner = cands[len(cands) // 2]
    ev.keep_for_next_step(plans[winner], [p for c, p in plans.items() if c != winner], winner.layer)
    kept = {key[0]: e.inputs for key, e in ev._cache[0].items()}
    assert set(kept) == {plans[c].components for c in cands if c.layer <= winner.layer}
    assert all(list(inputs) == [winner.layer] for comps, inputs in kept.items() if comps != plans[winner].components)
    assert len(kept[plans[winner].components]) == adapter.num_layers - 1


def test_keeping_for_the_next_step_does_not_change_a_search(model):
    data = windows(vocab=model.config.vocab_size, n=4, seq=16)
    fast = greedy_search(model, data, ["ssm"], StopWhen(steps=3), batch_size=4)
    ref = reference_search(model, data, ["ssm"], StopWhen(steps=3), batch_size=4)
    assert fast.components == ref.components
    assert [s.ppl for s in fast.steps] == pytest.approx([s.ppl for s in ref.steps], rel=1e-9)
