"""The CLI journey on every family in the real shape of its smallest public checkpoint.

Random weights in the published config (``shedder.dev.realshape``: vocabulary, width, head dim, state,
groups, chunk size, tied embeddings, hybrid layout), cut to a few layers with narrow MLPs, saved like
a downloaded checkpoint. On each: ``info``, ``eval`` under a plan, ``score`` of every kind the family
has, a 2-step ``search``, ``extract`` and ``eval`` of the extracted model (masked == extracted),
``bench``. The 4096-wide families run in bfloat16, as their checkpoints are published; Nemotron-H
(8 groups, a 131,072-token vocabulary) is saved without a tokenizer and reads text through
``--tokenizer``; Mamba-2 130M evaluates a 2048-token window. Select with ``-m realshape``.
"""
from __future__ import annotations

import json

import pytest
import torch

from shedder.arch import adapter_for
from shedder.cli import main
from shedder.formats.loading import REPO_ROOT
from shedder.core.plan import PruningPlan
from shedder.dev.realshape import REAL_SHAPES, build, save_checkpoint

pytestmark = pytest.mark.realshape

#: family -> (layers, dtype). Layers: the published layout's first ones (hybrids: see ``shrink``).
CASES = {
    "mamba": (2, "float32"),
    "falcon_mamba": (2, "bfloat16"),
    "mamba2": (2, "float32"),
    "nemotron_h": (3, "bfloat16"),
    "bamba": (2, "bfloat16"),
    "zamba2": (2, "float32"),
    "falcon_h1": (2, "float32"),
    "jamba": (2, "bfloat16"),
    "granite": (2, "float32"),
    "granite_dense": (2, "bfloat16"),
    "hymba": (3, "float32"),
}
#: Relative difference of perplexity, masked plan vs extracted model (see docs/families.md, "Real shapes").
PPL_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
SCORE = ["--samples", "1", "--seq-len", "16", "--batch-size", "1", "--no-progress"]
EVAL = ["--samples", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress"]


def run_json(capsys, *argv) -> dict:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def journey_plan(adapter) -> PruningPlan:
    """One component of every kind but ``block`` (the first one offered), so extraction exercises
    every kind's shapes; and the last layer's block."""
    plan = PruningPlan()
    for kind in adapter.kind_counts():
        offered = adapter.candidates(plan, [kind])
        if kind != "block" and offered:
            plan = plan.with_components([offered[0]])
    return plan.with_components([c for c in adapter.candidates(plan, ["block"]) if c.layer == adapter.num_layers - 1][:1])


def thinned(adapter, keep: int = 2) -> PruningPlan:
    """A base plan leaving at most ``keep`` heads / channel groups per layer: scoring every kind on
    top of it measures each kind's candidates without the 24-128 per layer a real shape has (one
    perplexity each, the scan padded to the 128-256 token chunk)."""
    plan = PruningPlan()
    for kind in ("head", "channel_group", "mlp_channel_group"):
        if kind not in adapter.kind_counts():
            continue
        while True:
            offered = adapter.candidates(plan, [kind])
            per_layer = {}
            for c in offered:
                per_layer[c.layer] = per_layer.get(c.layer, 0) + 1
            extra = [c for c in offered if per_layer[c.layer] > keep]
            if not extra:
                break
            plan = plan.with_components(extra[:1])
    return plan


@pytest.mark.parametrize("family", list(CASES))
def test_cli_journey_on_real_shape(family, tmp_path, capsys):
    layers, dtype = CASES[family]
    no_tokenizer = family == "nemotron_h"
    model = build(family, layers, small=True, dtype=getattr(torch, dtype))
    assert model.config.vocab_size == REAL_SHAPES[family].values["vocab_size"]
    model_dir = save_checkpoint(model, tmp_path / "model", tokenizer=not no_tokenizer)
    adapter = adapter_for(model)
    kinds = list(adapter.kind_counts())
    plan_file, base_file = tmp_path / "plan.json", tmp_path / "base.json"
    journey_plan(adapter).save(plan_file)
    base = thinned(adapter)
    base.save(base_file)
    # Whole blocks / MLPs go only from layers the base plan left intact, and Bamba and Zamba2 keep
    # their one attention; the kinds with many components per layer are all scored.
    scored_kinds = {c.kind for c in adapter.candidates(base, kinds)}
    assert scored_kinds >= set(kinds) & {"ssm", "head", "channel_group", "mlp_channel_group"}
    del model, adapter
    opts = ["--model", str(model_dir), "--dtype", dtype]
    text = ["--tokenizer", str(REPO_ROOT / "assets" / "tokenizer")] if no_tokenizer else []

    info = run_json(capsys, "info", *opts)
    assert info["num_layers"] == layers and set(info["components"]) == set(kinds)

    if no_tokenizer:  # commands that read text say so in one line
        assert main(["score", *opts, "--out", str(tmp_path / "x.csv"), *SCORE]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no tokenizer" in err[0] and "--tokenizer" in err[0]

    window = ["--seq-len", "2048", "--samples", "1"] if family == "mamba2" else []
    masked = run_json(capsys, "eval", *opts, *text, "--plan", str(plan_file), *EVAL, *window, "--accuracy-n", "2")
    assert masked["params"] < masked["params_original"]
    assert masked["perplexity"] == masked["perplexity"] and 0.0 <= masked["accuracy"] <= 1.0  # not NaN
    if window:
        assert "1 non-overlapping windows of 2048 tokens" in masked["perplexity_protocol"]

    scores = run_json(capsys, "score", *opts, *text, "--kinds", ",".join(kinds), "--base-plan", str(base_file),
                      "--out", str(tmp_path / "s.csv"),
                      "--cache-dir", str(tmp_path / "cache"), *SCORE)
    assert {r["kind"] for r in scores["rows"]} == scored_kinds
    assert all(r["ppl"] == r["ppl"] for r in scores["rows"])

    search = run_json(capsys, "search", *opts, *text, "--kinds", "ssm,block", "--steps", "2",
                      "--out", str(tmp_path / "run"), *SCORE)
    # Hybrids cut to 2-3 layers may run out of candidates after one step (a hybrid keeps a Mamba
    # layer and, in Bamba and Zamba2, its one attention): the search then stops and says why.
    assert [s["step"] for s in search["steps"]] in ([1], [1, 2]) and search["stopped"]

    out = tmp_path / "pruned"
    saved = run_json(capsys, "extract", *opts, "--plan", str(plan_file), "--out", str(out))
    assert saved["params_after"] == masked["params"]
    pruned = run_json(capsys, "eval", "--model", str(out), "--dtype", dtype, *text, *EVAL, *window, "--no-accuracy")
    assert pruned["perplexity"] == pytest.approx(masked["perplexity"], rel=PPL_TOL[dtype])
    assert pruned["params"] == masked["params"]

    bench = run_json(capsys, "bench", "--model", str(model_dir), "--pruned", str(out), "--dtype", dtype,
                     "--seq-len", "16", "--new-tokens", "2", "--min-rounds", "1", "--budget-s", "0.01", "--warmup", "0",
                     "--no-memory", "--no-progress")
    assert bench["pruned"]["params"] == masked["params"] and bench["measured_prefill_speedup"]["median"] > 0
