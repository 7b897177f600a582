"""The two released Zamba2-2.7B Mamba-Shedder configs (ratio 10 and 15) on a Zamba2-2.7B-shaped model.

The model has the published layout (54 layers, nine hybrid applications at layers 6, 12, ..., 51
alternating two memory blocks), the published MLP width (10,240 channels) and vocabulary; only the
hidden width, heads and adapter rank are narrow, so a CI run builds it in a second. On it the
released configs import (``pruned_mlp_channels`` narrow six applications, ``pruned_mlp_idx`` skips
three), evaluate, extract (masked == extracted, cached generation), save and reload, count their
parameters honestly (each narrowed copy against the shared MLP it leaves) and export back to the
same official config.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from adapter_checks import check_generation, check_plan, tokens

from shedder.arch import adapter_for, count_parameters
from shedder.arch.zamba2_mlp import NarrowedMLP
from shedder.cli import main
from shedder.core.plan import PruningPlan
from shedder.dev.realshape import REAL_SHAPES, fill, save_checkpoint
from shedder.formats.loading import load_model
from shedder.measure.masking import masked
from shedder.formats.official import OfficialConfig, read_plan, to_official

FIXTURES = Path(__file__).parent / "fixtures" / "official" / "zamba2-2.7b"
RATIOS = (10, 15)


def released(ratio: int) -> Path:
    return FIXTURES / f"ratio_{ratio}" / "pruning_config.json"


def without_widths(plan) -> PruningPlan:
    """The same plan with every application on its shared MLP (no ``mlp_channel_group``)."""
    return PruningPlan(frozenset(c for c in plan.components if c.kind != "mlp_channel_group"), plan.model)


@pytest.fixture(scope="module")
def model():
    """Zyphra/Zamba2-2.7B's layout, MLP width and vocabulary at a hidden width of 64."""
    values = {**REAL_SHAPES["zamba2_2.7b"].values, "hidden_size": 64, "n_mamba_heads": 4, "mamba_headdim": 32,
              "mamba_d_state": 16, "chunk_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4,
              "adapter_rank": 8}
    m = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**values))
    fill(m)
    m.config.architectures = ["Zamba2ForCausalLM"]
    return m.eval()


def test_the_model_has_the_published_applications(model):
    adapter = adapter_for(model)
    assert [c.layer for c in adapter.components("mlp")] == [6, 12, 18, 24, 30, 36, 42, 47, 51]
    assert {adapter.mlp_width(c.layer) for c in adapter.components("mlp")} == {10240}
    assert adapter.group_sizes["mlp_channel_group"] == 256


@pytest.mark.parametrize("ratio", RATIOS)
def test_released_config_imports_extracts_decodes_and_exports_back(model, ratio):
    adapter = adapter_for(model)
    config = json.loads(released(ratio).read_text())
    plan = adapter.resolve(OfficialConfig.of(config))
    widths = config["pruned_mlp_channels"]
    apps = [6, 12, 18, 24, 30, 36, 42, 47, 51]
    for ordinal, layer in enumerate(apps):
        groups = sorted(c.index for c in plan.components if c.kind == "mlp_channel_group" and c.layer == layer)
        skipped = ordinal in config["pruned_mlp_idx"]
        assert groups == ([] if skipped else list(range(widths[str(ordinal)] // 256, 40)))
    # masked == extracted, and the extracted applications hold what the config says
    ids = tokens(seed=ratio, length=12, vocab=32000)
    _, small = check_plan(model, plan, ids=ids, adapter=adapter)
    layer_map = adapter.layer_map(plan)
    for ordinal, layer in enumerate(apps):
        ff = small.model.layers[layer_map[layer]].shared_transformer.feed_forward
        width = widths[str(ordinal)]
        if ordinal in config["pruned_mlp_idx"]:
            assert not hasattr(ff, "gate_up_proj")
        elif width < 10240:
            assert isinstance(ff, NarrowedMLP) and ff.gate_up_proj.out_features == 2 * width
        else:
            assert ff.gate_up_proj.out_features == 2 * 10240 and not isinstance(ff, NarrowedMLP)
    # cached greedy decoding: the extracted model's equals its full forwards', the masked model's equals it. Step
    # logits are not compared: on this 54-layer random-weight model even the unpruned model's cached steps drift
    # from full forwards by up to ~6e-3 (fp32, 4 steps), above the contract's 1e-4
    prompt = tokens(seed=5, length=6, batch=1, vocab=32000)
    expected = check_generation(small, prompt, torch.ones_like(prompt), steps=4)
    with masked(model, plan, adapter):
        check_generation(model, prompt, torch.ones_like(prompt), steps=4, expected=expected)
    # honest counts: the narrowed copies against the same plan on the shared MLPs
    base = without_widths(plan)
    delta = adapter.param_count(plan) - adapter.param_count(base)
    assert adapter.param_count(plan) == count_parameters(small)
    assert f"{'adds' if delta > 0 else 'removes'} {abs(delta):,} parameters" in adapter.param_notes(plan)[0]
    # export back: the same official config (lists as sets: we write them by layer)
    back = to_official(adapter, plan)
    assert back["pruned_mlp_channels"] == widths
    assert {k: sorted(v) for k, v in back.items() if k != "pruned_mlp_channels"} == \
        {k: sorted(v) for k, v in config.items() if k != "pruned_mlp_channels"}


def test_narrowing_counts_each_copy_against_the_shared_mlp(model):
    """ratio_10 narrows applications 0, 2, 4 (memory block 0, whose other users 6 and 8 skip their
    MLP: block 0's shared MLP goes) and 1, 5 (block 1, still used by application 3)."""
    adapter = adapter_for(model)
    plan = adapter.resolve(OfficialConfig.of(json.loads(released(10).read_text())))
    base = without_widths(plan)
    hidden, rank, ffn = 64, 8, 10240
    copies = 3 * hidden * (3072 + 8192 + 6144 + 4096 + 9216)
    adapters = 5 * rank * (hidden + 2 * ffn)
    shared_block0 = 3 * hidden * ffn
    assert adapter.param_count(plan) - adapter.param_count(base) == copies - adapters - shared_block0


def test_cli_journey_with_a_released_config(model, tmp_path, capsys):
    source = save_checkpoint(model, tmp_path / "zamba2-2.7b-shaped")
    config = released(10)
    assert main(["eval", "--model", str(source), "--plan", str(config), "--samples", "2", "--seq-len", "16",
                 "--no-accuracy", "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] > 0 and evaluated["params"] == adapter_for(model).param_count(
        adapter_for(model).resolve(read_plan(config)))
    out = tmp_path / "pruned"
    assert main(["extract", "--model", str(source), "--plan", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "narrowed MLPs: 5 shared-block application(s) get their own MLP copy" in printed
    assert "layer 6 (3,072), layer 12 (4,096), layer 18 (8,192), layer 30 (6,144), layer 36 (9,216)" in printed
    assert "## Parameter count" in (out / "README.md").read_text()
    loaded, _ = load_model(str(out))
    ids = tokens(seed=2, length=10, vocab=32000)
    adapter = adapter_for(model)
    with torch.no_grad(), adapter.apply(read_plan(config)):
        expected = model(ids).logits
    assert (loaded(ids).logits - expected).abs().max().item() < 1e-4
    assert main(["info", "--model", str(out)]) == 0
    assert "own narrowed MLPs: layer 6 (3,072)" in capsys.readouterr().out
