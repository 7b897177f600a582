"""Bamba adapter: blocks, SSMs, heads, attention and MLP sub-blocks, MLP channel groups.

Tiny random fp32 model (5 layers: mamba, attention, mamba, attention, mamba; 2 B/C groups of 4
heads; MLP 64 channels = 8 groups of 8; chunk 8, sequence 20). The central property is exactness:
the live-masked model computes the same logits as the extracted one, which then saves and loads.
"""
from __future__ import annotations

import re

import pytest
import torch
import transformers

from shedder.arch import adapter_for, count_parameters
from shedder.arch.hybrid_common import ZeroBranch
from shedder.errors import PlanError
from shedder.evaluator import PlanEvaluator
from shedder.extract import extract, save
from shedder.loading import load_model
from shedder.masking import masked
from shedder.metrics import perplexity
from shedder.plan import Component, PruningPlan

TOL = 1e-4
SEQ = 20  # not a multiple of the chunk size (8)


def make_bamba(seed: int = 0):
    config = transformers.BambaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, tie_word_embeddings=False, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.BambaForCausalLM(config).eval()
    spread(model)
    return model


def spread(model, std: float = 0.3) -> None:
    """Weights large enough that every removal visibly changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "layernorm.weight", "norm.weight")):
                p.normal_(0.0, std)


def comps(*specs: str) -> PruningPlan:
    return PruningPlan(frozenset(Component.parse(s) for s in specs))


def tokens(seed: int = 1, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def greedy_reference(model, ids, steps: int, attention_mask=None) -> torch.Tensor:
    """Greedy decoding by full-sequence forwards (no cache)."""
    for _ in range(steps):
        with torch.no_grad():
            out = model(ids, attention_mask=attention_mask, use_cache=False).logits
        ids = torch.cat([ids, out[:, -1].argmax(-1, keepdim=True)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
    return ids


def check_generation(model) -> None:
    """Greedy decoding with a cache equals the argmax of full-sequence forwards, for a left-padded
    batch (so the cache's length feeds real causal masks)."""
    prompt = tokens()[:, :7]
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :3] = 0
    out = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_reference(model, prompt, 6, attention_mask))


def check_masked_generation(model, plan: PruningPlan) -> None:
    with masked(model, plan):
        check_generation(model)


def check_evaluator(model, plans) -> None:
    """The prefix-caching evaluator (resuming mid-model, skipping layers) matches plain masked runs."""
    windows = torch.randint(0, 100, (4, SEQ), generator=torch.Generator().manual_seed(3))
    evaluator = PlanEvaluator(model, windows)
    for specs in plans:
        plan = comps(*specs)
        with masked(model, plan):
            expected = perplexity(model, windows)
        assert evaluator.perplexity(plan) == pytest.approx(expected, rel=1e-6)


def check_plan(model, plan: PruningPlan, tmp_path=None, generate: bool = False, tokenizer=None):
    """The exactness contract of one plan; returns (masked logits, extracted model)."""
    ids = tokens()
    adapter = adapter_for(model)
    with masked(model, plan) as resolved:
        got = logits(model, ids)
    small = extract(model, resolved)
    assert (logits(small, ids) - got).abs().max().item() <= TOL
    assert adapter.param_count(resolved) == count_parameters(small)
    if generate:
        check_generation(small)
    if tmp_path is not None:
        save(small, tokenizer, tmp_path / "pruned", resolved)
        loaded, _ = load_model(str(tmp_path / "pruned"))
        assert torch.equal(logits(loaded, ids), logits(small, ids))
    return got, small


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
    "mlp_on_mamba_layer": ("mlp:0",),
    "mlp_on_attention_layer": ("mlp:1",),
    "attention_and_mlp": ("attention:1", "mlp:1"),
    "mlp_groups": ("mlp_channel_group:2:0", "mlp_channel_group:2:7", "mlp_channel_group:3:4"),
    "mixed": ("block:0", "ssm:2", "head:4:1", "attention:3", "mlp:4", "mlp_channel_group:1:2",
              "mlp_channel_group:2:5"),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, name, tmp_path, bundled_tokenizer):
    plan = comps(*PLANS[name])
    full = logits(model, tokens())
    round_trip = name in ("mixed", "heads_uneven_groups", "attention", "mlp_groups")
    got, _ = check_plan(model, plan, tmp_path if round_trip else None, tokenizer=bundled_tokenizer)
    assert (got - full).abs().max().item() > 1e-3, "removing components must change the logits"


