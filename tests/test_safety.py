"""Never lose a user's files, never corrupt a run, one clear error for every bad input.

Safe outputs (temporary directory + rename, refusals, a failing or killed write), locks on runs and
cache entries, torn logs, temporary names, one-line errors for bad weights, plans, texts and
options, and property tests of the plan parser and the text sources.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import lock_held_by_another_process

from shedder import cli, fileio
from shedder.cli import main
from shedder.data import load_text
from shedder.errors import Busy, Cancelled, DataError, PlanError, ShedderError
from shedder.extract import PLAN_FILE, save
from shedder.fileio import EXPORT_MARKER, check_output_dir, drop_torn_tail, exclusive, inside, publish_dir
from shedder.loading import REPO_ROOT
from shedder.masking import WAITING, holding, masked
from shedder.official import OFFICIAL_KEYS
from shedder.plan import KINDS, Component, PruningPlan
from shedder.search import LOCK_FILE, greedy_search

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
             str(tiny_model_dir): "source model's directory"}
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
        with pytest.raises(OSError, match="No space left"):
            save(model, bundled_tokenizer, target, overwrite=True)
    assert tree(out) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_kill_during_extract_leaves_no_model_behind(tmp_path, tiny_model_dir):
    """A process killed half-way through a save: the target never appears (its pieces were only
    ever in a hidden temporary directory beside it)."""
    out = tmp_path / "pruned"
    script = f"""
import time
from shedder.extract import save
from shedder.loading import load_model
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
    first = greedy_search(model, windows, ["block"], steps=1, run_dir=run)
    log = run / "log.jsonl"
    for garbage in ('{"type": "step", "step": 2, "comp', "not json at all\n", "[1, 2]\n"):
        with log.open("a") as f:
            f.write(garbage)
        again = greedy_search(model, windows, ["block"], steps=2, run_dir=run, resume=True)
        assert again.components[0] == first.components[0] and len(again.steps) == 2
        lines = log.read_text().splitlines()
        assert len(lines) == 3 and all(isinstance(json.loads(x), dict) for x in lines)
        log.write_text("\n".join(lines[:2]) + "\n")  # back to one step for the next kind of damage


def test_drop_torn_tail(tmp_path):
    p = tmp_path / "log.jsonl"
    for text, kept in [('{"a": 1}\n{"b"', '{"a": 1}\n'), ('{"a": 1}\n{"b": 2}', '{"a": 1}\n{"b": 2}\n'),
                       ('{"a": 1}\n', '{"a": 1}\n'), ('{"a": 1}\n7\n', '{"a": 1}\n'), ("", "")]:
        p.write_text(text)
        drop_torn_tail(p)
        assert p.read_text() == kept


def test_score_cache_entry_has_one_writer(tiny_model_factory, tmp_path, monkeypatch):
    from shedder import importance

    model = tiny_model_factory("mamba2", layers=2)
    windows = torch.randint(0, 128, (2, 12))
    path = importance._cache_path(model, windows, ["block"], importance.adapter_for(model).validate(PruningPlan()),
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
    err = capsys.readouterr().err
    assert argv[0] in err and ("integer count ≥ 1, a fraction in (0, 1), or a percentage in (0, 100%)" in err
                               if argv[0] == "--target-params" else "at least 1" in err)


def test_target_params_means_one_thing():
    assert [cli._target(t) for t in ("0.2", "20%", "250000", "2.5e5", "1", "99.5%")] == [0.2, 0.2, 250000, 250000, 1, 0.995]
    assert isinstance(cli._target("2.5e5"), int)


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(capsys, tiny_model_dir, monkeypatch):
    def broken(args):
        raise TypeError("unexpected")

    monkeypatch.setattr(cli, "cmd_info", broken)
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
        plan = PruningPlan.from_dict(data)
    except PlanError:
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


def test_uploads_are_per_session_named_by_file_and_deleted_with_the_session():
    pytest.importorskip("streamlit")
    import gc

    from app.state import Workspace

    one, two = Workspace(), Workspace()
    a, b = one.stash_upload("../../notes.txt", b"some text"), two.stash_upload("notes.txt", b"some text")
    assert Path(a).parent.parent != Path(b).parent.parent and Path(a).name == "notes.txt"
    assert Path(a).read_bytes() == b"some text" and one.label(a) == "upload notes.txt"
    assert one.public(f"text source not found: {a!r}") == "text source not found: 'notes.txt'"
    folder = Path(a).parent.parent
    del one
    gc.collect()
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


# ------------------------------------------------------------------------------ loading: weights that match their config
import shutil  # noqa: E402  (imports of this section, kept with it)
import time  # noqa: E402

import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from shedder.arch.base import Adapter  # noqa: E402


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
