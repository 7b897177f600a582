"""lm-eval accuracy (``shedder.measure.downstream``) on the bundled offline tasks, masked and extracted.

A tiny random Mamba-2 scores near zero on these tasks, so besides the official metric the checks
compare everything lm-eval reports (shedder_lastword's perplexity moves with any change of the model).
"""
from __future__ import annotations

import json
import random
import sys

import pytest

from shedder.measure import downstream, local_tasks
from shedder.arch import adapter_for
from shedder.cli import main
from shedder.core.errors import DownstreamError
from shedder.formats.loading import load_model
from shedder.core.plan import Component, PruningPlan

LIMIT = 4
PLAN = PruningPlan(components=frozenset({Component("block", 1)}))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Scores of the unpruned model, of the masked plan and of the extracted model (one cache)."""
    cache = tmp_path_factory.mktemp("downstream-cache")
    model, tok = load_model(str(tiny_model_dir))
    adapter = adapter_for(model)
    random.seed(123)
    state = random.getstate()
    base = downstream.scores(model, tok, "local", limit=LIMIT, cache_dir=cache)
    seeds_kept = random.getstate() == state
    masked = downstream.scores(model, tok, "local", PLAN, limit=LIMIT, cache_dir=cache)
    extracted = downstream.scores(adapter.extract(adapter.resolve(PLAN)), tok, "local", limit=LIMIT, cache_dir=cache)
    return dict(model=model, tok=tok, cache=cache, base=base, masked=masked, extracted=extracted, seeds_kept=seeds_kept)


def test_masked_equals_extracted_and_a_removal_changes_the_scores(runs):
    base, masked, extracted = runs["base"], runs["masked"], runs["extracted"]
    assert masked.tasks == ("shedder_lastword", "shedder_choice")
    assert masked.metrics == {"shedder_lastword": "acc", "shedder_choice": "acc_norm"}
    assert masked.samples == {"shedder_lastword": LIMIT, "shedder_choice": LIMIT}
    assert masked.scores == extracted.scores
    ppl = "perplexity"
    assert masked.reported["shedder_lastword"][ppl] == pytest.approx(extracted.reported["shedder_lastword"][ppl], rel=1e-4)
    assert masked.reported["shedder_lastword"][ppl] != pytest.approx(base.reported["shedder_lastword"][ppl], rel=1e-3)
    assert masked.average == pytest.approx(sum(masked.scores.values()) / 2)
    assert runs["seeds_kept"], "an evaluation must leave the caller's random state as it was"


def test_results_are_cached_per_plan(runs, monkeypatch):
    model, tok, cache = runs["model"], runs["tok"], runs["cache"]
    monkeypatch.setattr(downstream, "_run", lambda *a, **k: pytest.fail("ran lm-eval for a cached result"))
    assert downstream.scores(model, tok, "shedder_lastword,shedder_choice", PLAN, limit=LIMIT, cache_dir=cache) == runs["masked"]
    assert downstream.cached(model, tok, "local", limit=LIMIT, cache_dir=cache) == runs["base"]
    assert downstream.cached(model, tok, "local", limit=LIMIT + 1, cache_dir=cache) is None
    other = PruningPlan(components=frozenset({Component("block", 2)}))
    assert downstream.cached(model, tok, "local", other, limit=LIMIT, cache_dir=cache) is None
    summary = downstream.summary(model, tok, "local", PLAN, limit=LIMIT, cache_dir=cache)
    assert set(summary) == {"shedder_lastword", "shedder_choice", "average", "relative"}
    assert summary["average"] == runs["masked"].average


def test_official_metric_per_task():
    both = {"acc,none": 0.4, "acc_norm,none": 0.5}
    assert downstream.official_metric("arc_easy", both) == "acc"
    assert downstream.official_metric("hellaswag", both) == "acc_norm"
    assert downstream.official_metric("winogrande", {"acc,none": 0.6}) == "acc"
    assert downstream.official_metric("lambada_openai", {"perplexity,none": 9.0, "acc,none": 0.6}) == "acc"
    with pytest.raises(DownstreamError, match="reports no accuracy"):
        downstream.official_metric("gsm8k", {"exact_match,none": 0.1})


def test_task_lists():
    assert downstream.parse_tasks("local") == downstream.LOCAL_TASKS
    assert downstream.parse_tasks("paper,arc_easy") == downstream.PAPER_TASKS
    assert downstream.parse_tasks(["shedder_choice", "local"]) == ("shedder_choice", "shedder_lastword")
    with pytest.raises(DownstreamError, match="no lm-eval task"):
        downstream.parse_tasks(" , ")


def test_shipped_task_files_are_what_the_builder_cuts():
    built = local_tasks.build()
    for name, rows in built.items():
        assert (local_tasks.TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8") == local_tasks.to_jsonl(rows)
    assert len(built["lastword"]) == len(built["choice"]) == local_tasks.ITEMS
    for item in built["choice"]:
        assert len(item["endings"]) == 4 and len(set(item["endings"])) == 4


def test_cli_eval_tasks_on_masked_and_extracted_models(capsys, tiny_model_dir, tmp_path, runs):
    """The CLI finds the engine's results in the cache (same weights, plan, tasks and limit), and for
    an extracted directory takes the unpruned baseline from the source its plan records."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruned_mamba_block_idx": [1]}))
    out_dir = tmp_path / "pruned"
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(out_dir)]) == 0
    capsys.readouterr()
    common = ["--tasks", "local", "--limit", str(LIMIT), "--no-accuracy", "--samples", "1", "--seq-len", "16",
              "--cache-dir", str(runs["cache"]), "--json", "--no-progress"]
    assert main(["eval", "--model", str(tiny_model_dir), "--plan", str(plan), *common]) == 0
    masked = json.loads(capsys.readouterr().out)["lm_eval"]
    assert main(["eval", "--model", str(out_dir), *common]) == 0  # baseline: the source its plan records
    extracted = json.loads(capsys.readouterr().out)["lm_eval"]
    assert [r["task"] for r in masked["tasks"]] == ["shedder_lastword", "shedder_choice", "average"]
    assert masked["tasks"] == extracted["tasks"]
    assert masked["relative"] == extracted["relative"] == pytest.approx(runs["masked"].relative(runs["base"]))
    assert "lm-eval" in masked["protocol"] and "acc_norm" in masked["protocol"]
    assert main(["eval", "--model", str(out_dir), *common[:-2]]) == 0
    text = capsys.readouterr().out
    assert "shedder_choice" in text and "relative accuracy:" in text


def test_cli_without_lm_eval_says_how_to_install(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'shedder-studio[eval]'" in err and "pip install 'lm-eval[hf]'" in err
