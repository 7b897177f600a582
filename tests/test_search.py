"""PlanEvaluator (prefix cache), importance scores and the greedy search.

The central properties: the cached evaluator gives the full masked forward's perplexity for every
family (its NLL totals equal the plain sum exactly); the fast search chooses exactly what the plain
reference loop chooses, ties included, and really abandons losing candidates; an interrupted search
resumes to the same final plan.
"""
from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
import torch

from shedder.arch import adapter_for
from shedder.core.errors import Cancelled, PlanError, ShedderError
from shedder.measure.evaluator import PlanEvaluator, removing
from shedder.core.cache import model_fingerprint
from shedder.prune.importance import score
from shedder.measure.masking import masked
from shedder.measure.metrics import nll_sum, perplexity
from shedder.core.plan import Component, PruningPlan
from shedder.prune.runs import LOG_FILE, PLAN_FILE
from shedder.prune.search import RunDir, StopWhen, greedy_search, reference_search

FAMILIES = ["mamba2", "mamba1", "nemotron_h"]


def windows(vocab: int = 128, n: int = 6, seq: int = 16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, vocab, (n, seq))


def random_plans(adapter, count: int, seed: int = 0) -> list[PruningPlan]:
    """Plans built like a search builds them: random candidates of all kinds, one to three deep."""
    rng = random.Random(seed)
    kinds = list(adapter.kind_counts())
    plans = [PruningPlan()]
    for _ in range(count):
        plan = PruningPlan()
        for _ in range(rng.randint(1, 3)):
            options = adapter.candidates(plan, kinds)
            if options:
                plan = removing(plan, rng.choice(options))
        plans.append(plan)
    return plans


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_factory):
    return tiny_model_factory(request.param)


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2")


# ------------------------------------------------------------------------------------ evaluator
@pytest.mark.parametrize("budget", [4 << 30, 3 * 6 * 16 * 32 * 4], ids=["all-layers", "strided"])
def test_evaluator_equals_full_masked_forward(family_model, budget):
    w = windows()
    adapter = adapter_for(family_model)
    ev = PlanEvaluator(family_model, w, adapter, batch_size=4, max_cache_bytes=budget)
    plans = random_plans(adapter, 12)
    for plan in plans + plans[::-1]:  # revisits hit the cache of earlier plans
        fast = ev.perplexity(plan)
        full = perplexity(family_model, w, batch_size=4, plan=plan)
        assert fast == pytest.approx(full, rel=1e-5), plan.describe()
    assert ev.layers_run < 2 * len(plans) * 2 * adapter.num_layers  # something was skipped


def test_evaluator_reruns_only_changed_layers(mamba2):
    ev = PlanEvaluator(mamba2, windows(), batch_size=4)  # 2 batches, 4 layers
    runs = []
    for specs in [(), ("ssm:2",), ("block:1",), ("ssm:2",), ("ssm:2", "ssm:3"), ("block:0", "block:1")]:
        ev.nll(PruningPlan(frozenset(Component.parse(x) for x in specs)))
        runs.append(ev.layers_run)
    # layer runs per plan: all; from layer 2; past removed block 1; cached; from {ssm:2}'s layer-3 input;
    # from the start (the embedding output is not cached), removed blocks 0 and 1 costing nothing
    assert [b - a for a, b in zip([0] + runs, runs)] == [8, 4, 4, 0, 2, 4]


def test_evaluator_leaves_the_model_untouched(mamba2):
    w = windows()
    before = mamba2(w).logits
    PlanEvaluator(mamba2, w, batch_size=4).perplexity(PruningPlan(frozenset({Component("block", 1)})))
    layers = adapter_for(mamba2).layers()
    assert all("forward" not in layer.__dict__ and not layer._forward_pre_hooks for layer in layers)
    assert torch.equal(mamba2(w).logits, before)


