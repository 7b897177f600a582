"""Zamba2 adapter: blocks, SSMs, heads, the shared transformer block's applications and their narrowed MLPs.

The adapter contract (``adapter_contract.py``) runs on the tiny fp32 Zamba2 of
``tiny_models.TINY``: 6 layers (mamba, hybrid, mamba, hybrid, hybrid, mamba), two memory blocks used
in turn by the three applications (blocks 0, 1, 0), q/k/v adapters and RoPE on, 2 B/C groups of 4
heads, chunk 8, sequence 20, generating on a left-padded batch; MLPs of 64 channels in 8 groups of 8.
The tests here pin down that shared weights stay shared and disappear only with their last
application, that a narrowed application gets its own MLP with its adapter merged while the others
keep the shared one, what the official masks compute, and schema 1's meaning of ``attention``.
"""
from __future__ import annotations

import pytest
import torch
from adapter_checks import check_plan, comps, tokens
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY, ZAMBA2_LAYER_TYPES

from shedder.arch import adapter_for
from shedder.arch.zamba2 import PassThrough
from shedder.arch.zamba2_mlp import NarrowedMLP
from shedder.core.errors import PlanError, ShedderError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan


def make_zamba2(seed: int = 0, **overrides):
    """The tiny Zamba2 of ``tiny_models.TINY``."""
    return TINY["zamba2"].build(seed, **overrides)


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
    # both applications of memory block 0 narrowed (to 32 and 24 channels): its shared MLP goes
    "narrowed_block": tuple(f"mlp_channel_group:1:{g}" for g in range(4, 8))
    + tuple(f"mlp_channel_group:4:{g}" for g in range(3, 8)),
    "narrowed_with_others": ("mlp_channel_group:3:7", "mlp:1", "ssm:2"),
}

ZAMBA2 = FamilyCase(
    name="zamba2", build_tiny_model=make_zamba2,
    kinds={"block": 6, "mixer": 6, "shared_block": 3, "ssm": 6, "head": 48, "attention": 3, "mlp": 3,
           "mlp_channel_group": 24},
    layer_kinds=tuple(ZAMBA2_LAYER_TYPES), plans=PLANS, saved=("mixed", "block_hybrid", "mlp", "attention", "narrowed_block",
                                                            "narrowed_with_others"),
    restores=(PLANS["mixed"],), padded=True,
    generation=tuple((p, 7) for p in (PLANS["mixed"], PLANS["two_applications_of_one_block"], ("block:3", "ssm:1"),
                                      ("attention:1", "mlp:3"), ("block:1", "ssm:3"), PLANS["narrowed_with_others"],
                                      ("mlp_channel_group:1:0", "mlp_channel_group:4:7", "attention:4"))),
    stock=(("block:0", "block:4"), ("shared_block:4",)),
    refused=(
        (("attention:0",), ("layer 0 (mamba) has no attention",)),
        (("mlp:2",), ("layer 2 (mamba) has no mlp",)),
        (("mlp_channel_group:2:0",), ("layer 2 (mamba) has no mlp_channel_group",)),
        (("mlp:3", "mlp_channel_group:3:0"), ("redundant: the MLP of layer 3 is removed",)),
        (("shared_block:3", "mlp_channel_group:3:1"), ("redundant: the shared_block of layer 3 is removed",)),
        (tuple(f"mlp_channel_group:3:{g}" for g in range(8)), ("no channels", "mlp:3")),
        (("head:3:4", "head:3:5", "head:3:6", "head:3:7"), ("group 1",)),
        (tuple(f"block:{i}" for i in range(6)), ("removes all 6 layers",)),
        (("block:1", "attention:1"), ("redundant: block 1 is removed",)),
        (("attention:1", "block:3", "shared_block:4"), ("removes every attention (layers 1, 3, 4)",)),
        (("mixer:3", "ssm:3"), ("ssm:3:0 is redundant: the mixer of layer 3 is removed",)),
        (("shared_block:3", "mlp:3"), ("mlp:3:0 is redundant: the shared_block of layer 3 is removed",)),
    ),
    official=(({"pruned_mlp_idx": [0], "pruned_mlp_channels": {"0": 64, "1": 48, "2": 64}},
               ("mlp:1", "mlp_channel_group:3:6", "mlp_channel_group:3:7")),),
    evaluation=Evaluation(plans=((), ("attention:3",), ("attention:3", "block:2"), ("mlp:4",),
                                 ("head:2:1", "attention:1"), ("mlp_channel_group:4:7", "attention:1"))),
)


