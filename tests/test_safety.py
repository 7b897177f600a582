"""Never lose a user's files, never corrupt a run, one clear error for every bad input.

Safe outputs (temporary directory + rename, refusals, a failing or killed write), locks on runs and
cache entries, torn logs, temporary names, one-line errors for bad weights, plans, texts and
options, and property tests of the plan parser and the text sources.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from conftest import lock_held_by_another_process

from shedder import cli
from shedder.core import fileio
from shedder.arch.base import Adapter
from shedder.prune import recover as recovery
from shedder.cli import main
from shedder.measure.data import load_text
from shedder.core.errors import Busy, Cancelled, DataError, PlanError, ShedderError
from shedder.formats.extract import PLAN_FILE, save
from shedder.core.fileio import EXPORT_MARKER, check_output_dir, drop_torn_tail, exclusive, inside, publish_dir
from shedder.formats.loading import REPO_ROOT, load_model
from shedder.measure.masking import WAITING, holding, masked
from shedder.formats.official import OFFICIAL_KEYS, OfficialConfig, plan_from_dict
from shedder.core.plan import KINDS, Component, PruningPlan
from shedder.prune.runs import LOCK_FILE
from shedder.prune.search import RunDir, StopWhen, greedy_search

DATA = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    PruningPlan(frozenset({Component("block", 1)})).save(path)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ safe outputs
def test_extract_refuses_cwd_existing_and_source_directories(capsys, tiny_model_dir, plan_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine")
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    cases = {"": "no output directory given", ".": "is the working directory",
             str(tmp_path.parent): "contains the working directory", str(mine): "exists and is not empty",
             str(tiny_model_dir): "source directory"}
    before = tree(tmp_path), tree(tiny_model_dir)
    for out, words in cases.items():
        for extra in ([], ["--overwrite"]):
            assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", out, *extra]) == 2
            line = one_error_line(capsys)
            assert words in line or (extra and "not a directory this tool exported" in line), line
    assert (tree(tmp_path), tree(tiny_model_dir)) == before


def test_overwrite_replaces_only_a_previous_export(capsys, tiny_model_dir, plan_file, tmp_path):
    out = tmp_path / "pruned"
    argv = ["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]
    assert main(argv) == 0 and (out / EXPORT_MARKER).is_file()
    assert main(argv) == 2 and "--overwrite" in one_error_line(capsys)
    (out / "stale-shard.safetensors").write_text("x")
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "stale-shard.safetensors").exists()  # replaced as a whole, never merged into
    assert PruningPlan.load(out / PLAN_FILE).components == {Component("block", 1)}
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary directory left


def test_disk_error_during_save_leaves_the_target_as_it_was(tiny_model_factory, bundled_tokenizer, tmp_path, monkeypatch):
    model = tiny_model_factory("mamba2", layers=2, vocab_size=len(bundled_tokenizer))
    out = tmp_path / "export"
    save(model, bundled_tokenizer, out)
    before = tree(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(bundled_tokenizer), "save_pretrained", disk_full)
    for target in (out, tmp_path / "new"):
        with pytest.raises(ShedderError, match="no space left on the device writing .*; nothing was changed"):
            save(model, bundled_tokenizer, target, overwrite=True)
    assert tree(out) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_kill_during_extract_leaves_no_model_behind(tmp_path, tiny_model_dir):
    """A process killed half-way through a save: the target never appears (its pieces were only
    ever in a hidden temporary directory beside it)."""
    out = tmp_path / "pruned"
    script = f"""
import time
from shedder.formats.extract import save
from shedder.formats.loading import load_model
model, tok = load_model({str(tiny_model_dir)!r})
def slow(self, *a, **k):
    print("writing", flush=True)
    time.sleep(60)
