"""Importance metrics side by side, their agreement, one-shot series and the measured frontier."""
import json

import pandas as pd
import pytest
import torch

from shedder.prune import frontier
from shedder.prune.agreement import agreement, compare, correlate, matrix
from shedder.arch import adapter_for
from shedder.cli import main
from shedder.measure.bench import speedup_text
from shedder.measure.continuation import continue_text
from shedder.prune.importance_metrics import REGISTRY, MetricError, _Ownership, metric_scores
from shedder.formats.loading import load_model
from shedder.core.plan import Component, PruningPlan


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2", layers=3)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_taylor_owns_exactly_the_parameters_extraction_deletes(tiny_model_factory):
    for model in (tiny_model_factory("mamba2", layers=2), tiny_model_factory("nemotron_h", layers=4)):
        adapter = adapter_for(model)
        own = _Ownership(model, adapter)
        with torch.no_grad(), own.numbered():
            counts = {c: int(own.removed(c).sum()) for c in adapter.candidates(PruningPlan(), list(adapter.kind_counts()))}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights restored
        assert counts == {c: adapter.component_params(c) for c in counts}


def test_one_pass_metrics_match_hand_computations(mamba2, windows):
    with torch.no_grad():
        out = mamba2(input_ids=windows, output_hidden_states=True, use_cache=False)
        inputs = [mamba2.get_input_embeddings()(windows), *out.hidden_states]  # hidden_states[l]: after layer l
    bi = metric_scores(mamba2, windows, ["block"], "block_influence")
    for layer in range(3):
        cos = torch.nn.functional.cosine_similarity(inputs[layer], inputs[layer + 1], dim=-1)
        assert bi.loc[bi["layer"] == layer, "score"].item() == pytest.approx(float((1 - cos).mean()), rel=1e-5)

    captured = {}
    mixer = mamba2.backbone.layers[1].mixer
    handle = mixer.out_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        mamba2(input_ids=windows, use_cache=False)
    handle.remove()
    head_dim = mixer.head_dim
    act = metric_scores(mamba2, windows, ["head", "ssm"], "activation", batch_size=4)
    assert act.attrs["left_out"] == ["ssm"] and set(act["kind"]) == {"head"}
    for h in range(mixer.num_heads):
        want = captured["x"][..., h * head_dim:(h + 1) * head_dim].norm(dim=-1).mean()
        got = act.query("layer == 1 and index == @h")["score"].item()
        assert got == pytest.approx(float(want), rel=1e-5)
    assert act.attrs["forwards"] == 1 and act.attrs["backwards"] == 0 and act.attrs["seconds"] > 0


