"""The adapter contract, written once: every family's test class runs these tests on its own data.

As transformers' ``ModelTesterMixin``: a ``test_arch_<family>.py`` holds the family's
``FamilyCase`` (a tiny model and the plans, refusals, official configs that exercise it), a class
``TestBamba(AdapterContract): case = BAMBA``, and only the tests specific to that family. The
contract (``shedder.arch.base``): the inventory is what the tiny model holds; the live-masked model
computes the extracted model's logits (fp32, within ``TOL``) after a removal that changes them (so
the equality could fail); ``param_count`` counts what extraction builds; masks leave every tensor
and every module's ``forward`` as they were, even when the masked block raises; extracted models
decode through the ``transformers`` cache as full forwards do, and so do live-masked ones; they
save and load; invalid plans are refused by masking, extraction and counting alike; official
configs map to the components they name; the prefix-caching evaluator reports the masked
perplexity.

Data a family does not have (no official configs, no evaluator check) leaves its test skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import pytest

from adapter_checks import (check_cached_generation, check_evaluator, check_generation, check_mask_restores,
                            check_plan, check_refused, check_removal, check_saved, check_stock_load, tokens)

from shedder.arch import adapter_for, count_parameters
from shedder.core.plan import Component, PruningPlan
from shedder.formats.official import OfficialConfig
from shedder.formats.extract import extract
from shedder.measure.masking import masked

#: A plan in a case: component strings such as ``("head:2:5", "ssm:0")``, or a function of the
#: adapter (random plans drawn from its candidates).
Plan = Union[tuple, Callable]


@dataclass(frozen=True)
class Evaluation:
    """Plans the prefix-reusing evaluator scores on ``batch`` random windows of ``length`` tokens."""

    plans: tuple
    seed: int = 3
    length: int = 20
    batch: int = 4
    batch_size: int = 8
    rel: float = 1e-6
    cost: bool = False   # also: the analytic cost model's parameter total equals param_count


@dataclass(frozen=True)
class FamilyCase:
    """One family's data for the contract."""

    name: str
    build_tiny_model: Callable
    kinds: dict                      # kind_counts() of the tiny model
    layer_kinds: tuple               # layer_kind(i) of each layer
    plans: dict                      # name -> Plan: masked == extracted after a visible removal
    group_sizes: dict | None = None  # passed to adapter_for and carried by every plan
    ids: tuple = (1, 20)             # (seed, length) of the [2, length] token batch
    min_change: float = 1e-3         # how much each plan must change the logits
    saved: tuple = ()                # names in ``plans`` saved and loaded back
    shedder_entry: bool | None = None  # whether those saved configs carry a ``shedder`` entry
    restores: tuple = ()             # plans the mask must leave no trace of
    generation: tuple = ()           # (Plan, prompt length): cached decoding, extracted and masked
    padded: bool = False             # generation on a left-padded batch (prompt length unused)
    stock: tuple = ()                # plans whose extraction loads with plain transformers
    refused: tuple = ()              # (component strings, words every refusal names)
    official: tuple = ()             # (official pruning config, component strings it resolves to)
    component_params: dict = field(default_factory=dict)  # component string -> parameters it owns
    evaluation: Evaluation | None = None


def _describe(value) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return "+".join(value) if len(value) < 4 else f"{value[0]}+{len(value) - 1}more"
    return "plan"