type(tok).save_pretrained = slow
save(model, tok, {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"  # weights written, tokenizer under way
        assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()


def test_output_paths_confined_to_a_root(tmp_path):
    assert inside(tmp_path, "a/b") == tmp_path.resolve() / "a" / "b"
    assert inside(tmp_path, str(tmp_path / "c")) == tmp_path.resolve() / "c"
    for bad in ("..", "../x", "a/../../x", "/etc", ".", "", "  "):
        with pytest.raises(ShedderError):
            inside(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ShedderError, match="outside the export directory"):
        inside(tmp_path, "link/escaped")
    with pytest.raises(ShedderError, match="is not a directory"):
        (tmp_path / "file").write_text("x")
        check_output_dir(tmp_path / "file")


def test_publish_dir_refuses_a_target_created_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ShedderError, match="not empty"):
        with publish_dir(out) as tmp:
            (tmp / "a").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("keep")
    assert tree(out) == {"theirs": b"keep"}


# ------------------------------------------------------------------------------ the output policy
SCORE = ["score", "--kinds", "block", "--metric", "activation", *DATA]


def test_score_never_replaces_a_file_it_did_not_write(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """The score and compare CSVs: a model's own file, a user's file, an empty name, the working
    directory are refused (also with --overwrite); only an unchanged earlier output is replaced."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model_dir
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = tree(tmp_path), tree(model)
    for out, words in {str(model / "config.json"): "source directory", str(model / "new.csv"): "lies inside",
                       str(notes): "already exists", "": "is empty", ".": "working directory",
                       str(tmp_path.parent): "working directory"}.items():
        for extra in ([], ["--overwrite"]):
            for compare in ([], ["--compare", "activation,block_influence"]):
                assert main([*SCORE, "--model", str(model), "--out", out, *extra, *compare]) == 2
                line = one_error_line(capsys)
                assert words in line or (extra and "did not write it" in line), (out, extra, line)
    assert (tree(tmp_path), tree(model)) == before

    for cache in ("", ".", str(model), str(model / "cache"), str(notes)):
        assert main([*SCORE, "--model", str(model), "--out", "s.csv", "--cache-dir", cache]) == 2
        capsys.readouterr()
        assert main(["eval", "--model", str(model), "--cache-dir", cache, *DATA]) == 2
        capsys.readouterr()
    assert (tree(tmp_path), tree(model)) == before

    out = tmp_path / "scores.csv"
    assert main([*SCORE, "--model", str(model), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*SCORE, "--model", str(model), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert main([*SCORE, "--model", str(model), "--out", str(out), "--overwrite"]) == 0  # an unchanged output of ours
    capsys.readouterr()
    theirs = tmp_path / "other.csv"
    (tmp_path / ".other.csv.shedder").write_text("a user's own file of that name")
    assert main([*SCORE, "--model", str(model), "--out", str(theirs)]) == 2
    assert "record file" in one_error_line(capsys)
    assert (tmp_path / ".other.csv.shedder").read_text() == "a user's own file of that name"
    out.write_text(out.read_text() + "my notes\n")  # edited by its user: theirs now
    assert main([*SCORE, "--model", str(model), "--out", str(out), "--overwrite"]) == 2
    assert "did not write it" in one_error_line(capsys)
    assert out.read_text().endswith("my notes\n")


def test_runs_go_only_into_new_or_own_directories(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """search, recover and import-run: never into the working directory (``--out ""``), the model's
    directory or a directory of someone else's files; the official layout stays inside the run."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    before = tree(tmp_path), tree(tiny_model_dir)
    model = ["--model", str(tiny_model_dir)]
    commands = [["search", *model, "--steps", "1", *DATA], ["recover", *model, "--steps", "1", "--batch-size", "1",
                "--seq-len", "16", "--eval-samples", "1", "--no-progress"], ["import-run", str(tmp_path / "official-run"), *model]]
    for argv in commands:
        for out, words in {"": "is empty", ".": "working directory", str(tiny_model_dir): "source directory",
                           str(tiny_model_dir / "run"): "lies inside", str(mine): "not empty",
                           str(mine / "thesis.tex"): "not a directory"}.items():
            assert main([*argv, "--out", out]) == 2, (argv[0], out)
            line = one_error_line(capsys)
            assert words in line, (argv[0], out, line)
    assert (tree(tmp_path), tree(tiny_model_dir)) == before

    run = tmp_path / "run"
    assert main(["search", *model, "--steps", "1", "--out", str(run), "--official-layout", *DATA]) == 0
    assert (run / fileio.RUN_MARKER).is_file() and (run / "log.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["documents", "run"]
    assert main(["search", *model, "--steps", "2", "--out", str(run), "--resume", *DATA]) == 0  # its own run


def test_plan_convert_writes_under_the_policy(capsys, tiny_model_dir, plan_file, tmp_path):
    out = tmp_path / "official.json"
    out.write_text("mine")
    argv = ["plan", "convert", str(plan_file), "--to", "official", "--model", str(tiny_model_dir)]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, "--out", str(out), *extra]) == 2
        capsys.readouterr()
    assert out.read_text() == "mine"
    assert main([*argv, "--out", str(tiny_model_dir / "official.json")]) == 2
    assert "source directory" in one_error_line(capsys)
    out.unlink()
    assert main([*argv, "--out", str(out)]) == 0 and fileio.written_by_us(out)
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0


def test_a_run_left_by_an_older_version_still_resumes(tmp_path):
    """Runs from before the marker are recognised by their log (resume keeps working); the marker is added."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "log.jsonl").write_text("{}\n")
    assert fileio.claim_run_dir(run, legacy=("log.jsonl",)) == run.resolve()
    assert (run / fileio.RUN_MARKER).is_file()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "log.jsonl").write_text("{}\n")
    with pytest.raises(ShedderError, match="not a run directory of this tool"):
        fileio.claim_run_dir(tmp_path / "theirs")


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 4 MiB at ``tmp_path / "disk"`` (root only), and ``fill(leave)``, which takes all
    but ``leave`` bytes of it (``free()`` gives them back): writes there really run out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    filler = disk / "filler"

    def fill(leave: int) -> None:
        stat = os.statvfs(disk)
        filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))

    try:
        yield disk, fill, lambda: filler.unlink(missing_ok=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_extract_onto_a_full_disk_is_one_line_and_leaves_nothing(capsys, small_disk, tiny_model_dir, plan_file):
    disk, fill, free = small_disk
    fill(64 << 10)
    out = disk / "pruned"
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]) == 2
    assert "no space left on the device" in one_error_line(capsys)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no model, no temporary directory
    free()
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]) == 0


def test_a_search_that_runs_out_of_disk_resumes_once_there_is_room(capsys, small_disk, tiny_model_dir):
    disk, fill, free = small_disk
    run = disk / "run"
    argv = ["search", "--model", str(tiny_model_dir), "--out", str(run), "--kinds", "head", *DATA]
    fill(5 * 4096)  # a few pages (tmpfs gives every file one): the marker, the log, a step or two
    assert main([*argv, "--steps", "6"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    free()
    assert main([*argv, "--steps", "6", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_recovery_that_runs_out_of_disk_resumes_once_there_is_room(capsys, small_disk, tiny_model_dir, plan_file):
    """The checkpoints (LoRA factors) fit, the recovered model does not: one error line, then the
    same command with --resume finishes from the last checkpoint."""
    disk, fill, free = small_disk
    run = disk / "rec"
    fill(160 << 10)
    assert main(recover_argv(tiny_model_dir, plan_file, run)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    free()
    assert main([*recover_argv(tiny_model_dir, plan_file, run), "--resume"]) == 0
    events = log_events(run)
    assert [e["step"] for e in events if e["event"] == "step"] == [10, 12]


# ------------------------------------------------------------------------------ runs, caches, logs
def test_two_processes_on_one_run_directory(capsys, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with lock_held_by_another_process(run / LOCK_FILE):
        argv = ["search", "--model", str(tiny_model_dir), "--out", str(run), "--steps", "1", *DATA]
        assert main(argv) == 2
        assert "is in use by another process" in one_error_line(capsys)
        assert not (run / "log.jsonl").exists()
    assert main([*argv, "--json"]) == 0  # free again once the other process is done
    capsys.readouterr()


def test_search_log_drops_a_torn_last_line_before_appending(tiny_model_factory, tmp_path):
    model = tiny_model_factory("mamba2", layers=3)
    windows = torch.randint(0, 128, (2, 12))
    run = tmp_path / "run"
    first = greedy_search(model, windows, ["block"], StopWhen(steps=1), run=RunDir(run))
    log = run / "log.jsonl"
    garbages = ('{"type": "step", "step": 2, "comp', "not json at all\n", "[1, 2]\n", "two\ngarbage lines\n",
                "\n\n\n", '{"type": "step"\n\n')
    for garbage in garbages:
        with log.open("a") as f:
            f.write(garbage)
        again = greedy_search(model, windows, ["block"], StopWhen(steps=2), run=RunDir(run, resume=True))
        assert again.components[0] == first.components[0] and len(again.steps) == 2
        lines = log.read_text().splitlines()
        assert len(lines) == 3 and all(isinstance(json.loads(x), dict) for x in lines)
        log.write_text("\n".join(lines[:2]) + "\n")  # back to one step for the next kind of damage
    # everything cut is kept beside the log, blank lines aside
    assert (run / "log.jsonl.damaged").read_text().splitlines() == [
        '{"type": "step", "step": 2, "comp', "not json at all", "[1, 2]", "two", "garbage lines", '{"type": "step"']


def test_drop_torn_tail(tmp_path):
    p = tmp_path / "log.jsonl"
    damaged = tmp_path / "log.jsonl.damaged"
    for text, kept, aside in [('{"a": 1}\n{"b"', '{"a": 1}\n', '{"b"\n'),
                              ('{"a": 1}\n{"b": 2}', '{"a": 1}\n{"b": 2}\n', ""),
                              ('{"a": 1}\n', '{"a": 1}\n', ""), ('{"a": 1}\n7\n', '{"a": 1}\n', "7\n"),
                              ('{"a": 1}\nx\n\n{"b\n\n', '{"a": 1}\n', 'x\n{"b\n'), ("", "", "")]:
        p.write_text(text)
        damaged.unlink(missing_ok=True)
        drop_torn_tail(p)
        assert p.read_text() == kept and (damaged.read_text() if damaged.exists() else "") == aside
    p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ShedderError, match="line 2 is not a JSON object, but records follow it"):
        drop_torn_tail(p)
    assert p.read_text() == '{"a": 1}\nnot json\n{"b": 2}\n'


def test_score_cache_entry_has_one_writer(tiny_model_factory, tmp_path, monkeypatch):
    from shedder.prune import importance

    model = tiny_model_factory("mamba2", layers=2)
    windows = torch.randint(0, 128, (2, 12))
    path = importance._cache_path(model, windows, ["block"], importance.adapter_for(model).resolve(PruningPlan()),
                                  tmp_path)
    with exclusive(path.with_name(f"{path.stem}.lock"), "x"):
        errors = []
        worker = threading.Thread(target=lambda: errors.append(
            pytest.raises(Busy, importance.score, model, windows, ["block"], cache_dir=tmp_path)))
        worker.start()
        worker.join()
        assert errors and "in use by another" in str(errors[0].value)
    assert len(importance.score(model, windows, ["block"], cache_dir=tmp_path)) == 2


def test_temporary_names_are_unique_per_thread(tmp_path):
    target = tmp_path / "f.txt"
    names = set()
    texts = [str(i) * 50_000 for i in range(8)]

    def write(text):
        names.add(fileio.temp_path(target))
        for _ in range(20):
            fileio.atomic_write_text(target, text)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 8 and target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ------------------------------------------------------------------------------ one message per bad input
def test_truncated_or_garbage_weights_are_one_error(capsys, tiny_model_dir, tmp_path):
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    for name, data in {"truncated": weights[: len(weights) // 2], "header": weights[:100], "garbage": b"x" * 5000}.items():
        bad = tmp_path / name
        bad.mkdir()
        for f in tiny_model_dir.iterdir():
            (bad / f.name).write_bytes(data if f.name == "model.safetensors" else f.read_bytes())
        assert main(["info", "--model", str(bad)]) == 2
        assert "model.safetensors is not a complete safetensors file" in one_error_line(capsys)


@pytest.mark.parametrize("name,content,words", [
    ("meta.json", '{"schema_version": 1, "components": [], "meta": [1]}', "'meta' must be an object"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("bool.json", '{"schema_version": 1, "components": [{"kind": "block", "layer": 1, "index": true}]}',
     "layer and index must be integers"),
    ("version.json", '{"schema_version": true, "components": []}', "schema_version True is not supported"),
    ("extra.json", '{"schema_version": 1, "components": [], "comment": "x"}', "unknown plan field(s) 'comment'"),
    ("comp.json", '{"schema_version": 1, "components": [{"kind": "block", "layer": 1, "idx": 2}]}',
     "unknown field(s) 'idx'"),
    ("groups.json", '{"schema_version": 1, "components": [], "group_sizes": {"head": 2}}', "'group_sizes' must map"),
    ("groups0.json", '{"schema_version": 1, "components": [], "group_sizes": {"channel_group": 0}}', "'group_sizes' must map"),
    ("latin1.json", b'{"schema_version": 1, "components": [], "meta": {"n": "\xe9"}}', "not UTF-8"),
])
def test_bad_plans_are_one_error(capsys, tiny_model_dir, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["eval", "--model", str(tiny_model_dir), "--plan", str(path), "--no-accuracy", *DATA]) == 2
    assert words in one_error_line(capsys)


def test_control_characters_are_escaped_in_messages(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "evil.json"
    path.write_text(json.dumps({"schema_version": 1, "components": ["block:1"],
                                "model": {"architecture": "\x1b[2J\x1b[31mEvil\nModel", "num_layers": 3,
                                          "config_hash": "0"}}))
    assert main(["eval", "--model", str(tiny_model_dir), "--plan", str(path), "--no-accuracy", *DATA]) == 2
    line = one_error_line(capsys)
    assert "\x1b" not in line and "\\x1b[2J\\x1b[31mEvil\\nModel" in line


def test_bad_text_sources_are_one_error(capsys, tiny_model_dir, tmp_path):
    for name, data in {"bad.jsonl": b'{"text": "\xff\xfe"}\n', "bad.txt": b"caf\xe9 " * 100,
                       "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n"}.items():
        (tmp_path / name).write_bytes(data)
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / name), "--no-accuracy", *DATA]) == 2
        line = one_error_line(capsys)
        assert name in line and ("not UTF-8" in line or "nested too deeply" in line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_device_is_one_error(capsys, tiny_model_dir):
    for device in ("cuda", "cuda:3", "tpu", "nonsense"):
        assert main(["info", "--model", str(tiny_model_dir), "--device", device]) == 2
        assert repr(device) in one_error_line(capsys)


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--threads", "two"],
                                  ["--batch-size", "0"], ["--target-params", "150%"], ["--target-params", "100%"],
                                  ["--target-params", "1.0"], ["--target-params", "0"], ["--target-params", "-5"],
                                  ["--target-params", "1.5"], ["--target-params", "nan"], ["--target-params", "2.5x"]])
def test_bad_numbers_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["search", "--out", "unused", *argv])
    assert e.value.code == 2
    err = one_error_line(capsys)
    assert err.endswith("(see python -m shedder search --help)")
    assert argv[0] in err and ("integer count ≥ 1, a fraction in (0, 1), or a percentage in (0, 100%)" in err
                               if argv[0] == "--target-params" else "at least 1" in err)


def test_target_params_means_one_thing():
    assert [cli.options.target(t) for t in ("0.2", "20%", "250000", "2.5e5", "1", "99.5%")] == [0.2, 0.2, 250000, 250000, 1, 0.995]
    assert isinstance(cli.options.target("2.5e5"), int)


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(capsys, tiny_model_dir, monkeypatch):
    def broken(args):
        raise TypeError("unexpected")

    monkeypatch.setattr(cli.info, "run", broken)
    assert main(["info", "--model", str(tiny_model_dir)]) == 1
    assert "internal error (TypeError: unexpected); rerun with --debug" in one_error_line(capsys)
    assert main(["info", "--model", str(tiny_model_dir), "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_broken_pipe_is_quiet(tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "shedder", "info", "--model", str(tiny_model_dir), "--json"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err.strip() == "", err


# ------------------------------------------------------------------------------ the model shared by sessions
def test_nested_masks_are_refused(tiny_model_factory):
    model = tiny_model_factory("mamba2", layers=3)
    outer = PruningPlan(frozenset({Component("block", 0)}))
    with masked(model, outer):
        with pytest.raises(PlanError, match="nested masks are refused"):
            with masked(model, PruningPlan(frozenset({Component("ssm", 1)}))):
                pass
        patched = {n for n, m in model.named_modules() if "forward" in m.__dict__}
        with masked(model, outer):  # the same plan again: nothing more is patched
            assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == patched
    assert not [m for m in model.modules() if "forward" in m.__dict__]


def test_waiting_for_the_model_is_shown_and_cancellable(tiny_model_factory):
    model = tiny_model_factory("mamba2", layers=2)
    held, release = threading.Event(), threading.Event()

    def other_session():
        with holding(model):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=other_session)
    worker.start()
    held.wait(30)
    seen = []

    def progress(done, total, message):
        seen.append(message)
        if len(seen) == 2:
            raise Cancelled("cancelled from the app")

    try:
        with pytest.raises(Cancelled):
            with masked(model, PruningPlan(), progress=progress, ):
                pass
    finally:
        release.set()
        worker.join()
    assert seen == [WAITING, WAITING]


# ------------------------------------------------------------------------------ property tests
_json = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                     max_leaves=12)
_plan_like = st.fixed_dictionaries({"schema_version": st.sampled_from([1, 1, True, 2, "1"]),
                                    "components": st.lists(
                                        st.fixed_dictionaries({"kind": st.sampled_from(KINDS + ("wing",)),
                                                               "layer": _json | st.integers(0, 5)},
                                                              optional={"index": _json, "extra": _json}) | _json,
                                        max_size=4)},
                                   optional={"model": _json, "group_sizes": _json, "meta": _json, "other": _json})
_official_like = st.dictionaries(st.sampled_from([*OFFICIAL_KEYS, "pruned_mlp_channels", "note"]),
                                 _json | st.lists(st.integers(-2, 8), max_size=4), min_size=1, max_size=4)
_fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(_plan_like | _official_like | _json)
def test_plan_parser_accepts_a_plan_or_raises_plan_error(data):
    try:
        plan = plan_from_dict(data)
    except PlanError:
        return
    if isinstance(plan, OfficialConfig):
        assert plan_from_dict(plan.to_dict()) == plan  # an official config is read back as it was checked
        return
    assert PruningPlan.from_json(plan.to_json()) == plan  # whatever is accepted round-trips
    for c in plan.components:
        assert type(c.layer) is int and type(c.index) is int and c.kind in KINDS


@_fast
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 50), st.integers(0, 50)), max_size=6, unique=True),
       st.dictionaries(st.sampled_from(["channel_group", "mlp_channel_group"]), st.integers(1, 64)),
       st.dictionaries(st.text(max_size=5), _json, max_size=3))
def test_valid_plans_round_trip(comps, sizes, meta):
    plan = PruningPlan(frozenset(Component(*c) for c in comps), None, sizes, meta)
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan and again.group_sizes == sizes and again.meta == meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_text_sources_give_text_or_data_error(tmp_path, data, suffix):
    path = tmp_path / f"source{suffix}"
    path.write_bytes(data)
    try:
        text = load_text(str(path))
    except DataError as e:
        assert str(path) in str(e)
        return
    assert isinstance(text, str) and text.strip()


# ------------------------------------------------------------------------------ the studio
def test_two_sessions_in_parallel_threads_get_single_session_numbers(tiny_model_dir):
    """Two sessions toggle and evaluate on the one shared model at the same time; every number
    equals the one a session alone gets."""
    pytest.importorskip("streamlit")
    from app.state import Settings, Workspace

    settings = Settings(model=str(tiny_model_dir), samples=2, seq_len=16, accuracy_passages=2)
    toggles = {"a": [Component("block", 1), Component("ssm", 2), Component("head", 0, 2)],
               "b": [Component("ssm", 0), Component("head", 2, 3), Component("ssm", 0)]}

    def session(comps, out):
        ws = Workspace(settings=settings)
        for c in comps:
            ws.toggle(c)
            m = ws.metrics(ws.plan)
            out.append((ws.plan, m["ppl"], m["params"], ws.accuracy(ws.plan)))

    alone = {k: [] for k in toggles}
    for k, comps in toggles.items():
        session(comps, alone[k])
    together = {k: [] for k in toggles}
    errors = []

    def run(k):
        try:
            session(toggles[k], together[k])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in toggles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and together == alone
    assert Workspace(settings=settings).loaded.model is Workspace(settings=settings).loaded.model  # one shared copy


def test_uploads_are_per_session_named_by_file_and_deleted_with_the_session(tmp_path, monkeypatch):
    """The real path: each rerun (``workspace()``) is a heartbeat and sweeps at most once a minute;
    a session Streamlit no longer has active loses its uploads once past the reconnect grace."""
    pytest.importorskip("streamlit")
    from types import SimpleNamespace

    from app import sessions
    from app.state import Workspace

    monkeypatch.setenv("SHEDDER_CACHE_DIR", str(tmp_path))
    live = {"one", "two"}
    monkeypatch.setattr(sessions, "runtime", SimpleNamespace(
        exists=lambda: True, get_instance=lambda: SimpleNamespace(is_active_session=lambda s: s in live)))
    one, two = Workspace(), Workspace()
    monkeypatch.setattr(sessions, "session_id", lambda: "one")
    a = one.stash_upload("../../notes.txt", b"some text")
    monkeypatch.setattr(sessions, "session_id", lambda: "two")
    b = two.stash_upload("notes.txt", b"some text")
    assert Path(a).parent.parent != Path(b).parent.parent and Path(a).name == "notes.txt"
    assert Path(a).is_relative_to(tmp_path / "uploads")
    assert Path(a).read_bytes() == b"some text" and one.label(a) == "upload notes.txt"
    assert one.public(f"text source not found: {a!r}") == "text source not found: 'notes.txt'"
    folder = Path(a).parent.parent

    def rerun_after(seconds):
        monkeypatch.setattr(sessions, "_last_sweep", float("-inf"))
        clock = sessions.time.time() + seconds
        monkeypatch.setattr(sessions.time, "time", lambda: clock)
        two.heartbeat()

    rerun_after(2 * sessions.DEFAULT_TTL_S)
    assert folder.exists() and Path(b).exists()  # live sessions keep their files, however idle
    live.discard("one")  # the tab was closed
    rerun_after(sessions.RECONNECT_GRACE_S / 2)
    assert folder.exists()  # it may still reconnect
    rerun_after(2 * sessions.RECONNECT_GRACE_S)
    assert not folder.exists() and Path(b).exists()


def test_server_settings(monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    import streamlit as st_

    from app.hosting import hosting

    for var in ("SHEDDER_ALLOW_REMOTE_CODE", "SHEDDER_ALLOW_SAVE", "SHEDDER_EXPORT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    address = {"value": None}
    monkeypatch.setattr(st_, "get_option", lambda key: address["value"] if key == "server.address" else None)
    shared = hosting()
    assert not shared.allow_remote_code and not shared.allow_save and shared.export_root == Path("exports").resolve()
    address["value"] = "localhost"
    assert hosting().allow_remote_code and hosting().allow_save
    address["value"] = "0.0.0.0"
    monkeypatch.setenv("SHEDDER_ALLOW_SAVE", "yes")
    monkeypatch.setenv("SHEDDER_EXPORT_ROOT", str(tmp_path))
    h = hosting()
    assert h.allow_save and not h.allow_remote_code and h.export_root == tmp_path.resolve()
    from app.state import Settings, Workspace

    with pytest.raises(ShedderError, match="does not allow remote code"):
        Workspace().configure(Settings(trust_remote_code=True))


def test_a_second_thread_waits_for_a_run_lock_shown_and_cancellable(tmp_path):
    """An app session's previous run still stopping, or another session: the new writer waits
    (reported through its progress callback, which can cancel), then proceeds."""
    lock = tmp_path / ".lock"
    held, release = threading.Event(), threading.Event()

    def other():
        with exclusive(lock, "the run"):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=other)
    worker.start()
    held.wait(30)
    seen = []

    def cancel(done, total, message):
        seen.append(message)
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        with exclusive(lock, "the run", cancel):
            pass
    assert seen == ["waiting: another session is writing the run"]
    with exclusive(lock, "the run", lambda *a: release.set()):  # waits for the other, then holds it
        assert not worker.is_alive() or release.is_set()
    worker.join()


# ------------------------------------------------------------------------------ the shared studio
def _session_folder(root: Path, record: dict | None, age_s: float, now: float) -> Path:
    """An upload folder under ``root`` owned as ``record`` says, its heartbeat ``age_s`` before ``now``."""
    from app import sessions

    folder = root / f"session-{len(list(root.glob('session-*')))}"
    folder.mkdir(parents=True)
    (folder / "abc" / "notes.txt").parent.mkdir()
    (folder / "abc" / "notes.txt").write_text("text")
    if record is not None:
        (folder / sessions.RECORD).write_text(json.dumps(record))
    for path in (folder, folder / sessions.RECORD):
        if path.exists():
            os.utime(path, (now - age_s, now - age_s))
    return folder


def test_upload_sweeper_deletes_only_ended_sessions(tmp_path):
    """A fake clock and a fake Streamlit session list: every owner case of ``app.sessions.ended``."""
    pytest.importorskip("streamlit")
    import socket

    from app import sessions

    now, ttl, grace = 1_000_000.0, 3600.0, sessions.RECONNECT_GRACE_S
    ours = {"process": sessions.PROCESS, "pid": os.getpid(), "host": socket.gethostname()}
    other = {"process": "another", "pid": 12345, "host": socket.gethostname()}
    keep = {  # folder -> why it stays
        _session_folder(tmp_path, {**ours, "session": "live"}, 10 * ttl, now): "active, however idle",
        _session_folder(tmp_path, {**ours, "session": "dropped"}, grace / 2, now): "may reconnect",
        _session_folder(tmp_path, {**ours, "session": None}, ttl / 2, now): "no runtime, within the TTL",
        _session_folder(tmp_path, {**other, "session": "x"}, 10 * ttl, now): "its server still runs here",
        _session_folder(tmp_path, {**other, "pid": 999, "session": "x"}, ttl / 2, now): "ended server, within the TTL",
    }
    gone = {
        _session_folder(tmp_path, {**ours, "session": "closed"}, 2 * grace, now),
        _session_folder(tmp_path, {**ours, "session": None}, 2 * ttl, now),
        _session_folder(tmp_path, {**other, "pid": 999, "session": "x"}, 2 * ttl, now),
        _session_folder(tmp_path, {**other, "host": "elsewhere", "session": "x"}, 2 * ttl, now),
        _session_folder(tmp_path, None, 2 * ttl, now),  # no record (a torn creation)
    }
    deleted = sessions.sweep(tmp_path, now=now, ttl=ttl, active=lambda s: None if s is None else s == "live",
                             pid_alive=lambda pid: pid == 12345)
    assert set(deleted) == gone and not any(p.exists() for p in gone)
    assert all(p.exists() for p in keep), [why for p, why in keep.items() if not p.exists()]
    live = next(p for p, why in keep.items() if why.startswith("active"))
    assert (live / sessions.RECORD).stat().st_mtime == now  # seen active: the grace starts again


def test_upload_ttl_setting_and_sweeps_at_most_once_a_minute(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from app import sessions

    monkeypatch.delenv("SHEDDER_UPLOAD_TTL_S", raising=False)
    assert sessions.ttl_s() == 3600
    monkeypatch.setenv("SHEDDER_UPLOAD_TTL_S", "60")
    assert sessions.ttl_s() == 60
    monkeypatch.setenv("SHEDDER_UPLOAD_TTL_S", "soon")
    with pytest.raises(ValueError, match="SHEDDER_UPLOAD_TTL_S"):
        sessions.ttl_s()
    calls = []
    monkeypatch.setattr(sessions, "sweep", lambda: calls.append(1))
    monkeypatch.setattr(sessions, "_last_sweep", float("-inf"))
    for _ in range(5):
        sessions.maybe_sweep()
    assert calls == [1]


def test_uploads_of_this_server_are_deleted_when_it_stops(tmp_path, monkeypatch):
    """``atexit``: the server's own folders go, another server's stay."""
    pytest.importorskip("streamlit")
    import atexit

    from app import sessions

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(sessions, "_ROOTS", set())
    mine = sessions.open_folder("s1", root=tmp_path)
    theirs = _session_folder(tmp_path, {"process": "another", "pid": 1, "host": "h"}, 0, sessions.time.time())
    assert registered == [sessions.remove_own_folders] and oct(mine.stat().st_mode & 0o777) == "0o700"
    registered[0]()
    assert not mine.exists() and theirs.exists()


BAD_NAMES = {"a\x00b": "NUL byte", "x" * 300: "longer than 255 bytes", "é" * 200: "longer than 255 bytes",
             "line\nbreak": "control character", "esc\x1b[31m": "control character", "...": "only dots",
             "a/.../b": "only dots", "a/" + "y" * 256: "longer than 255 bytes"}


def test_output_names_are_refused_with_the_rule(tmp_path, capsys, tiny_model_dir, plan_file):
    """Export names (``inside``) and every writer's target (``check_output_dir``, the CLI): one
    message naming the rule, never a raw ValueError or ENAMETOOLONG, and nothing written."""
    for bad, problem in BAD_NAMES.items():
        for check in (lambda n: inside(tmp_path, n), lambda n: check_output_dir(tmp_path / n)):
            with pytest.raises(ShedderError) as e:
                check(bad)
            assert problem in str(e.value) and fileio.NAME_RULE in str(e.value), str(e.value)
            assert "\n" not in str(e.value) and len(str(e.value)) < 400
    for bad in ("", "  "):
        with pytest.raises(ShedderError, match="empty"):
            inside(tmp_path, bad)
    assert inside(tmp_path, "a/b") == tmp_path.resolve() / "a" / "b"  # parts are fine, names are judged each
    for fine in ("model-1.2_final", "modèle\u00a0final 🙂", "é" * 127):  # letters, spaces, 254 bytes
        assert fileio.check_name(fine) == fine
    with pytest.raises(ShedderError, match="contains '/'"):
        fileio.check_name("a/b")
    out = tmp_path / ("z" * 300)
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]) == 2
    assert "longer than 255 bytes" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_upload_names_are_made_safe_and_shown_as_uploaded(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from app.state import Workspace

    monkeypatch.setenv("SHEDDER_CACHE_DIR", str(tmp_path))
    ws = Workspace()
    names = ["x" * 300 + ".txt", "é" * 200 + ".jsonl", "a\x00b.txt", "../../etc/passwd", "C:\\docs\\notes.txt",
             "...", "", "line\nbreak.txt", "\x1b[31mred.txt"]
    for i, name in enumerate(names):
        path = Path(ws.stash_upload(name, f"text {i}".encode()))
        assert path.read_bytes() == f"text {i}".encode() and path.is_relative_to(tmp_path / "uploads")
        assert fileio.name_problem(path.name) is None and len(path.name.encode()) <= 120
        assert not path.name.startswith(".")
        shown = ws.public(f"cannot read {path}")
        assert str(tmp_path) not in shown and "\x00" not in shown and "\x1b" not in shown and "\n" not in shown
    assert Path(ws.stash_upload("x" * 300 + ".txt", b"t")).suffix == ".txt"
    assert ws.label(ws.stash_upload("../../notes.txt", b"n")) == "upload notes.txt"


def _modes(path: Path) -> dict:
    return {str(p.relative_to(path)): oct(p.stat().st_mode & 0o777) for p in [path, *sorted(path.rglob("*"))]}


@pytest.mark.parametrize("umask,dirs,files", [(0o022, "0o755", "0o644"), (0o027, "0o750", "0o640")])
def test_exports_get_the_umask_permissions(tiny_model_dir, plan_file, tmp_path, umask, dirs, files):
    """A team reads an export: the directory and every file in it (marker, weights, config, tokenizer,
    plan, card) get the process umask's permissions, from ``extract.save`` and ``python -m shedder extract``."""
    out_api, out_cli = tmp_path / "api", tmp_path / "cli"
    from shedder.formats.loading import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    old = os.umask(umask)
    try:
        save(model, tokenizer, out_api, plan=PruningPlan(frozenset({Component("block", 1)})), card="# card")
    finally:
        os.umask(old)
    subprocess.run(["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", sys.executable, "-m", "shedder", "extract",
                    "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out_cli)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    for out in (out_api, out_cli):
        modes = _modes(out)
        assert {EXPORT_MARKER, "config.json", "model.safetensors", PLAN_FILE, "README.md"} <= set(modes), modes
        assert any("tokenizer" in name for name in modes), modes
        assert all(m == (dirs if (out / p).is_dir() else files) for p, m in modes.items()), modes


# ------------------------------------------------------------------------------ recovery runs
RECOVER = ["--steps", "12", "--batch-size", "2", "--seq-len", "16", "--eval-samples", "1", "--checkpoint-every", "4",
           "--lr", "1e-3", "--no-progress"]


def recover_argv(model_dir, plan, out) -> list[str]:
    return ["recover", "--model", str(model_dir), "--plan", str(plan), "--out", str(out), *RECOVER]


@pytest.fixture(scope="module")
def stopped_recovery(tmp_path_factory, tiny_model_dir, plan_file):
    """A recovery run interrupted (Ctrl-C) during step 7 of 12: its checkpoint holds step 6."""
    run = tmp_path_factory.mktemp("recoveries") / "stopped"
    real, calls = recovery.sample_batch, []

    def interrupt_at_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recovery.loop, "sample_batch", interrupt_at_7)  # the name the loop calls
        assert main(recover_argv(tiny_model_dir, plan_file, run)) == 130
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 6
    return run


@pytest.fixture
def stopped_copy(stopped_recovery, tmp_path, tiny_model_dir, plan_file):
    """A copy of the stopped run of this test's own, and the command that made it."""
    run = tmp_path / "run"
    shutil.copytree(stopped_recovery, run)
    return run, recover_argv(tiny_model_dir, plan_file, run)


def log_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_on_one_recovery_run(capsys, stopped_copy):
    run, argv = stopped_copy
    before = tree(run)
    with lock_held_by_another_process(run / fileio.RUN_LOCK):
        assert main([*argv, "--resume"]) == 2
        line = one_error_line(capsys)
        assert f"the recovery run {run} is in use by another process" in line, line
        assert tree(run) == before  # refused before anything was measured or written
    assert main([*argv, "--resume", "--json"]) == 0  # free again once the other process is done
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 6


def test_a_second_session_waits_for_a_recovery_run_shown_and_cancellable(stopped_copy, plan_file):
    run, argv = stopped_copy
    args = cli.build_parser().parse_args([*argv, "--resume"])
    model, tokenizer = load_model(args.model)
    plan = PruningPlan.load(plan_file)
    held, release = threading.Event(), threading.Event()

    def other():
        with exclusive(run / fileio.RUN_LOCK, "the run"):
            held.set()
            release.wait(30)

    worker = threading.Thread(target=other)
    worker.start()
    held.wait(30)
    seen, before = [], tree(run)

    def cancel(done, total, message):
        seen.append(message)
        raise Cancelled("stop")

    def resume(progress):
        return recovery.recover(recovery.student_for(model, plan), tokenizer, cli.recover.recover_config(args), run,
                                plan=plan, progress=progress, resume=True, save=save)

    try:
        with pytest.raises(Cancelled):
            resume(cancel)
        assert seen == [f"waiting: another session is writing the recovery run {run}"]
        assert tree(run) == before
        result = resume(lambda *a: release.set())  # the other session finishes while this one waits
    finally:
        release.set()
        worker.join()
    assert result.resumed_from == 6 and result.steps == 12


def test_kill_during_recovery_then_resume_logs_each_step_once(capsys, tmp_path, tiny_model_dir, plan_file):
    """Killed after step 10 was logged but before its checkpoint (step 8): the resumed run redoes
    steps 9 to 12 and the log still holds each step once."""
    run = tmp_path / "run"
    argv = recover_argv(tiny_model_dir, plan_file, run)
    script = f"""
import time
import shedder.prune.recover.loop as r
from shedder import cli
real, calls = r.sample_batch, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) == 11:
        print("step 11", flush=True)
        time.sleep(60)
    return real(*a, **k)
r.sample_batch = slow
cli.main({[*argv, "--json"]!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "step 11"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 8
    assert [e["step"] for e in log_events(run) if e["event"] == "step"] == [10]
    assert main([*argv, "--resume", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 8
    events = log_events(run)
    assert [e["step"] for e in events if e["event"] == "step"] == [10, 12]
    assert [e["event"] for e in events] == ["start", "resume", "step", "held_out", "step", "done"]
    assert not [p.name for p in run.iterdir() if p.name.startswith("checkpoint")]


class _Trap:
    """Unpickling this creates a file: proof that a pickle was read."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_checkpoint_is_refused_never_read(capsys, tmp_path, tiny_model_dir, plan_file):
    pickle.loads(pickle.dumps(_Trap(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the trap works when unpickled
    trap = tmp_path / "trapped"
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"fingerprint": _Trap(trap)}))
    before = tree(run)
    for extra in (["--resume"], []):
        assert main([*recover_argv(tiny_model_dir, plan_file, run), *extra]) == 2
        line = one_error_line(capsys)
        assert "old pickle format (checkpoint.pt), which is not read for safety; start a new run" in line, line
    assert not trap.exists() and tree(run) == before


def _retensor(run: Path, change) -> None:
    """Rewrite the checkpoint's tensor file with ``change(tensors)`` applied, its JSON consistent."""
    tensors = load_file(str(_tensor_file(run)))
    change(tensors)
    _replace_tensor_file(run, safetensors_bytes(tensors))


def _replace_tensor_file(run: Path, data: bytes) -> None:
    """Put ``data`` in place of the checkpoint's tensor file, named and hashed in its JSON as ours are."""
    meta = json.loads((run / "checkpoint.json").read_text())
    (run / meta["tensors"]).unlink()
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    meta["tensors"] = f"checkpoint-{meta['sha256'][:16]}.safetensors"
    (run / meta["tensors"]).write_bytes(data)
    (run / "checkpoint.json").write_text(json.dumps(meta))


def _edit_meta(**fields):
    def edit(run: Path) -> None:
        meta = json.loads((run / "checkpoint.json").read_text())
        (run / "checkpoint.json").write_text(json.dumps({**meta, **fields}))
    return edit


def _first_trained(tensors: dict) -> str:
    return next(n for n in sorted(tensors) if n.startswith("trainable/"))


def _tensor_file(run: Path) -> Path:
    return run / json.loads((run / "checkpoint.json").read_text())["tensors"]


@pytest.mark.parametrize("damage,words", [
    (_edit_meta(schema_version=99), "schema_version 99 is not supported"),
    (_edit_meta(schema_version=True), "schema_version True is not supported"),
    (_edit_meta(step="6"), "'step' has the wrong type"),
    (_edit_meta(step=1000), "step 1000 of a 12-step run"),
    (_edit_meta(seconds=-1), "out of range"),
    (_edit_meta(extra=1), "lacks or adds the field(s) 'extra'"),
    (_edit_meta(tensors="../elsewhere.safetensors"), "does not name a tensor file of its own"),
    (_edit_meta(param_groups=[{"params": [0], "betas": [0.5, 0.5]}]), "optimizer settings are not this run's"),
    (lambda run: (run / "checkpoint.json").write_bytes(b"\x00garbage{"), "checkpoint.json is not readable JSON"),
    (lambda run: (run / "checkpoint.json").write_text("[1, 2]"), "is not a JSON object"),
    (lambda run: _tensor_file(run).write_bytes(b"x" * 100), "changed or truncated"),
    (lambda run: _tensor_file(run).unlink(), "is missing"),
    (lambda run: _replace_tensor_file(run, b"x" * 100), "is not a readable safetensors file"),
    (lambda run: _retensor(run, lambda t: t.update({_first_trained(t): torch.zeros(3, 3)})), "this run needs"),
    (lambda run: _retensor(run, lambda t: t.pop(_first_trained(t))), "1 missing"),
    (lambda run: _retensor(run, lambda t: t.update({"evil": torch.zeros(1)})), "1 unknown, e.g. evil"),
    (lambda run: _retensor(run, lambda t: t.pop("optimizer/0/exp_avg")), "state of parameter 0 is incomplete"),
    (lambda run: _retensor(run, lambda t: t.update({"generator": torch.zeros(3, dtype=torch.uint8)})),
     "generator is torch.uint8 [3]"),
])
def test_a_damaged_checkpoint_is_one_error(capsys, stopped_copy, damage, words):
    run, argv = stopped_copy
    damage(run)
    before = tree(run)
    assert main([*argv, "--resume"]) == 2
    line = one_error_line(capsys)
    assert words in line and ("cannot be resumed" in line or "schema" in line), line
    assert tree(run) == before


@pytest.mark.parametrize("flag,value", [
    ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "inf"), ("--lr", "1e300"), ("--warmup", "1"),
    ("--warmup", "-0.1"), ("--warmup", "nan"), ("--steps", "0"), ("--steps", "-1"), ("--tokens", "0"), ("--batch-size", "0"),
    ("--seq-len", "0"), ("--seq-len", "-5"), ("--lora-rank", "0"), ("--lora-alpha", "nan"), ("--lora-alpha", "0"),
    ("--temperature", "0"), ("--temperature", "nan"), ("--lm-weight", "nan"), ("--lm-weight", "-1"),
    ("--eval-samples", "0"), ("--checkpoint-every", "0"), ("--seed", "-1"), ("--seed", str(2 ** 64)),
])
def test_bad_recover_options_are_one_error(capsys, tmp_path, tiny_model_dir, plan_file, flag, value):
    out = tmp_path / "rec"
    try:
        code = main(["recover", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out),
                     "--no-progress", flag, value])
    except SystemExit as e:  # refused by the parser, before the command runs
        code = e.code
    assert code == 2
    assert flag in one_error_line(capsys)
    assert not out.exists()


