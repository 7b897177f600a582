"""Jamba adapter: blocks, Mamba-1 SSMs and channel groups, attention, dense-MLP and MoE
feed-forwards, dense-MLP channel groups.

Tiny random fp32 model (5 layers: mamba, attention, mamba, attention, mamba; MoE with 3 experts,
top 2, on layers 1 and 4, dense 64-channel MLPs = 8 groups of 8 elsewhere; Mamba inner width 64 =
4 channel groups of 16; sequence 20). The central property is exactness: the live-masked model
computes the same logits as the extracted one, which then saves and loads.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from adapter_checks import (TOL, check_evaluator, check_mask_restores, check_plan, check_refused, check_removal,
                            check_stock_load, comps, logits, random_model, tokens)

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.arch.jamba import period_offset
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

SEQ = 20


def make_jamba(seed: int = 0, **overrides):
    kwargs = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3,
        expert_layer_offset=1, num_experts=3, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=4, tie_word_embeddings=False, eos_token_id=None)
    kwargs.update(overrides)
    config = transformers.JambaConfig(**kwargs)
    return random_model(transformers.JambaForCausalLM, config, seed)


@pytest.fixture(scope="module")
def model():
    return make_jamba()


PLANS = {
    "block_mamba": ("block:2",),
    "block_attention": ("block:1",),
    "all_attention_blocks": ("block:1", "block:3"),
    "ssm": ("ssm:0",),
    "channel_groups": ("channel_group:2:0", "channel_group:2:3"),
    "ssm_and_groups": ("ssm:4", "channel_group:4:1"),
    "attention": ("attention:1",),
    "mlp_dense": ("mlp:0",),
    "mlp_moe": ("mlp:4",),
    "mlp_groups": ("mlp_channel_group:3:0", "mlp_channel_group:3:7", "mlp_channel_group:0:2"),
    "attention_and_mlp": ("attention:3", "mlp:3"),
    "mixers": ("mixer:4", "mixer:1", "mixer:2", "mlp:2"),   # MoE layer, attention layer, an emptied layer (deleted)
    "mixed": ("block:0", "ssm:2", "channel_group:4:1", "attention:3", "mlp:1", "mlp_channel_group:3:2"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, name, tmp_path, bundled_tokenizer):
    round_trip = name in ("mixed", "all_attention_blocks", "attention", "mlp_groups", "block_mamba")
    check_removal(model, comps(*PLANS[name]), tokens(), tmp_path=tmp_path if round_trip else None,
                  tokenizer=bundled_tokenizer)


def test_mixer_biases(tmp_path, bundled_tokenizer):
    variant = make_jamba(seed=3, mamba_proj_bias=True, mamba_conv_bias=False)
    got, _ = check_plan(variant, comps("ssm:0", "channel_group:0:1", "channel_group:2:3", "attention:1", "block:3"),
                        tmp_path, generate=True, tokenizer=bundled_tokenizer)
    assert (got - logits(variant, tokens())).abs().max().item() > 1e-3


def test_unpruned_mask_is_identity_and_restores_bit_for_bit(model):
    check_mask_restores(model, comps(*PLANS["mixed"]))


def test_mask_restores_after_exception(model):
    check_mask_restores(model, comps("attention:1", "mlp_channel_group:0:1", "ssm:2", "channel_group:4:0", "block:3",
                                     "mlp:4"))


def test_generation_with_cache_on_extracted_models(model):
    for name in ("mixed", "attention", "all_attention_blocks", "mlp_moe", "mixers"):
        check_plan(model, comps(*PLANS[name]), generate=True)
    check_plan(model, comps("attention:1", "mlp:1", "attention:3", "mlp:3", "ssm:0"), generate=True)


def test_manual_decode_loop_with_padding_keeps_mask_sizes(model):
    """A plain ``model(token, cache=...)`` loop sizes the attention mask from the first attention
    layer's cache slot: with that attention removed the cache must still know how many tokens it has
    seen (a left-padded prompt makes the mask matter)."""
    small = extract(model, comps("attention:1", "channel_group:2:1"))
    ids = tokens()[:1, :12]
    mask = torch.ones_like(ids)
    mask[:, :2] = 0
    with torch.no_grad():
        out = small(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        for t in range(8, 12):
            out = small(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
        full = small(ids, attention_mask=mask, use_cache=False).logits[:, 7:]
    assert (torch.stack(steps, 1) - full).abs().max().item() <= TOL


def test_masked_generation_matches_extracted(model):
    plan = comps("block:1", "attention:3", "ssm:2")
    prompt = tokens()[:1, :7]
    with masked(model, plan) as resolved:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    small = extract(model, resolved)
    assert torch.equal(out, small.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_block_only_plan_loads_with_stock_transformers(model, tmp_path, bundled_tokenizer):
    plan = comps("block:0", "block:3")
    _, small = check_plan(model, plan, generate=True)
    assert small.config.num_hidden_layers == 3
    assert small.config.layers_block_type == ["attention", "mamba", "mamba"]
    assert small.config.layers_num_experts == [3, 1, 3]
    assert [type(layer.feed_forward).__name__ for layer in small.model.layers] == \
        ["JambaSparseMoeBlock", "JambaMLP", "JambaSparseMoeBlock"]
    assert small.model.layers[0].self_attn.layer_idx == 0 and small.model.layers[2].mamba.layer_idx == 2
    check_stock_load(small, plan, bundled_tokenizer, tmp_path / "stock", tokens())


def test_pruned_structure(model):
    small = extract(model, comps("block:1", "attention:3", "mlp:4", "mlp_channel_group:0:5", "ssm:2",
                                 "channel_group:2:0"))
    layers = small.model.layers
    assert len(layers) == 4
    assert small.config.layers_block_type == ["mamba", "mamba", "attention", "mamba"]   # no period describes it
    assert small.config.shedder["layers"] == [
        {"source": 0, "type": "mamba", "moe": False, "mlp": 56},
        {"source": 2, "type": "mamba", "moe": False, "ssm": False, "inner": 48},
        {"source": 3, "type": "attention", "moe": False, "attention": False},
        {"source": 4, "type": "mamba", "moe": True, "mlp": 0},
    ]
    assert isinstance(layers[2].self_attn, ZeroBranch) and layers[2].self_attn.layer_idx == 2
    assert isinstance(layers[3].feed_forward, ZeroBranch)
    assert layers[1].mamba.layer_idx == 1 and not hasattr(layers[1].mamba, "x_proj")
    # the extracted model re-prunes like any other
    adapter = adapter_for(small)
    assert [adapter.layer_kind(i) for i in range(4)] == ["mamba", "mamba", "mlp", "mamba"]
    check_plan(small, comps("mlp:2", "channel_group:1:0", "mlp_channel_group:0:0"))


def test_removing_every_attention_layer_keeps_an_empty_one_for_the_cache(model):
    small = extract(model, comps("block:1", "block:3"))
    assert small.config.layers_block_type == ["mamba", "attention", "mamba", "mamba"]
    empty = small.model.layers[1]
    assert sum(p.numel() for p in empty.parameters()) == 0
    assert adapter_for(small).layer_components(1) == [Component("block", 1)]


def test_inventory(model):
    adapter = adapter_for(model)
    assert [adapter.layer_kind(i) for i in range(5)] == ["mamba", "attention", "mamba", "attention", "mamba"]
    assert adapter.kind_counts() == {"block": 5, "mixer": 5, "ssm": 3, "channel_group": 12, "attention": 2, "mlp": 5,
                                     "mlp_channel_group": 24}
    assert adapter.group_sizes == {"channel_group": 16, "mlp_channel_group": 8}
    assert adapter.component_params(Component("mlp", 4)) == 3 * 3 * 32 * 64 + 3 * 32 + 32   # experts, router, norm
    assert adapter.component_params(Component("attention", 1)) == 2 * 32 * 32 + 2 * 32 * 16 + 32


def test_period_offset():
    assert period_offset([False, True, False, True], (2, 1)) == (2, 1)
    assert period_offset([False, False, True, False], (2, 1)) == (3, 2)
    assert period_offset([False, False, False], (2, 1)) == (4, 3)
    assert period_offset([False, True, True, False], (2, 1)) is None


@pytest.mark.parametrize("specs, message", [
    (("attention:0",), "layer 0 (mamba) has no attention"),
    (("ssm:1",), "layer 1 (attention) has no ssm"),
    (("mlp_channel_group:1:0",), "layer 1 (attention) has no mlp_channel_group"),   # MoE: experts stay whole
    (("head:0:0",), "has no component kind 'head'"),
    (tuple(f"channel_group:2:{g}" for g in range(4)), "removing all 4 channel groups"),
    (tuple(f"mlp_channel_group:3:{g}" for g in range(8)), "remove the layer's MLP instead (mlp:3)"),
    (("mlp:0", "mlp_channel_group:0:1"), "the MLP of layer 0 is removed as a whole"),
    (tuple(f"block:{i}" for i in range(5)), "removes all 5 layers"),
])
def test_validation_errors_name_the_problem(model, specs, message):
    check_refused(model, comps(*specs), [message])


def test_evaluator_and_cost_model_agree(model):
    """The prefix-reusing evaluator gives the masked perplexity, and the analytic cost model counts
    the extracted structure (its parameter total equals param_count)."""
    windows = tokens(seed=5, length=SEQ, batch=3)
    plans = [PruningPlan(), comps("mlp:4"), comps("mlp:4", "block:1"), comps(*PLANS["mixed"]),
             comps(*PLANS["all_attention_blocks"])]
    check_evaluator(model, plans, windows, batch_size=2, rel=1e-5, cost=True)
