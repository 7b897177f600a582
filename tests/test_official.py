"""Official Mamba-Shedder files: every key the official code writes, read per family or refused by name,
written back, and official run directories both ways (hand-written files mirroring the official ones)."""
from __future__ import annotations

import json

import pytest

from shedder.arch import adapter_for
from shedder.cli import main
from shedder.core.errors import PlanError
from shedder.formats.official import OfficialConfig, check_official_kinds, import_run, to_official
from shedder.core.plan import Component, PruningPlan


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2", layers=6)


@pytest.fixture(scope="module")
def hybrid(tiny_model_factory):
    return tiny_model_factory("nemotron_h", layers=8)  # attention at layers 1 and 5, MLP at 3 and 7 (width 64)


@pytest.fixture(scope="module")
def zamba2():
    from test_arch_zamba2 import make_zamba2

    return make_zamba2()  # hybrid layers 1, 3, 4; intermediate size 64


def resolve(model, config, **group_sizes) -> set[Component]:
    return set(adapter_for(model, group_sizes).resolve(OfficialConfig.of(config)).components)


def test_released_mamba_configs_import(mamba2, tiny_model_factory):
    # mamba-2.8b/pruning_config.json and mamba2-2.7b/pruning_config.json, at the tiny models' depth
    mamba1 = tiny_model_factory("mamba1", layers=6)
    assert resolve(mamba1, {"pruned_mamba_block_idx": [2, 5, 0]}) == {Component("block", i) for i in (0, 2, 5)}
    assert resolve(mamba2, {"pruned_ssm_idx": [5, 4, 1]}) == {Component("ssm", i) for i in (1, 4, 5)}


def test_hymba_and_unknown_keys_are_refused_by_name(mamba2, zamba2):
    with pytest.raises(PlanError, match="'pruned_hymba_block_idx' is for Hymba models; Zamba2ForCausalLM"):
        resolve(zamba2, {"pruned_hymba_block_idx": [2, 22, 15]})
    # an empty Hymba key (the Hymba script writes every key) is harmless
    assert resolve(mamba2, {"pruned_ssm_idx": [1], "pruned_moe_idx": [], "pruned_self_attn_idx": []}) == \
        {Component("ssm", 1)}
    with pytest.raises(PlanError, match="'pruned_heads_idx' is not known"):
        OfficialConfig.of({"pruned_ssm_idx": [1], "pruned_heads_idx": [0]})
    with pytest.raises(PlanError, match="'pruned_mha_idx' does not apply to Mamba2ForCausalLM"):
        resolve(mamba2, {"pruned_mha_idx": [0]})
    with pytest.raises(PlanError, match="names layer 6, but Mamba2ForCausalLM has layers 0..5"):
        resolve(mamba2, {"pruned_ssm_idx": [6]})
    with pytest.raises(PlanError, match="lists an index twice"):
        OfficialConfig.of({"pruned_ssm_idx": [1, 1]})
    with pytest.raises(PlanError, match="remaining width must be a positive integer"):
        OfficialConfig.of({"pruned_mlp_channels": {"0": 0}})


def test_zamba2_config_with_mlp_channels(zamba2):
    # a prune_hybrid.py output: every key, widths at full size where nothing was narrowed
    config = {"pruned_mamba_block_idx": [2], "pruned_mha_idx": [1], "pruned_mlp_idx": [2],
              "pruned_mlp_channels": {"0": 64, "1": 64, "2": 64}, "pruned_ssm_idx": [5, 0]}
    assert resolve(zamba2, config) == {Component("mixer", 2), Component("attention", 3), Component("mlp", 4),
                                       Component("ssm", 5), Component("ssm", 0)}
    adapter = adapter_for(zamba2)
    back = to_official(adapter, adapter.resolve(OfficialConfig.of(config)))
    assert {k: sorted(v) for k, v in back.items()} == {"pruned_mamba_block_idx": [2], "pruned_mha_idx": [1],
                                                      "pruned_mlp_idx": [2], "pruned_ssm_idx": [0, 5]}
    # a plain layer's block is the official mamba block; a hybrid layer's block has no counterpart
    assert to_official(adapter, PruningPlan(frozenset({Component("block", 0)})))["pruned_mamba_block_idx"] == [0]
    with pytest.raises(PlanError, match="'block' on Zamba2ForCausalLM has no counterpart"):
        to_official(adapter, PruningPlan(frozenset({Component("block", 1)})))
    # a narrowed MLP (ratio_10 narrows five of nine): that application's trailing channel groups, and back
    narrowed = {**config, "pruned_mlp_channels": {"0": 64, "1": 32, "2": 64}}
    assert resolve(zamba2, narrowed) - resolve(zamba2, config) == {Component("mlp_channel_group", 3, g)
                                                                   for g in range(4, 8)}
    back = to_official(adapter, adapter.resolve(OfficialConfig.of(narrowed)))
    assert back["pruned_mlp_channels"] == {"0": 64, "1": 32, "2": 64}
    with pytest.raises(PlanError, match="MLP #1 keeps 30 channels, not a whole number of 8-channel groups"):
        resolve(zamba2, {"pruned_mlp_channels": {"1": 30}})


