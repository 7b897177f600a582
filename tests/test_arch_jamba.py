"""Jamba adapter: blocks, Mamba-1 SSMs and channel groups, attention, dense-MLP and MoE
feed-forwards, dense-MLP channel groups.

The adapter contract (``adapter_contract.py``) runs on the tiny fp32 Jamba of ``tiny_models.TINY``
(5 layers: mamba, attention, mamba, attention, mamba; MoE with 3 experts, top 2, on layers 1 and 4,
dense 64-channel MLPs = 8 groups of 8 elsewhere; Mamba inner width 64 = 4 channel groups of 16;
sequence 20). The tests here pin down the mixer biases, the padded decode loop without the first
attention, the layout written for a layout no period describes, and the empty attention layer kept
for the cache.
"""
from __future__ import annotations

import torch
from adapter_checks import TOL, check_plan, comps, logits, tokens
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.arch.jamba import period_offset
from shedder.formats.extract import extract
from shedder.core.plan import Component

SEQ = 20


def make_jamba(seed: int = 0, **overrides):
    """The tiny Jamba of ``tiny_models.TINY``."""
    return TINY["jamba"].build(seed, **overrides)


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
    "experts": ("expert:1:0", "expert:4:2", "mixer:4"),
}

JAMBA = FamilyCase(
    name="jamba", build_tiny_model=make_jamba,
    kinds={"block": 5, "mixer": 5, "ssm": 3, "channel_group": 12, "attention": 2, "mlp": 5, "mlp_channel_group": 24,
           "expert": 6},
    layer_kinds=("mamba", "attention", "mamba", "attention", "mamba"), plans=PLANS,
    saved=("mixed", "all_attention_blocks", "attention", "mlp_groups", "block_mamba", "experts"),
    restores=(PLANS["mixed"], ("attention:1", "mlp_channel_group:0:1", "ssm:2", "channel_group:4:0", "block:3",
                               "mlp:4")),
    generation=tuple((p, 7) for p in (*(PLANS[name] for name in ("mixed", "attention", "all_attention_blocks",
                                                                  "mlp_moe", "mixers", "experts")),
                                      ("attention:1", "mlp:1", "attention:3", "mlp:3", "ssm:0"), ("block:0", "block:3"),
                                      ("block:1", "attention:3", "ssm:2"))),
    stock=(("block:0", "block:3"),),
    refused=(
        (("attention:0",), ("layer 0 (mamba) has no attention",)),
        (("ssm:1",), ("layer 1 (attention) has no ssm",)),
        (("mlp_channel_group:1:0",), ("layer 1 (attention) has no mlp_channel_group",)),   # MoE: experts stay whole
        (("head:0:0",), ("has no component kind 'head'",)),
        (tuple(f"channel_group:2:{g}" for g in range(4)), ("removing all 4 channel groups",)),
        (tuple(f"mlp_channel_group:3:{g}" for g in range(8)), ("remove the layer's MLP instead (mlp:3)",)),
        (("mlp:0", "mlp_channel_group:0:1"), ("the MLP of layer 0 is removed as a whole",)),
        (tuple(f"block:{i}" for i in range(5)), ("removes all 5 layers",)),
        (("expert:1:0", "expert:1:1"), ("fewer than the 2 each token is routed to",)),
        (("mlp:4", "expert:4:0"), ("expert:4:0 is redundant: the MLP of layer 4",)),
        (("expert:0:0",), ("has no expert",)),
    ),
    component_params={"mlp:4": 3 * 3 * 32 * 64 + 3 * 32 + 32,              # experts, router, norm
                      "attention:1": 2 * 32 * 32 + 2 * 32 * 16 + 32,
                      "expert:1:2": 3 * 32 * 64 + 32},                        # one expert and its router row
    # the evaluator gives the masked perplexity; the cost model counts the extracted structure
    evaluation=Evaluation(plans=((), ("mlp:4",), ("mlp:4", "block:1"), PLANS["mixed"], PLANS["all_attention_blocks"]),
                          seed=5, length=SEQ, batch=3, batch_size=2, rel=1e-5, cost=True),
)


def test_period_offset():
    assert period_offset([False, True, False, True], (2, 1)) == (2, 1)
    assert period_offset([False, False, True, False], (2, 1)) == (3, 2)
    assert period_offset([False, False, False], (2, 1)) == (4, 3)
    assert period_offset([False, True, True, False], (2, 1)) is None


def test_mixer_biases(tmp_path, bundled_tokenizer):
    variant = make_jamba(seed=3, mamba_proj_bias=True, mamba_conv_bias=False)
    got, _ = check_plan(variant, comps("ssm:0", "channel_group:0:1", "channel_group:2:3", "attention:1", "block:3"),
                        tmp_path, generate=True, tokenizer=bundled_tokenizer)
    assert (got - logits(variant, tokens())).abs().max().item() > 1e-3


class TestJamba(AdapterContract):
    case = JAMBA

    def test_group_sizes(self, adapter):
        assert adapter.group_sizes == {"channel_group": 16, "mlp_channel_group": 8}

    def test_manual_decode_loop_with_padding_keeps_mask_sizes(self, model):
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

    def test_block_only_plan_keeps_the_stock_layout(self, model):
        small = extract(model, comps("block:0", "block:3"))
        assert small.config.num_hidden_layers == 3
        assert small.config.layers_block_type == ["attention", "mamba", "mamba"]
        assert small.config.layers_num_experts == [3, 1, 3]
        assert [type(layer.feed_forward).__name__ for layer in small.model.layers] == \
            ["JambaSparseMoeBlock", "JambaMLP", "JambaSparseMoeBlock"]
        assert small.model.layers[0].self_attn.layer_idx == 0 and small.model.layers[2].mamba.layer_idx == 2

    def test_pruned_structure(self, model):
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


    def test_removing_every_attention_layer_keeps_an_empty_one_for_the_cache(self, model):
        small = extract(model, comps("block:1", "block:3"))
        assert small.config.layers_block_type == ["mamba", "attention", "mamba", "mamba"]
        empty = small.model.layers[1]
        assert sum(p.numel() for p in empty.parameters()) == 0
        assert adapter_for(small).layer_components(1) == [Component("block", 1)]
