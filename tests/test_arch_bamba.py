"""Bamba adapter: blocks, SSMs, heads, attention and MLP sub-blocks, MLP channel groups.

The adapter contract (``adapter_contract.py``) runs on the tiny fp32 Bamba of ``tiny_models.TINY``
(5 layers: mamba, attention, mamba, attention, mamba; 2 B/C groups of 4 heads; MLP 64 channels =
8 groups of 8; chunk 8, sequence 20), generating on a left-padded batch so that the cache's length
feeds real causal masks. The tests here pin down the extracted structure, the stock layout of a
block-only extraction and the candidates' rules.
"""
from __future__ import annotations

from adapter_checks import check_plan, comps
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.formats.extract import extract
from shedder.core.plan import Component


def make_bamba(seed: int = 0):
    """The tiny Bamba of ``tiny_models.TINY``."""
    return TINY["bamba"].build(seed)


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

BAMBA = FamilyCase(
    name="bamba", build_tiny_model=make_bamba,
    kinds={"block": 5, "mixer": 5, "ssm": 3, "head": 24, "attention": 2, "mlp": 5, "mlp_channel_group": 40},
    layer_kinds=("mamba", "attention", "mamba", "attention", "mamba"), plans=PLANS,
    saved=("mixed", "heads_uneven_groups", "attention", "mlp_groups"),
    restores=(PLANS["mixed"], ("attention:1", "mlp_channel_group:0:1", "head:2:3", "block:4")),
    padded=True,
    generation=tuple((p, 7) for p in (PLANS["mixed"], ("attention:1", "head:0:2"),
                                      ("ssm:0", "ssm:2", "mlp_channel_group:3:0"), ("mixer:0", "mixer:3"),
                                      ("block:1", "mlp:3"))),
    stock=(("block:1", "block:2"),),
    refused=(
        (("attention:0",), ("layer 0 (mamba) has no attention",)),
        (("ssm:1",), ("layer 1 (attention) has no ssm",)),
        (("channel_group:0:0",), ("has no component kind 'channel_group'",)),
        (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), ("remove the layer's MLP instead (mlp:2)",)),
        (("mlp_channel_group:2:8",), ("indices 0..7, not 8",)),
        (tuple(f"block:{i}" for i in range(5)), ("removes all 5 layers",)),
        (("attention:1", "block:3"), ("removes every attention layer (layers 1, 3)",)),
        (("mixer:1", "attention:3"), ("removes every attention layer (layers 1, 3)",)),
        (("mixer:2", "head:2:0"), ("head:2:0 is redundant: the mixer of layer 2 is removed",)),
        (("head:0:0", "head:0:1", "head:0:2", "head:0:3"), ("group 0",)),
    ),
    official=(({"pruned_mha_idx": [1], "pruned_mamba_block_idx": [0]}, ("attention:3", "block:0")),),
    component_params={"mlp:0": 3 * 32 * 64 + 32},   # gate, up, down + pre_ff_layernorm
    evaluation=Evaluation(plans=((), ("attention:3",), ("attention:3", "block:2"), ("mlp_channel_group:4:1",),
                                 ("head:2:1", "mlp:1", "attention:3"))),
)


class TestBamba(AdapterContract):
    case = BAMBA

    def test_mlp_group_size(self, adapter):
        assert adapter.mlp_group_size == 8

    def test_block_only_plan_keeps_the_stock_layout(self, model):
        small = extract(model, comps("block:1", "block:2"))
        assert small.config.num_hidden_layers == 3
        assert small.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
        assert [getattr(layer.self_attn, "layer_idx", None) for layer in small.model.layers
                if hasattr(layer, "self_attn")] == [1]

    def test_pruned_structure(self, model):
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

    def test_candidates_respect_rules(self, model, adapter):
        base = comps(*(f"mlp_channel_group:1:{g}" for g in range(7)))
        cands = adapter.candidates(base, ["mlp_channel_group", "mlp"])
        assert Component("mlp_channel_group", 1, 7) not in cands   # would empty the MLP
        assert Component("mlp", 1) in cands                        # the MLP can still go as a whole
        without_mlp = base.with_components([Component("mlp", 1)])
        check_plan(model, without_mlp)
        assert not [c for c in adapter.candidates(without_mlp, ["mlp_channel_group"]) if c.layer == 1]
