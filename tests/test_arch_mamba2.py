"""Mamba-2 adapter and the shared Mamba-2 mixer core: blocks, SSMs and SSM heads.

The adapter contract (``adapter_contract.py``) runs on tiny fp32 models (hidden 64, 8 heads of 16
channels, state 8, chunk 8) with 1, 2 and 4 B/C groups, on a sequence length (13) that is not a
multiple of the chunk size. The tests here pin down the shared core against every family's stock
mixer, the uneven group norm, the SSM-less mixer, uniform removals as stock configs, the extracted
structure and group refusals.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from adapter_checks import TOL, check_refused, comps, logits, max_diff, random_plan
from adapter_contract import AdapterContract, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for
from shedder.arch.mamba2_mixer import (MixerLayout, PrunedMamba2Mixer, Selection, gated_group_rms_norm, mixer_layout,
                                      ssd_forward)
from shedder.arch.spec import PrunedSpec
from shedder.core.errors import PlanError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

N_LAYERS = 4
SEQ = 13  # not a multiple of chunk_size


def make_model(n_groups: int, seed: int = 0, **overrides):
    """A tiny Mamba-2 from ``tiny_models.TINY`` with ``n_groups`` B/C groups."""
    return TINY["mamba2"].build(seed, n_groups=n_groups, **overrides)


PLANS = {
    "block": ("block:1", "block:3"),
    "ssm": ("ssm:0", "ssm:2"),
    "one_head": ("head:1:5",),
    "heads_uneven": ("head:0:0", "head:0:2", "head:0:7", "head:2:3"),
    "ssm_and_heads_same_layer": ("ssm:1", "head:1:2", "head:1:6"),
    "mixed": ("block:3", "ssm:0", "head:0:4", "head:1:1", "head:2:6"),
    "random_blocks": lambda a: random_plan(a, ["block"], 10, 2),
    "random_ssms": lambda a: random_plan(a, ["ssm"], 11, 3),
    "random_heads": lambda a: random_plan(a, ["head"], 12, 6),
    "random_mixed": lambda a: random_plan(a, ["block", "ssm", "head"], 13, 6),
}


def mamba2_case(n_groups: int) -> FamilyCase:
    return FamilyCase(
        name=f"mamba2-groups{n_groups}", build_tiny_model=functools.partial(make_model, n_groups),
        kinds={"block": N_LAYERS, "ssm": N_LAYERS, "head": 8 * N_LAYERS}, layer_kinds=("mamba",) * N_LAYERS,
        plans=PLANS, ids=(1, SEQ), saved=("mixed",), shedder_entry=True, restores=(PLANS["mixed"],),
        generation=tuple((PLANS[name], 9) for name in ("ssm", "heads_uneven", "ssm_and_heads_same_layer", "mixed")),
        stock=(("block:0", "block:2"),),
        refused=(
            (("head:0:8",), ("head", "indices 0..7", "not 8")),
            (("attention:1",), ("no component kind", "attention")),
            (("mlp_channel_group:1:0",), ("no component kind", "mlp_channel_group")),
            (("block:4",), ("layer 4", "out of range")),
            (("block:2", "ssm:2"), ("ssm:2:0", "redundant", "block 2")),
            (("block:2", "head:2:1"), ("head:2:1", "redundant", "block 2")),
            (tuple(f"block:{i}" for i in range(N_LAYERS)), ("all 4 layers",)),
        ),
    )


def stock_mixer(family: str):
    """One stock Mamba-2-style mixer (8 heads of 16, 2 groups, state 8) of each family."""
    from transformers.models.bamba.modeling_bamba import BambaMixer
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer
    from transformers.models.zamba2.modeling_zamba2 import Zamba2MambaMixer

    if family == "mamba2":
        return make_model(2).backbone.layers[1].mixer
    common = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    if family == "bamba":
        config = transformers.BambaConfig(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                                          mamba_chunk_size=8, **common)
        mixer = BambaMixer(config, layer_idx=0)
    elif family == "zamba2":
        config = transformers.Zamba2Config(n_mamba_heads=8, mamba_headdim=16, mamba_ngroups=2, mamba_d_state=8,
                                           chunk_size=8, layers_block_type=["mamba"], **common)
        mixer = Zamba2MambaMixer(config, layer_idx=0)
    else:
        config = transformers.NemotronHConfig(mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
                                              chunk_size=8, layers_block_type=["mamba"], **common)
        mixer = NemotronHMamba2Mixer(config, layer_idx=0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer.eval()


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h", "bamba", "zamba2"])
def test_core_forward_equals_every_family_stock_mixer(family):
    torch.manual_seed(2)
    mixer = stock_mixer(family)
    h = torch.randn(2, SEQ, 64)
    with torch.no_grad():
        assert torch.equal(ssd_forward(mixer, h, layout=mixer_layout(mixer)), mixer(h))


def test_uneven_group_norm_normalises_each_group_over_its_own_channels():
    layout = MixerLayout((1, 3, 2))
    torch.manual_seed(3)
    y, gate, weight = torch.randn(2, 5, 6 * 4), torch.randn(2, 5, 6 * 4), torch.randn(6 * 4)
    got = gated_group_rms_norm(y, gate, weight, 1e-5, layout, head_dim=4)
    gated = y * torch.nn.functional.silu(gate)
    parts, start = [], 0
    for n in layout.heads_per_group:
        part = gated[..., start:start + n * 4]
        parts.append(part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5))
        start += n * 4
    assert max_diff(got, weight * torch.cat(parts, -1)) < 1e-6


def test_param_count_with_tied_embeddings():
    tied = make_model(2, tie_word_embeddings=True)
    adapter = adapter_for(tied)
    plan = comps("head:0:1", "ssm:2", "block:1")
    small = extract(tied, plan)
    unique = {id(p): p.numel() for p in small.parameters()}
    assert small.lm_head.weight is small.backbone.embeddings.weight
    assert adapter.param_count(plan) == sum(unique.values())


def group_heads(model, group):
    layout = mixer_layout(model.backbone.layers[0].mixer)
    return [h for h, g in enumerate(layout.head_group) if g == group]


class Mamba2Tests(AdapterContract):
    """The contract plus what only Mamba-2 models have; run for 1, 2 and 4 B/C groups below."""

    def test_layer_components(self, model):
        assert adapter_for(model).layer_components(2) == [Component("block", 2), Component("ssm", 2)] + [
            Component("head", 2, h) for h in range(8)]

    def test_ssm_removal_is_identity_on_x(self, model):
        """y = act(conv(x)) (no D term), then the stock gated norm and out_proj."""
        mixer = model.backbone.layers[2].mixer
        torch.manual_seed(4)
        h = torch.randn(2, SEQ, 64)
        with torch.no_grad():
            z, xBC, _ = mixer.in_proj(h).split([128, mixer.conv_dim, 8], -1)
            x = mixer.act(mixer.conv1d(xBC.transpose(1, 2))[..., :SEQ]).transpose(1, 2)[..., :128]
            want = mixer.out_proj(mixer.norm(x, z))
            full = mixer_layout(mixer)
            got = ssd_forward(mixer, h, layout=full.after_removing(True, []), select=Selection.of(full, 16, 8, True, []))
        assert max_diff(got, want) < 1e-5

    def test_uniform_head_removal_gives_a_stock_config(self, model, ids):
        """Half the heads of every group in every layer: stock Mamba2Config (num_heads 4, expand 1),
        so the masked forward is checked against the stock transformers mixer."""
        layout = mixer_layout(model.backbone.layers[0].mixer)
        per = layout.heads_per_group[0]
        gone = [h for h in range(8) if h % per >= per // 2] if per > 1 else []
        if not gone:
            pytest.skip("one head per group: cannot halve")
        plan = PruningPlan(frozenset(Component("head", i, h) for i in range(N_LAYERS) for h in gone))
        small = extract(model, plan)
        assert not hasattr(small.config, "shedder")
        assert (small.config.num_heads, small.config.expand) == (4, 1)
        assert all(type(b.mixer).__name__ == "Mamba2Mixer" for b in small.backbone.layers)
        with masked(model, plan):
            assert max_diff(logits(model, ids), logits(small, ids)) <= TOL

    def test_extracted_structure(self, model):
        small = extract(model, comps("block:3", "ssm:0", "head:1:1"))
        assert small.config.num_hidden_layers == 3
        entries = PrunedSpec.from_json(small.config.shedder).layers
        assert [e.ssm for e in entries] == [False, True, True]
        assert sum(entries[1].heads_per_group) == 7 and len(entries[1].heads_per_group) == model.config.n_groups
        m0, m1 = small.backbone.layers[0].mixer, small.backbone.layers[1].mixer
        assert isinstance(m0, PrunedMamba2Mixer) and not hasattr(m0, "A_log") and m0.in_proj.out_features == 256
        assert m0.conv1d.weight.shape[0] == 128
        assert m1.A_log.shape == (7,) and m1.out_proj.in_features == 112 and m1.norm.weight.shape == (112,)
        assert [b.mixer.layer_idx for b in small.backbone.layers] == [0, 1, 2]

    def test_reprune_an_extracted_model(self, model, ids):
        small = extract(model, comps("head:0:0", "ssm:1"))
        adapter = adapter_for(small)
        assert adapter.kind_counts() == {"block": N_LAYERS, "ssm": N_LAYERS - 1, "head": 8 * N_LAYERS - 1}
        plan = comps("head:0:6", "head:2:2", "block:3")
        with masked(small, plan):
            live = logits(small, ids)
        assert max_diff(live, logits(extract(small, plan), ids)) <= TOL

    def test_plan_for_another_config_is_refused(self, model):
        other = make_model(model.config.n_groups, state_size=16)
        plan = adapter_for(other).resolve(comps("ssm:1"))
        with pytest.raises(PlanError, match="another Mamba2ForCausalLM configuration"):
            masked(model, plan).__enter__()
        deeper = make_model(model.config.n_groups, num_hidden_layers=3)
        with pytest.raises(PlanError, match="3 layers"):
            extract(model, adapter_for(deeper).resolve(comps("ssm:1")))

    def test_removing_a_whole_group_is_refused(self, model):
        if model.config.n_groups == 1:
            plan = PruningPlan(frozenset(Component("head", 3, h) for h in range(8)))
            words = ["layer 3", "all its 8 heads", "remove the block instead"]
        else:
            plan = PruningPlan(frozenset(Component("head", 3, h) for h in group_heads(model, 1)))
            words = ["layer 3, group 1", "removing all its heads", "remove the SSM or the block instead"]
        check_refused(model, plan, words)
        assert Component("head", 3, 0) in adapter_for(model).candidates(PruningPlan(), ["head"])
        last = plan.restoring([Component("head", 3, group_heads(model, min(1, model.config.n_groups - 1))[0])])
        assert not [c for c in adapter_for(model).candidates(last, ["head"]) if c.layer == 3 and c in plan]


class TestMamba2Groups1(Mamba2Tests):
    case = mamba2_case(1)


class TestMamba2Groups2(Mamba2Tests):
    case = mamba2_case(2)


class TestMamba2Groups4(Mamba2Tests):
    case = mamba2_case(4)
