"""Resumable importance scoring: an interrupted run keeps its finished rows, the next run with the
same cache key measures only the rest, and the finished table equals an uninterrupted run's exactly."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from shedder.prune import importance
from shedder.cli import main
from shedder.core.errors import Cancelled
from shedder.measure.evaluator import PlanEvaluator
from shedder.core.plan import Component, PruningPlan

KINDS = ["block", "ssm"]
BASE = PruningPlan(frozenset({Component("ssm", 3)}))


def windows(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 128, (4, 16))


@pytest.fixture(scope="module")
def mamba2(tiny_model_factory):
    return tiny_model_factory("mamba2")


@pytest.fixture(scope="module")
def reference(mamba2, tmp_path_factory):
    """The uninterrupted run's table (its own cache directory)."""
    return importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path_factory.mktemp("ref"))


@pytest.fixture
def evaluated(monkeypatch):
    """The plans every ``PlanEvaluator`` built by ``score`` measures, in order."""
    plans: list[PruningPlan] = []

    class Counting(PlanEvaluator):
        def perplexity(self, plan=None, progress=None):
            plans.append(plan)
            return super().perplexity(plan, progress)

    monkeypatch.setattr(importance, "PlanEvaluator", Counting)
    return plans


def cancel_after(k: int):
    """A progress callback that cancels the run once ``k`` components are done."""
    def progress(done, total, message):
        if done >= k:
            raise Cancelled("stop")
    return progress


def removed(plans: list[PruningPlan]) -> set[Component]:
    """The single component each plan removes on top of ``BASE`` (the base plan itself maps to nothing)."""
    return {c for p in plans for c in p.components - BASE.components}


def partial_files(cache) -> list:
    return sorted((cache / "scores").glob("*.partial.jsonl"))


def test_interrupted_run_resumes_to_the_uninterrupted_table(mamba2, reference, evaluated, tmp_path):
    k = 3
    with pytest.raises(Cancelled):
        importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path, progress=cancel_after(k))
    first = removed(evaluated)
    assert len(evaluated) == k + 1 and len(first) == k  # the base plan, then k components
    assert len(partial_files(tmp_path)) == 1 and not list((tmp_path / "scores").glob("*.csv"))

    evaluated.clear()
    ticks = []
    table = importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path,
                             progress=lambda d, t, m: ticks.append((d, t, m)))
    pd.testing.assert_frame_equal(table, reference, check_exact=True)
    total = len(reference)
    # Only the remaining components were measured (the base perplexity came from the partial file).
    assert len(evaluated) == total - k and removed(evaluated).isdisjoint(first)
    assert removed(evaluated) | first == {Component(r.kind, r.layer, r.index) for r in reference.itertuples()}
    assert ticks[0] == (k, total, f"scoring: resumed {k} of {total} components")
    assert [d for d, _, _ in ticks] == list(range(k, total + 1))
    assert table.attrs["resumed"] == k and reference.attrs["resumed"] == 0
    assert partial_files(tmp_path) == []  # finished: the cache entry replaces the partial rows

    evaluated.clear()  # and the finished table reopens without measuring, exactly
    pd.testing.assert_frame_equal(importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path),
                                  reference, check_exact=True)
    assert evaluated == []


def test_a_row_torn_by_a_kill_is_measured_again(mamba2, reference, evaluated, tmp_path):
    with pytest.raises(Cancelled):
        importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path, progress=cancel_after(4))
    [partial] = partial_files(tmp_path)
    lines = partial.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # the 4th row half-written
    evaluated.clear()
    table = importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(table, reference, check_exact=True)
    assert len(evaluated) == len(reference) - 3 and table.attrs["resumed"] == 3


@pytest.mark.parametrize("other", [
    {"kinds": ["block"]},
    {"windows": windows(seed=2)},
    {"base_plan": PruningPlan(frozenset({Component("ssm", 2)}))},
], ids=["kinds", "windows", "base_plan"])
def test_another_key_does_not_reuse_partial_rows(mamba2, evaluated, tmp_path, other):
    with pytest.raises(Cancelled):
        importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path, progress=cancel_after(3))
    [interrupted] = partial_files(tmp_path)
    kept = interrupted.read_text()
    evaluated.clear()
    args = {"kinds": KINDS, "windows": windows(), "base_plan": BASE, **other}
    table = importance.score(mamba2, args["windows"], args["kinds"], base_plan=args["base_plan"], cache_dir=tmp_path)
    assert len(evaluated) == len(table) + 1 and table.attrs["resumed"] == 0  # base plan + every component
    assert interrupted.read_text() == kept  # the interrupted run can still resume


def test_cli_reports_the_resumed_components(capsys, monkeypatch, tiny_model_dir, tmp_path):
    from shedder.core.progress import TqdmProgress

    args = ["score", "--model", str(tiny_model_dir), "--kinds", "block,ssm", "--out", str(tmp_path / "s.csv"),
            "--cache-dir", str(tmp_path / "cache"), "--samples", "3", "--seq-len", "16", "--batch-size", "2",
            "--no-progress"]
    monkeypatch.setattr(TqdmProgress, "__call__", lambda self, done, total, message: cancel_after(2)(done, total, message))
    assert main(args) == 2
    assert "the same command resumes them" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 0
    assert "resumed 2 of 6 components" in capsys.readouterr().out


def test_cache_status_tells_finished_from_interrupted(mamba2, tmp_path):
    status = lambda: importance.cache_status(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path)  # noqa: E731
    assert status() is None
    with pytest.raises(Cancelled):
        importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path, progress=cancel_after(2))
    assert "scored 2 of" in status() and "resumes" in status()
    importance.score(mamba2, windows(), KINDS, base_plan=BASE, cache_dir=tmp_path)
    assert "cached on disk" in status()
    assert importance.cache_status(mamba2, windows(), ["block"], base_plan=BASE, cache_dir=tmp_path) is None
