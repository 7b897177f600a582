"""Nemotron-H adapter: Mamba blocks, SSMs and heads (shared Mamba-2 core), attention and MLP/MoE
sub-blocks, and MLP channel groups, on a tiny random fp32 hybrid with every layer type (its one
attention layer: removing it removes every attention, so the extracted model keeps a
``RemovedAttentionLayer`` for the cache). The adapter contract (``adapter_contract.py``) runs on
the family's data below; the tests here pin down the cache without attention and the layer layout."""
from __future__ import annotations

import pytest
import torch
from adapter_checks import check_generation, check_refused, check_removal, check_saved, comps, random_plan
from adapter_contract import AdapterContract, FamilyCase
from tiny_models import NEMOTRON_H_PATTERN as PATTERN
from tiny_models import TINY

from shedder.arch import adapter_for, count_parameters
from shedder.arch.mamba2_mixer import PrunedMamba2Mixer
from shedder.arch.nemotron_h import RemovedAttentionLayer
from shedder.measure.cost import estimate
from shedder.core.errors import PlanError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

GROUPS = {"mlp_channel_group": 32}  # 96 intermediate channels = 3 groups


def make_model(seed: int = 0, **overrides):
    """The tiny Nemotron-H of ``tiny_models.TINY``."""
    return TINY["nemotron_h"].build(seed, **overrides)


def plan(*specs: str) -> PruningPlan:
    return PruningPlan(comps(*specs).components, group_sizes=dict(GROUPS))


PLANS = {
    "attention": ("attention:1",),
    "mlp": ("mlp:3",),
    "moe": ("mlp:4",),
    "mamba_block": ("block:2",),
    "ssm_and_heads": ("ssm:0", "head:0:1", "head:5:6"),
    "channel_groups_uneven": ("mlp_channel_group:3:1",),
    "channel_groups_uniform": ("mlp_channel_group:3:2", "mlp_channel_group:6:0"),
    "mixed": ("attention:1", "block:5", "ssm:2", "head:0:3", "mlp_channel_group:6:1", "mlp:4"),
    "random_mixed": lambda a: random_plan(a, list(a.kinds), 21, 6),
}
#: Same heads in every Mamba layer, same MLP width, attention and a block gone: a stock config.
UNIFORM = (*[f"head:{i}:{h}" for i in (0, 5) for h in (1, 6)], "mlp_channel_group:3:0", "mlp_channel_group:6:2",
           "block:2", "mlp:4")

NEMOTRON_H = FamilyCase(
    name="nemotron_h", build_tiny_model=make_model, group_sizes=GROUPS,
    kinds={"block": 3, "ssm": 3, "head": 24, "attention": 1, "mlp": 3, "mlp_channel_group": 6},
    layer_kinds=tuple(PATTERN), plans=PLANS, ids=(1, 13),
    saved=("mixed", "ssm_and_heads", "channel_groups_uneven"), shedder_entry=True,  # the last two keep the MoE
    restores=(PLANS["mixed"],),
    generation=((("block:2", "ssm:0", "head:5:1", "head:5:2", "mlp_channel_group:3:1", "mlp:6"), 9),
                # no attention layer left: the extracted stand-in keeps the cache's length
                (("attention:1", "ssm:0"), 9)),
    stock=(UNIFORM,),
    refused=(
        (("block:1",), ("layer 1 (attention) has no block",)),
        (("attention:0",), ("layer 0 (mamba) has no attention",)),
        (("head:3:0",), ("layer 3 (mlp) has no head",)),
        (("mlp_channel_group:4:0",), ("layer 4 (moe) has no mlp_channel_group",)),
        (("mlp_channel_group:3:3",), ("indices 0..2", "not 3")),
        (("head:0:4", "head:0:5", "head:0:6", "head:0:7"), ("layer 0, group 1", "remove the SSM or the block instead")),
        (("mlp_channel_group:6:0", "mlp_channel_group:6:1", "mlp_channel_group:6:2"),
         ("layer 6", "all 3 MLP channel groups", "remove the MLP instead")),
        (("mlp:3", "mlp_channel_group:3:1"), ("redundant", "layer 3")),
        (("block:2", "ssm:2"), ("redundant", "block 2")),
        (("block:0", "attention:1", "block:2", "mlp:3", "mlp:4", "block:5", "mlp:6"), ("removes all 7 layers",)),
    ),
)


class TestNemotronH(AdapterContract):
    case = NEMOTRON_H

    def test_layer_components(self, model, adapter):
        assert adapter.layer_components(1) == [Component("attention", 1)]
        assert adapter.layer_components(4) == [Component("mlp", 4)]  # MoE: skipped whole, no channel groups
        assert adapter.layer_components(3) == [Component("mlp", 3)] + [
            Component("mlp_channel_group", 3, g) for g in range(3)]
        default = adapter_for(model)  # groups of 64: 64 + a short last group of 32
        assert [len(g) for g in default.mlp_groups(3)] == [64, 32]

    def test_extracted_structure(self, model, adapter):
        small = extract(model, plan(*PLANS["mixed"]), adapter)
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

    def test_removing_every_attention_keeps_the_cache_usable(self, model, adapter, ids, bundled_tokenizer, tmp_path):
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

    def test_uniform_removals_give_a_stock_config(self, model, adapter):
        small = extract(model, plan(*UNIFORM), adapter)
        assert not hasattr(small.config, "shedder")
        assert (small.config.mamba_num_heads, small.config.intermediate_size) == (6, 64)

    def test_a_skipped_attention_keeps_counting_for_the_others(self, ids):
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

    def test_plan_for_another_group_size_is_refused(self, model, adapter):
        with pytest.raises(PlanError, match="groups of 64"):
            adapter.resolve(PruningPlan(frozenset([Component("mlp_channel_group", 3, 0)]),
                                         group_sizes={"mlp_channel_group": 64}))
