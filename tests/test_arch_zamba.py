"""Zamba (v1) adapter: blocks, Mamba-1 SSMs, Mamba heads and channel groups, and the shared block's
applications.

The adapter contract (``adapter_contract.py``) runs on the tiny fp32 Zamba of ``tiny_models.TINY``:
6 layers (mamba, hybrid, mamba, hybrid, hybrid, mamba), three applications of the one shared block,
2 Mamba heads of 32 channels (8 channel groups of 8), sequence 20, generating on a left-padded
batch. The tests here pin down that the engine's mixer forward is the stock one, what the official
masks compute, that shared weights stay shared, and ``info`` on a saved model.
"""
from __future__ import annotations

import json

import pytest
import torch
from adapter_checks import check_plan, comps, tokens
from adapter_contract import AdapterContract, Evaluation, FamilyCase
from tiny_models import TINY, ZAMBA_LAYER_TYPES

from shedder.arch import adapter_for, count_parameters
from shedder.arch.zamba import AttentionFreeApplication
from shedder.arch.zamba_mixer import PrunedZambaMixer, zamba_mixer_forward
from shedder.cli import main
from shedder.core.errors import PlanError
from shedder.core.plan import Component, PruningPlan
from shedder.dev.realshape import save_checkpoint
from shedder.formats.extract import extract
from shedder.formats.official import OfficialConfig, to_official
from shedder.measure.masking import masked


def make_zamba(seed: int = 0, **overrides):
    """The tiny Zamba of ``tiny_models.TINY``."""
    return TINY["zamba"].build(seed, **overrides)


PLANS = {
    "block_mamba": ("block:0",),
    "block_hybrid": ("block:3",),
    "ssm_on_hybrid_layer": ("ssm:3",),
    "heads": ("head:1:0",),
    "channel_groups": ("channel_group:2:1", "channel_group:2:6", "channel_group:2:7"),  # heads of 24 and 16
    "head_groups_and_ssm": ("head:5:0", "channel_group:5:4", "ssm:5"),
    "head_over_its_groups": ("channel_group:1:0", "channel_group:1:6", "head:1:0"),   # the head takes its groups
    # the official MHA mask (the MLP runs on the stream); the shared attention stays for the other
    # applications, so a head goes too to make the model smaller
    "attention": ("attention:1", "head:0:0"),
    "mixers": ("mixer:0", "mixer:4", "attention:4", "mlp:4"),   # plain layer: as block; hybrid: h + linear(T), T = h
    "mixer_and_shared_block": ("mixer:3", "shared_block:3"),   # nothing left of layer 3: deleted
    # one application left: transformers cannot build that stock, so it is saved with a shedder section
    "one_application": ("shared_block:1", "shared_block:3"),
    "mlp": ("mlp:3", "ssm:1"),
    "every_mlp": ("mlp:1", "mlp:3", "mlp:4"),    # the shared MLP's weights go with its last application
    "mixed": ("block:0", "attention:3", "mlp:4", "ssm:5", "head:1:1", "channel_group:4:2", "mixer:3",
              "shared_block:1"),
}

