"""Start-up: ``python -m shedder --help``, every command's ``--help`` and argument errors import neither
torch nor transformers, and the light defaults they show are the engine's own values.

Each check runs in a fresh interpreter (this test process has long imported torch) and reads
``sys.modules`` there once the command line has been answered. No time is asserted: the import set
is what makes start-up fast (``docs/startup.md`` has the measured times).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")

#: Runs ``python -m shedder`` with the JSON argv lists given, in order, in one interpreter; after each
#: prints one line ``RESULT {"argv", "code", "heavy"}`` on stderr (``heavy``: which of HEAVY are loaded).
WRAPPER = f"""
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["shedder", *argv]
    try:
        runpy.run_module("shedder", run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as e:
        code = e.code
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    print("RESULT " + json.dumps({{"argv": argv, "code": code, "heavy": heavy}}), file=sys.stderr, flush=True)
"""


def shedder(*argvs: list[str]) -> tuple[list[dict], str, str]:
    """(one result per argv, stdout, stderr without the result lines) of ``python -m shedder``."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(list(argvs))], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "100"})
    lines = done.stderr.splitlines()
    results = [json.loads(line.removeprefix("RESULT ")) for line in lines if line.startswith("RESULT ")]
    assert len(results) == len(argvs), done.stderr
    return results, done.stdout, "\n".join(line for line in lines if not line.startswith("RESULT "))


def test_help_imports_neither_torch_nor_transformers():
    [result], out, err = shedder(["--help"])
    assert result == {"argv": ["--help"], "code": 0, "heavy": []}
    assert out.startswith("usage: python -m shedder") and "search" in out and err == ""


def test_a_command_help_imports_neither_torch_nor_transformers():
    [result], out, _ = shedder(["search", "--help"])
    assert result["code"] == 0 and result["heavy"] == []
    assert "--kinds" in out and "default mamba2-tiny" in out


@pytest.mark.parametrize("argv, message", [
    (["search", "--bogus", "--out", "runs/x"], "error: unrecognized arguments: --bogus (see python -m shedder --help)"),
    (["extract", "--plan", "p.json"], "error: the following arguments are required: --out "
                                      "(see python -m shedder extract --help)"),
    (["score", "--out", "s.csv", "--metric", "nope"], "error: argument --metric: invalid choice: 'nope' "
                                                      "(choose from 'ppl', 'block_influence', 'activation', 'taylor') "
                                                      "(see python -m shedder score --help)"),
    (["stock", "--out", "plans", "--kinds", "block"], "error: argument --kinds: 'block' is not a stock-shaped kind: "
                                                      "one or more of head, mlp_channel_group "
                                                      "(see python -m shedder stock --help)"),
    (["bench", "gpu-check", "--family", "nope"], "error: argument --family: invalid choice: 'nope'"),
])
def test_an_argument_error_is_one_line_exit_2_without_torch(argv, message):
    [result], out, err = shedder(argv)
    assert result["code"] == 2 and result["heavy"] == []
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(message)


def test_every_command_help_imports_neither_torch_nor_transformers():
    from shedder.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    argvs = [[name, "--help"] for name in commands]
    argvs += [["plan", "convert", "--help"], ["bench", "scale", "--help"], ["bench", "gpu-check", "--help"]]
    argvs += [["bench", name, "--help"] for name in ("search", "recover", "scan", "dtype")]
    results, out, _ = shedder(*argvs)
    assert [r for r in results if r["code"] != 0 or r["heavy"]] == []
    assert out.count("usage: python -m shedder") == len(argvs)


def test_the_light_defaults_are_the_engine_values():
    """Where the engine keeps a list of its own (a registry, a table), it names what the command line shows."""
    from shedder import api
    from shedder.core import defaults
    from shedder.dev import realshape, scale
    from shedder.formats import loading
    from shedder.prune import recover, stock
    from shedder.prune.importance_metrics import REGISTRY

    assert {m.name: m.description for m in REGISTRY.values()} == defaults.METRICS
    assert list(REGISTRY) == list(defaults.METRICS)
    assert realshape.FAMILIES == defaults.REAL_SHAPE_FAMILIES
    assert tuple(scale.SIZES) == defaults.SCALE_SIZES
    assert loading.DEFAULT_MODEL == api.DEFAULT_MODEL == defaults.DEFAULT_MODEL
    assert (api.DEFAULT_CALIBRATION, api.DEFAULT_EVAL, api.DEFAULT_SAMPLES, api.DEFAULT_SEQ_LEN, api.DEFAULT_BATCH) == (
        defaults.DEFAULT_CALIBRATION, defaults.DEFAULT_EVAL, defaults.DEFAULT_SAMPLES, defaults.DEFAULT_SEQ_LEN,
        defaults.DEFAULT_BATCH)
    assert (recover.METHODS, recover.SCHEDULES, recover.DEFAULT_LR) == (
        defaults.RECOVER_METHODS, defaults.RECOVER_SCHEDULES, defaults.RECOVER_DEFAULT_LR)
    assert (recover.REPORT_TO, recover.TENSORBOARD_DIR) == (defaults.REPORT_TO, defaults.TENSORBOARD_DIR)
    assert stock.KINDS == api.STOCK_KINDS == defaults.STOCK_KINDS
    assert api.STOCK_STRATEGIES == defaults.STOCK_STRATEGIES


def test_baseline_numbers_are_remembered_per_model_and_windows(tmp_path):
    """What a reopened studio shows at once: the number measured before with the same weights, windows,
    text and passages; anything else (another window, a torn file) is not known, never a wrong number."""
    import torch

    from shedder.api import known_baseline, remember_baseline
    from tiny_models import make_tiny_model

    model = make_tiny_model("mamba2")
    windows = torch.arange(32).reshape(2, 16) % 100
    assert known_baseline(model, "ppl", windows, cache_dir=tmp_path) is None
    remember_baseline(model, "ppl", windows, 12.5, cache_dir=tmp_path)
    remember_baseline(model, "accuracy", windows, 0.25, source="test", passages=20, cache_dir=tmp_path)
    assert known_baseline(model, "ppl", windows, cache_dir=tmp_path) == 12.5
    assert known_baseline(model, "accuracy", windows, source="test", passages=20, cache_dir=tmp_path) == 0.25
    assert known_baseline(model, "accuracy", windows, source="test", passages=21, cache_dir=tmp_path) is None
    assert known_baseline(model, "ppl", windows[:1], cache_dir=tmp_path) is None
    assert known_baseline(make_tiny_model("mamba2", seed=1), "ppl", windows, cache_dir=tmp_path) is None
    for path in (tmp_path / "baseline").iterdir():
        path.write_text("{not json")
    assert known_baseline(model, "ppl", windows, cache_dir=tmp_path) is None
    with pytest.raises(ValueError, match="one of"):
        remember_baseline(model, "latency", windows, 1.0, cache_dir=tmp_path)
