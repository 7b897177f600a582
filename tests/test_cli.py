"""``python -m shedder``: every subcommand on a tiny saved model, JSON output, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from shedder.cli import main
from shedder.formats.loading import REPO_ROOT
from shedder.core.plan import Component, PruningPlan

DATA = ["--samples", "3", "--seq-len", "16", "--batch-size", "2", "--no-progress"]


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def plan_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(json.dumps({"schema_version": 1, "components": ["block:1", "head:2:0", "head:2:2"]}))
    return path


def test_info(capsys, tiny_model_dir):
    out = run_json(capsys, "info", "--model", str(tiny_model_dir))
    assert out["architecture"] == "Mamba2ForCausalLM" and out["num_layers"] == 3
    assert out["components"] == {"block": 3, "ssm": 3, "head": 12}
    assert out["layers"][0] == {"layer": 0, "type": "mamba", "components": {"block": 1, "ssm": 1, "head": 4}}
    assert out["parameters"] > 0
    assert main(["info", "--model", str(tiny_model_dir)]) == 0
    assert "head ×4" in capsys.readouterr().out


def test_eval_under_a_plan_equals_eval_of_the_extracted_model(capsys, tiny_model_dir, plan_file, tmp_path):
    masked = run_json(capsys, "eval", "--model", str(tiny_model_dir), "--plan", str(plan_file), *DATA,
                      "--accuracy-n", "8")
    full = run_json(capsys, "eval", "--model", str(tiny_model_dir), *DATA, "--no-accuracy")
    assert masked["params"] < masked["params_original"] == full["params"]
    assert "3 non-overlapping windows of 16 tokens of 'test'" in masked["perplexity_protocol"]
    assert 0.0 <= masked["accuracy"] <= 1.0 and "first 8 paragraphs" in masked["accuracy_protocol"]
    assert "accuracy" not in full and masked["perplexity"] != full["perplexity"]

    out = tmp_path / "pruned"
    saved = run_json(capsys, "extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out))
    assert saved["params_after"] == masked["params"]
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and f"{saved['params_after']:,}" in card and "block ×1 (1)" in card
    assert PruningPlan.load(out / "pruning_plan.json").components == {
        Component("block", 1), Component("head", 2, 0), Component("head", 2, 2)}

    pruned = run_json(capsys, "eval", "--model", str(out), *DATA, "--accuracy-n", "8")
    assert pruned["perplexity"] == pytest.approx(masked["perplexity"], rel=1e-4)
    assert pruned["accuracy"] == masked["accuracy"] and pruned["params"] == masked["params"]


def test_score_writes_the_table(capsys, tiny_model_dir, tmp_path):
    csv = tmp_path / "scores.csv"
    out = run_json(capsys, "score", "--model", str(tiny_model_dir), "--kinds", "block,ssm", "--out", str(csv),
                   "--cache-dir", str(tmp_path / "cache"), *DATA)
    table = pd.read_csv(csv)
    assert list(table.columns) == ["layer", "kind", "index", "ppl", "delta_ppl", "params_removed"]
    assert len(table) == len(out["rows"]) == 6 and "calibration" in out["protocol"]


def test_search_and_resume(capsys, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = ["search", "--model", str(tiny_model_dir), "--kinds", "ssm,head", "--out", str(run), *DATA]
    assert main([*args, "--steps", "1"]) == 0
    text = capsys.readouterr().out
    assert "step 1: removed " in text and "ppl" in text
    assert main([*args, "--steps", "2"]) == 2  # the directory holds a search: refuse without --resume
    assert "--resume" in capsys.readouterr().err
    out = run_json(capsys, *args, "--steps", "2", "--resume")
    assert [s["step"] for s in out["steps"]] == [1, 2] and (run / "step_02" / "pruning_config.json").is_file()


def test_bench_search_reports_identical_choices(capsys, tiny_model_dir):
    out = run_json(capsys, "bench", "search", "--model", str(tiny_model_dir), "--kinds", "ssm", "--steps", "2", *DATA)
    assert out["identical"] is True and out["reference_choices"] == out["fast_choices"]
    assert out["reference_s"] > 0 and out["fast_s"] > 0


def test_python_m_shedder_error_is_one_line_with_exit_code_2():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "shedder", "info", "--model", "./no/such/model"],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.startswith("error: model not found: ./no/such/model")


@pytest.mark.parametrize("argv,words", [
    (["eval", "--plan", "/no/plan.json"], "plan file not found: /no/plan.json"),
    (["eval", "--data", "/no/text.txt", "--no-accuracy"], "text source not found: '/no/text.txt'"),
    (["eval", "--seq-len", "100000", "--no-accuracy"], "fewer than one window of 100000"),
    (["search", "--kinds", "attention", "--out", "{tmp}/run"], "has no component kind 'attention'"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, tiny_model_dir, tmp_path, argv, words):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--model", str(tiny_model_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_plan_for_another_model_is_refused(capsys, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "components": ["block:7"]}))
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: block:7:0: layer 7 is out of range (the model has layers 0..2)"
