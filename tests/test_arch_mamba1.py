"""Mamba-1 family adapters (Mamba, Falcon-Mamba): blocks, SSMs and channel groups.

Both architectures run the adapter contract (``adapter_contract.py``) on tiny fp32 models (hidden 32,
64 inner channels = 4 groups of 16, state 8); the tests here pin down what only Mamba-1 has: the
shared forward against the stock mixer, the SSM-less mixer, channel groups as zeroed channels, the
schema-2 spec of narrowed layers, other layouts (untied, biased, no conv bias).
"""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from adapter_checks import TOL, check_plan, check_saved, comps, logits, random_plan
from adapter_contract import AdapterContract, FamilyCase
from tiny_models import TINY

from shedder.arch import adapter_for, count_parameters, patch_forward
from shedder.arch.mamba1_mixer import PrunedMamba1Mixer, default_channel_group_size, has_ssm, mamba1_forward
from shedder.core.errors import PlanError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

N_LAYERS = 4

PLANS = {
    "block": ("block:1",),
    "blocks": ("block:0", "block:3"),
    "ssm": ("ssm:2",),
    "ssms": ("ssm:0", "ssm:1", "ssm:3"),
    "channel_group": ("channel_group:1:2",),
    "channel_groups": ("channel_group:0:0", "channel_group:0:3", "channel_group:2:1"),
    "ssm_and_groups_same_layer": ("ssm:1", "channel_group:1:0", "channel_group:1:1", "channel_group:1:2"),
    "mixed": ("block:2", "ssm:0", "channel_group:0:1", "channel_group:3:3", "ssm:3"),
    "random_block": lambda a: random_plan(a, ["block"], seed=1, n=2),
    "random_ssm": lambda a: random_plan(a, ["ssm"], seed=2, n=2),
    "random_channel_group": lambda a: random_plan(a, ["channel_group"], seed=3, n=5),
    "random_mixed": lambda a: random_plan(a, ["block", "ssm", "channel_group"], seed=4, n=6),
}


def make_model(arch: str, seed: int = 0, **overrides):
    """A tiny ``arch`` ('mamba' or 'falcon_mamba') model from ``tiny_models.TINY``."""
    return TINY[arch].build(seed, **overrides)


def mamba1_case(arch: str) -> FamilyCase:
    return FamilyCase(
        name=arch, build_tiny_model=functools.partial(make_model, arch),
        kinds={"block": N_LAYERS, "ssm": N_LAYERS, "channel_group": 4 * N_LAYERS},
        layer_kinds=("mamba",) * N_LAYERS, plans=PLANS, ids=(0, 16), min_change=1e-2,
        saved=("mixed",), shedder_entry=True, restores=(PLANS["mixed"],),
        # a prompt shorter than the conv kernel (4) exercises the padded conv state
        generation=((PLANS["channel_groups"], 7), (PLANS["channel_groups"], 2),
                    (PLANS["ssm_and_groups_same_layer"], 7), (PLANS["mixed"], 2)),
        stock=(("block:1", "block:2"),),
        refused=(
            (("head:0:0",), ("no component kind", "head")),
            (("attention:1",), ("no component kind", "attention")),
            (("block:7",), ("layer 7", "out of range")),
            (("ssm:-1",), ("layer -1", "out of range")),
            (("channel_group:1:4",), ("channel_group", "indices 0..3", "not 4")),
            (tuple(f"channel_group:2:{g}" for g in range(4)),
             ("layer 2", "all 4 channel groups", "remove the block instead")),
            (("ssm:1", *[f"channel_group:1:{g}" for g in range(4)]), ("layer 1", "remove the block instead")),
            (("block:3", "ssm:3"), ("ssm:3:0", "redundant", "block 3")),
            (("block:3", "channel_group:3:0"), ("redundant", "block 3")),
            (tuple(f"block:{i}" for i in range(N_LAYERS)), ("all 4 blocks",)),
        ),
        # one channel group of one layer: in_proj 2*16*32, conv 16*(4+1), x_proj (2+2*8)*16,
        # dt_proj 16*(2+1), A_log 16*8, D 16, out_proj 32*16
        component_params={"channel_group:1:2": 2 * 16 * 32 + 16 * 5 + 18 * 16 + 16 * 3 + 16 * 8 + 16 + 32 * 16},
    )


