"""Fuzzing ``python -m shedder``: random flags with random values on every command.

Whatever the command line, a command ends in exit status 0 or 2 (never 1, an internal error; never
130/141 or a signal), a failure is one stderr line ``error: ...`` (no traceback), and nothing is
written outside the ``--out`` it was given (the sandbox holding every input file and the tiny model
directory are compared before and after). Parsers are fuzzed alone (cheap, many examples, every
command including the long benches); entry points run in this process on the tiny model with tiny
data flags injected (a handful of examples, each quick); a few nasty command lines run in a
subprocess to catch a crash by signal. Examples are derandomized: CI sees the same ones every run.

"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import cli
from shedder.formats.loading import REPO_ROOT

FAST = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
#: Flags that keep every in-process run quick, per command (added unless the example sets them).
TINY = {"--samples": "2", "--seq-len": "16", "--batch-size": "2", "--steps": "1", "--accuracy-n": "2",
        "--eval-samples": "2", "--repeats": "1", "--budget-s": "0.01", "--warmup": "0", "--new-tokens": "2", "--batch": "1"}

# ------------------------------------------------------------------------------ the inputs
BAD_INTS = st.sampled_from(["0", "-1", "-7", "99999999999999999999", "9" * 5000, "1e3", "x", "", "0x10"])
INTS = st.one_of(st.sampled_from(["1", "2", "3"]), BAD_INTS)  # half of them usable, so the work runs too
FLOATS = st.sampled_from(["nan", "inf", "-inf", "0", "-1", "0.5", "1e308", "1e-320", "20%", "150%", "x", ""])
TEXTS = st.one_of(st.sampled_from(["", " ", "a\nb", "\x1b[2J", "\x00", "é" * 3, "x" * 5000, "-", "--json"]),
                  st.text(max_size=20))


def _files(sandbox: Path) -> dict[str, Path]:
    """Small input files of every sort, written once into the sandbox."""
    inputs = sandbox / "inputs"
    inputs.mkdir()
    files = {"empty": b"", "garbage": bytes(range(256)) * 4, "json": b'{"a": [1, 2, {"b": null}]}',
             "list": b"[1, 2, 3]", "plan": json.dumps({"schema_version": 2, "components": ["block:1"]}).encode(),
             "plan-big": b'{"schema_version": 2, "components": [{"kind": "block", "layer": ' + b"7" * 5000 + b"}]}",
             "plan-far": json.dumps({"schema_version": 2, "components": ["block:9"]}).encode(),
             "official": json.dumps({"pruned_mamba_block_idx": [1]}).encode(),
             "text.txt": b"the cat sat on the mat. " * 40, "rows.jsonl": b'{"text": "a b c d e f g"}\n' * 30,
             "latin1.txt": b"caf\xe9 " * 100}
    paths = {}
    for name, data in files.items():
        paths[name] = inputs / name
        paths[name].write_bytes(data)
    run = inputs / "official-run"  # a minimal official run directory, for import-run
    (run / "pruned_model_configs").mkdir(parents=True)
    (run / "pruned_model_configs" / "config.mamba_block.0.json").write_text('{"pruned_mamba_block_idx": [1]}')
    (run / "log.json").write_text(json.dumps({"pruning_results": [
        {"step": 0, "importance": 5.0, "config_save_to": "elsewhere/config.mamba_block.0.json"}]}))
    paths["official-run"] = run
    paths["dir"] = inputs
    return paths


#: Config fields that make a model directory unusable: each copy of the tiny model gets one set.
DAMAGED_CONFIGS = [{"num_hidden_layers": "x"}, {"num_hidden_layers": -1}, {"hidden_size": 0},
                   {"num_hidden_layers": None}, {"vocab_size": 10 ** 12}, {"num_heads": 8.5}]


def _damaged_models(sandbox: Path, model: Path) -> list[Path]:
    """Copies of ``model`` whose config.json each carries one set of ``DAMAGED_CONFIGS``."""
    out = []
    for i, fields in enumerate(DAMAGED_CONFIGS):
        damaged = sandbox / "inputs" / f"damaged-{i}"
        shutil.copytree(model, damaged)
        config = json.loads((damaged / "config.json").read_text())
        config.update(fields)
        (damaged / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        out.append(damaged)
    return out


def _paths(files: dict[str, Path], names) -> st.SearchStrategy[str]:
    missing = files["dir"].parent / "missing" / "path"  # inside the sandbox: a write there is seen
    return st.sampled_from([str(files[n]) for n in names] + [str(missing), ""])


def _flags(files: dict[str, Path], model_dir: Path) -> dict[str, st.SearchStrategy[str] | None]:
    """Every flag the fuzzed commands know, with the values to draw (None: a switch)."""
    any_file = [name for name in files if name != "damaged-models"]
    return {
        "--model": st.sampled_from([str(model_dir), str(files["garbage"]), str(files["dir"]), "/no/such/model",
                                    "no-such-org/no-such-model", "", *map(str, files["damaged-models"])]),
        "--dtype": st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "nonsense", "int8"]), TEXTS),
        "--device": st.one_of(st.sampled_from(["cpu", "cuda:7", "nonsense"]), TEXTS),
        "--threads": st.sampled_from(["0", "-1", "100000", "x", "1"]),
        "--tokenizer": _paths(files, ["garbage", "dir"]),
        "--plan": _paths(files, any_file), "--base-plan": _paths(files, any_file),
        "--baseline": st.sampled_from(["/no/such/model", str(files["garbage"])]),
        "--data": st.one_of(_paths(files, any_file), st.sampled_from(["calibration", "test", "train", "hf:no/such:x"])),
        "--samples": INTS, "--seq-len": INTS, "--batch-size": INTS, "--steps": INTS, "--accuracy-n": INTS,
        "--limit": INTS, "--top-k": INTS, "--workers": st.sampled_from(["0", "-1", "x", ""]),
        "--ray-address": st.just("ray://127.0.0.1:1"),
        "--max-ppl": FLOATS, "--target-params": FLOATS,
        "--kinds": st.one_of(st.sampled_from(["block", "ssm", "head", "block,ssm", ",", "attention", "mlp"]), TEXTS),
        "--metric": st.sampled_from(["ppl", "activation", "block_influence", "taylor", "nonsense"]),
        "--compare": st.sampled_from(["all", "ppl,activation", "", "nonsense"]),
        "--protocol": st.sampled_from(["shedder", "official", "x"]),
        "--tasks": st.one_of(st.sampled_from(["no_such_task", ","]), TEXTS),
        "--cache-dir": _paths(files, ["garbage"]),
        "--to": st.sampled_from(["official", "shedder", "x"]),
        "--method": st.sampled_from(["lora", "full", "distill", "x"]),
        "--strategy": st.sampled_from(["one-shot", "greedy", "x"]),
        "--lr": FLOATS, "--lora-rank": INTS, "--lora-alpha": FLOATS, "--temperature": FLOATS, "--lm-weight": FLOATS,
        "--checkpoint-every": INTS, "--seed": INTS, "--tokens": INTS,
        "--repeats": INTS, "--warmup": INTS, "--new-tokens": INTS, "--batch": INTS, "--eval-samples": INTS,
        "--pruned": _paths(files, ["dir", "garbage"]), "--layers": INTS,
        "--json": None, "--overwrite": None, "--resume": None, "--no-accuracy": None, "--official-layout": None,
        "--no-stability": None, "--no-memory": None, "--nonsense-flag": None,
    }


#: command -> (argv prefix, flags it is fuzzed with, needs --out)
COMMANDS = {
    "info": (["info"], ["--model", "--dtype", "--device", "--threads", "--tokenizer"], False),
    "eval": (["eval"], ["--model", "--plan", "--data", "--samples", "--seq-len", "--batch-size", "--accuracy-n",
                        "--no-accuracy", "--tasks", "--limit", "--baseline", "--threads", "--dtype"], False),
    "extract": (["extract"], ["--model", "--plan", "--overwrite", "--device"], True),
    "score": (["score"], ["--model", "--kinds", "--metric", "--compare", "--top-k", "--no-stability", "--base-plan",
                          "--cache-dir", "--samples", "--seq-len", "--data", "--protocol", "--workers", "--overwrite"],
              True),
    "search": (["search"], ["--model", "--kinds", "--steps", "--target-params", "--max-ppl", "--resume", "--base-plan",
                            "--official-layout", "--data", "--samples", "--seq-len", "--protocol", "--workers",
                            "--ray-address"], True),
    "stock": (["stock"], ["--model", "--strategy", "--metric", "--steps", "--data", "--samples", "--seq-len",
                          "--overwrite"], True),
    "recover": (["recover"], ["--model", "--plan", "--method", "--data", "--steps", "--batch-size", "--seq-len",
                              "--eval-samples", "--lr", "--warmup", "--lora-rank", "--lora-alpha", "--temperature",
                              "--lm-weight", "--checkpoint-every", "--seed", "--tokens"], True),
    "bench": (["bench"], ["--model", "--plan", "--pruned", "--repeats", "--warmup", "--new-tokens", "--batch",
                          "--seq-len", "--threads", "--no-memory"], False),
    "bench search": (["bench", "search"], ["--model", "--kinds", "--steps", "--workers", "--data", "--samples"], False),
    "plan convert": (["plan", "convert"], ["--to", "--model", "--overwrite"], True),
    "import-run": (["import-run"], ["--model"], True),
}
#: Parsers only: their commands run for minutes.
PARSE_ONLY = {
    "bench scale": (["bench", "scale"], ["--samples", "--seq-len", "--batch-size", "--threads", "--json"]),
    "bench gpu-check": (["bench", "gpu-check"], ["--layers", "--dtype", "--json"]),
    "bench recover": (["bench", "recover"], ["--steps", "--batch-size", "--seq-len", "--eval-samples", "--threads"]),
}
RUNS = itertools.count()  # numbers each example's fresh --out
#: Flags a command cannot run without, drawn (from the usable values first) unless the example has them.
REQUIRED = {"extract": ["--plan"], "plan convert": ["--to"], "bench": ["--plan"]}
_USABLE = {"--plan": lambda files: str(files["plan"]), "--to": lambda files: "official"}
#: Always passed on a run: the work stays small and needs the network for nothing.
FIXED = {"recover": ["--checkpoint-every", "1"], "bench": ["--no-memory"]}


@st.composite
def command_lines(draw, files, model_dir, out, commands=COMMANDS, extra=()):
    """(command name, argv) of one random command line."""
    name = draw(st.sampled_from(sorted(commands)))
    prefix, names = commands[name][:2]
    flags = _flags(files, model_dir)
    argv = list(prefix)
    if name == "plan convert":
        argv.append(draw(_paths(files, ["plan", "official", "json", "garbage", "plan-big"])))
    if name == "import-run":
        argv.append(draw(_paths(files, ["official-run", "dir", "garbage"])))
    chosen = draw(st.lists(st.sampled_from([*names, "--json", *extra]), max_size=4, unique=True))
    for flag in chosen:
        argv += [flag] if flags[flag] is None else [flag, draw(flags[flag])]
    for flag in REQUIRED.get(name, []):
        if flag not in chosen:
            argv += [flag, draw(st.one_of(st.just(_USABLE[flag](files)), flags[flag]))]
    if len(commands[name]) > 2 and commands[name][2]:
        argv += ["--out", draw(st.one_of(st.just(str(out)), _paths(files, ["garbage", "dir", "plan"]),
                                         st.sampled_from([str(model_dir), ".", str(model_dir / "inside")])))]
    if "--model" in names and "--model" not in chosen:
        argv += ["--model", str(model_dir)]
    return name, argv


def _tiny(argv: list[str], name: str) -> list[str]:
    """``argv`` with the tiny data flags the command knows and the example did not set."""
    takes = _option_strings(COMMANDS[name][0])
    extra = [x for flag, value in TINY.items() if flag in takes and flag not in argv for x in (flag, value)]
    return [*argv, *FIXED.get(name, []), *extra, "--no-progress"]


_OPTIONS: dict[tuple, set] = {}


def _option_strings(prefix: list[str]) -> set[str]:
    """The option strings of one (sub)command's parser."""
    key = tuple(prefix)
    if key not in _OPTIONS:
        parser = cli.build_parser()
        for word in prefix:
            action = next(a for a in parser._actions if a.choices and word in a.choices)
            parser = action.choices[word]
        _OPTIONS[key] = {s for a in parser._actions for s in a.option_strings}
    return _OPTIONS[key]