def test_a_teacher_of_another_vocabulary_is_one_error(capsys, tmp_path, tiny_model_dir, tiny_model_factory,
                                                      bundled_tokenizer):
    teacher = tmp_path / "teacher"
    tiny_model_factory("mamba2", layers=3, vocab_size=100).save_pretrained(teacher)
    bundled_tokenizer.save_pretrained(teacher)
    out = tmp_path / "rec"
    assert main(["recover", "--model", str(tiny_model_dir), "--teacher", str(teacher), "--method", "distill",
                 "--out", str(out), *RECOVER]) == 2
    assert "the teacher's vocabulary has 100 tokens" in one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------ one error line for every user mistake
@pytest.mark.parametrize("argv,command", [
    (["bogus"], ""), (["search"], " search"), (["eval", "--samples", "x"], " eval"),
    (["plan", "convert", "p.json"], " plan convert"), (["bench", "--min-rounds", "0"], " bench"),
    (["bench", "search", "--steps", "0"], " bench search"), (["bench", "scale", "--samples", "0"], " bench scale"),
    (["bench", "gpu-check", "--layers", "x"], " bench gpu-check"), (["bench", "recover", "--nope"], ""),
    (["recover", "--out", "r", "--steps", "0"], " recover"), (["info", "--nope", "a\nb"], ""),
])
def test_argument_errors_are_one_line_naming_the_help(capsys, argv, command):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys)
    assert line.endswith(f"(see python -m shedder{command} --help)") and "usage:" not in line


