"""Scoring and searching on Ray workers (``shedder.prune.distributed``).

The central property: a search on a pool of two workers picks exactly the components the single
process picks and logs bit-identical perplexities, also when a worker is killed mid-step and when
the driver is stopped mid-step and a new one resumes from the run log. One local Ray (2 CPUs) and
one pool of two workers serve the whole module: starting them is most of its runtime.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from shedder.cli import main
from shedder.measure.data import calibration_windows
from shedder.prune.distributed import INSTALL_HINT, WorkerPool, Workers
from shedder.core.errors import ShedderError
from shedder.prune.importance import score
from shedder.formats.loading import load_model
from shedder.prune.runs import LOG_FILE, PLAN_FILE
from shedder.prune.search import RunDir, StopWhen, greedy_search

KINDS = ["ssm", "block"]  # a mixed search: 16 candidates in the first step
STEPS = 2
BATCH = 2


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load_model("mamba2-tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs: two busy workers and this process share 2 cores
    yield model, calibration_windows(tokenizer, "calibration", samples=4, seq_len=32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def pool(bundled, ray):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with WorkerPool(*bundled, workers=2, batch_size=BATCH) as pool:
            yield pool
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single(bundled, tmp_path_factory):
    """The single-process search, logged."""
    run = tmp_path_factory.mktemp("single")
    return greedy_search(*bundled, KINDS, StopWhen(steps=STEPS), batch_size=BATCH, run=RunDir(run))


def logged(run) -> list[dict]:
    """The run log without its timings."""
    records = [json.loads(line) for line in (run / LOG_FILE).read_text().splitlines()]
    for r in records:
        r.pop("seconds", None), r.pop("created", None)
    return records


def assert_same_search(result, single) -> None:
    assert result.components == single.components
    assert [s.ppl for s in result.steps] == [s.ppl for s in single.steps]  # bit for bit
    assert result.base_ppl == single.base_ppl
    assert logged(result.run_dir) == logged(single.run_dir)
    for s in single.steps:
        name = f"step_{s.step:02d}/{PLAN_FILE}"
        assert (result.run_dir / name).read_text() == (single.run_dir / name).read_text()


def test_two_workers_choose_exactly_what_one_process_chooses(bundled, pool, single, tmp_path):
    result = greedy_search(*bundled, KINDS, StopWhen(steps=STEPS), batch_size=BATCH, run=RunDir(tmp_path / "run"), workers=Workers(pool=pool))
    assert_same_search(result, single)
    assert result.stats["workers"] == 2 and result.stats["replaced"] == 0
    assert result.stats["evaluated"] == single.stats["evaluated"]  # every candidate answered once


def test_a_killed_worker_is_replaced_and_its_candidate_rerun(bundled, pool, single, tmp_path, ray):
    victim = []

    def kill_in_step_two(done, total, message):
        if message.startswith("step 2") and done == 3 and not victim:
            victim.append(pool.actors[0])
            ray.kill(victim[0])  # mid-step: it holds a request, or gets the next one

    result = greedy_search(*bundled, KINDS, StopWhen(steps=STEPS), batch_size=BATCH, progress=kill_in_step_two, run=RunDir(tmp_path / "run"), workers=Workers(pool=pool))
    assert victim and pool.actors[0] is not victim[0]
    assert result.stats["replaced"] == 1
    assert_same_search(result, single)


def test_a_driver_stopped_mid_step_resumes_from_the_log(bundled, pool, single, tmp_path):
    run = tmp_path / "run"

    def stop_in_step_two(done, total, message):
        if message.startswith("step 2") and done == total // 2 + 2:  # requests still out on the workers
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        greedy_search(*bundled, KINDS, StopWhen(steps=STEPS), batch_size=BATCH, progress=stop_in_step_two, run=RunDir(run), workers=Workers(pool=pool))
    assert len(logged(run)) == 2  # header and step 1
    resumed = greedy_search(*bundled, KINDS, StopWhen(steps=STEPS), batch_size=BATCH, run=RunDir(run, resume=True), workers=Workers(pool=pool))
    assert_same_search(resumed, single)


def test_scores_on_workers_equal_scores_in_one_process(bundled, pool, tmp_path):
    mine = score(*bundled, ["block"], cache_dir=tmp_path / "a", batch_size=BATCH, pool=pool)
    assert mine.equals(score(*bundled, ["block"], cache_dir=tmp_path / "b", batch_size=BATCH))


def test_a_pool_for_other_windows_is_refused(bundled, pool):
    model, windows = bundled
    with pytest.raises(ShedderError, match="another model, other windows"):
        greedy_search(model, windows[:2], KINDS, StopWhen(steps=1), batch_size=BATCH, workers=Workers(pool=pool))


def test_without_ray_workers_say_how_to_install_it(bundled, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ShedderError, match="pip install") as err:
        greedy_search(*bundled, KINDS, StopWhen(steps=1), workers=Workers(count=2))
    assert str(err.value) == INSTALL_HINT and "\n" not in INSTALL_HINT


def test_cli_workers_without_ray_is_one_line_of_advice(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["search", "--kinds", "ssm", "--steps", "1", "--out", str(tmp_path / "run"), "--workers", "2",
                 "--samples", "2", "--seq-len", "32", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {INSTALL_HINT}"
