"""Stock-shaped width pruning: equal head counts in every group of every layer, chosen per group, and
an extracted model plain ``transformers`` loads; a Mamba-Shedder plan with uneven heads is told to
use our loader."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import transformers

from shedder import api
from shedder.cli import main
from shedder.core.errors import ShedderError
from shedder.core.plan import Component, PruningPlan
from shedder.measure.masking import masked
from shedder.prune.stock import stock_greedy, stock_one_shot, stock_shaped
from tests.tiny_models import SUITE, TINY

#: hidden 32, 4 heads of 16 channels in 2 groups: one head per group gone leaves 32 = hidden channels.
MODEL = SUITE["mamba2"]


@pytest.fixture(scope="module")
def model():
    return MODEL.build(0, 3, vocab_size=100)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))


def heads_per_group(plan: PruningPlan) -> dict:
    counts: dict = {}
    for c in plan.components:
        counts[(c.layer, c.index // 2)] = counts.get((c.layer, c.index // 2), 0) + 1
    return counts


def test_one_shot_removes_the_lowest_head_of_every_group(model, windows):
    table = api.score(model, windows, ["head"], "ppl", cache_dir=None)
    series = stock_one_shot(model, table)
    assert [p.label for p in series.points] == ["−1 heads per group"]
    plan = series.points[0].plan
    assert set(heads_per_group(plan).values()) == {1} and len(plan.components) == 3 * 2
    for c in plan.components:  # within its group, the head whose removal hurt least
        group = table[(table.kind == "head") & (table.layer == c.layer) & (table["index"] // 2 == c.index // 2)]
        assert c.index == int(group.sort_values("delta_ppl", kind="stable").iloc[0]["index"])


def test_greedy_picks_per_group_by_measured_nll(model, windows):
    series = stock_greedy(model, windows, batch_size=2)
    plan = series.points[0].plan
    assert set(heads_per_group(plan).values()) == {1} and len(plan.components) == 6
    ev = api.PlanEvaluator(model, windows, batch_size=2)
    for c in plan.components:
        other = c.index ^ 1  # the other head of its group
        assert ev.nll(PruningPlan().with_components([c])) <= ev.nll(PruningPlan().with_components([Component("head", c.layer, other)]))


def test_stock_plan_extracts_to_a_checkpoint_transformers_loads(model, windows, tmp_path):
    plan = stock_one_shot(model, api.score(model, windows, ["head"], "ppl")).points[0].plan
    adapter = api.adapter_for(model)
    assert stock_shaped(adapter, plan)
    done = api.export(model, None, adapter, plan, tmp_path / "out", "tiny")
    assert done.stock and done.load_line.startswith("stock checkpoint: loads with transformers: "
                                                    "AutoModelForCausalLM.from_pretrained(")
    assert api.load_line(done.stock) in done.card  # the card names "<this directory>"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(done.out).eval()
    assert loaded.config.num_heads == 2 and not hasattr(loaded.config, "shedder")
    with torch.no_grad(), masked(model, plan):
        expected = model(windows).logits
    with torch.no_grad():
        assert torch.allclose(loaded(windows).logits, expected, atol=1e-5)


def test_uneven_plan_is_told_to_use_our_loader(model, tmp_path):
    plan = PruningPlan().with_components([Component("head", 0, 0)])
    adapter = api.adapter_for(model)
    assert not stock_shaped(adapter, plan)
    done = api.export(model, None, adapter, plan, tmp_path / "out", "tiny")
    assert not done.stock and done.load_line.startswith("needs shedder.formats.loading.load_model")
    assert api.load_line(done.stock) in done.card  # the card names "<this directory>"
    assert torch.is_tensor(api.load_model(str(done.out))[0].lm_head.weight)


def test_refuses_a_model_without_heads():
    mamba1 = SUITE["mamba1"].build(0, 2, vocab_size=100)
    with pytest.raises(ShedderError, match="no SSM heads"):
        stock_greedy(mamba1, torch.zeros(1, 8, dtype=torch.long))


def test_cli_stock_writes_stock_plans_and_extract_prints_the_load_line(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir
    assert main(["stock", "--model", str(src), "--strategy", "greedy", "--samples", "4",
                 "--seq-len", "16", "--out", str(tmp_path / "plans"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["plan"] for r in out["plans"]] == ["stock_01.json"]
    assert main(["extract", "--model", str(src), "--plan", str(tmp_path / "plans" / "stock_01.json"),
                 "--out", str(tmp_path / "x")]) == 0
    assert "stock checkpoint: loads with transformers" in capsys.readouterr().out


def test_a_hybrid_stock_plan_loads_with_transformers_too(tmp_path):
    hybrid = SUITE["nemotron_h"].build(0, None, vocab_size=100)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    plan = stock_greedy(hybrid, ids, steps=1, batch_size=2).points[0].plan
    done = api.export(hybrid, None, api.adapter_for(hybrid), plan, tmp_path / "out", "tiny")
    assert done.stock
    loaded = transformers.AutoModelForCausalLM.from_pretrained(done.out).eval()
    with torch.no_grad(), masked(hybrid, plan):
        expected = hybrid(ids).logits
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


# -- MLP channels: the same number of channel groups gone from every MLP --------------------------
#: Nemotron-H with two per-layer MLPs of 96 channels: 3 groups of 32 each.
GROUPS = PruningPlan(group_sizes={"mlp_channel_group": 32})


@pytest.fixture(scope="module")
def hybrid():
    return TINY["nemotron_h"].build(0, None, vocab_size=100)


def per_mlp(plan: PruningPlan) -> dict:
    counts: dict = {}
    for c in plan.components:
        assert c.kind == "mlp_channel_group"
        counts[c.layer] = counts.get(c.layer, 0) + 1
    return counts


def test_one_shot_removes_the_lowest_channel_groups_of_every_mlp(hybrid, windows):
    table = api.score(hybrid, windows, ["mlp_channel_group"], "ppl", base=GROUPS, cache_dir=None)
    series = stock_one_shot(hybrid, table, base_plan=GROUPS, kinds=("mlp_channel_group",))
    assert series.name == "stock one-shot ppl (mlp_channel_group)"
    assert [p.label for p in series.points] == ["−1 MLP channel groups per MLP", "−2 MLP channel groups per MLP"]
    mlps = sorted({c.layer for c in api.adapter_for(hybrid, GROUPS.group_sizes).components("mlp_channel_group")})
    for k, point in enumerate(series.points, 1):
        assert per_mlp(point.plan) == {layer: k for layer in mlps}
        for c in point.plan.components:  # each MLP's own k lowest
            own = table[(table.kind == "mlp_channel_group") & (table.layer == c.layer)]
            assert c.index in set(own.sort_values("delta_ppl", kind="stable")["index"].iloc[:k].astype(int))


def test_stock_mlp_plan_extracts_to_a_checkpoint_transformers_loads(hybrid, windows, tmp_path):
    series = stock_greedy(hybrid, windows, steps=1, base_plan=GROUPS, batch_size=2,
                          kinds=("head", "mlp_channel_group"))
    assert series.name == "stock greedy (head, mlp_channel_group)"
    plan = series.points[0].plan
    assert series.points[0].label == "−1 heads per group, −1 MLP channel groups per MLP"
    assert {c.kind for c in plan.components} == {"head", "mlp_channel_group"}
    adapter = api.adapter_for(hybrid, plan.group_sizes)
    assert stock_shaped(adapter, plan)
    done = api.export(hybrid, None, adapter, plan, tmp_path / "out", "tiny")
    assert done.stock
    loaded = transformers.AutoModelForCausalLM.from_pretrained(done.out).eval()
    assert loaded.config.intermediate_size == 64 and not hasattr(loaded.config, "shedder")
    assert loaded.config.mamba_num_heads == hybrid.config.mamba_num_heads - hybrid.config.n_groups
    ids = windows[:2]
    with torch.no_grad(), masked(hybrid, plan):
        expected = hybrid(ids).logits
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_uneven_mlp_widths_are_not_stock(hybrid):
    adapter = api.adapter_for(hybrid, GROUPS.group_sizes)
    first = adapter.components("mlp_channel_group")[0]
    assert not stock_shaped(adapter, GROUPS.with_components([first]))


def test_refuses_mlp_channels_on_a_model_without_them(model, windows):
    with pytest.raises(ShedderError, match="no per-layer MLP channel groups"):
        stock_greedy(model, windows, kinds=("mlp_channel_group",))
    with pytest.raises(ShedderError, match="cannot be pruned stock-shaped"):
        stock_greedy(model, windows, kinds=("attention",))


def test_a_short_last_channel_group_is_never_removed(hybrid, windows):
    uneven = PruningPlan(group_sizes={"mlp_channel_group": 40})  # 96 channels: 40, 40 and a short 16
    series = stock_greedy(hybrid, windows, base_plan=uneven, batch_size=2, kinds=("mlp_channel_group",))
    assert len(series.points) == 1 and {c.index for c in series.points[0].plan.components} <= {0, 1}


@pytest.mark.parametrize("family,kind", [("bamba", "head"), ("bamba", "mlp_channel_group"), ("zamba2", "head"),
                                         ("falcon_h1", "head"), ("falcon_h1", "mlp_channel_group"),
                                         ("granite_moe", "head"), ("granite_dense", "mlp_channel_group")])
def test_every_hybrid_stock_plan_loads_with_transformers(family, kind, tmp_path):
    """Each Mamba-2 hybrid's stock config states an equal removal (heads: mixer width and head count;
    MLP channels: the MLP width), so plain ``from_pretrained`` builds the pruned model exactly."""
    model = TINY[family].build(0)
    adapter = api.adapter_for(model)
    rank = torch.Generator().manual_seed(0)
    table = pd.DataFrame([{"kind": c.kind, "layer": c.layer, "index": c.index, "score": float(torch.rand(1, generator=rank))}
                          for c in adapter.components(kind)])
    plan = stock_one_shot(model, table, kinds=(kind,)).points[0].plan
    done = api.export(model, None, adapter, plan, tmp_path / "out", "tiny")
    config = json.loads((done.out / "config.json").read_text())
    assert done.stock and "shedder" not in config and done.params_after < done.params_before
    loaded = transformers.AutoModelForCausalLM.from_pretrained(done.out).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), masked(model, plan):
        expected = model(ids).logits
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_a_family_whose_stock_config_cannot_state_it_is_refused():
    with pytest.raises(ShedderError, match="stock config cannot state"):
        stock_greedy(TINY["jamba"].build(0), torch.zeros(1, 8, dtype=torch.long), kinds=("mlp_channel_group",))


def test_offered_kinds_are_the_ones_each_family_can_prune_stock_shaped(model, hybrid):
    from shedder.arch import adapter_for

    assert api.stock_kinds(adapter_for(model)) == ["head"]
    assert api.stock_kinds(adapter_for(hybrid)) == ["head", "mlp_channel_group"]
    assert api.stock_kinds(adapter_for(SUITE["mamba1"].build(0, 2, vocab_size=100))) == []


def test_cli_stock_kinds(tmp_path, capsys, bundled_tokenizer):
    src = tmp_path / "src"  # MLPs of 128 channels: two groups of the family's default 64
    TINY["nemotron_h"].build(0, None, vocab_size=len(bundled_tokenizer), intermediate_size=128).save_pretrained(src)
    bundled_tokenizer.save_pretrained(src)
    assert main(["stock", "--model", str(src), "--kinds", "mlp_channel_group", "--strategy", "greedy",
                 "--samples", "2", "--seq-len", "16", "--steps", "1", "--out", str(tmp_path / "plans"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["series"] == "stock greedy (mlp_channel_group)" and [r["plan"] for r in out["plans"]] == ["stock_01.json"]
    assert {c.kind for c in PruningPlan.load(tmp_path / "plans" / "stock_01.json").components} == {"mlp_channel_group"}
    with pytest.raises(SystemExit) as bad:
        main(["stock", "--model", str(src), "--kinds", "head,block", "--out", str(tmp_path / "p2")])
    assert bad.value.code == 2 and "'block' is not a stock-shaped kind" in capsys.readouterr().err
