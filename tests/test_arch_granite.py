"""Granite 4.0-H adapter (dense and MoE): blocks, mixers, SSMs, heads, attention, the feed-forward,
shared-MLP channel groups and experts.

The adapter contract (``adapter_contract.py``) runs on the two tiny fp32 Granite 4.0-H models of
``tiny_models.TINY`` (5 layers: mamba, attention, mamba, attention, mamba; 2 B/C groups of 4 heads;
shared MLP 64 channels = 8 groups of 8; every multiplier away from 1): ``granite_moe`` with 4
experts of 16 channels (top 2) in every layer and no RoPE, ``granite_dense`` without experts and
with RoPE; both generate on a left-padded batch. The tests here pin down the extracted structure
and when the extracted config is a stock one.
"""
from __future__ import annotations

from adapter_checks import comps
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for
from shedder.arch.layers import ZeroBranch
from shedder.formats.extract import extract

LAYER_KINDS = ("mamba", "attention", "mamba", "attention", "mamba")

COMMON_PLANS = {
    "block_mamba": ("block:2",),
    "block_attention": ("block:1",),
    "ssm": ("ssm:0",),
    "heads_uneven_groups": ("head:4:0", "head:4:1", "head:4:2"),
    "attention": ("attention:3",),
    "mixers": ("mixer:2", "mixer:1", "mlp_channel_group:2:1"),
    "mlp": ("mlp:0", "mlp:3"),
    "mlp_groups": ("mlp_channel_group:2:0", "mlp_channel_group:2:7", "mlp_channel_group:3:4"),
    "uniform_mlp_groups": tuple(f"mlp_channel_group:{i}:7" for i in range(5)),
}
MOE_PLANS = {
    **COMMON_PLANS,
    "expert": ("expert:0:1",),
    "experts_uneven": ("expert:1:0", "expert:1:3", "expert:4:2"),
    "experts_uniform": tuple(f"expert:{i}:3" for i in range(5)),
    "mixed": ("block:0", "ssm:2", "head:4:1", "attention:3", "mlp:4", "mlp_channel_group:1:2", "expert:2:0",
              "expert:1:1"),
}
DENSE_PLANS = {**COMMON_PLANS,
               "mixed": ("block:0", "ssm:2", "head:4:1", "attention:3", "mlp:4", "mlp_channel_group:1:2")}

COMMON_REFUSED = (
    (("attention:0",), ("layer 0 (mamba) has no attention",)),
    (("ssm:1",), ("layer 1 (attention) has no ssm",)),
    (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), ("remove the layer's MLP instead (mlp:2)",)),
    (("attention:1", "block:3"), ("removes every attention layer (layers 1, 3)",)),
    (("mixer:2", "head:2:0"), ("head:2:0 is redundant: the mixer of layer 2 is removed",)),
)


def _case(name: str, plans: dict, kinds: dict, refused: tuple, component_params: dict) -> FamilyCase:
    return FamilyCase(
        name=name, build_tiny_model=lambda: TINY[name].build(0), kinds=kinds, layer_kinds=LAYER_KINDS, plans=plans,
        saved=("mixed", "heads_uneven_groups", "mlp_groups") + (("experts_uneven",) if "expert" in kinds else ()),
        restores=(plans["mixed"],), padded=True,
        generation=tuple((plans[p], 7) for p in ("mixed", "mixers", "mlp") + (("experts_uneven",) if "expert" in kinds
                                                                                else ())),
        stock=(("block:1", "block:2"), plans["uniform_mlp_groups"]) + ((plans["experts_uniform"],)
                                                                       if "expert" in kinds else ()),
        refused=COMMON_REFUSED + refused,
        official=(({"pruned_mha_idx": [1], "pruned_mlp_idx": [0]}, ("attention:3", "mlp:0")),),
        component_params=component_params,
        evaluation=Evaluation(plans=((), ("attention:3",), ("mlp_channel_group:4:1",), plans["mixed"])),
    )


#: gate+up (2 x 64 x 32), down (32 x 64), post_attention_layernorm (32); MoE: router (4 x 32) and
#: 4 experts of gate+up (32 x 32) and down (32 x 16); one expert: its router row and its tensors.
SHARED_MLP_PARAMS = 3 * 64 * 32 + 32
EXPERT_PARAMS = 32 + 2 * 16 * 32 + 32 * 16

GRANITE_MOE = _case(
    "granite_moe", MOE_PLANS,
    kinds={"block": 5, "mixer": 5, "ssm": 3, "head": 24, "attention": 2, "mlp": 5, "mlp_channel_group": 40,
           "expert": 20},
    refused=((("expert:0:0", "expert:0:1", "expert:0:2"), ("fewer than the 2 each token is routed to",)),
             (("expert:0:4",), ("layer 0 has expert indices 0..3, not 4",)),
             (("mlp:1", "expert:1:0"), ("expert:1:0 is redundant: the MLP of layer 1",))),
    component_params={"mlp:0": SHARED_MLP_PARAMS + 4 * EXPERT_PARAMS, "expert:3:2": EXPERT_PARAMS},
)
GRANITE_DENSE = _case(
    "granite_dense", DENSE_PLANS,
    kinds={"block": 5, "mixer": 5, "ssm": 3, "head": 24, "attention": 2, "mlp": 5, "mlp_channel_group": 40},
    refused=((("expert:0:0",), ("has no expert",)),),
    component_params={"mlp:0": SHARED_MLP_PARAMS},
)


class TestGraniteMoe(AdapterContract):
    case = GRANITE_MOE

    def test_pruned_structure(self, model):
        small = extract(model, comps("block:2", "attention:3", "mlp:4", "mlp_channel_group:0:5", "expert:1:0",
                                     "expert:1:3"))
        layers = small.model.layers
        # the attention-less layer 3 is listed as a Mamba layer without a mixer
        assert small.config.layer_types == ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
        assert small.config.shedder["layers"] == [
            {"source": 0, "mlp": 56}, {"source": 1, "experts": 2}, {"source": 3, "mixer": False},
            {"source": 4, "mlp": 0},
        ]
        assert layers[1].block_sparse_moe.router.weight.shape == (2, 32)
        assert layers[1].block_sparse_moe.experts.gate_up_proj.shape == (2, 32, 32)
        assert layers[0].shared_mlp.input_linear.weight.shape == (112, 32)
        assert isinstance(layers[2].mamba, ZeroBranch)
        assert isinstance(layers[3].shared_mlp, ZeroBranch) and isinstance(layers[3].block_sparse_moe, ZeroBranch)

    def test_uniform_removals_fold_into_a_stock_config(self, model):
        small = extract(model, comps(*MOE_PLANS["experts_uniform"], *MOE_PLANS["uniform_mlp_groups"]))
        assert not hasattr(small.config, "shedder")
        assert (small.config.num_local_experts, small.config.shared_intermediate_size) == (3, 56)

    def test_multipliers_are_off_one(self, model):
        c = model.config
        assert 1.0 not in (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling)

    def test_expert_candidates_stop_at_top_k(self, model):
        adapter = adapter_for(model)
        plan = comps("expert:0:0", "expert:0:1")
        assert not [c for c in adapter.candidates(plan, ["expert"]) if c.layer == 0]


class TestGraniteDense(AdapterContract):
    case = GRANITE_DENSE

    def test_dense_layers_have_no_experts(self, model):
        assert all(layer.block_sparse_moe is None for layer in model.model.layers)