def test_unpruned_mask_is_identity_and_restores_bit_for_bit(model):
    ids = tokens()
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with masked(model, PruningPlan()):
        assert torch.equal(logits(model, ids), before)
    with masked(model, comps(*PLANS["mixed"])):
        pass
    assert torch.equal(logits(model, ids), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_mask_restores_after_exception(model):
    ids = tokens()
    before = logits(model, ids)
    with pytest.raises(RuntimeError), masked(model, comps("attention:1", "mlp_channel_group:0:1", "head:2:3", "block:4")):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), before)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_generation_with_cache_on_extracted_models(model):
    for plan in (comps(*PLANS["mixed"]), comps("attention:1"), comps("ssm:0", "ssm:2", "mlp_channel_group:3:0")):
        check_plan(model, plan, generate=True)


def test_generation_with_cache_under_live_masks(model):
    for plan in (comps(*PLANS["mixed"]), comps("attention:1", "head:0:2"), comps("block:1", "mlp:3")):
        check_masked_generation(model, plan)


def test_prefix_evaluator_matches_masked_forward(model):
    check_evaluator(model, [(), ("attention:3",), ("attention:3", "block:2"), ("mlp_channel_group:4:1",),
                            ("head:2:1", "mlp:1", "attention:3")])


def test_block_only_plan_loads_with_stock_transformers(model, tmp_path, bundled_tokenizer):
    plan = comps("block:1", "block:2")
    _, small = check_plan(model, plan)
    assert not getattr(small.config, "shedder", None)
    assert small.config.num_hidden_layers == 3
    assert small.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
    assert [getattr(layer.self_attn, "layer_idx", None) for layer in small.model.layers if hasattr(layer, "self_attn")] == [1]
    save(small, bundled_tokenizer, tmp_path / "stock", plan)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert torch.equal(logits(stock, tokens()), logits(small, tokens()))


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
    assert counts == {"block": 5, "ssm": 3, "head": 24, "attention": 2, "mlp": 5, "mlp_channel_group": 40}
    assert adapter.group_size == 8
    removed = adapter.component_params(Component("mlp", 0))
    assert removed == 3 * 32 * 64 + 32   # gate, up, down + pre_ff_layernorm


def test_official_ordinal_attention_maps_to_layers(model):
    plan = PruningPlan.from_official({"pruned_mha_idx": [1], "pruned_mamba_block_idx": [0]})
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
    (("head:0:0", "head:0:1", "head:0:2", "head:0:3"), "group 0"),
])
def test_validation_errors_name_the_problem(model, specs, message):
    with pytest.raises(PlanError, match=re.escape(message)), masked(model, comps(*specs)):
        pass


def test_candidates_respect_rules(model):
    adapter = adapter_for(model)
    base = comps(*(f"mlp_channel_group:1:{g}" for g in range(7)))
    cands = adapter.candidates(base, ["mlp_channel_group", "mlp"])
    assert Component("mlp_channel_group", 1, 7) not in cands   # would empty the MLP
    assert Component("mlp", 1) in cands                        # the MLP can still go as a whole
    without_mlp = base.with_components([Component("mlp", 1)])
    check_plan(model, without_mlp)
    assert not [c for c in adapter.candidates(without_mlp, ["mlp_channel_group"]) if c.layer == 1]