def test_early_abandoning_returns_none_only_above_the_bound(mamba2):
    w = windows()
    ev = PlanEvaluator(mamba2, w, batch_size=2)
    plan = PruningPlan(frozenset({Component("block", 0)}))
    total = ev.nll(plan)
    assert ev.nll(plan, bound=total) == total
    assert ev.nll(plan, bound=total * 0.1) is None


# ------------------------------------------------------------------------------------ importance
def test_score_table_matches_direct_masked_evaluation(mamba2, tmp_path):
    w = windows()
    adapter = adapter_for(mamba2)
    base = PruningPlan(frozenset({Component("ssm", 3)}))
    ticks = []
    table = score(mamba2, w, ["block", "ssm"], base_plan=base, cache_dir=tmp_path,
                  progress=lambda d, t, m: ticks.append((d, t)))
    assert list(table.columns) == ["layer", "kind", "index", "ppl", "delta_ppl", "params_removed"]
    expected = adapter.candidates(base, ["block", "ssm"])  # ssm 3 is already removed
    assert len(table) == len(expected) >= 6 and ticks[-1] == (len(expected), len(expected))
    assert [Component(k, la, i) for k, la, i in zip(table["kind"], table["layer"], table["index"])] == expected
    assert list(table["layer"]) == sorted(table["layer"])
    base_ppl = perplexity(mamba2, w, plan=base)
    for row in table.itertuples():
        comp = Component(row.kind, row.layer, row.index)
        direct = perplexity(mamba2, w, plan=removing(base, comp))
        assert row.ppl == pytest.approx(direct, rel=1e-6)
        assert row.delta_ppl == pytest.approx(direct - base_ppl, rel=1e-6, abs=1e-9)
        expected = adapter.param_count(base) - adapter.param_count(removing(base, comp))
        assert row.params_removed == expected > 0


def test_score_cache_reopens_without_evaluating(mamba2, tmp_path, monkeypatch):
    w = windows()
    first = score(mamba2, w, "ssm", cache_dir=tmp_path)
    monkeypatch.setattr("shedder.prune.importance.PlanEvaluator", None)  # any evaluation would now fail
    again = score(mamba2, w, ["ssm"], cache_dir=tmp_path)
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(TypeError):  # other data: a different key, so it must evaluate
        score(mamba2, windows(seed=2), ["ssm"], cache_dir=tmp_path)


def test_fingerprint_sees_weight_changes(tiny_model_factory):
    a, b = tiny_model_factory("mamba2"), tiny_model_factory("mamba2")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.backbone.layers[2].mixer.out_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_of_a_real_size_embedding():
    """A 50,288 × 768 embedding (past 2**24 elements, where a float linspace of sample indices
    overshot the end) is fingerprinted, and swapping two of its values changes the key."""
    from shedder.dev.realshape import build

    a, b = build("mamba2", layers=1), build("mamba2", layers=1)
    assert a.backbone.embeddings.weight.numel() > 1 << 24
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        w = b.backbone.embeddings.weight.view(-1)
        w[[1, 2]] = w[[2, 1]]
    assert model_fingerprint(a) != model_fingerprint(b)


def test_unknown_kind_is_refused(mamba2, tmp_path):
    with pytest.raises(PlanError, match="no component kind 'attention'"):
        score(mamba2, windows(), ["attention"], cache_dir=tmp_path)


# ------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("family,kinds", [("mamba2", ["ssm"]), ("mamba2", ["block", "ssm", "head"]),
                                          ("mamba1", ["block", "channel_group"]),
                                          ("nemotron_h", ["block", "attention", "mlp", "head"])])
def test_fast_search_chooses_what_the_reference_chooses(tiny_model_factory, family, kinds):
    model = tiny_model_factory(family)
    w = windows()
    ref = reference_search(model, w, kinds, StopWhen(steps=4), batch_size=2)
    fast = greedy_search(model, w, kinds, StopWhen(steps=4), batch_size=2)
    assert fast.components == ref.components and len(ref.steps) == 4
    assert [s.ppl for s in fast.steps] == pytest.approx([s.ppl for s in ref.steps], rel=1e-9)
    assert [s.params for s in fast.steps] == [s.params for s in ref.steps]
    assert fast.base_ppl == pytest.approx(ref.base_ppl, rel=1e-9)
    # each step's choice really is the best single addition (checked with plain masked forwards)
    plan = PruningPlan()
    adapter = adapter_for(model)
    for step in ref.steps:
        ppls = {c: perplexity(model, w, plan=removing(plan, c)) for c in adapter.candidates(plan, kinds)}
        assert ppls[step.component] == pytest.approx(min(ppls.values()), rel=1e-9)
        plan = removing(plan, step.component)