# ------------------------------------------------------------------------------ the checks
def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` -> the hash of its content ("dir" for a directory)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots for p in [root, *root.rglob("*")] if p.exists()}


def _targets(argv: list[str], cache: Path) -> list[Path]:
    """Where a command may write: its ``--out``, and its cache (``--cache-dir``, else the default)."""
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--cache-dir")]
    usable = [Path(t).expanduser().resolve() for t in given if t.strip() and "\x00" not in t]
    return [*usable, cache.resolve()]


def _allowed(path: str, targets: list[Path]) -> bool:
    """Whether a new or changed path is a command's output: under a target, its sidecar, or a
    directory created on the way to it."""
    p = Path(path).resolve()
    return any(p == out or out in p.parents or p in out.parents or p == out.with_name(f".{out.name}.shedder")
               for out in targets)


def _check(code, err: str, before: dict, after: dict, targets: list[Path], argv) -> None:
    assert code in (0, 2), (code, argv, err[-2000:])
    assert "Traceback" not in err, (argv, err[-3000:])
    if code == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), (argv, err[-2000:])
        assert sum(line.startswith("error: ") for line in lines) == 1, (argv, err[-2000:])
    changed = [p for p in after if before.get(p) != after[p]] + [p for p in before if p not in after]
    stray = [p for p in changed if not _allowed(p, targets)]
    assert not stray, (argv, stray)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    (root / "cwd").mkdir()
    (root / "cache").mkdir()
    files = _files(root)
    files["damaged-models"] = _damaged_models(root, model)
    return root, model, files


@pytest.fixture
def inside_sandbox(sandbox, monkeypatch):
    root, _, _ = sandbox
    monkeypatch.chdir(root / "cwd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SHEDDER_CACHE_DIR", str(root / "cache"))
    monkeypatch.setitem(sys.modules, "grpc", None)  # a ray:// address fails at once, as without ray[client]
    threads = torch.get_num_threads()
    yield sandbox
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ the tests
def _parse(argv: list[str]):
    if argv[:2] in (["bench", "scale"], ["bench", "gpu-check"]):
        return cli.bench.scale_parser(argv[1], cli.main).parse_args(argv[2:])
    return cli.build_parser().parse_args(argv)


@settings(FAST, max_examples=150)
@given(data=st.data())
def test_every_parser_accepts_or_refuses_in_one_line(inside_sandbox, data, capsys):
    root, model, files = inside_sandbox
    _, argv = data.draw(command_lines(files, model, root / "outs" / "p", {**COMMANDS, **PARSE_ONLY}, ["--nonsense-flag"]))
    try:
        _parse(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, captured.err)
    if code == 2:
        assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: "), (argv, captured.err)
        assert captured.err.rstrip().endswith("--help)"), captured.err


@settings(FAST, max_examples=30)
@given(data=st.data())
def test_every_command_ends_in_0_or_one_error_line_and_writes_only_its_out(inside_sandbox, data, capsys):
    root, model, files = inside_sandbox
    out = root / "outs" / f"o{next(RUNS)}"  # a fresh --out per example
    name, argv = data.draw(command_lines(files, model, out))
    argv = _tiny(argv, name)
    before = _snapshot(root, model)
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    _check(code, err, before, _snapshot(root, model), _targets(argv, root / "cache"), argv)


NASTY = [
    ["info", "--threads", "100000"], ["eval", "--seq-len", "9" * 30, "--no-accuracy"],
    ["search", "--kinds", "head", "--official-layout", "--steps", "1", "--out", "{out}"],
    ["eval", "--plan", "{plan-big}", "--no-accuracy", "--samples", "2", "--seq-len", "16"],
]


def test_nasty_command_lines_end_without_a_signal(sandbox):
    root, model, files = sandbox
    lines = [[a.replace("{out}", str(root / "outs" / "nasty")).replace("{plan-big}", str(files["plan-big"]))
              for a in argv] + ["--model", str(model), "--no-progress"] for argv in NASTY]
    script = ("import json, sys\nfrom shedder.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    try:\n        code = main(argv)\n    except SystemExit as e:\n        code = e.code\n"
              "    print('exit', code, flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(lines)], capture_output=True, text=True,
                            env=env, cwd=root / "cwd", timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])  # a signal is negative
    assert [line for line in result.stdout.splitlines() if line.startswith("exit")] == ["exit 2"] * len(NASTY)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("index", range(len(DAMAGED_CONFIGS)))
def test_a_damaged_config_is_one_error(sandbox, capsys, index):
    _, _, files = sandbox
    assert cli.main(["info", "--model", str(files["damaged-models"][index])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0]