def test_mlp_channels_become_trailing_channel_groups_and_back(hybrid):
    config = {"pruned_mha_idx": [], "pruned_mlp_idx": [], "pruned_mlp_channels": {"0": 32, "1": 64}}
    got = resolve(hybrid, config, mlp_channel_group=16)
    assert got == {Component("mlp_channel_group", 3, 2), Component("mlp_channel_group", 3, 3)}
    adapter = adapter_for(hybrid, {"mlp_channel_group": 16})
    assert to_official(adapter, PruningPlan(frozenset(got), group_sizes={"mlp_channel_group": 16})) == \
        {**config, "pruned_mamba_block_idx": [], "pruned_ssm_idx": []}
    with pytest.raises(PlanError, match="not a whole number of 16-channel groups"):
        resolve(hybrid, {"pruned_mlp_channels": {"0": 40}}, mlp_channel_group=16)
    with pytest.raises(PlanError, match="layer 3: the official format keeps the first channels"):
        to_official(adapter, PruningPlan(frozenset({Component("mlp_channel_group", 3, 0)}),
                                         group_sizes={"mlp_channel_group": 16}))


def test_kinds_without_official_counterpart_are_refused_on_export(mamba2):
    adapter = adapter_for(mamba2)
    plan = PruningPlan(frozenset({Component("block", 4), Component("ssm", 1)}))
    assert to_official(adapter, plan) == {"pruned_mamba_block_idx": [4], "pruned_ssm_idx": [1]}
    with pytest.raises(PlanError, match="'head' on Mamba2ForCausalLM has no counterpart"):
        to_official(adapter, PruningPlan(frozenset({Component("head", 1, 0)})))
    check_official_kinds(adapter, ["block", "ssm"])  # what a search --official-layout checks first
    with pytest.raises(PlanError, match="--official-layout: 'head' on Mamba2ForCausalLM has no counterpart"):
        check_official_kinds(adapter, ["ssm", "head"])


def test_a_kind_only_some_of_whose_components_have_a_counterpart_is_refused_for_a_layout(zamba2):
    adapter = adapter_for(zamba2)
    check_official_kinds(adapter, ["mixer", "ssm", "attention", "mlp"])
    with pytest.raises(PlanError, match="'block' on Zamba2ForCausalLM has no counterpart"):
        check_official_kinds(adapter, ["block"])  # a hybrid layer's block has none: the search could pick it


def _official_run(tmp_path, steps: list[tuple[list[int], float]]):
    """A run directory as the official prune.py leaves it (config paths from the machine that ran it)."""
    run = tmp_path / "official"
    (run / "pruned_model_configs").mkdir(parents=True)
    results = []
    for k, (idx, ppl) in enumerate(steps):
        name = f"config.mamba_block.{k}.json"
        (run / "pruned_model_configs" / name).write_text(json.dumps({"pruned_mamba_block_idx": idx}, indent=4))
        results.append({"step": k, "prune_target": "mamba_block", "importance": ppl,
                        "config_save_to": f"/home/someone/prune_result/pruned_model_configs/{name}"})
    (run / "log.json").write_text(json.dumps({"args": {}, "total_params": 1, "pruning_results": results,
                                              "num_evals": 11}, indent=4))
    (run / "pruning_config.json").write_text(json.dumps({"pruned_mamba_block_idx": steps[-1][0]}))
    return run


