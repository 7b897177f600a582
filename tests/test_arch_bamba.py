"""Bamba adapter: blocks, SSMs, heads, attention and MLP sub-blocks, MLP channel groups.

Tiny random fp32 model (5 layers: mamba, attention, mamba, attention, mamba; 2 B/C groups of 4
heads; MLP 64 channels = 8 groups of 8; chunk 8, sequence 20). The central property is exactness:
the live-masked model computes the same logits as the extracted one, which then saves and loads.
"""
from __future__ import annotations

import functools

import pytest
import transformers
from adapter_checks import (check_evaluator, check_mask_restores, check_refused, check_removal, check_stock_load, comps,
                            random_model, tokens)
from adapter_checks import check_masked_generation as _check_masked_generation
from adapter_checks import check_plan as _check_plan

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.formats.official import OfficialConfig
from shedder.core.plan import Component

SEQ = 20  # not a multiple of the chunk size (8)

#: Bamba's (and Zamba2's) generation checks decode a left-padded batch, so the cache's length
#: feeds real causal masks.
check_plan = functools.partial(_check_plan, padded=True)
check_masked_generation = functools.partial(_check_masked_generation, padded=True)


def make_bamba(seed: int = 0):
    config = transformers.BambaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, tie_word_embeddings=False, eos_token_id=None)
    return random_model(transformers.BambaForCausalLM, config, seed)


@pytest.fixture(scope="module")
def model():
    return make_bamba()