class AdapterContract:
    """Every family adapter's tests; a subclass sets ``case``."""

    case: FamilyCase

    # ------------------------------------------------------------------ data and fixtures
    def pytest_generate_tests(self, metafunc):
        case = metafunc.cls.case
        table = {
            "plan_name": (sorted(case.plans), None),
            "saved_name": (list(case.saved), None),
            "restore_plan": (list(case.restores), [_describe(p) for p in case.restores]),
            "generation": (list(case.generation), [f"{_describe(p)}-{n}" for p, n in case.generation]),
            "stock_plan": (list(case.stock), [_describe(p) for p in case.stock]),
            "refusal": (list(case.refused), [_describe(s) for s, _ in case.refused]),
            "official": (list(case.official), [str(i) for i in range(len(case.official))]),
        }
        for arg, (values, ids) in table.items():
            if arg in metafunc.fixturenames:
                metafunc.parametrize(arg, values, ids=ids)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        return cls.case.build_tiny_model()

    @pytest.fixture(scope="class")
    @classmethod
    def adapter(cls, model):
        return adapter_for(model, cls.case.group_sizes)

    @pytest.fixture(scope="class")
    @classmethod
    def ids(cls):
        seed, length = cls.case.ids
        return tokens(seed=seed, length=length)

    def plan(self, spec: Plan, adapter) -> PruningPlan:
        """The case's plan ``spec`` as a ``PruningPlan`` carrying the case's group sizes."""
        plan = spec(adapter) if callable(spec) else PruningPlan(frozenset(Component.parse(s) for s in spec))
        return PruningPlan(plan.components, group_sizes=dict(self.case.group_sizes or {}))

    # ------------------------------------------------------------------ inventory and counts
    def test_inventory(self, model, adapter):
        assert adapter.kind_counts() == self.case.kinds
        assert set(self.case.kinds) <= set(adapter.kinds)
        assert tuple(adapter.layer_kind(i) for i in range(len(self.case.layer_kinds))) == self.case.layer_kinds
        for kind, count in self.case.kinds.items():
            assert 0 < len(adapter.candidates(PruningPlan(), [kind])) <= count, kind
        for spec, params in self.case.component_params.items():
            assert adapter.component_params(Component.parse(spec)) == params, spec

    def test_param_count_of_the_empty_plan(self, model, adapter):
        assert adapter.param_count(PruningPlan()) == count_parameters(model)

    # ------------------------------------------------------------------ exactness
    def test_masked_equals_extracted(self, model, adapter, ids, plan_name):
        """Masked logits == extracted logits, param_count == the extracted model's parameters, and
        the plan changes the logits and shrinks the model (so the equality could have failed)."""
        plan = self.plan(self.case.plans[plan_name], adapter)
        assert len(plan.components) > 0
        check_removal(model, plan, ids, min_change=self.case.min_change, adapter=adapter)

    def test_mask_leaves_the_model_untouched(self, model, adapter, ids, restore_plan):
        check_mask_restores(model, self.plan(restore_plan, adapter), ids, adapter)

    # ------------------------------------------------------------------ generation with the cache
    def test_cached_generation(self, model, adapter, ids, generation):
        """The extracted model's greedy decoding through the cache equals full forwards, and the
        live-masked model decodes exactly that through its own cache (a left-padded batch when the
        case is ``padded``: the cache's length then feeds real causal masks)."""
        spec, prompt_len = generation
        plan = self.plan(spec, adapter)
        if spec not in self.case.plans.values():  # exactness not yet checked on this plan
            check_plan(model, plan, ids=ids, adapter=adapter)
        if not self.case.padded:
            check_cached_generation(model, plan, ids[:, :prompt_len], adapter=adapter)
            return
        expected = check_generation(extract(model, plan, adapter), padded=True)
        with masked(model, plan, adapter):
            check_generation(model, expected=expected, padded=True)

    # ------------------------------------------------------------------ save / load
    def test_save_load_round_trip(self, model, adapter, ids, saved_name, bundled_tokenizer, tmp_path):
        plan = adapter.resolve(self.plan(self.case.plans[saved_name], adapter))
        loaded = check_saved(extract(model, plan, adapter), plan, bundled_tokenizer, tmp_path / "pruned", ids,
                             shedder_entry=self.case.shedder_entry)
        assert type(loaded) is type(model)

    def test_stock_expressible_plan_loads_with_plain_transformers(self, model, adapter, ids, stock_plan,
                                                                   bundled_tokenizer, tmp_path):
        plan = self.plan(stock_plan, adapter)
        _, small = check_plan(model, plan, ids=ids, adapter=adapter)
        plain = check_stock_load(small, plan, bundled_tokenizer, tmp_path / "stock", ids)
        assert type(plain) is type(model)
        assert count_parameters(plain) == count_parameters(small)

    # ------------------------------------------------------------------ refusals, official configs
    def test_invalid_plans_are_refused(self, model, adapter, refusal):
        specs, words = refusal
        check_refused(model, self.plan(specs, adapter), list(words), adapter)

    def test_official_config_maps_to_components(self, model, adapter, official):
        config, specs = official
        resolved = adapter.resolve(OfficialConfig.of(config))
        with masked(model, resolved, adapter):
            pass
        assert set(resolved.components) == {Component.parse(s) for s in specs}

    # ------------------------------------------------------------------ evaluator
    def test_prefix_evaluator_matches_masked_forward(self, model, adapter):
        evaluation = self.case.evaluation
        if evaluation is None:
            pytest.skip(f"{self.case.name}: no evaluator data")
        windows = tokens(seed=evaluation.seed, length=evaluation.length, batch=evaluation.batch)
        check_evaluator(model, [self.plan(p, adapter) for p in evaluation.plans], windows,
                        batch_size=evaluation.batch_size, rel=evaluation.rel, cost=evaluation.cost)
