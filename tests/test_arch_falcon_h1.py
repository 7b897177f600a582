"""Falcon-H1 adapter: blocks, parallel attention branches, SSMs, heads, MLPs, MLP channel groups.

Tiny random fp32 model (3 hybrid layers; Mamba branch with 2 B/C groups of 4 heads, gated RMSNorm
applied before the gate; MLP 64 channels = 8 groups of 8; chunk 8, sequence 20; every muP
multiplier away from 1 so a forgotten one shows). The central property is exactness: the
live-masked model computes the same logits as the extracted one, which then saves and loads.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from adapter_checks import (TOL, check_evaluator, check_mask_restores, check_plan, check_refused, check_removal,
                            check_stock_load, comps, logits, random_model, tokens)

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.formats.official import OfficialConfig
from shedder.core.plan import Component, PruningPlan

SEQ = 20  # not a multiple of the chunk size (8)


def make_falcon_h1(seed: int = 0, **overrides):
    kwargs = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=True,
        tie_word_embeddings=False, eos_token_id=None,
        embedding_multiplier=1.5, lm_head_multiplier=0.7, mlp_multipliers=[0.8, 1.3], key_multiplier=1.2,
        attention_in_multiplier=0.9, attention_out_multiplier=1.4, ssm_multipliers=[0.6, 1.3, 0.8, 1.2, 0.9],
        ssm_in_multiplier=1.1, ssm_out_multiplier=0.75)
    kwargs.update(overrides)
    return random_model(transformers.FalconH1ForCausalLM, transformers.FalconH1Config(**kwargs), seed)


@pytest.fixture(scope="module")
def model():
    return make_falcon_h1()


PLANS = {
    "block": ("block:1",),
    "attention": ("attention:0",),
    "ssm": ("ssm:1",),
    "heads": ("head:2:0", "head:2:5", "head:2:6"),
    "heads_uneven_groups": ("head:0:0", "head:0:1", "head:0:2"),
    "ssm_and_heads": ("ssm:0", "head:0:3"),
    "mlp": ("mlp:2",),
    "mixer": ("mixer:0", "mlp_channel_group:0:3"),   # layer 0 holds the cache slot the length is read from
    "mlp_groups": ("mlp_channel_group:0:0", "mlp_channel_group:0:7", "mlp_channel_group:1:4"),
    "attention_ssm_mlp": ("attention:1", "ssm:1", "mlp:1"),
    "mixed": ("block:2", "attention:0", "ssm:1", "head:0:1", "mlp:1", "mlp_channel_group:0:2",
              "mlp_channel_group:0:5"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, name, tmp_path, bundled_tokenizer):
    round_trip = name in ("mixed", "heads_uneven_groups", "attention", "mlp_groups")
    check_removal(model, comps(*PLANS[name]), tokens(), tmp_path=tmp_path if round_trip else None,
                  tokenizer=bundled_tokenizer)


@pytest.mark.parametrize("overrides", [
    {"mamba_rms_norm": False, "mamba_proj_bias": True, "projectors_bias": True, "mlp_bias": True,
     "mamba_conv_bias": False},                                  # y * silu(z), no norm module; biases
    {"mamba_rms_norm": True, "mamba_norm_before_gate": False},   # Mamba-2's gate-then-norm order
], ids=["no_norm", "gate_before_norm"])
def test_mixer_variants(overrides, tmp_path, bundled_tokenizer):
    variant = make_falcon_h1(seed=3, **overrides)
    got, small = check_plan(variant, comps("ssm:0", "head:1:2", "head:1:6", "head:2:0", "attention:2",
                                           "mlp_channel_group:1:3"),
                            tmp_path, generate=True, tokenizer=bundled_tokenizer)
    assert (got - logits(variant, tokens())).abs().max().item() > 1e-3
    assert hasattr(small.model.layers[1].mamba, "norm") == overrides["mamba_rms_norm"]


def test_unpruned_mask_is_identity_and_restores_bit_for_bit(model):
    check_mask_restores(model, comps(*PLANS["mixed"]))


def test_mask_restores_after_exception(model):
    check_mask_restores(model, comps("attention:1", "mlp_channel_group:0:1", "head:1:3", "block:2", "mlp:1"))


def test_generation_with_cache_on_extracted_models(model):
    # attention:0 removes the branch whose cache slot transformers reads the sequence length from
    for plan in (comps(*PLANS["mixed"]), comps("attention:0"), comps("block:0", "ssm:1", "mlp_channel_group:2:0"),
                 comps("mixer:0", "mixer:2")):
        check_plan(model, plan, generate=True)


def test_manual_decode_loop_keeps_positions(model):
    """A plain ``model(token, cache=...)`` loop takes positions from the cache's sequence length,
    which transformers reads from layer 0: with layer 0's attention removed the cache must still
    know how many tokens it has seen."""
    small = extract(model, comps("attention:0", "head:1:2"))
    ids = tokens()[:1, :12]
    with torch.no_grad():
        out = small(ids[:, :8], use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        for t in range(8, 12):
            out = small(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    full = logits(small, ids)[:, 7:]
    assert (torch.stack(steps, 1) - full).abs().max().item() <= TOL


def test_masked_generation_matches_extracted(model):
    """Live masks keep the cache consistent too (skipped block 0 / removed attention 1 still record
    the sequence length), so a masked model generates what its extraction generates."""
    plan = comps("block:0", "attention:1", "head:2:4")
    prompt = tokens()[:1, :7]
    with masked(model, plan) as resolved:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    small = extract(model, resolved)
    assert torch.equal(out, small.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_block_only_plan_loads_with_stock_transformers(model, tmp_path, bundled_tokenizer):
    plan = comps("block:1")
    _, small = check_plan(model, plan, generate=True)
    assert small.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    assert [layer.mamba.layer_idx for layer in small.model.layers] == [0, 1]
    check_stock_load(small, plan, bundled_tokenizer, tmp_path / "stock", tokens())


def test_pruned_structure(model):
    small = extract(model, comps("attention:2", "mlp:0", "mlp_channel_group:2:5", "head:2:1", "ssm:2", "block:1"))
    layers = small.model.layers
    assert len(layers) == 2
    assert isinstance(layers[1].self_attn, ZeroBranch) and layers[1].self_attn.layer_idx == 1
    assert isinstance(layers[0].feed_forward, ZeroBranch)
    assert layers[1].feed_forward.gate_proj.out_features == 56
    assert layers[1].mamba.num_heads == 7 and not hasattr(layers[1].mamba, "A_log")
    assert layers[1].mamba.mup_vector.shape[-1] == 2 * 7 * 4      # z and x rows only, no B/C/dt
    assert small.config.shedder["layers"] == [{"source": 0, "mlp": 0},
                                              {"source": 2, "attention": False, "ssm": False, "heads_per_group": [3, 4], "mlp": 56}]
    # the extracted model re-prunes like any other
    adapter = adapter_for(small)
    assert [adapter.layer_kind(i) for i in range(2)] == ["hybrid", "mamba"]
    assert Component("attention", 1) not in adapter.components() and Component("ssm", 1) not in adapter.components()
    check_plan(small, comps("mlp:1", "head:1:0", "attention:0"))


def test_inventory(model):
    adapter = adapter_for(model)
    assert [adapter.layer_kind(i) for i in range(3)] == ["hybrid"] * 3
    counts = adapter.kind_counts()
    assert counts == {"block": 3, "mixer": 3, "ssm": 3, "head": 24, "attention": 3, "mlp": 3, "mlp_channel_group": 24}
    assert adapter.mlp_group_size == 8
    assert adapter.component_params(Component("mlp", 0)) == 3 * 32 * 64 + 32   # gate, up, down + pre_ff_layernorm
    assert adapter.component_params(Component("attention", 0)) == 2 * 32 * 32 + 2 * 32 * 16   # q, o + k, v


def test_official_ordinal_attention_maps_to_layers(model):
    plan = OfficialConfig.of({"pruned_mha_idx": [1], "pruned_mlp_idx": [2]})
    with masked(model, plan) as resolved:
        pass
    assert set(resolved.components) == {Component("attention", 1), Component("mlp", 2)}


@pytest.mark.parametrize("specs, message", [
    (("channel_group:0:0",), "has no component kind 'channel_group'"),
    (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), "remove the layer's MLP instead (mlp:2)"),
    (("mlp_channel_group:2:8",), "indices 0..7, not 8"),
    (("mlp:1", "mlp_channel_group:1:0"), "the MLP of layer 1 is removed as a whole"),
    (("block:1", "attention:1"), "redundant: block 1 is removed as a whole"),
    (("mixer:1", "attention:1"), "attention:1:0 is redundant: the mixer of layer 1 is removed"),
    (("attention:3",), "layer 3 is out of range"),
    (tuple(f"block:{i}" for i in range(3)), "removes all 3 layers"),
    (("head:0:0", "head:0:1", "head:0:2", "head:0:3"), "group 0"),
    (tuple(f"head:1:{h}" for h in range(8)), "removing all its 8 heads"),
])
def test_validation_errors_name_the_problem(model, specs, message):
    check_refused(model, comps(*specs), [message])


def test_evaluator_and_cost_model_agree(model):
    """The prefix-reusing evaluator gives the masked perplexity, and the analytic cost model counts
    the extracted structure (its parameter total equals param_count)."""
    windows = tokens(seed=5, length=SEQ, batch=3)
    plans = [PruningPlan(), comps("mlp:2"), comps("mlp:2", "block:1"), comps(*PLANS["mixed"]),
             comps("attention:0", "ssm:1")]
    check_evaluator(model, plans, windows, batch_size=2, rel=1e-5, cost=True)