def test_stopping_rules(mamba2):
    w = windows()
    adapter = adapter_for(mamba2)
    full = adapter.param_count()
    result = greedy_search(mamba2, w, ["block"], StopWhen(target_params=0.3))
    removed = [full - s.params for s in result.steps]
    assert removed[-1] >= 0.3 * full and all(r < 0.3 * full for r in removed[:-1])
    assert "target" in result.stopped
    everything = greedy_search(mamba2, w, ["block"])
    assert len(everything.steps) >= 3 and everything.stopped == "no candidates left"
    limit = (everything.steps[1].ppl + everything.steps[2].ppl) / 2
    capped = greedy_search(mamba2, w, ["block"], StopWhen(max_ppl=limit))
    assert capped.components == everything.components[:len(capped.steps)]
    assert all(s.ppl <= limit for s in capped.steps) and "max_ppl" in capped.stopped
    with pytest.raises(ShedderError, match="target_params"):
        greedy_search(mamba2, w, ["block"], StopWhen(target_params=-1))


def test_run_directory_and_resume_after_interruption(mamba2, tmp_path):
    w = windows()
    kinds = ["block", "ssm"]
    straight = greedy_search(mamba2, w, kinds, StopWhen(steps=4))

    def interrupt(done, total, message):
        if message.startswith("step 3"):  # mid-step: two steps are finished and logged
            raise Cancelled("stop")

    run = tmp_path / "run"
    with pytest.raises(Cancelled):
        greedy_search(mamba2, w, kinds, StopWhen(steps=4), progress=interrupt, run=RunDir(run))
    lines = [json.loads(x) for x in (run / LOG_FILE).read_text().splitlines()]
    assert [x["type"] for x in lines] == ["header", "step", "step"]
    saved = PruningPlan.load(run / "step_02" / PLAN_FILE)
    assert saved.components == frozenset(straight.components[:2])
    assert saved.meta["search_step"] == 2

    with pytest.raises(ShedderError, match="already holds a search"):
        greedy_search(mamba2, w, kinds, StopWhen(steps=4), run=RunDir(run))
    with pytest.raises(ShedderError, match="different settings.*kinds"):
        greedy_search(mamba2, w, ["block"], StopWhen(steps=4), run=RunDir(run, resume=True))
    with pytest.raises(ShedderError, match="different settings.*data"):
        greedy_search(mamba2, w[:4], kinds, StopWhen(steps=4), run=RunDir(run, resume=True))

    evaluated = []
    resumed = greedy_search(mamba2, w, kinds, StopWhen(steps=4), progress=lambda d, t, m: evaluated.append(m), run=RunDir(run, resume=True))
    assert resumed.components == straight.components
    assert resumed.plan.components == straight.plan.components
    assert not any(m.startswith(("step 1", "step 2")) for m in evaluated)  # finished steps not redone
    assert len((run / LOG_FILE).read_text().splitlines()) == 5
    assert math.isclose(resumed.steps[0].ppl, straight.steps[0].ppl, rel_tol=1e-9)


