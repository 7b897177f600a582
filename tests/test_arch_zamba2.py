"""Zamba2 adapter: blocks, SSMs, heads, and the shared transformer block's applications.

Tiny random fp32 model: 6 layers (mamba, hybrid, mamba, hybrid, hybrid, mamba), two memory blocks
used in turn by the three applications (blocks 0, 1, 0), q/k/v adapters and RoPE on, 2 B/C groups
of 4 heads, chunk 8, sequence 20. Besides exactness, the tests pin down that shared weights stay
shared and disappear only with their last application.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from adapter_checks import (check_evaluator, check_mask_restores, check_refused, check_removal, check_stock_load, comps,
                            random_model, tokens)
from adapter_checks import check_masked_generation as _check_masked_generation
from adapter_checks import check_plan as _check_plan

from shedder.arch import adapter_for, count_parameters
from shedder.arch.zamba2 import PassThrough
from shedder.formats.extract import extract
from shedder.core.plan import Component, PruningPlan

#: generation checks decode a left-padded batch, so the cache's length feeds real causal masks
check_plan = functools.partial(_check_plan, padded=True)
check_masked_generation = functools.partial(_check_masked_generation, padded=True)

LAYER_TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]


def make_zamba2(seed: int = 0, **overrides):
    kwargs = {
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
        "num_attention_heads": 4, "layers_block_type": LAYER_TYPES, "n_mamba_heads": 8, "mamba_ngroups": 2,
        "mamba_d_state": 8, "chunk_size": 8, "num_mem_blocks": 2, "use_shared_attention_adapter": True,
        "adapter_rank": 4, "use_mem_rope": True, "eos_token_id": None}
    config = transformers.Zamba2Config(**{**kwargs, **overrides})
    return random_model(transformers.Zamba2ForCausalLM, config, seed)


@pytest.fixture(scope="module")
def model():
    return make_zamba2()


def shared_params(model) -> int:
    """Unique parameters inside the shared blocks (all applications together)."""
    seen = {}
    for layer in model.model.layers:
        if hasattr(layer, "shared_transformer"):
            for p in layer.shared_transformer.parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


PLANS = {
    "block_mamba": ("block:0",),
    "block_hybrid": ("block:3",),            # remaining applications use blocks 0, 0: not the stock order
    "ssm_on_hybrid_layer": ("ssm:3",),
    "heads": ("head:1:0", "head:1:5", "head:1:6"),
    "attention": ("attention:1",),             # the official MHA mask: the MLP runs on the stream
    "mixers": ("mixer:0", "mixer:4", "attention:4", "mlp:4"),   # plain layer: as block; hybrid: h + linear(T), T = h
    "mixer_and_shared_block": ("mixer:3", "shared_block:3"),   # nothing left of layer 3: deleted
    "mlp": ("mlp:3",),
    "attention_and_mlp": ("attention:4", "mlp:4"),
    "two_applications_of_one_block": ("attention:1", "attention:4"),
    "mixed": ("block:0", "attention:3", "mlp:4", "ssm:5", "head:1:2", "head:4:7", "mixer:3", "shared_block:1"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, name, tmp_path, bundled_tokenizer):
    round_trip = name in ("mixed", "block_hybrid", "mlp", "attention")
    check_removal(model, comps(*PLANS[name]), tokens(), tmp_path=tmp_path if round_trip else None,
                  tokenizer=bundled_tokenizer, padded=True)


def test_unpruned_mask_is_identity_and_restores_bit_for_bit(model):
    check_mask_restores(model, comps(*PLANS["mixed"]))


def test_generation_with_cache_on_extracted_models(model):
    for plan in (comps(*PLANS["mixed"]), comps("block:3", "ssm:1"), comps(*PLANS["two_applications_of_one_block"])):
        check_plan(model, plan, generate=True)


def test_generation_with_cache_under_live_masks(model):
    for plan in (comps(*PLANS["mixed"]), comps("attention:1", "mlp:3"), comps("block:1", "ssm:3")):
        check_masked_generation(model, plan)


def test_prefix_evaluator_matches_masked_forward(model):
    windows = tokens(seed=3, length=20, batch=4)
    check_evaluator(model, [comps(*specs) for specs in [(), ("attention:3",), ("attention:3", "block:2"), ("mlp:4",),
                                                         ("head:2:1", "attention:1")]], windows)


def test_cost_counts_only_the_applications_own_adapters(model):
    adapter = adapter_for(model)
    linears = [m for m in adapter.layer_cost_modules(3) if isinstance(m, torch.nn.Linear)]
    # q, k, v, o + its q/k/v adapters (2 each) + gate_up, down + its gate_up adapter (2) + linear + in/out_proj
    assert len(linears) == 4 + 6 + 2 + 2 + 1 + 2
    assert len(adapter.layer_cost_modules(2)) == len(list(model.model.layers[2].modules()))


def test_shared_weights_stay_shared(model):
    adapter = adapter_for(model)
    full_shared = shared_params(model)
    # one application of memory block 0 goes: only its own adapters and linear go with it
    attn_adapters, mlp_adapter, linear = 3 * (64 * 4 + 4 * 64), 32 * 4 + 4 * 128, 32 * 32
    small = extract(model, comps("shared_block:1"))
    assert shared_params(small) == full_shared - attn_adapters - mlp_adapter
    assert adapter.component_params(Component("shared_block", 1)) == attn_adapters + mlp_adapter + linear
    assert adapter.component_params(Component("mlp", 1)) == mlp_adapter   # the shared MLP is still used
    layers = small.model.layers
    q = [layers[j].shared_transformer.self_attn.q_proj.weight for j in small.config.hybrid_layer_ids]
    assert len(q) == 2 and q[0] is not q[1]           # blocks 1 and 0 now
    # both applications of block 0 go: block 0's weights go too, block 1's stay
    small = extract(model, comps("shared_block:1", "shared_block:4"))
    only = small.model.layers[small.config.hybrid_layer_ids[0]].shared_transformer
    assert only.block_id == 1
    assert shared_params(small) == sum(p.numel() for p in only.parameters())
    # a skipped MLP keeps the shared MLP for the other application of its block
    small = extract(model, comps("mlp:1"))
    apps = [small.model.layers[j].shared_transformer for j in small.config.hybrid_layer_ids]
    assert isinstance(apps[0].feed_forward, PassThrough)
    assert apps[2].feed_forward.gate_up_proj.weight is not None
    assert isinstance(apps[2].feed_forward.gate_up_proj_adapter_list[0], torch.nn.Identity)


def test_stock_expressible_plans_load_with_stock_transformers(model, tmp_path, bundled_tokenizer):
    for name, plan in {"blocks": comps("block:0", "block:4"), "shared_block": comps("shared_block:4")}.items():
        _, small = check_plan(model, plan)
        stock = check_stock_load(small, plan, bundled_tokenizer, tmp_path / name, tokens())
        assert count_parameters(stock) == count_parameters(small)
    assert small.config.layers_block_type == ["linear_attention", "hybrid", "linear_attention", "hybrid",
                                              "linear_attention", "linear_attention"]


def test_inventory(model):
    adapter = adapter_for(model)
    assert [adapter.layer_kind(i) for i in range(6)] == ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]
    assert adapter.kind_counts() == {"block": 6, "mixer": 6, "shared_block": 3, "ssm": 6, "head": 48,
                                    "attention": 3, "mlp": 3}
    small = extract(model, comps("shared_block:3", "mlp:4"))
    again = adapter_for(small)
    assert [again.layer_kind(i) for i in range(6)] == ["mamba", "hybrid", "mamba", "mamba", "hybrid", "mamba"]
    assert again.kind_counts()["mlp"] == 1
    check_plan(small, comps("shared_block:4", "head:3:1"))


def test_single_memory_block_without_adapters():
    model = make_zamba2(num_mem_blocks=1, use_shared_attention_adapter=False, use_mem_rope=False)
    check_plan(model, comps("block:1", "mlp:4", "ssm:0"), generate=True)
    _, small = check_plan(model, comps("block:3"))
    assert not getattr(small.config, "shedder", None)


def test_candidates_skip_no_ops(model):
    adapter = adapter_for(model)
    assert Component("mlp", 3) in adapter.candidates(PruningPlan(), ["mlp"])
    assert Component("mlp", 3) not in adapter.candidates(comps("shared_block:3"), ["mlp"])
    # the last application cannot go (transformers' Zamba2 needs one to decode with a cache)
    assert adapter.candidates(comps("attention:1", "shared_block:3"), ["attention", "shared_block"]) == []


@pytest.mark.parametrize("specs, message", [
    (("attention:0",), "layer 0 (mamba) has no attention"),
    (("mlp:2",), "layer 2 (mamba) has no mlp"),
    (("mlp_channel_group:1:0",), "has no component kind 'mlp_channel_group'"),
    (("head:3:4", "head:3:5", "head:3:6", "head:3:7"), "group 1"),
    (tuple(f"block:{i}" for i in range(6)), "removes all 6 layers"),
    (("block:1", "attention:1"), "redundant: block 1 is removed"),
    (("attention:1", "block:3", "shared_block:4"), "removes every attention (layers 1, 3, 4)"),
    (("mixer:3", "ssm:3"), "ssm:3:0 is redundant: the mixer of layer 3 is removed"),
    (("shared_block:3", "mlp:3"), "mlp:3:0 is redundant: the shared_block of layer 3 is removed"),
])
def test_validation_errors_name_the_problem(model, specs, message):
    check_refused(model, comps(*specs), [message])


def test_official_masks_compute_what_the_official_patch_computes(model):
    """attention (the official MHA mask): T = mlp(pre_ff_norm(h)), the Mamba side unchanged;
    mixer (the official mamba-block mask): h + linear(T) with the full shared block."""
    from shedder.measure.masking import masked

    block, seen = model.model.layers[3], {}

    def capture(module, args, kwargs, output):
        seen["h"], seen["out"] = args[0] if args else kwargs["hidden_states"], output

    ids = tokens()
    handles = [block.register_forward_hook(capture, with_kwargs=True),
               block.shared_transformer.register_forward_hook(lambda m, a, out: seen.update(T=out))]
    try:
        with torch.no_grad():
            for plan, expected in (
                ("attention:3", lambda h: block.mamba_decoder(h, transformer_hidden_states=block.linear(
                    block.shared_transformer.feed_forward(block.shared_transformer.pre_ff_layernorm(h), 3)))),
                ("mixer:3", lambda h: h + block.linear(seen["T"])),
            ):
                with masked(model, comps(plan)):
                    model(ids)
                assert torch.allclose(seen["out"], expected(seen["h"]), atol=1e-6), plan
    finally:
        for handle in handles:
            handle.remove()


def test_schema1_plans_keep_their_meaning(model, tmp_path):
    """Schema 1's Zamba2 ``attention`` removed the whole application: it reads as ``shared_block``."""
    old = {"schema_version": 1, "model": None, "group_sizes": {}, "meta": {},
           "components": [{"kind": "attention", "layer": 3, "index": 0}, {"kind": "ssm", "layer": 5, "index": 0}]}
    resolved = adapter_for(model).resolve(PruningPlan.from_dict(old))
    assert resolved.components == {Component("shared_block", 3), Component("ssm", 5)}
    assert resolved.meta == {} and resolved.to_dict()["schema_version"] == 2
    assert adapter_for(model).resolve(PruningPlan.from_json(resolved.to_json())) == resolved