def test_import_run_and_its_refusals(mamba2, tmp_path):
    run = _official_run(tmp_path, [([3], 12.5), ([3, 0], 14.25)])
    steps = import_run(mamba2, run, tmp_path / "ours")
    assert [(str(s.component), s.ppl) for s in steps] == [("block:3:0", 12.5), ("block:0:0", 14.25)]
    saved = PruningPlan.load(tmp_path / "ours" / "step_02" / "pruning_config.json")
    assert saved.components == {Component("block", 3), Component("block", 0)}
    lines = (tmp_path / "ours" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["params"] == adapter_for(mamba2).param_count(saved)
    with pytest.raises(Exception, match="is not empty"):
        import_run(mamba2, run, tmp_path / "ours")
    bad = _official_run(tmp_path / "b", [([3], 12.5), ([1, 0], 14.25)])
    with pytest.raises(Exception, match="must add exactly one component"):
        import_run(mamba2, bad, tmp_path / "ours2")


def test_cli_official_layout_convert_and_import(capsys, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["search", "--model", str(tiny_model_dir), "--kinds", "ssm", "--steps", "2", "--samples", "2",
                 "--seq-len", "32", "--out", str(run), "--official-layout", "--no-progress", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["steps"]
    log = json.loads((run / "log.json").read_text())
    assert [r["step"] for r in log["pruning_results"]] == [0, 1]
    assert [r["importance"] for r in log["pruning_results"]] == [s["ppl"] for s in ours]
    final = json.loads((run / "pruning_config.json").read_text())
    assert final == {"pruned_mamba_block_idx": [], "pruned_ssm_idx": [int(s["component"].split(":")[1]) for s in ours]}
    assert json.loads((run / "pruned_model_configs" / "config.ssm.1.json").read_text()) == final

    # the official layout imports back into the same steps
    assert main(["import-run", str(run), "--model", str(tiny_model_dir), "--out", str(tmp_path / "back"),
                 "--json"]) == 0
    back = json.loads(capsys.readouterr().out)["steps"]
    assert [(s["component"], s["ppl"], s["params"]) for s in back] == [(s["component"], s["ppl"], s["params"])
                                                                       for s in ours]

    # plan convert: ours -> official -> ours
    official = tmp_path / "official.json"
    assert main(["plan", "convert", str(run / "step_02" / "pruning_config.json"), "--to", "official",
                 "--model", str(tiny_model_dir), "--out", str(official)]) == 0
    assert json.loads(official.read_text()) == {**final, "pruned_ssm_idx": sorted(final["pruned_ssm_idx"])}
    again = tmp_path / "again.json"
    assert main(["plan", "convert", str(official), "--to", "shedder", "--model", str(tiny_model_dir),
                 "--out", str(again)]) == 0
    assert PruningPlan.load(again).components == PruningPlan.load(run / "step_02" / "pruning_config.json").components
    capsys.readouterr()
    assert main(["plan", "convert", str(official), "--to", "shedder", "--out", str(tmp_path / "x.json")]) == 2
    assert "--model is needed" in capsys.readouterr().err
    assert main(["plan", "convert", str(official), "--to", "shedder", "--model", str(tiny_model_dir),
                 "--out", str(again)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", [10, 15])
def test_released_zamba2_configs_fit_the_published_shape(ratio):
    """The released Zamba2-2.7B configs name one MLP width per hybrid application of the published
    config (nine), each within its intermediate size, and only Mamba layers that exist."""
    from pathlib import Path  # why: only this fixture test reads files beside the tests
    from shedder.dev.realshape import REAL_SHAPES  # why: only this test needs the published config
    config = REAL_SHAPES["zamba2_2.7b"].config()
    fixture = Path(__file__).parent / "fixtures" / "official" / "zamba2-2.7b" / f"ratio_{ratio}" / "pruning_config.json"
    released = json.loads(fixture.read_text())
    widths = released["pruned_mlp_channels"]
    assert sorted(int(k) for k in widths) == list(range(len(config.hybrid_layer_ids)))
    assert all(0 < w <= config.intermediate_size for w in widths.values())
    assert all(0 <= i < config.num_hidden_layers for i in released["pruned_ssm_idx"])