def test_default_run_dir_is_keyed_so_a_cancelled_search_continues(mamba2, tmp_path):
    from shedder.prune.search import default_run_dir

    w = windows()
    run = default_run_dir(mamba2, w, ["block"], cache_dir=tmp_path)
    assert run.parent == tmp_path / "searches"
    assert run == default_run_dir(mamba2, w, ["block"], cache_dir=tmp_path)
    assert run != default_run_dir(mamba2, w, ["ssm"], cache_dir=tmp_path)
    assert run != default_run_dir(mamba2, w[:4], ["block"], cache_dir=tmp_path)

    def interrupt(done, total, message):
        if message.startswith("step 2"):
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        greedy_search(mamba2, w, ["block"], StopWhen(steps=3), progress=interrupt, run=RunDir(run, resume=True))
    seen = []
    longer = greedy_search(mamba2, w, ["block"], StopWhen(steps=3), progress=lambda d, t, m: seen.append(m), run=RunDir(run, resume=True))
    assert longer.components == greedy_search(mamba2, w, ["block"], StopWhen(steps=3)).components
    assert not any(m.startswith("step 1") for m in seen)  # the first step came from the log
    # Resumed under tighter limits, a longer log is read back only as far as they allow, evaluating nothing.
    seen.clear()
    shorter = greedy_search(mamba2, w, ["block"], StopWhen(steps=2), progress=lambda d, t, m: seen.append(m),
                            run=RunDir(run, resume=True))
    assert shorter.components == longer.components[:2] and shorter.stopped == "2 steps done" and not seen
    cap = longer.steps[1].ppl * (1 - 1e-9)  # step 2 is over it; step 1 may be (on a tiny random model) or not
    allowed = next(i for i, step in enumerate(longer.steps) if step.ppl > cap)
    capped = greedy_search(mamba2, w, ["block"], StopWhen(max_ppl=cap), progress=lambda d, t, m: seen.append(m),
                           run=RunDir(run, resume=True))
    assert capped.components == longer.components[:allowed] and "max_ppl" in capped.stopped and not seen


# ------------------------------------------------------------------------------------ fast search: exactness and speed mechanism
@pytest.mark.parametrize("kinds", [["ssm"], ["block"], ["block", "ssm", "head"]], ids=["ssm", "block", "mixed"])
def test_best_first_search_matches_reference_bit_for_bit(mamba2, kinds):
    w = windows(n=8)
    ref = reference_search(mamba2, w, kinds, StopWhen(steps=3), batch_size=4)
    fast = greedy_search(mamba2, w, kinds, StopWhen(steps=3), batch_size=4)
    assert fast.components == ref.components and len(ref.steps) == 3
    # the compared totals are summed exactly as the reference sums them: equal, not merely close
    assert [s.ppl for s in fast.steps] == [s.ppl for s in ref.steps]
    assert fast.base_ppl == ref.base_ppl


def test_evaluator_totals_equal_the_plain_sum_exactly(mamba2):
    w = windows(n=7)  # batches of 3, 3 and 1 windows: two batch shapes, each verified once
    adapter = adapter_for(mamba2)
    ev = PlanEvaluator(mamba2, w, adapter, batch_size=3)
    for plan in random_plans(adapter, 8, seed=3):
        with masked(mamba2, plan, adapter):
            assert ev.nll(plan) == nll_sum(mamba2, w, 3)[0], plan.describe()
    assert ev._split_head == {(3, 16): True, (1, 16): True}  # the per-window head is in use


def test_per_window_head_is_refused_when_logits_are_more_than_the_head(tiny_model_factory):
    """A model that post-processes its logits (e.g. a multiplier) keeps the plain whole-batch loss."""
    model = tiny_model_factory("mamba2")

    def scale(module, args, kwargs, output):
        output.logits = output.logits * 1.5
        return output

    handle = model.register_forward_hook(scale, with_kwargs=True)
    try:
        w = windows()
        ev = PlanEvaluator(model, w, batch_size=3)
        plan = PruningPlan(frozenset({Component("ssm", 1)}))
        assert ev.nll(PruningPlan()) == nll_sum(model, w, 3)[0]
        assert ev._split_head == {(3, 16): False}
        with masked(model, plan):
            assert ev.nll(plan) == nll_sum(model, w, 3)[0]
    finally:
        handle.remove()


