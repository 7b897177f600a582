"""Pruning plans: JSON round trip, official Mamba-Shedder configs, and a clear message for every bad input."""
from __future__ import annotations

import json

import pytest

from shedder.arch import adapter_for
from shedder.core.errors import PlanError
from shedder.core.plan import SCHEMA_VERSION, Component, ModelIdentity, PruningPlan
from shedder.formats.official import OfficialConfig, plan_from_dict, plan_from_json, read_plan


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2")


@pytest.fixture(scope="module")
def hybrid(tiny_model_factory):
    return tiny_model_factory("nemotron_h", layers=8)  # attention at layers 1 and 5, MLP at 3 and 7


def plan_of(*specs: str, **kw) -> PruningPlan:
    return PruningPlan(frozenset(Component.parse(s) for s in specs), **kw)


def test_json_round_trip(mamba2, tmp_path):
    adapter = adapter_for(mamba2)
    plan = adapter.resolve(plan_of("block:2", "ssm:0", "head:1:3", meta={"note": "x", "ppl": 1.5}))
    path = tmp_path / "plan.json"
    plan.save(path)
    back = PruningPlan.load(path)
    assert back == plan and back.model == adapter.identity() and back.meta == {"note": "x", "ppl": 1.5}
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert adapter.resolve(back) == plan
    assert [str(c) for c in back.sorted()] == ["ssm:0:0", "head:1:3", "block:2:0"]
    # the compact string form reads too
    assert PruningPlan.from_dict({"schema_version": 1, "components": ["block:2", "head:1:3"]}).components == \
        {Component("block", 2), Component("head", 1, 3)}


def test_official_config_import(mamba2, hybrid):
    plan = plan_from_json(json.dumps({"pruned_mamba_block_idx": [1], "pruned_ssm_idx": [3]}))
    assert isinstance(plan, OfficialConfig)
    assert adapter_for(mamba2).resolve(plan).components == {Component("block", 1), Component("ssm", 3)}
    # attention / MLP indices count the model's attention / MLP sub-blocks in order
    official = plan_from_dict({"pruned_mha_idx": [1], "pruned_mlp_idx": [0], "pruned_mamba_block_idx": []})
    resolved = adapter_for(hybrid).resolve(official)
    assert resolved.components == {Component("attention", 5), Component("mlp", 3)}
    assert "official_ordinal" not in resolved.meta
    with pytest.raises(PlanError, match="attention #2 does not exist .the model has 2"):
        adapter_for(hybrid).resolve(plan_from_dict({"pruned_mha_idx": [2]}))
    with pytest.raises(PlanError, match="must be a list of integers"):
        plan_from_dict({"pruned_ssm_idx": "3"})


@pytest.mark.parametrize("text,words", [
    ("", "the plan file is empty"),
    ("{not json", "not valid JSON: .* line 1 column 2"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"foo": 1}', "not a pruning plan"),
    ('{"schema_version": 99, "components": []}', "schema_version 99 is not supported"),
    ('{"schema_version": 1, "components": {}}', "'components' must be a list"),
    ('{"schema_version": 1, "components": [{"kind": "wing", "layer": 1}]}', "component #0: unknown kind 'wing'"),
    ('{"schema_version": 1, "components": [{"kind": "block", "layer": "1"}]}', "layer and index must be integers"),
    ('{"schema_version": 1, "components": [{"layer": 1}]}', "component #0 must be an object with 'kind'"),
    ('{"schema_version": 1, "components": ["block:1", {"kind": "block", "layer": 1}]}', "block:1:0 is listed twice"),
    ('{"schema_version": 1, "components": ["block-1"]}', "cannot read component 'block-1'"),
    ('{"schema_version": 1, "components": [], "model": {"architecture": "X"}}', "'model' needs architecture"),
])
def test_malformed_plans(text, words):
    with pytest.raises(PlanError, match=words):
        PruningPlan.from_json(text)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="plan file not found"):
        PruningPlan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("specs,words", [
    (["block:9"], r"block:9:0: layer 9 is out of range \(the model has layers 0..3\)"),
    (["head:1:7"], "layer 1 has head indices 0..3, not 7"),
    (["attention:1"], "Mamba2ForCausalLM has no component kind 'attention'"),
    (["block:1", "ssm:1"], "ssm:1:0 is redundant: block 1 is removed as a whole"),
])
def test_plans_that_do_not_fit_the_model(mamba2, specs, words):
    with pytest.raises(PlanError, match=words):
        adapter_for(mamba2).resolve(plan_of(*specs))


def test_plan_for_another_model(mamba2, tiny_model_factory):
    adapter = adapter_for(mamba2)
    other_arch = adapter_for(tiny_model_factory("mamba1")).resolve(plan_of("block:1"))
    with pytest.raises(PlanError, match="made for MambaForCausalLM, but this model is Mamba2ForCausalLM"):
        adapter.resolve(other_arch)
    deeper = adapter_for(tiny_model_factory("mamba2", layers=5)).resolve(plan_of("block:1"))
    with pytest.raises(PlanError, match="made for a model with 5 layers; this one has 4"):
        adapter.resolve(deeper)
    wider = PruningPlan(frozenset({Component("block", 1)}),
                        ModelIdentity("Mamba2ForCausalLM", 4, "0123456789abcdef", "other-model"))
    with pytest.raises(PlanError, match="another Mamba2ForCausalLM configuration .*made for other-model"):
        adapter.resolve(wider)


def test_one_reader_for_both_formats_and_one_type_per_state(tmp_path, tiny_model_factory):
    """A plan file is ours (a ``PruningPlan``) or official (an ``OfficialConfig``, no components
    until a model resolves it); resolving gives a ``ResolvedPlan`` that is not checked again."""
    from shedder.arch import ResolvedPlan

    path = tmp_path / "official.json"
    path.write_text(json.dumps({"pruned_mamba_block_idx": [1]}))
    official = read_plan(path)
    assert isinstance(official, OfficialConfig) and read_plan(path.read_bytes()) == official
    adapter = adapter_for(tiny_model_factory("mamba2"))
    resolved = adapter.resolve(official)
    assert isinstance(resolved, ResolvedPlan) and resolved.components == {Component("block", 1)}
    assert adapter.resolve(resolved) is resolved
    ours = tmp_path / "ours.json"
    resolved.save(ours)
    again = read_plan(ours)
    assert type(again) is PruningPlan and again == resolved
    assert type(resolved.with_components([Component("ssm", 2)])) is PruningPlan
    assert bool(PruningPlan())  # a plan removing nothing is still a plan
    with pytest.raises(PlanError, match="not a pruning plan: no 'schema_version' and none of the official keys"):
        plan_from_json('{"foo": 1}')
