"""Mamba-1 family adapters (Mamba, Falcon-Mamba): blocks, SSMs and channel groups.

Every test runs on tiny randomly initialised fp32 models of both architectures. The central
property is exactness: the live-masked model computes the same logits as the extracted one.
"""
from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import transformers
from adapter_checks import (TOL, check_cached_generation, check_mask_restores, check_plan, check_refused, check_removal,
                            check_saved, check_stock_load, comps, logits, random_model, random_plan, spread, tokens)

from shedder.arch import adapter_for, count_parameters, patch_forward
from shedder.arch.mamba1_mixer import PrunedMamba1Mixer, default_channel_group_size, has_ssm, mamba1_forward
from shedder.core.errors import PlanError
from shedder.formats.extract import extract
from shedder.measure.masking import masked
from shedder.core.plan import Component, PruningPlan

ARCHS = {
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
    "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
}
N_LAYERS = 4


def make_model(arch: str, seed: int = 0, **overrides):
    """A tiny model (hidden 32, 64 inner channels = 4 groups of 16, state 8) with weights spread
    enough that removing anything visibly changes the logits and greedy decoding does not collapse."""
    config_cls, model_cls = ARCHS[arch]
    kwargs = dict(hidden_size=32, expand=2, state_size=8, num_hidden_layers=N_LAYERS, vocab_size=100)
    config = config_cls(**{**kwargs, **overrides})
    return random_model(model_cls, config, seed,
                        init=functools.partial(spread, keep=("A_log", "norm.weight", "norm_f.weight")))


PLANS = {
    "block": lambda a: comps("block:1"),
    "blocks": lambda a: comps("block:0", "block:3"),
    "ssm": lambda a: comps("ssm:2"),
    "ssms": lambda a: comps("ssm:0", "ssm:1", "ssm:3"),
    "channel_group": lambda a: comps("channel_group:1:2"),
    "channel_groups": lambda a: comps("channel_group:0:0", "channel_group:0:3", "channel_group:2:1"),
    "ssm_and_groups_same_layer": lambda a: comps("ssm:1", "channel_group:1:0", "channel_group:1:1", "channel_group:1:2"),
    "mixed": lambda a: comps("block:2", "ssm:0", "channel_group:0:1", "channel_group:3:3", "ssm:3"),
    "random_block": lambda a: random_plan(a, ["block"], seed=1, n=2),
    "random_ssm": lambda a: random_plan(a, ["ssm"], seed=2, n=2),
    "random_channel_group": lambda a: random_plan(a, ["channel_group"], seed=3, n=5),
    "random_mixed": lambda a: random_plan(a, ["block", "ssm", "channel_group"], seed=4, n=6),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def ids():
    return tokens(seed=0, length=16)


# ------------------------------------------------------------------ inventory
def test_inventory(model):
    a = adapter_for(model)
    assert a.group_sizes["channel_group"] == 16
    assert a.kind_counts() == {"block": N_LAYERS, "ssm": N_LAYERS, "channel_group": 4 * N_LAYERS}
    assert a.layer_kind(0) == "mamba"
    assert a.layer_components(2) == [Component("block", 2), Component("ssm", 2)] + [
        Component("channel_group", 2, g) for g in range(4)]


@pytest.mark.parametrize("width, layer_widths, size", [
    (64, (), 16), (5120, (), 64), (8192, (), 64), (96, (), 16), (48, (), 8), (6, (), 1), (2, (), 1),
    (64, (64, 48, 16), 16),  # narrowed with the default grouping: the grouping is kept
    (64, (64, 56), 8),       # narrowed with groups of 8: groups shrink until they tile every layer
])
def test_default_channel_group_size(width, layer_widths, size):
    assert default_channel_group_size(width, layer_widths) == size


def test_group_size_must_tile_the_layer(model):
    assert adapter_for(model, {"channel_group": 8}).kind_counts()["channel_group"] == 8 * N_LAYERS
    with pytest.raises(PlanError, match="does not divide"):
        adapter_for(model, {"channel_group": 24})


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(PLANS))
def test_masked_equals_extracted(model, ids, name):
    plan = PLANS[name](adapter_for(model))
    assert len(plan.components) > 0
    check_removal(model, plan, ids, min_change=1e-2)


# ------------------------------------------------------------------ semantics against the stock model
def test_core_forward_reproduces_the_stock_mixer(model, ids):
    """With nothing masked, the shared forward is the stock mixer's function (dt/B/C norms included),
    with and without the cache."""
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


def test_removed_ssm_is_the_gated_identity(model):
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


def test_removed_channel_groups_equal_zeroed_channels(model, ids):
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


def test_extracted_structure(model):
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


def test_block_only_plan_gives_a_stock_config(model):
    small = extract(model, comps("block:0", "block:2"))
    assert not hasattr(small.config, "shedder")
    assert small.config.num_hidden_layers == 2
    assert all(type(layer.mixer) is type(model.backbone.layers[0].mixer) for layer in small.backbone.layers)


def test_reprune_an_extracted_model(model, ids):
    """An extracted model is itself prunable: its adapter sees the narrowed structure."""
    small = extract(model, comps("ssm:1", "channel_group:2:0"))
    a = adapter_for(small)
    assert Component("ssm", 1) not in a.components()
    assert len([c for c in a.layer_components(2) if c.kind == "channel_group"]) == 3
    plan = comps("ssm:2", "channel_group:2:1", "channel_group:1:3")
    with masked(small, plan):
        live = logits(small, ids)
    assert (live - logits(extract(small, plan), ids)).abs().max().item() <= TOL