def test_help_still_exits_0(capsys):
    for argv in (["--help"], ["search", "--help"], ["bench", "scale", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["eval", "--accuracy-n", "0"], ["eval", "--accuracy-n", "-1"], ["eval", "--samples", "0"],
    ["eval", "--seq-len", "-16"], ["eval", "--limit", "0"], ["score", "--out", "s.csv", "--top-k", "0"],
    ["score", "--out", "s.csv", "--workers", "0"], ["search", "--out", "r", "--steps", "0"],
    ["search", "--out", "r", "--steps", "-2"], ["search", "--out", "r", "--samples", "-1"],
    ["search", "--out", "r", "--max-ppl", "nan"], ["search", "--out", "r", "--max-ppl", "0"],
    ["search", "--out", "r", "--max-ppl", "-3"], ["search", "--out", "r", "--target-params", "nan"],
    ["search", "--out", "r", "--threads", "100000"], ["bench", "search", "--workers", "0"],
    ["bench", "--plan", "p", "--threads", "100000"], ["bench", "scale", "--threads", "100000"],
    ["eval", "--samples", "9" * 5000],
])
def test_counts_and_limits_out_of_range_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys)
    assert argv[-2] in line and len(line) < 300


def test_a_thread_count_beyond_the_machine_is_one_error_not_a_crash(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "shedder", "info", "--model", str(tiny_model_dir),
                             "--threads", "100000"], capture_output=True, text=True, env=ENV, cwd=REPO_ROOT,
                            timeout=120)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: argument --threads: must be at most") and \
        len(result.stderr.strip().splitlines()) == 1