def test_taylor_sums_gradient_times_weight_over_a_block(mamba2, windows):
    mamba2.zero_grad()
    logits = mamba2(input_ids=windows, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    loss.backward()
    with torch.no_grad():
        want = sum(float((p.grad * p).abs().sum()) for p in mamba2.backbone.layers[2].parameters())
    mamba2.zero_grad(set_to_none=True)
    table = metric_scores(mamba2, windows, ["block"], "taylor")
    assert table.query("layer == 2")["score"].item() == pytest.approx(want, rel=1e-4)
    assert table.attrs["backwards"] == 1
    assert all(p.grad is None for p in mamba2.parameters())


def test_a_metric_refuses_kinds_it_does_not_score(mamba2, windows):
    with pytest.raises(MetricError, match="block_influence does not score head"):
        metric_scores(mamba2, windows, ["head"], "block_influence")
    with pytest.raises(MetricError, match="unknown importance metric"):
        metric_scores(mamba2, windows, ["block"], "magic")
    base = PruningPlan([Component("block", 0)])
    with pytest.raises(MetricError, match="unpruned model only"):
        metric_scores(mamba2, windows, ["block"], "taylor", base_plan=base)


def test_rank_agreement_and_top_k_overlap():
    a = pd.DataFrame({"layer": range(4), "kind": "block", "index": 0, "score": [1.0, 2.0, 3.0, 4.0]})
    same = correlate(a, a.assign(score=a["score"] * 10), "block", top_k=2)
    assert same == {"spearman": 1.0, "kendall": 1.0, "top_k_overlap": 1.0, "k": 2, "n": 4}
    flipped = correlate(a, a.assign(score=-a["score"]), "block", top_k=2)
    assert flipped["spearman"] == -1.0 and flipped["kendall"] == -1.0 and flipped["top_k_overlap"] == 0.0
    rows = agreement({"x": a, "y": a.assign(score=-a["score"])}, {"x": (a, a)}, top_k=1)
    m = matrix(rows, "block", "kendall")
    assert m.loc["x", "y"] == m.loc["y", "x"] == -1.0 and m.loc["x", "x"] == 1.0 and m.loc["y", "y"] == 1.0


def test_compare_gives_a_four_metric_matrix_for_blocks(mamba2, windows, tmp_path):
    tables, rows = compare(mamba2, windows, ["block"], list(REGISTRY), cache_dir=tmp_path)
    assert list(tables) == list(REGISTRY)
    m = matrix(rows, "block", "spearman")
    assert list(m.index) == list(REGISTRY) and m.notna().all().all()
    stability = rows[rows["a"].str.contains("even")]
    assert len(stability) == 4 and stability["n"].eq(3).all()


def test_one_shot_removes_the_lowest_scored_at_once(tiny_model_factory):
    model = tiny_model_factory("mamba2", layers=2)
    adapter = adapter_for(model)
    heads = adapter.components("head")
    table = pd.DataFrame([{"layer": c.layer, "kind": c.kind, "index": c.index, "score": float(i)}
                          for i, c in enumerate(heads)])
    series = frontier.one_shot(model, table, steps=4, name="one-shot test")
    plans = [p.plan for p in series.points]
    assert [len(p.components) for p in plans] == [1, 2, 3, 4]
    assert all(a.components < b.components for a, b in zip(plans, plans[1:]))
    # layer 0 group 0 has heads 0 and 1: the second cannot go, the next lowest is taken instead
    assert Component("head", 0, 1) not in plans[-1].components
    assert plans[0].components == {heads[0]}


def test_measured_speed_is_cached_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    model, _ = load_model(str(tiny_model_dir))
    plan = adapter_for(model).resolve(PruningPlan([Component("block", 1)]))
    settings = dict(seq_len=16, new_tokens=2, min_rounds=1, budget_s=0.01, warmup=0, cache_dir=tmp_path)
    assert frontier.measured(model, plan, **settings) is None
    first = frontier.measure(str(tiny_model_dir), model, plan, **settings)
    assert first["prefill_speedup"] > 0 and first["state_ratio"] == pytest.approx(2 / 3)
    bench = first["bench"]["measured_prefill_speedup"]  # exactly bench's numbers, and its printed form
    assert (first["prefill_speedup_low"], first["prefill_speedup"], first["prefill_speedup_high"]) == (
        bench["ci95"][0], bench["median"], bench["ci95"][1])
    assert first["prefill_speedup_text"] == speedup_text(bench) and first["prefill_speedup_resolved"] is False
    assert first["bench"]["pruned"]["params"] == adapter_for(model).param_count(plan)
    monkeypatch.setattr(frontier, "bench_models", lambda *a, **k: pytest.fail("measured twice"))
    again, _ = load_model(str(tiny_model_dir))  # another session: same weights, same key
    assert frontier.measure(str(tiny_model_dir), again, plan, **settings) == json.loads(json.dumps(first))
    assert frontier.measured(model, plan, **{**settings, "dtype": "bfloat16"}) is None
    assert frontier.measured(model, PruningPlan(), **settings)["prefill_speedup"] == 1.0


def test_pareto_front_spans_series_and_reads_speedups_as_gains():
    rows = pd.DataFrame({"series": ["a", "a", "b"], "prefill_speedup": [1.0, 1.2, 1.3], "ppl": [10.0, 12.0, 11.0]})
    assert list(frontier.pareto(rows, "prefill_speedup", "ppl")) == [True, False, True]
    # an uncertain speedup counts by the lower end of its interval: 1.3 [0.9–1.7] is beaten by 1.2 [1.15–1.25]
    rows = rows.assign(prefill_speedup_low=[1.0, 1.15, 0.9])
    assert list(frontier.pareto(rows, "prefill_speedup", "ppl")) == [True, True, False]


def test_continuation_of_the_masked_model_is_the_extracted_models(mamba2, bundled_tokenizer):
    class Chars:  # the tiny model's 128-token vocabulary: one id per byte
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 128 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    adapter = adapter_for(mamba2)
    plan = adapter.resolve(PruningPlan([Component("ssm", 1), Component("head", 0, 2)]))
    masked_text = continue_text(mamba2, Chars(), "Emma was", plan, new_tokens=12)
    assert masked_text == continue_text(adapter.extract(plan), Chars(), "Emma was", None, new_tokens=12)
    assert len(masked_text) == 12


def test_cli_score_metric_and_compare(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--samples", "2", "--seq-len", "16", "--no-progress",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["score", *common, "--kinds", "block,ssm", "--metric", "block_influence",
                 "--out", str(tmp_path / "bi.csv")]) == 0
    out = capsys.readouterr().out
    assert "1 forward(s) and 0 backward(s)" in out and "does not score ssm" in out
    assert list(pd.read_csv(tmp_path / "bi.csv")["kind"]) == ["block"] * 3
    assert main(["score", *common, "--kinds", "block", "--compare", "block_influence,taylor", "--out", str(tmp_path / "agree.csv")]) == 0
    out = capsys.readouterr().out
    assert "block: spearman rank correlation" in out and "taylor (even windows)" in out and "top-k overlap" in out
    assert main(["score", *common, "--kinds", "head", "--metric", "block_influence", "--out", str(tmp_path / "x.csv")]) == 2
    assert "error: block_influence does not score head" in capsys.readouterr().err


def test_metrics_are_registered_once_and_the_cli_offers_exactly_them():
    from shedder.cli import build_parser
    from shedder.prune.importance_metrics import register

    assert list(REGISTRY) == ["ppl", "block_influence", "activation", "taylor"]
    score_parser = build_parser()._subparsers._group_actions[0].choices["score"]
    metric = next(a for a in score_parser._actions if a.dest == "metric")
    assert list(metric.choices) == list(REGISTRY)
    assert all(REGISTRY[m].description in metric.help for m in REGISTRY)
    with pytest.raises(ValueError, match="twice"):
        register("taylor")(lambda *a: {})