PLANS = {
    "block_mamba": ("block:2",),
    "block_attention": ("block:1",),
    "ssm": ("ssm:0",),
    "heads": ("head:2:0", "head:2:5", "head:2:6"),
    "heads_uneven_groups": ("head:4:0", "head:4:1", "head:4:2"),
    "ssm_and_heads": ("ssm:0", "head:0:3"),
    "attention": ("attention:3",),
    "mixers": ("mixer:2", "mixer:1", "mlp_channel_group:2:1"),   # a Mamba and an attention layer's mixer
    "mlp_on_mamba_layer": ("mlp:0",),
    "mlp_on_attention_layer": ("mlp:1",),
    "attention_and_mlp": ("attention:1", "mlp:1"),
    "mlp_groups": ("mlp_channel_group:2:0", "mlp_channel_group:2:7", "mlp_channel_group:3:4"),
    "mixed": ("block:0", "ssm:2", "head:4:1", "attention:3", "mlp:4", "mlp_channel_group:1:2",
              "mlp_channel_group:2:5"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, name, tmp_path, bundled_tokenizer):
    round_trip = name in ("mixed", "heads_uneven_groups", "attention", "mlp_groups")
    check_removal(model, comps(*PLANS[name]), tokens(), tmp_path=tmp_path if round_trip else None,
                  tokenizer=bundled_tokenizer, padded=True)


def test_unpruned_mask_is_identity_and_restores_bit_for_bit(model):
    check_mask_restores(model, comps(*PLANS["mixed"]))


def test_mask_restores_after_exception(model):
    check_mask_restores(model, comps("attention:1", "mlp_channel_group:0:1", "head:2:3", "block:4"))


def test_generation_with_cache_on_extracted_models(model):
    for plan in (comps(*PLANS["mixed"]), comps("attention:1"), comps("ssm:0", "ssm:2", "mlp_channel_group:3:0"),
                 comps("mixer:0", "mixer:3")):
        check_plan(model, plan, generate=True)


def test_generation_with_cache_under_live_masks(model):
    for plan in (comps(*PLANS["mixed"]), comps("attention:1", "head:0:2"), comps("block:1", "mlp:3"),
                 comps("mixer:0", "mixer:3")):
        check_masked_generation(model, plan)


def test_prefix_evaluator_matches_masked_forward(model):
    windows = tokens(seed=3, length=SEQ, batch=4)
    check_evaluator(model, [comps(*specs) for specs in [(), ("attention:3",), ("attention:3", "block:2"),
                                                         ("mlp_channel_group:4:1",),
                                                         ("head:2:1", "mlp:1", "attention:3")]], windows)


def test_block_only_plan_loads_with_stock_transformers(model, tmp_path, bundled_tokenizer):
    plan = comps("block:1", "block:2")
    _, small = check_plan(model, plan)
    assert small.config.num_hidden_layers == 3
    assert small.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
    assert [getattr(layer.self_attn, "layer_idx", None) for layer in small.model.layers if hasattr(layer, "self_attn")] == [1]
    check_stock_load(small, plan, bundled_tokenizer, tmp_path / "stock", tokens())


def test_pruned_structure(model):
    small = extract(model, comps("attention:3", "mlp:4", "mlp_channel_group:1:5", "head:0:1", "block:2"))
    layers = small.model.layers
    assert len(layers) == 4
    assert isinstance(layers[2].mamba, ZeroBranch)                    # old layer 3: attention gone
    assert small.config.layers_block_type[2] == "linear_attention"    # so the cache keeps no KV for it
    assert isinstance(layers[3].feed_forward, ZeroBranch)
    assert layers[1].feed_forward.gate_proj.out_features == 56       # old layer 1: one group of 8 gone
    assert small.config.layers_block_type[1] == "full_attention"
    assert layers[0].mamba.num_heads == 7
    # the extracted model re-prunes like any other
    adapter = adapter_for(small)
    assert adapter.layer_kind(2) == "mlp" and adapter.layer_kind(0) == "mamba"
    check_plan(small, comps("mlp:2", "head:0:0"))


def test_inventory(model):
    adapter = adapter_for(model)
    assert [adapter.layer_kind(i) for i in range(5)] == ["mamba", "attention", "mamba", "attention", "mamba"]
    counts = adapter.kind_counts()
    assert counts == {"block": 5, "mixer": 5, "ssm": 3, "head": 24, "attention": 2, "mlp": 5, "mlp_channel_group": 40}
    assert adapter.mlp_group_size == 8
    removed = adapter.component_params(Component("mlp", 0))
    assert removed == 3 * 32 * 64 + 32   # gate, up, down + pre_ff_layernorm


def test_official_ordinal_attention_maps_to_layers(model):
    plan = OfficialConfig.of({"pruned_mha_idx": [1], "pruned_mamba_block_idx": [0]})
    with masked(model, plan) as resolved:
        pass
    assert set(resolved.components) == {Component("attention", 3), Component("block", 0)}


@pytest.mark.parametrize("specs, message", [
    (("attention:0",), "layer 0 (mamba) has no attention"),
    (("ssm:1",), "layer 1 (attention) has no ssm"),
    (("channel_group:0:0",), "has no component kind 'channel_group'"),
    (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), "remove the layer's MLP instead (mlp:2)"),
    (("mlp_channel_group:2:8",), "indices 0..7, not 8"),
    (tuple(f"block:{i}" for i in range(5)), "removes all 5 layers"),
    (("attention:1", "block:3"), "removes every attention layer (layers 1, 3)"),
    (("mixer:1", "attention:3"), "removes every attention layer (layers 1, 3)"),
    (("mixer:2", "head:2:0"), "head:2:0 is redundant: the mixer of layer 2 is removed"),
    (("head:0:0", "head:0:1", "head:0:2", "head:0:3"), "group 0"),
])
def test_validation_errors_name_the_problem(model, specs, message):
    check_refused(model, comps(*specs), [message])


def test_candidates_respect_rules(model):
    adapter = adapter_for(model)
    base = comps(*(f"mlp_channel_group:1:{g}" for g in range(7)))
    cands = adapter.candidates(base, ["mlp_channel_group", "mlp"])
    assert Component("mlp_channel_group", 1, 7) not in cands   # would empty the MLP
    assert Component("mlp", 1) in cands                        # the MLP can still go as a whole
    without_mlp = base.with_components([Component("mlp", 1)])
    check_plan(model, without_mlp)
    assert not [c for c in adapter.candidates(without_mlp, ["mlp_channel_group"]) if c.layer == 1]