# ------------------------------------------------------------------ reversibility
def test_mask_leaves_the_model_untouched(model, ids):
    check_mask_restores(model, PLANS["mixed"](None), ids)


# ------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", ["block", "ssms", "channel_groups", "mixed", "random_mixed"])
def test_param_count_matches_extracted(model, name):
    a = adapter_for(model)
    plan = PLANS[name](a)
    small = extract(model, plan)
    assert a.param_count(plan) == count_parameters(small) < count_parameters(model)


def test_param_count_empty_plan_and_tied_embeddings(model):
    a = adapter_for(model)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert a.param_count(PruningPlan()) == count_parameters(model)
    # one channel group of one layer: in_proj 2*16*32, conv 16*(4+1), x_proj (2+2*8)*16, dt_proj 16*(2+1),
    # A_log 16*8, D 16, out_proj 32*16
    assert a.component_params(Component("channel_group", 1, 2)) == 2 * 16 * 32 + 16 * 5 + 18 * 16 + 16 * 3 + 16 * 8 + 16 + 32 * 16
    small = extract(model, comps("ssm:1"))
    assert small.lm_head.weight is small.backbone.embeddings.weight


def test_other_layouts_untied_biases_no_conv_bias(model, ids, bundled_tokenizer, tmp_path):
    """Untied lm_head (as Falcon-Mamba-7B), biased in/out projections, bias-free conv."""
    arch = "mamba" if isinstance(model, transformers.MambaForCausalLM) else "falcon_mamba"
    other = make_model(arch, tie_word_embeddings=False, use_bias=True, use_conv_bias=False)
    plan = PLANS["mixed"](None)
    assert other.lm_head.weight is not other.backbone.embeddings.weight
    _, small = check_plan(other, plan, ids=ids)
    assert adapter_for(other).param_count(PruningPlan()) == count_parameters(other)
    assert small.backbone.layers[0].mixer.in_proj.bias.shape == (96,)
    assert small.backbone.layers[0].mixer.conv1d.bias is None
    loaded = check_saved(small, plan, bundled_tokenizer, tmp_path / "untied", ids)
    assert loaded.lm_head.weight is not loaded.backbone.embeddings.weight


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(model, ids, bundled_tokenizer, tmp_path):
    plan = adapter_for(model).resolve(PLANS["mixed"](None))
    loaded = check_saved(extract(model, plan), plan, bundled_tokenizer, tmp_path / "pruned", ids, shedder_entry=True)
    assert type(loaded) is type(model)


def test_block_only_model_loads_with_plain_transformers(model, ids, bundled_tokenizer, tmp_path):
    small = extract(model, comps("block:1", "block:2"))
    plain = check_stock_load(small, None, bundled_tokenizer, tmp_path / "blocks", ids)
    assert type(plain) is type(model) and plain.config.num_hidden_layers == 2


# ------------------------------------------------------------------ generation with the cache
@pytest.mark.parametrize("name, prompt_len", [("channel_groups", 7), ("channel_groups", 2),
                                              ("ssm_and_groups_same_layer", 7), ("mixed", 2)])
def test_cached_generation_matches_full_forwards(model, ids, name, prompt_len):
    """Greedy decoding with the cache (prefill, then one token at a time) equals full-sequence
    forwards, for the extracted model and for the live-masked one. A prompt shorter than the conv
    kernel (4) exercises the padded conv state."""
    check_cached_generation(model, PLANS[name](None), ids[:, :prompt_len])


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("plan, words", [
    (comps("head:0:0"), ["no component kind", "head"]),
    (comps("attention:1"), ["no component kind", "attention"]),
    (comps("block:7"), ["layer 7", "out of range"]),
    (comps("ssm:-1"), ["layer -1", "out of range"]),
    (comps("channel_group:1:4"), ["channel_group", "indices 0..3", "not 4"]),
    (comps(*[f"channel_group:2:{g}" for g in range(4)]), ["layer 2", "all 4 channel groups", "remove the block instead"]),
    (comps("ssm:1", *[f"channel_group:1:{g}" for g in range(4)]), ["layer 1", "remove the block instead"]),
    (comps("block:3", "ssm:3"), ["ssm:3:0", "redundant", "block 3"]),
    (comps("block:3", "channel_group:3:0"), ["redundant", "block 3"]),
    (comps(*[f"block:{i}" for i in range(N_LAYERS)]), ["all 4 blocks"]),
])
def test_invalid_plans_are_refused(model, plan, words):
    check_refused(model, plan, words)


def test_plan_for_another_model_is_refused(model):
    arch = "mamba" if isinstance(model, transformers.MambaForCausalLM) else "falcon_mamba"
    other_arch = "falcon_mamba" if arch == "mamba" else "mamba"
    cases = [
        (make_model(arch, state_size=4), ["another", "configuration"]),
        (make_model(arch, num_hidden_layers=3), ["3 layers"]),
        (make_model(other_arch), ["made for", type(make_model(other_arch)).__name__]),
    ]
    for other, words in cases:
        plan = adapter_for(other).resolve(comps("ssm:0"))
        with pytest.raises(PlanError) as err:
            with masked(model, plan):
                pass
        assert all(w in str(err.value) for w in words), str(err.value)
    with pytest.raises(PlanError, match="groups of 8 channels"):
        adapter_for(model).resolve(PruningPlan(frozenset({Component("ssm", 0)}), group_sizes={"channel_group": 8}))