class TestZamba2(AdapterContract):
    case = ZAMBA2

    def test_cost_counts_only_the_applications_own_adapters(self, model):
        adapter = adapter_for(model)
        linears = [m for m in adapter.layer_cost_modules(3) if isinstance(m, torch.nn.Linear)]
        # q, k, v, o + its q/k/v adapters (2 each) + gate_up, down + its gate_up adapter (2) + linear + in/out_proj
        assert len(linears) == 4 + 6 + 2 + 2 + 1 + 2
        assert len(adapter.layer_cost_modules(2)) == len(list(model.model.layers[2].modules()))

    def test_shared_weights_stay_shared(self, model):
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

    def test_stock_expressible_plan_keeps_the_stock_layout(self, model):
        small = extract(model, comps("shared_block:4"))
        assert not getattr(small.config, "shedder", None)
        assert small.config.layers_block_type == ["linear_attention", "hybrid", "linear_attention", "hybrid",
                                                  "linear_attention", "linear_attention"]

    def test_reprune_after_an_application_goes(self, model):
        small = extract(model, comps("shared_block:3", "mlp:4"))
        again = adapter_for(small)
        assert [again.layer_kind(i) for i in range(6)] == ["mamba", "hybrid", "mamba", "mamba", "hybrid", "mamba"]
        assert again.kind_counts()["mlp"] == 1
        check_plan(small, comps("shared_block:4", "head:3:1"))

    def test_single_memory_block_without_adapters(self):
        model = make_zamba2(num_mem_blocks=1, use_shared_attention_adapter=False, use_mem_rope=False)
        check_plan(model, comps("block:1", "mlp:4", "ssm:0"), generate=True, padded=True)
        _, small = check_plan(model, comps("block:3"))
        assert not getattr(small.config, "shedder", None)

    def test_candidates_skip_no_ops(self, adapter):
        assert Component("mlp", 3) in adapter.candidates(PruningPlan(), ["mlp"])
        assert Component("mlp", 3) not in adapter.candidates(comps("shared_block:3"), ["mlp"])
        # the last application cannot go (transformers' Zamba2 needs one to decode with a cache)
        assert adapter.candidates(comps("attention:1", "shared_block:3"), ["attention", "shared_block"]) == []

    def test_official_masks_compute_what_the_official_patch_computes(self, model):
        """attention (the official MHA mask): T = mlp(pre_ff_norm(h)), the Mamba side unchanged;
        mixer (the official mamba-block mask): h + linear(T) with the full shared block."""
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

    def test_schema1_plans_keep_their_meaning(self, model):
        """Schema 1's Zamba2 ``attention`` removed the whole application: it reads as ``shared_block``."""
        old = {"schema_version": 1, "model": None, "group_sizes": {}, "meta": {},
               "components": [{"kind": "attention", "layer": 3, "index": 0}, {"kind": "ssm", "layer": 5, "index": 0}]}
        resolved = adapter_for(model).resolve(PruningPlan.from_dict(old))
        assert resolved.components == {Component("shared_block", 3), Component("ssm", 5)}
        assert resolved.meta == {} and resolved.to_dict()["schema_version"] == 2
        assert adapter_for(model).resolve(PruningPlan.from_json(resolved.to_json())) == resolved

    def test_a_narrowed_application_gets_its_own_mlp_with_its_adapter_merged(self, model, adapter):
        """Layer 1 shares memory block 0's MLP with layer 4: its own 56-channel copy adds
        3 * 56 * 32 parameters and takes its adapter (32 * 4 + 4 * 128) away; layer 3 is the only user
        of block 1, so narrowing it also removes block 1's shared MLP (3 * 64 * 32)."""
        own, adapter_params, shared_mlp = 3 * 56 * 32, 32 * 4 + 4 * 128, 3 * 64 * 32
        for layer, delta in ((1, own - adapter_params), (3, own - adapter_params - shared_mlp)):
            plan = comps(f"mlp_channel_group:{layer}:7", "ssm:0")
            assert adapter.param_count(plan) - adapter.param_count(comps("ssm:0")) == delta
            words = "adds" if delta > 0 else "removes"
            assert adapter.param_notes(plan) == [f"narrowed MLPs: 1 shared-block application(s) get their own MLP copy "
                                                 f"with its adapter merged (layer {layer} (56)); this {words} "
                                                 f"{abs(delta):,} parameters against keeping them on the shared MLP "
                                                 "(a shared MLP goes only when none of its applications uses it)"]
        small = extract(model, comps("mlp_channel_group:1:7"))
        apps = {j: small.model.layers[j].shared_transformer for j in small.config.hybrid_layer_ids}
        assert isinstance(apps[1].feed_forward, NarrowedMLP)
        source = model.model.layers[1].shared_transformer.feed_forward
        rows = torch.cat([torch.arange(56), 64 + torch.arange(56)])
        a, b = source.gate_up_proj_adapter_list[0][0].weight, source.gate_up_proj_adapter_list[0][1].weight
        assert torch.allclose(apps[1].feed_forward.gate_up_proj.weight, (source.gate_up_proj.weight + b @ a)[rows])
        assert torch.equal(apps[1].feed_forward.down_proj.weight, source.down_proj.weight[:, :56])
        assert apps[4].feed_forward.gate_up_proj.weight.shape == (128, 32)         # block 0's shared MLP stays
        assert isinstance(apps[4].feed_forward.gate_up_proj_adapter_list[0], torch.nn.Identity)  # layer 1's slot goes
        assert adapter.param_notes() == []

    def test_a_narrowed_model_narrows_again(self, model):
        small = extract(model, comps("mlp_channel_group:1:7", "mlp_channel_group:1:6"))
        again = adapter_for(small)
        assert again.owns_mlp(1) and again.mlp_width(1) == 48 and not again.owns_mlp(4)
        assert again.kind_counts()["mlp_channel_group"] == 6 + 8 + 8
        assert again.param_notes() == ["own narrowed MLPs: layer 1 (48); 4,608 parameters not shared with other "
                                       "applications"]
        check_plan(small, comps("mlp_channel_group:1:5", "mlp_channel_group:4:0"))
        check_plan(small, comps("mlp:1", "ssm:2"))
        _, smaller = check_plan(small, comps("attention:1"))
        assert adapter_for(smaller).mlp_width(1) == 48

    def test_weight_reorder_is_refused_with_the_reason(self):
        with pytest.raises(PlanError, match="the official Zamba2 scripts have no weight reorder"):
            adapter_for(make_zamba2()).reorder_mlp_channels()

    def test_stock_shaped_mlp_pruning_is_refused_at_once(self, model):
        """Narrowed applications get their own MLP copies, so no uniform narrowing is stock-shaped."""
        from shedder.prune.stock import check_kinds  # why: only this test reaches the stock strategies
        with pytest.raises(ShedderError, match="stock config cannot state an equal removal of mlp_channel_group"):
            check_kinds(adapter_for(model), ["head", "mlp_channel_group"])
        assert check_kinds(adapter_for(model), ["head"]) == ("head",)
