"""Nemotron-H adapter: Mamba blocks, SSMs and heads (shared Mamba-2 core), attention and MLP/MoE
sub-blocks, and MLP channel groups, on a tiny random fp32 hybrid with every layer type (its one
attention layer: removing it removes every attention, so the extracted model keeps a
``RemovedAttentionLayer`` for the cache)."""
from __future__ import annotations

import pytest
import transformers
import torch
from adapter_checks import (TOL, check_cached_generation, check_generation, check_mask_restores, check_refused,
                            check_removal, check_saved, check_stock_load, comps, logits, max_diff, random_model,
                            random_plan, spread_around_init, tokens)

from shedder.arch import adapter_for, count_parameters
from shedder.arch.mamba2_mixer import PrunedMamba2Mixer
from shedder.arch.nemotron_h import RemovedAttentionLayer
from shedder.measure.cost import estimate
from shedder.core.errors import PlanError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

PATTERN = ["mamba", "attention", "mamba", "mlp", "moe", "mamba", "mlp"]
GROUPS = {"mlp_channel_group": 32}  # 96 intermediate channels = 3 groups


def make_model(seed: int = 0, **overrides):
    kwargs = dict(hidden_size=64, vocab_size=100, layers_block_type=PATTERN, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16,
                  n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, max_position_embeddings=64,
                  eos_token_id=None)
    config = transformers.NemotronHConfig(**{**kwargs, **overrides})
    return random_model(transformers.NemotronHForCausalLM, config, seed, init=spread_around_init)


def plan(*specs: str) -> PruningPlan:
    return PruningPlan(comps(*specs).components, group_sizes=dict(GROUPS))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def adapter(model):
    return adapter_for(model, GROUPS)


@pytest.fixture(scope="module")
def ids():
    return tokens(seed=1, length=13)


def test_inventory(model, adapter):
    assert [adapter.layer_kind(i) for i in range(len(PATTERN))] == PATTERN
    assert adapter.kind_counts() == {"block": 3, "ssm": 3, "head": 24, "attention": 1, "mlp": 3, "mlp_channel_group": 6}
    assert adapter.layer_components(1) == [Component("attention", 1)]
    assert adapter.layer_components(4) == [Component("mlp", 4)]  # MoE: skipped whole, no channel groups
    assert adapter.layer_components(3) == [Component("mlp", 3)] + [Component("mlp_channel_group", 3, g) for g in range(3)]
    default = adapter_for(model)  # groups of 64: 64 + a short last group of 32
    assert [len(g) for g in default.mlp_groups(3)] == [64, 32]


PLANS = {
    "attention": lambda a: plan("attention:1"),
    "mlp": lambda a: plan("mlp:3"),
    "moe": lambda a: plan("mlp:4"),
    "mamba_block": lambda a: plan("block:2"),
    "ssm_and_heads": lambda a: plan("ssm:0", "head:0:1", "head:5:6"),
    "channel_groups_uneven": lambda a: plan("mlp_channel_group:3:1"),
    "channel_groups_uniform": lambda a: plan("mlp_channel_group:3:2", "mlp_channel_group:6:0"),
    "mixed": lambda a: plan("attention:1", "block:5", "ssm:2", "head:0:3", "mlp_channel_group:6:1", "mlp:4"),
    "random_mixed": lambda a: PruningPlan(random_plan(a, list(a.kinds), 21, 6).components, group_sizes=dict(GROUPS)),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, adapter, ids, name):
    check_removal(model, PLANS[name](adapter), ids, adapter=adapter)


def test_extracted_structure(model, adapter):
    small = extract(model, PLANS["mixed"](adapter), adapter)
    # the only attention layer is removed: it stays as a parameterless attention-type layer
    assert small.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention", "mlp", "mlp"]
    assert small.config.use_cache is not False
    entries = small.config.shedder["layers"]
    assert entries[0] == {"source": 0, "heads_per_group": [3, 4]} and entries[2]["ssm"] is False
    assert entries[1] == {"source": 1, "attention": False}
    assert entries[3:] == [{"source": 3}, {"source": 6, "mlp": 64}]
    layers = small.model.layers
    assert isinstance(layers[0].mixer, PrunedMamba2Mixer) and layers[4].mixer.up_proj.out_features == 64
    assert isinstance(layers[1], RemovedAttentionLayer) and count_parameters(layers[1]) == 0
    assert [getattr(getattr(l, "mixer", l), "layer_idx", i) for i, l in enumerate(layers)] == [0, 1, 2, 3, 4]


