"""Falcon-H1 adapter: blocks, parallel attention branches, SSMs, heads, MLPs, MLP channel groups.

The adapter contract (``adapter_contract.py``) runs on the tiny fp32 Falcon-H1 of
``tiny_models.TINY`` (3 hybrid layers; Mamba branch with 2 B/C groups of 4 heads, gated RMSNorm
applied before the gate; MLP 64 channels = 8 groups of 8; chunk 8, sequence 20; every muP
multiplier away from 1 so a forgotten one shows). The tests here pin down the mixer variants, the
cache's positions without layer 0's attention, the extracted structure and the stock layout.
"""
from __future__ import annotations

import pytest
import torch
from adapter_checks import TOL, check_plan, comps, logits, tokens
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.formats.extract import extract
from shedder.core.plan import Component

SEQ = 20  # not a multiple of the chunk size (8)


def make_falcon_h1(seed: int = 0, **overrides):
    """The tiny Falcon-H1 of ``tiny_models.TINY``."""
    return TINY["falcon_h1"].build(seed, **overrides)


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

FALCON_H1 = FamilyCase(
    name="falcon_h1", build_tiny_model=make_falcon_h1,
    kinds={"block": 3, "mixer": 3, "ssm": 3, "head": 24, "attention": 3, "mlp": 3, "mlp_channel_group": 24},
    layer_kinds=("hybrid",) * 3, plans=PLANS, saved=("mixed", "heads_uneven_groups", "attention", "mlp_groups"),
    restores=(PLANS["mixed"], ("attention:1", "mlp_channel_group:0:1", "head:1:3", "block:2", "mlp:1")),
    # attention:0 removes the branch whose cache slot transformers reads the sequence length from;
    # live masks keep the cache consistent too (skipped block 0 / removed attention 1 record the length)
    generation=tuple((p, 7) for p in (PLANS["mixed"], PLANS["attention"], ("block:0", "ssm:1", "mlp_channel_group:2:0"),
                                      ("mixer:0", "mixer:2"), PLANS["block"], ("block:0", "attention:1", "head:2:4"))),
    stock=(PLANS["block"],),
    refused=(
        (("channel_group:0:0",), ("has no component kind 'channel_group'",)),
        (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), ("remove the layer's MLP instead (mlp:2)",)),
        (("mlp_channel_group:2:8",), ("indices 0..7, not 8",)),
        (("mlp:1", "mlp_channel_group:1:0"), ("the MLP of layer 1 is removed as a whole",)),
        (("block:1", "attention:1"), ("redundant: block 1 is removed as a whole",)),
        (("mixer:1", "attention:1"), ("attention:1:0 is redundant: the mixer of layer 1 is removed",)),
        (("attention:3",), ("layer 3 is out of range",)),
        (tuple(f"block:{i}" for i in range(3)), ("removes all 3 layers",)),
        (("head:0:0", "head:0:1", "head:0:2", "head:0:3"), ("group 0",)),
        (tuple(f"head:1:{h}" for h in range(8)), ("removing all its 8 heads",)),
    ),
    official=(({"pruned_mha_idx": [1], "pruned_mlp_idx": [2]}, ("attention:1", "mlp:2")),),
    component_params={"mlp:0": 3 * 32 * 64 + 32,                     # gate, up, down + pre_ff_layernorm
                      "attention:0": 2 * 32 * 32 + 2 * 32 * 16},     # q, o + k, v
    # the evaluator gives the masked perplexity; the cost model counts the extracted structure
    evaluation=Evaluation(plans=((), ("mlp:2",), ("mlp:2", "block:1"), PLANS["mixed"], ("attention:0", "ssm:1")),
                          seed=5, length=SEQ, batch=3, batch_size=2, rel=1e-5, cost=True),
)


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


class TestFalconH1(AdapterContract):
    case = FALCON_H1

    def test_mlp_group_size(self, adapter):
        assert adapter.mlp_group_size == 8

    def test_manual_decode_loop_keeps_positions(self, model):
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

    def test_block_only_plan_keeps_the_stock_layout(self, model):
        small = extract(model, comps(*PLANS["block"]))
        assert small.config.num_hidden_layers == 2
        assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
        assert [layer.mamba.layer_idx for layer in small.model.layers] == [0, 1]

    def test_pruned_structure(self, model):
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