ZAMBA = FamilyCase(
    name="zamba", build_tiny_model=make_zamba,
    kinds={"block": 6, "mixer": 6, "shared_block": 3, "ssm": 6, "head": 12, "channel_group": 48, "attention": 3,
           "mlp": 3},
    layer_kinds=tuple(ZAMBA_LAYER_TYPES), plans=PLANS, saved=("mixed", "channel_groups", "block_hybrid", "attention",
                                                                 "one_application"),
    restores=(PLANS["mixed"],), padded=True,
    generation=tuple((p, 7) for p in (PLANS["mixed"], ("attention:1", "attention:4"), PLANS["channel_groups"],
                                      ("block:3", "head:1:1"), ("attention:1", "mlp:3", "ssm:0"))),
    stock=(("block:0", "block:4"), ("shared_block:4",)),
    refused=(
        (("attention:0",), ("layer 0 (mamba) has no attention",)),
        (("mlp:2",), ("layer 2 (mamba) has no mlp",)),
        (("mlp_channel_group:1:0",), ("has no component kind 'mlp_channel_group'",)),
        (("head:3:0", "head:3:1"), ("leaves no channels", "mixer:3")),
        (tuple(f"block:{i}" for i in range(6)), ("removes all 6 layers",)),
        (("attention:1", "block:3", "shared_block:4"), ("removes every attention (layers 1, 3, 4)",)),
        (("mixer:3", "head:3:0"), ("head:3:0 is redundant: the mixer of layer 3 is removed",)),
        (("shared_block:3", "mlp:3"), ("mlp:3:0 is redundant: the shared_block of layer 3 is removed",)),
    ),
    # the official keys as the Zamba2 scripts define them: mixers by layer, MHA / MLP by application
    official=(({"pruned_mamba_block_idx": [0, 3], "pruned_mha_idx": [1], "pruned_mlp_idx": [0, 2],
                "pruned_ssm_idx": [5]}, ("mixer:0", "mixer:3", "attention:3", "mlp:1", "mlp:4", "ssm:5")),),
    component_params={
        # in_proj rows (x, gate), conv weight + bias, x_proj, dt_proj + bias, A_log, D, out_proj columns
        "head:0:1": 2 * 32 * 32 + 32 * 4 + 32 + (4 + 2 * 8) * 32 + 32 * 4 + 32 + 32 * 8 + 32 + 32 * 32,
        "ssm:0": 2 * ((4 + 2 * 8) * 32 + 32 * 4 + 32 + 32 * 8 + 32),
        "shared_block:3": 32 * 32,            # its linear; the shared weights stay for the others
        "attention:1": 0,
    },
    evaluation=Evaluation(plans=((), ("attention:3",), ("attention:3", "block:2"), ("mlp:4",),
                                 ("head:2:1", "attention:1"), PLANS["channel_groups"]), cost=True),
)