def test_removing_every_attention_keeps_the_cache_usable(model, adapter, ids, bundled_tokenizer, tmp_path):
    """Without any attention the extracted model still generates with the cache: its stand-in layer
    records the sequence length, and it survives a save / load and a second pruning."""
    p = adapter.resolve(plan("attention:1", "ssm:0"))
    small = check_removal(model, p, ids, adapter=adapter)
    planned, actual = estimate(model, p, seq_len=16, adapter=adapter), estimate(small, seq_len=16)
    assert planned.params == actual.params == count_parameters(small) == adapter.param_count(p)
    assert planned.flops_per_token_prefill == actual.flops_per_token_prefill
    assert planned.state_bytes_per_sequence == actual.state_bytes_per_sequence
    assert planned.layers[1].flops_prefill == planned.layers[1].state_bytes == planned.layers[1].params == 0
    loaded = check_saved(small, p, bundled_tokenizer, tmp_path / "pruned", ids, shedder_entry=True)
    assert isinstance(loaded.model.layers[1], RemovedAttentionLayer)
    with torch.no_grad():
        assert loaded(ids, use_cache=True).cache.get_seq_length() == ids.shape[1]
    check_generation(loaded, padded=True)

    again = adapter_for(loaded, GROUPS)
    assert again.layer_kind(1) == "attention" and again.layer_components(1) == []
    check_refused(loaded, plan("attention:1"), ["layer 1 (attention) has no attention"], again)
    twice = check_removal(loaded, plan("block:2"), ids, adapter=again)
    assert isinstance(twice.model.layers[1], RemovedAttentionLayer)
    assert twice.config.shedder["layers"][1] == {"source": 1, "attention": False}


def test_a_skipped_attention_keeps_counting_for_the_others(ids):
    """Live mask on the first of two attention layers (the one whose cache slot gives the length):
    a left-padded batch decodes through the cache exactly as the extracted model does, which needs
    the right length for the remaining attention's causal mask."""
    model = make_model(layers_block_type=["mamba", "attention", "mlp", "attention", "mamba"])
    adapter = adapter_for(model, GROUPS)
    p = plan("attention:1")
    expected = check_generation(extract(model, p, adapter), padded=True)
    with masked(model, p, adapter):
        check_generation(model, expected=expected, padded=True)
        with torch.no_grad():
            assert model(ids, use_cache=True).cache.get_seq_length() == ids.shape[1]


def test_uniform_removals_give_a_stock_config(model, adapter, ids, bundled_tokenizer, tmp_path):
    """Same heads in every Mamba layer, same MLP width, attention and a block gone: stock config."""
    heads = [f"head:{i}:{h}" for i in (0, 5) for h in (1, 6)]
    p = plan(*heads, "mlp_channel_group:3:0", "mlp_channel_group:6:2", "block:2", "mlp:4")
    small = extract(model, p, adapter)
    assert not hasattr(small.config, "shedder")
    assert (small.config.mamba_num_heads, small.config.intermediate_size) == (6, 64)
    with masked(model, p, adapter):
        assert max_diff(logits(model, ids), logits(small, ids)) <= TOL
    check_stock_load(small, p, bundled_tokenizer, tmp_path / "stock", ids)


@pytest.mark.parametrize("name", ["mixed", "ssm_and_heads", "channel_groups_uneven"])  # the last two keep the MoE
def test_save_load_round_trip(model, adapter, ids, bundled_tokenizer, tmp_path, name):
    p = adapter.resolve(PLANS[name](adapter))
    loaded = check_saved(extract(model, p, adapter), p, bundled_tokenizer, tmp_path / "pruned", ids, shedder_entry=True)
    assert type(loaded) is type(model)


def test_mask_leaves_the_model_untouched(model, adapter, ids):
    check_mask_restores(model, PLANS["mixed"](adapter), ids, adapter)


@pytest.mark.parametrize("specs", [
    ("block:2", "ssm:0", "head:5:1", "head:5:2", "mlp_channel_group:3:1", "mlp:6"),
    ("attention:1", "ssm:0"),  # no attention layer left: the extracted stand-in keeps the cache's length
])
def test_cached_generation_matches_full_forwards(model, adapter, ids, specs):
    check_cached_generation(model, plan(*specs), ids[:, :9], adapter=adapter)


@pytest.mark.parametrize("specs, words", [
    (("block:1",), ["layer 1 (attention) has no block"]),
    (("attention:0",), ["layer 0 (mamba) has no attention"]),
    (("head:3:0",), ["layer 3 (mlp) has no head"]),
    (("mlp_channel_group:4:0",), ["layer 4 (moe) has no mlp_channel_group"]),
    (("mlp_channel_group:3:3",), ["indices 0..2", "not 3"]),
    (("head:0:4", "head:0:5", "head:0:6", "head:0:7"), ["layer 0, group 1", "remove the SSM or the block instead"]),
    (("mlp_channel_group:6:0", "mlp_channel_group:6:1", "mlp_channel_group:6:2"),
     ["layer 6", "all 3 MLP channel groups", "remove the MLP instead"]),
    (("mlp:3", "mlp_channel_group:3:1"), ["redundant", "layer 3"]),
    (("block:2", "ssm:2"), ["redundant", "block 2"]),
    (("block:0", "attention:1", "block:2", "mlp:3", "mlp:4", "block:5", "mlp:6"), ["removes all 7 layers"]),
])
def test_invalid_plans_are_refused(model, adapter, specs, words):
    check_refused(model, plan(*specs), words, adapter)


def test_plan_for_another_group_size_is_refused(model, adapter):
    with pytest.raises(PlanError, match="groups of 64"):
        adapter.resolve(PruningPlan(frozenset([Component("mlp_channel_group", 3, 0)]),
                                     group_sizes={"mlp_channel_group": 64}))