def test_exact_ties_go_to_the_candidate_listed_first(tiny_model_factory):
    """Every mixer adds exactly zero (out_proj zeroed), so every candidate gives the same NLL bit for
    bit: both searches must keep the candidate listed first, whatever order the fast one visits in."""
    model = tiny_model_factory("mamba2")
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.zero_()
    w = windows()
    kinds = ["ssm", "block"]
    ref = reference_search(model, w, kinds, StopWhen(steps=2), batch_size=2)
    fast = greedy_search(model, w, kinds, StopWhen(steps=2), batch_size=2)
    first = adapter_for(model).candidates(PruningPlan(), kinds)[0]
    assert ref.components[0] == first and fast.components == ref.components
    assert [s.ppl for s in fast.steps] == [s.ppl for s in ref.steps] == [ref.base_ppl] * 2


def test_fast_search_abandons_losing_candidates(tiny_model_factory):
    """The speed mechanism itself: losing candidates are dropped before all their windows are scored.
    Only block 2 writes to the residual stream, and it spoils predictions the head would otherwise
    make well (each window repeats one token; the head is the embedding): removing it wins by far."""
    model = tiny_model_factory("mamba2")
    with torch.no_grad():
        model.lm_head.weight.copy_(model.backbone.embeddings.weight)
        model.backbone.norm_f.weight.fill_(3.0)
        for i, layer in enumerate(model.backbone.layers):
            layer.mixer.out_proj.weight.mul_(5.0 if i == 2 else 0.0)
    w = (torch.arange(8)[:, None] * 7 + 3).repeat(1, 16)  # [8, 16]
    ref = reference_search(model, w, ["block", "ssm"], StopWhen(steps=2), batch_size=4)
    fast = greedy_search(model, w, ["block", "ssm"], StopWhen(steps=2), batch_size=4)
    assert fast.components == ref.components and ref.components[0] == Component("block", 2)
    assert fast.stats["evaluated"] == ref.stats["evaluated"] - 1  # the reference counts the base plan
    assert fast.stats["abandoned"] >= 3
    assert fast.stats["windows_scored"] < ref.stats["windows_scored"] - 3 * 4
    assert fast.stats["layers_run"] < ref.stats["layers_run"]


def test_evaluators_share_the_process_cache_budget(mamba2, monkeypatch):
    import gc

    from shedder.measure import budget

    monkeypatch.setattr(budget, "_PROCESS_BUDGET", {"cpu": 1 << 30})
    gc.collect()
    first = PlanEvaluator(mamba2, windows())
    alone = first.max_cache_bytes
    second = PlanEvaluator(mamba2, windows())
    own = PlanEvaluator(mamba2, windows(), max_cache_bytes=123)  # its own budget: not a sharer
    assert first.max_cache_bytes == second.max_cache_bytes < alone and own.max_cache_bytes == 123
    del second
    gc.collect()
    assert first.max_cache_bytes == alone


def test_run_cost_counts_passes_and_states_the_eta(mamba2):
    from shedder.measure.budget import run_cost

    from shedder.measure.budget import PassTiming

    n = mamba2.config.num_hidden_layers
    cost = run_cost("search", mamba2, windows(n=6, seq=16), candidates=4, steps=2, batch_size=2, budget_bytes=1 << 20,
                    candidate_layers=[0, 0, n - 1, n - 1])
    assert cost.passes == 1 + 4 + 3 and cost.tokens == 8 * 6 * 16
    assert cost.logits_bytes == 2 * 16 * mamba2.config.vocab_size * 4
    # the timed first pass is not counted again; each later pass pays the head, and its layers from its own on
    assert cost.eta_seconds(PassTiming(layers=0.0, head=1.0)) == pytest.approx(7)
    assert cost.eta_seconds(PassTiming(layers=1.0, head=0.0)) == pytest.approx((2 + 2 / n) * 7 / 4)
    text = cost.describe(PassTiming(layers=0.5, head=0.0))
    assert "at most 8 forward passes × 96 tokens" in text and f"about {(2 + 2 / n) * 7 / 8:.0f} s more" in text
