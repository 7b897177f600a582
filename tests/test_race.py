"""Racing search (``shedder.prune.race``): deterministic, exact when every candidate survives to be
finished, its regret computed, its log and resume kept apart from exact runs, its flags checked."""
from __future__ import annotations

import json

import pytest
import torch

from shedder.api.search import compare_race
from shedder.cli import main
from shedder.core.errors import ShedderError
from shedder.prune.race import Race
from shedder.prune.runs import LOG_FILE
from shedder.prune.search import RunDir, StopWhen, greedy_search

KINDS = ["ssm", "head"]
DATA = ["--samples", "3", "--seq-len", "16", "--batch-size", "2", "--no-progress"]


def windows(vocab: int = 128, n: int = 6, seq: int = 16, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, vocab, (n, seq))


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2")


def test_race_is_deterministic_and_labelled(mamba2):
    w, race = windows(), Race(windows=2, finish=2)
    a = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, race=race)
    b = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, race=race)
    assert a.components == b.components and [s.ppl for s in a.steps] == [s.ppl for s in b.steps]
    assert a.raced and a.stats["raced"] > 0
    assert not greedy_search(mamba2, w, KINDS, StopWhen(steps=1), batch_size=2).raced


def test_race_is_exact_when_every_candidate_is_finished(mamba2):
    w = windows()
    exact = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2)
    raced = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, race=Race(windows=2, finish=10_000))
    assert raced.components == exact.components
    assert [s.ppl for s in raced.steps] == [s.ppl for s in exact.steps]


def test_compare_race_computes_regret(mamba2):
    w = windows()
    out = compare_race(mamba2, w, KINDS, 2, Race(windows=2, finish=1), batch_size=2)
    final = out["final_ppl"]
    assert out["race_regret"] == pytest.approx(final["raced"] / final["exact"] - 1)
    assert out["race_speedup"] > 0 and 0 <= out["identical_choices"] <= 2
    same = compare_race(mamba2, w, KINDS, 2, Race(windows=2, finish=10_000), batch_size=2)
    assert same["race_regret"] == 0 and same["identical_choices"] == 2


def test_raced_log_records_finished_candidates_and_resumes_only_as_raced(mamba2, tmp_path):
    w, race = windows(), Race(windows=2, finish=2)
    straight = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, race=race)
    run = tmp_path / "run"
    greedy_search(mamba2, w, KINDS, StopWhen(steps=2), batch_size=2, race=race, run=RunDir(run))
    lines = [json.loads(x) for x in (run / LOG_FILE).read_text().splitlines()]
    assert lines[0]["settings"]["race"] == race.to_dict()
    assert all(x["raced"] and len(x["finished_exactly"]) == 2 for x in lines[1:])
    assert all(x["component"] in x["finished_exactly"] for x in lines[1:])
    with pytest.raises(ShedderError, match="raced search.*with --race"):
        greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, run=RunDir(run, resume=True))
    resumed = greedy_search(mamba2, w, KINDS, StopWhen(steps=3), batch_size=2, race=race, run=RunDir(run, resume=True))
    assert resumed.components == straight.components and resumed.raced

    exact_run = tmp_path / "exact"
    greedy_search(mamba2, w, KINDS, StopWhen(steps=1), batch_size=2, run=RunDir(exact_run))
    with pytest.raises(ShedderError, match="exact search.*without --race"):
        greedy_search(mamba2, w, KINDS, StopWhen(steps=2), batch_size=2, race=race, run=RunDir(exact_run, resume=True))


def test_race_settings_are_checked():
    with pytest.raises(ShedderError, match="race finish"):
        Race(finish=0)
    with pytest.raises(ShedderError, match="cannot exceed"):
        Race(windows=2, start=3)


def test_cli_search_race_says_raced(capsys, tiny_model_dir, tmp_path):
    assert main(["search", "--model", str(tiny_model_dir), "--kinds", "ssm,head", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--race", "--race-windows", "2", *DATA, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["raced"] is True


@pytest.mark.parametrize("argv,words", [
    (["search", "--out", "{tmp}/run", "--race-finish", "3"], "--race-windows and --race-finish need --race"),
    (["search", "--out", "{tmp}/run", "--race", "--workers", "2"], "--race runs in this process"),
    (["bench", "search", "--race", "--race-windows", "0"], "error: argument --race-windows"),
])
def test_bad_race_flags_are_one_error_line(capsys, tiny_model_dir, tmp_path, argv, words):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main([*argv, "--model", str(tiny_model_dir), "--no-progress"])
    except SystemExit as exit_:  # argparse's own refusals
        rc = exit_.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