class TestZamba(AdapterContract):
    case = ZAMBA

    def test_engine_mixer_forward_is_the_stock_forward(self, model):
        """The live mask's forward with nothing removed computes what ``ZambaMambaMixer`` does."""
        mixer = adapter_for(model).mamba(3)
        hidden = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(zamba_mixer_forward(mixer, hidden), mixer(hidden), atol=1e-6)

    def test_uneven_heads_are_extracted_and_reload(self, model):
        small = extract(model, comps("channel_group:2:1", "channel_group:2:6", "channel_group:2:7", "head:4:0"))
        mixer = small.model.layers[2].mamba
        assert isinstance(mixer, PrunedZambaMixer) and mixer.head_widths == (24, 16)
        assert small.model.layers[4].mamba_decoder.mamba.head_widths == (32,)
        again = adapter_for(small)
        assert again.kind_counts()["head"] == 12 - 1 and again.kind_counts()["channel_group"] == 48 - 3 - 4
        check_plan(small, comps("head:2:1", "channel_group:4:0"))

    def test_shared_weights_stay_shared(self, model):
        adapter = adapter_for(model)
        shared = count_parameters(model.model.layers[1].shared_transf)
        attention = count_parameters(model.model.layers[1].shared_transf.self_attn) + 64  # + input_layernorm
        small = extract(model, comps("attention:1", "mlp:3"))
        apps = [small.model.layers[j].shared_transf for j in (1, 3, 4)]
        assert isinstance(apps[0], AttentionFreeApplication)
        assert apps[0].feed_forward.gate_proj.weight is apps[2].feed_forward.gate_proj.weight
        assert apps[1].self_attn.q_proj.weight is apps[2].self_attn.q_proj.weight
        assert count_parameters(small) == count_parameters(model)
        # attention gone from every application but one: its weights stay, once
        assert adapter.component_params(Component("attention", 3), comps("attention:1")) == 0
        small = extract(model, comps("shared_block:1", "shared_block:3"))
        assert count_parameters(small) == count_parameters(model) - 2 * 32 * 32
        assert small.config.shedder  # not a stock checkpoint: transformers cannot build one application
        # no application keeps attention but one, and that one loses its MLP: the MLP's weights go
        small = extract(model, comps("shared_block:1", "shared_block:3", "mlp:4"))
        assert count_parameters(small.model.layers[4].shared_transf) == attention
        assert shared - attention == 3 * 32 * 64 + 32   # gate, up, down + pre_ff_layernorm

    def test_official_masks_compute_what_the_official_patch_computes(self, model):
        """attention (the official MHA mask): T = mlp(pre_ff_norm(h)), the Mamba side unchanged;
        mixer (the official mamba-block mask): h + linear(T) with the full shared block."""
        block, seen = model.model.layers[3], {}

        def capture(module, args, kwargs, output):
            seen["h"], seen["out"] = args[0] if args else kwargs["hidden_states"], output

        ids = tokens()
        shared = block.shared_transf
        handles = [block.register_forward_hook(capture, with_kwargs=True),
                   shared.register_forward_hook(lambda m, a, out: seen.update(T=out))]
        try:
            with torch.no_grad():
                for plan, expected in (
                    ("attention:3", lambda h: block.mamba_decoder(h, transformer_hidden_states=block.linear(
                        shared.feed_forward(shared.pre_ff_layernorm(h))))),
                    ("mixer:3", lambda h: h + block.linear(seen["T"])),
                ):
                    with masked(model, comps(plan)):
                        model(ids)
                    assert torch.allclose(seen["out"], expected(seen["h"]), atol=1e-6), plan
        finally:
            for handle in handles:
                handle.remove()

    def test_info_on_a_saved_model(self, model, tmp_path, capsys):
        model_dir = save_checkpoint(model, tmp_path / "zamba")
        assert main(["info", "--model", str(model_dir), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["num_layers"] == 6 and set(info["components"]) == set(ZAMBA.kinds)

    def test_no_op_channel_groups_are_not_candidates(self, adapter):
        plan = comps("channel_group:2:1", "head:2:0")
        assert adapter.param_count(plan) == adapter.param_count(comps("head:2:0"))
        offered = adapter.candidates(plan, ["channel_group", "head"])
        # head 1's groups only: head 0's are no-ops, and head 1 cannot go too (no channels would be left)
        assert {c for c in offered if c.layer == 2} == {Component("channel_group", 2, g) for g in (4, 5, 6, 7)}
        assert Component("head", 2, 1) in adapter.candidates(comps("channel_group:2:1", "channel_group:2:6"), ["head"])

    def test_official_mlp_widths(self, adapter):
        """Full official widths are no removal; a narrower one is refused (the MLP is shared)."""
        assert not adapter.resolve(OfficialConfig.of({"pruned_mlp_channels": {"0": 64, "1": 64, "2": 64}})).components
        with pytest.raises(PlanError, match="no per-layer MLP channels"):
            adapter.resolve(OfficialConfig.of({"pruned_mlp_channels": {"0": 32}}))

    def test_official_config_round_trip(self, adapter):
        """Our plan written as an official config (the Zamba2 scripts' keys) and read back."""
        plan = comps("block:0", "mixer:3", "attention:1", "mlp:4", "ssm:5")
        back = to_official(adapter, adapter.resolve(plan))
        assert {k: sorted(v) for k, v in back.items()} == {"pruned_mamba_block_idx": [0, 3], "pruned_mha_idx": [0],
                                                          "pruned_mlp_idx": [2], "pruned_ssm_idx": [5]}
        assert adapter.resolve(OfficialConfig.of(back)).components == {
            Component("mixer", 0), Component("mixer", 3), Component("attention", 1), Component("mlp", 4),
            Component("ssm", 5)}
        with pytest.raises(PlanError, match="'block' on ZambaForCausalLM has no counterpart"):
            to_official(adapter, PruningPlan(frozenset({Component("block", 1)})))