@pytest.mark.parametrize("width, layer_widths, size", [
    (64, (), 16), (5120, (), 64), (8192, (), 64), (96, (), 16), (48, (), 8), (6, (), 1), (2, (), 1),
    (64, (64, 48, 16), 16),  # narrowed with the default grouping: the grouping is kept
    (64, (64, 56), 8),       # narrowed with groups of 8: groups shrink until they tile every layer
])
def test_default_channel_group_size(width, layer_widths, size):
    assert default_channel_group_size(width, layer_widths) == size


class Mamba1Tests(AdapterContract):
    """The contract plus what only Mamba-1 models have; run for both architectures below."""

    def test_inventory_layout(self, model):
        a = adapter_for(model)
        assert a.group_sizes["channel_group"] == 16
        assert a.layer_components(2) == [Component("block", 2), Component("ssm", 2)] + [
            Component("channel_group", 2, g) for g in range(4)]

    def test_group_size_must_tile_the_layer(self, model):
        assert adapter_for(model, {"channel_group": 8}).kind_counts()["channel_group"] == 8 * N_LAYERS
        with pytest.raises(PlanError, match="does not divide"):
            adapter_for(model, {"channel_group": 24})

    # -------------------------------------------------------------- semantics against the stock model
    def test_core_forward_reproduces_the_stock_mixer(self, model, ids):
        """With nothing masked, the shared forward is the stock mixer's function (dt/B/C norms
        included), with and without the cache."""
        prompt = ids[:, :7]
        kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            stock_logits, stock_gen = logits(model, ids), model.generate(prompt, **kwargs)
            with contextlib.ExitStack() as stack:
                for layer in model.backbone.layers:
                    patch_forward(layer.mixer, functools.partial(mamba1_forward, layer.mixer), stack)
                ours_logits, ours_gen = logits(model, ids), model.generate(prompt, **kwargs)
        assert (ours_logits - stock_logits).abs().max().item() <= 1e-5
        assert torch.equal(ours_gen.sequences, stock_gen.sequences)
        assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(ours_gen.logits, stock_gen.logits))

    def test_removed_ssm_is_the_gated_identity(self, model):
        """Without its SSM a mixer computes out_proj(act(conv(x)) * silu(z))."""
        mixer = model.backbone.layers[1].mixer
        h = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x, z = mixer.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # [B, I, L] each
            x = mixer.act(mixer.conv1d(x)[..., :9])
            expected = mixer.out_proj((x * torch.nn.functional.silu(z)).transpose(1, 2))
            with masked(model, comps("ssm:1")):
                got = mixer(h)
        assert (got - expected).abs().max().item() <= 1e-5

    def test_removed_channel_groups_equal_zeroed_channels(self, model, ids):
        """Removing channel groups computes what the stock model computes when those channels' conv
        output is forced to zero (zero conv weight and bias: silu(0) = 0 feeds nothing downstream)."""
        plan = comps("channel_group:0:1", "channel_group:2:0", "channel_group:2:3", "ssm:2")
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for layer, start in ((0, 16), (2, 0), (2, 48)):
                conv = zeroed.backbone.layers[layer].mixer.conv1d
                conv.weight[start:start + 16] = 0
                conv.bias[start:start + 16] = 0
        with masked(model, plan), masked(zeroed, comps("ssm:2")):
            live, reference = logits(model, ids), logits(zeroed, ids)
        assert (live - reference).abs().max().item() <= TOL

    def test_extracted_structure(self, model):
        plan = comps("block:2", "ssm:0", "channel_group:0:1", "channel_group:3:3", "ssm:3", "channel_group:1:0")
        small = extract(model, plan)
        layers = small.backbone.layers
        assert small.config.num_hidden_layers == len(layers) == 3
        assert len(small.config.layer_types) == 3
        assert [layer.mixer.layer_idx for layer in layers] == [0, 1, 2]
        assert small.config.shedder == {"schema_version": 2, "layers": [{"source": 0, "ssm": False, "inner": 48},
                                                                        {"source": 1, "inner": 48},
                                                                        {"source": 3, "ssm": False, "inner": 48}]}
        m0 = layers[0].mixer
        assert isinstance(m0, PrunedMamba1Mixer) and not has_ssm(m0)
        assert not any(n.startswith(("x_proj", "dt_proj", "A_log", "D")) for n, _ in m0.named_parameters())
        assert m0.in_proj.weight.shape == (96, 32) and m0.conv1d.weight.shape == (48, 1, 4)
        assert m0.out_proj.weight.shape == (32, 48)
        m1 = layers[1].mixer
        assert m1.x_proj.weight.shape[1] == m1.dt_proj.weight.shape[0] == m1.A_log.shape[0] == m1.D.shape[0] == 48
        # weights are sliced copies of the right channels (group 0 of layer 1 gone: channels 16.. kept)
        src = model.backbone.layers[1].mixer
        assert torch.equal(m1.A_log, src.A_log[16:])
        assert torch.equal(m1.in_proj.weight[48:], src.in_proj.weight[64 + 16:])
        assert torch.equal(m1.out_proj.weight, src.out_proj.weight[:, 16:])

    def test_block_only_plan_gives_a_stock_config(self, model):
        small = extract(model, comps("block:0", "block:2"))
        assert not hasattr(small.config, "shedder")
        assert small.config.num_hidden_layers == 2
        assert all(type(layer.mixer) is type(model.backbone.layers[0].mixer) for layer in small.backbone.layers)

    def test_reprune_an_extracted_model(self, model, ids):
        """An extracted model is itself prunable: its adapter sees the narrowed structure."""
        small = extract(model, comps("ssm:1", "channel_group:2:0"))
        a = adapter_for(small)
        assert Component("ssm", 1) not in a.components()
        assert len([c for c in a.layer_components(2) if c.kind == "channel_group"]) == 3
        plan = comps("ssm:2", "channel_group:2:1", "channel_group:1:3")
        with masked(small, plan):
            live = logits(small, ids)
        assert (live - logits(extract(small, plan), ids)).abs().max().item() <= TOL

    # -------------------------------------------------------------- parameter counts, other layouts
    def test_tied_embeddings_stay_tied(self, model):
        assert model.lm_head.weight is model.backbone.embeddings.weight
        small = extract(model, comps("ssm:1"))
        assert small.lm_head.weight is small.backbone.embeddings.weight

    def test_other_layouts_untied_biases_no_conv_bias(self, model, ids, bundled_tokenizer, tmp_path):
        """Untied lm_head (as Falcon-Mamba-7B), biased in/out projections, bias-free conv."""
        other = make_model(self.case.name, tie_word_embeddings=False, use_bias=True, use_conv_bias=False)
        plan = comps(*PLANS["mixed"])
        assert other.lm_head.weight is not other.backbone.embeddings.weight
        _, small = check_plan(other, plan, ids=ids)
        assert adapter_for(other).param_count(PruningPlan()) == count_parameters(other)
        assert small.backbone.layers[0].mixer.in_proj.bias.shape == (96,)
        assert small.backbone.layers[0].mixer.conv1d.bias is None
        loaded = check_saved(small, plan, bundled_tokenizer, tmp_path / "untied", ids)
        assert loaded.lm_head.weight is not loaded.backbone.embeddings.weight

    # -------------------------------------------------------------- validation
    def test_plan_for_another_model_is_refused(self, model):
        arch = self.case.name
        other_arch = "falcon_mamba" if arch == "mamba" else "mamba"
        cases = [
            (make_model(arch, state_size=4), ["another", "configuration"]),
            (make_model(arch, num_hidden_layers=3), ["3 layers"]),
            (make_model(other_arch), ["made for", TINY[other_arch].model_cls.__name__]),
        ]
        for other, words in cases:
            plan = adapter_for(other).resolve(comps("ssm:0"))
            with pytest.raises(PlanError) as err:
                with masked(model, plan):
                    pass
            assert all(w in str(err.value) for w in words), str(err.value)
        with pytest.raises(PlanError, match="groups of 8 channels"):
            adapter_for(model).resolve(PruningPlan(frozenset({Component("ssm", 0)}),
                                                    group_sizes={"channel_group": 8}))


MAMBA = mamba1_case("mamba")
FALCON_MAMBA = mamba1_case("falcon_mamba")


class TestMamba(Mamba1Tests):
    case = MAMBA


class TestFalconMamba(Mamba1Tests):
    case = FALCON_MAMBA