def test_a_number_too_long_for_python_in_a_plan_is_a_plan_error(capsys, tiny_model_dir, tmp_path):
    path = tmp_path / "long.json"
    path.write_text('{"schema_version": 2, "components": [{"kind": "block", "layer": ' + "7" * 5000 + "}]}")
    assert main(["eval", "--model", str(tiny_model_dir), "--plan", str(path), "--no-accuracy", *DATA]) == 2
    assert "holds a number too long to read" in one_error_line(capsys)
    with pytest.raises(PlanError, match="number too long"):
        PruningPlan.load(path)


def test_a_ray_client_address_without_the_client_extra_says_what_to_install(capsys, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setitem(sys.modules, "grpc", None)  # the client's gRPC missing, as in a minimal Ray
    assert main(["search", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--ray-address", "ray://127.0.0.1:1", *DATA]) == 2
    assert "pip install 'ray[client]'" in one_error_line(capsys)


def test_a_full_disk_during_extract_is_one_line_and_changes_nothing(capsys, tiny_model_dir, plan_file, tmp_path,
                                                                    monkeypatch):
    import transformers

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "pruned"
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]) == 2
    assert one_error_line(capsys) == (f"error: no space left on the device writing {out}; nothing was changed "
                                      "(free space, or choose another --out)")
    assert list(tmp_path.iterdir()) == []
    csv = tmp_path / "scores.csv"
    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    assert main(["score", "--model", str(tiny_model_dir), "--metric", "activation", "--out", str(csv), *DATA,
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert one_error_line(capsys).startswith(f"error: no space left on the device writing {csv}; nothing was changed")
    assert not csv.exists()


def test_official_layout_for_kinds_it_cannot_write_is_refused_before_the_search(capsys, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from shedder.prune import search

    monkeypatch.setattr(search, "greedy_search", lambda *a, **k: pytest.fail("the search ran"))
    run = tmp_path / "run"
    assert main(["search", "--model", str(tiny_model_dir), "--kinds", "head", "--out", str(run), "--steps", "1",
                 "--official-layout", *DATA]) == 2
    assert "'head' on Mamba2ForCausalLM has no counterpart in the official config format" in one_error_line(capsys)
    assert not run.exists()


def test_paths_echoed_in_results_are_escaped(capsys, tiny_model_dir, plan_file, tmp_path):
    """A name with control characters is refused as an output (one escaped line); read as an input
    (a model directory named so), it is echoed escaped."""
    out = tmp_path / "a\nb\x1b[2J"
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan_file), "--out", str(out)]) == 2
    assert "a\\nb\\x1b[2J" in one_error_line(capsys) and not out.exists()
    model = tmp_path / "m\nx\x1b[2J"
    shutil.copytree(tiny_model_dir, model)
    assert main(["info", "--model", str(model)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert "m\\nx\\x1b[2J" in printed[0] and "\x1b" not in printed[0]


def test_junk_after_the_last_record_of_a_search_log_is_set_aside_and_the_run_resumes(capsys, tiny_model_dir,
                                                                                   tmp_path):
    run = tmp_path / "run"
    argv = ["search", "--model", str(tiny_model_dir), "--out", str(run), *DATA]
    assert main([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    log = run / "log.jsonl"
    with log.open("a") as f:
        f.write("garbage one\n{\"torn\": \n\n\n")
    assert main([*argv, "--steps", "2", "--resume", "--json"]) == 0
    assert [s["step"] for s in json.loads(capsys.readouterr().out)["steps"]] == [1, 2]
    assert (run / "log.jsonl.damaged").read_text() == "garbage one\n{\"torn\": \n"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage in the middle", *lines[1:]]) + "\n")
    assert main([*argv, "--steps", "3", "--resume"]) == 2  # after the cost announcement, one error line
    assert "line 2 is not a JSON object, but records follow it" in capsys.readouterr().err.splitlines()[-1]


# ------------------------------------------------------------------------------ loading: weights that match their config
def _model_copy(src: Path, dst: Path, config=None, weights=None) -> Path:
    """A copy of the model directory ``src`` at ``dst``, its config.json dict changed by
    ``config(dict)`` and its tensors by ``weights(dict)`` (both in place)."""
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    if weights is not None:
        tensors = load_file(dst / "model.safetensors")
        weights(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Building any model (adapter skeletons, transformers' own classes) fails the test: a config
    must be refused before work proportional to its sizes starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(Adapter, "build", classmethod(refuse))
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)


def test_a_config_without_its_layer_count_is_refused_naming_the_missing_layers(capsys, tmp_path):
    model_dir = _model_copy(REPO_ROOT / "assets" / "models" / "mamba2-tiny", tmp_path / "m",
                            config=lambda c: c.pop("num_hidden_layers"))  # transformers' default: 64
    assert main(["eval", "--model", str(model_dir), "--no-accuracy", *DATA]) == 2
    line = one_error_line(capsys)
    assert "are missing" in line and "layer(s) 8..63" in line and "num_hidden_layers" in line, line


def test_tensors_the_config_does_not_build_are_refused(capsys, tiny_model_dir, tmp_path):
    def extra(tensors):
        tensors["backbone.layers.3.mixer.D"] = tensors["backbone.layers.0.mixer.D"].clone()

    model_dir = _model_copy(tiny_model_dir, tmp_path / "m", weights=extra)
    assert main(["info", "--model", str(model_dir)]) == 2
    assert "1 tensor(s) in the weights are not in the model" in one_error_line(capsys)


@pytest.mark.parametrize("case,edit,words", [
    ("int32", lambda t: t.update({"backbone.layers.0.mixer.D": t["backbone.layers.0.mixer.D"].to(torch.int32)}),
     "backbone.layers.0.mixer.D is stored as I32; weights must be floating point"),
    ("nan", lambda t: t["backbone.layers.1.mixer.D"].__setitem__(0, float("nan")),
     "weight backbone.layers.1.mixer.D holds nan or inf values"),
    ("inf", lambda t: t["backbone.norm_f.weight"].__setitem__(0, float("inf")), "weight backbone.norm_f.weight holds nan"),
])
def test_weights_that_are_not_finite_floats_are_refused(capsys, tiny_model_dir, tmp_path, case, edit, words):
    model_dir = _model_copy(tiny_model_dir, tmp_path / case, weights=edit)
    assert main(["eval", "--model", str(model_dir), "--no-accuracy", *DATA]) == 2
    assert words in one_error_line(capsys)


@pytest.mark.parametrize("scale,words", [(1e38, "perplexity is nan: the model produced non-finite logits"),
                                         (1e25, "perplexity is inf: the mean NLL is")])
def test_a_non_finite_perplexity_is_an_error_not_a_number(capsys, tiny_model_dir, tmp_path, scale, words):
    def huge(tensors):  # finite weights whose logits overflow (nan) or whose NLL overflows exp (inf)
        tensors["backbone.norm_f.weight"].fill_(scale)

    model_dir = _model_copy(tiny_model_dir, tmp_path / "m", weights=huge)
    assert main(["eval", "--model", str(model_dir), "--no-accuracy", *DATA]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # after eval's status line
    assert "perplexity" not in out, out  # no number printed
    line = errors[0]
    assert words in line and "float16 overflow?" in line, line


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_in_place_of_a_model_file_is_refused_without_reading_it(tiny_model_dir, tmp_path, name):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m")
    (model_dir / name).unlink()
    os.mkfifo(model_dir / name)
    try:  # in another process, so that a reader blocked on the FIFO fails the test instead of hanging it
        done = subprocess.run([sys.executable, "-m", "shedder", "info", "--model", str(model_dir)], env=ENV,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"info blocked on the FIFO {name}")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("error: ") and f"{name} is a FIFO, not a regular file" in err[0], err


def test_a_directory_in_place_of_the_weights_is_refused(capsys, tiny_model_dir, tmp_path):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").mkdir()
    assert main(["info", "--model", str(model_dir)]) == 2
    assert "model.safetensors is a directory, not a regular file" in one_error_line(capsys)


def test_a_link_to_a_regular_weights_file_loads(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    assert main(["info", "--model", str(model_dir)]) == 0


@pytest.mark.parametrize("field,value,also", [
    ("num_hidden_layers", 10_000_000, {}), ("hidden_size", 1 << 17, {"num_heads": 1 << 14}),  # as consistent as asked
    ("vocab_size", 10 ** 9, {}), ("state_size", 100_000, {}), ("conv_kernel", 1 << 20, {})])
def test_huge_sizes_are_refused_before_anything_is_built(capsys, tiny_model_dir, tmp_path, nothing_is_built,
                                                         field, value, also):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m", config=lambda c: c.update({field: value, **also}))
    started = time.monotonic()
    assert main(["info", "--model", str(model_dir)]) == 2
    assert time.monotonic() - started < 20
    line = one_error_line(capsys)
    assert f"{field} is {value}; expected an integer from 1 to" in line and "config.json" in line, line


@pytest.mark.parametrize("field,value", [("hidden_size", "128"), ("num_hidden_layers", -1), ("num_heads", 8.5),
                                         ("num_hidden_layers", True), ("vocab_size", None), ("n_groups", [2])])
def test_config_values_of_the_wrong_type_are_one_error(capsys, tiny_model_dir, tmp_path, field, value):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m", config=lambda c: c.update({field: value}))
    assert main(["info", "--model", str(model_dir)]) == 2
    line = one_error_line(capsys)
    assert "config.json" in line and field in line, line


@pytest.mark.parametrize("content,words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    ("[1, 2]", "must hold a JSON object, not list"),
    ('"mamba2"', "must hold a JSON object, not str"),
    ("{not json", "is not valid JSON"),
])
def test_a_config_json_that_is_not_a_json_object_is_one_error(capsys, tiny_model_dir, tmp_path, content, words):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m")
    (model_dir / "config.json").write_text(content)
    assert main(["info", "--model", str(model_dir)]) == 2
    line = one_error_line(capsys)
    assert "config.json" in line and words in line, line


def test_a_config_json_that_is_not_utf8_is_one_error(capsys, tiny_model_dir, tmp_path):
    model_dir = _model_copy(tiny_model_dir, tmp_path / "m")
    (model_dir / "config.json").write_bytes(b'{"model_type": "mamba2\xff"}')
    assert main(["info", "--model", str(model_dir)]) == 2
    assert "config.json is not UTF-8 text" in one_error_line(capsys)


@pytest.fixture(scope="module")
def uneven_model_dir(tmp_path_factory, tiny_model_dir):
    """A pruned tiny Mamba-2 whose config.json has a ``shedder`` section (layer 0's SSM removed)."""
    out = tmp_path_factory.mktemp("uneven") / "model"
    plan = out.parent / "plan.json"
    PruningPlan(frozenset({Component("ssm", 0)})).save(plan)
    assert main(["extract", "--model", str(tiny_model_dir), "--plan", str(plan), "--out", str(out)]) == 0
    assert [s["source"] for s in json.loads((out / "config.json").read_text())["shedder"]["layers"]] == [0, 1, 2]
    return out


def _sources(*sources):
    def edit(config):
        for layer, source in zip(config["shedder"]["layers"], sources):
            layer["source"] = source
    return edit


def _many_layers(config):
    config["num_hidden_layers"] = 100_000
    config["shedder"]["layers"] = [{"source": j} for j in range(100_000)]


@pytest.mark.parametrize("edit,words", [
    (_sources(0, 0, 2), "shedder.layers[1].source is 0, which repeats the source of layers[0]"),
    (_sources(0, 2, 1), "shedder.layers[2].source is 1, which comes before the source of layers[1]"),
    (_sources(0, 1, 5000), "shedder.layers[2].source is 5,000, out of range"),
    (_sources(0, 1, 10 ** 30), "shedder.layers[2].source is 1,000,000,000,000,000,000,000,000,000,000, out of range"),
    (_sources(True, 1, 2), "shedder.layers[0].source is true; expected a layer index"),
    (_sources(0, 1.0, 2), "shedder.layers[1].source is 1.0; expected a layer index"),
    (_many_layers, "num_hidden_layers is 100000; expected an integer from 1 to 1,000"),
    (lambda c: c["shedder"].update(layers=[{}] * 100_000), "shedder.layers has 100,000 layers; this tool reads at most 1,000"),
])
def test_a_bad_shedder_section_is_refused_before_anything_is_built(capsys, uneven_model_dir, tmp_path,
                                                                   nothing_is_built, edit, words):
    model_dir = _model_copy(uneven_model_dir, tmp_path / "m", config=edit)
    started = time.monotonic()
    assert main(["info", "--model", str(model_dir)]) == 2
    assert time.monotonic() - started < 20
    line = one_error_line(capsys)
    assert words in line and "config.json" in line, line


def test_the_uneven_model_itself_loads(capsys, uneven_model_dir):
    assert main(["info", "--model", str(uneven_model_dir)]) == 0
