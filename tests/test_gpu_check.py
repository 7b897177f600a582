"""``bench gpu-check --paper``: the paper's speed measurements, tested on the CPU in their dry run.

No test here needs a GPU: the dry run builds the same plans and writes the same report with tiny
shapes; the paper-shape plans are checked on models built on the meta device (no memory); the
switch to the PyTorch path is checked with a fake kernel that fails when it runs.
"""
from __future__ import annotations

import functools
import inspect
import json

import pytest
import torch
import transformers
from transformers.models.mamba import modeling_mamba
from transformers.models.mamba2 import modeling_mamba2

from shedder.arch import adapter_for, kernels, mamba2_mixer, ssd_scan
from shedder.cli import main
from shedder.dev import paper_speed
from shedder.dev.paper_speed import JSON_NAME, MARKDOWN_NAME, PAPER_LAYERS, PAPER_MODELS, evenly_spaced
from shedder.dev.realshape import from_config
from shedder.formats.extract import extract
from shedder.measure.bench import kernel_path
from shedder.measure.timing import Ratio

FAST = ["--budget-s", "0.3"]
SPEEDUP_KEYS = {"median", "ci95", "rounds", "noisy", "resolved"}


def _meta_model(spec):
    """``spec``'s model at the published shape, without memory (meta tensors)."""
    config = spec.config(dry=False)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]._from_config(config, dtype=torch.float16)


@pytest.mark.parametrize("spec", PAPER_MODELS, ids=lambda s: s.name)
def test_paper_shape_plans_remove_14_blocks_and_22_ssms(spec):
    model = _meta_model(spec)
    adapter = adapter_for(model)
    assert adapter.num_layers == PAPER_LAYERS and model.config.hidden_size == 2560
    plan = adapter.resolve(spec.plan(adapter.num_layers))  # valid for the real-shape model
    want = {"Mamba-2.8B": ("block", 14, 50280, 2.77e9), "Mamba2-2.7B": ("ssm", 22, 50288, 2.70e9)}[spec.name]
    assert {c.kind for c in plan.components} == {want[0]} and len(plan.components) == want[1]
    assert len({c.layer for c in plan.components}) == want[1]
    assert model.config.vocab_size == want[2] and abs(adapter.param_count() / want[3] - 1) < 0.01
    pruned = extract(model, plan, adapter)
    if spec.kind == "block":
        assert pruned.config.num_hidden_layers == PAPER_LAYERS - 14
    else:
        assert adapter_for(pruned).param_count() < adapter.param_count()
    if spec.name == "Mamba2-2.7B":
        assert (model.config.head_dim, model.config.state_size, model.config.n_groups) == (64, 128, 1)


def test_evenly_spaced_is_distinct_and_centred():
    assert evenly_spaced(64, 14) == [2, 6, 11, 16, 20, 25, 29, 34, 38, 43, 48, 52, 57, 61]
    for n in (8, 24, 64):
        for k in range(1, n + 1):
            picked = evenly_spaced(n, k)
            assert len(set(picked)) == k and 0 <= min(picked) and max(picked) < n
    with pytest.raises(ValueError):
        evenly_spaced(8, 9)


def _fake_kernel(module, name, monkeypatch, calls):
    """Put a 'kernel' wrapper in ``module.name`` that fails when run, wrapping the real reference
    the way transformers' kernel wrappers do."""
    reference = inspect.unwrap(getattr(module, name))

    @functools.wraps(reference)
    def kernel(*args, **kwargs):
        calls.append(name)
        raise RuntimeError("the kernel ran")

    monkeypatch.setattr(module, name, kernel)
    return kernel


@pytest.mark.parametrize("spec", PAPER_MODELS, ids=lambda s: s.name)
def test_torch_path_replaces_every_kernel_wrapper_and_puts_them_back(spec, monkeypatch):
    original = from_config(spec.config(dry=True))
    adapter = adapter_for(original)
    pruned = extract(original, adapter.resolve(spec.plan(adapter.num_layers)), adapter)
    calls = []
    fakes = [_fake_kernel(modeling_mamba, "causal_conv1d_fn", monkeypatch, calls),
             _fake_kernel(modeling_mamba2, "causal_conv1d_fn", monkeypatch, calls),
             _fake_kernel(mamba2_mixer, "causal_conv1d_fn", monkeypatch, calls)]
    monkeypatch.setattr(ssd_scan, "HAVE_MAMBA_SSM", True)
    ids = torch.randint(0, original.config.vocab_size, (1, 8))
    for model in (original, pruned):
        with pytest.raises(RuntimeError, match="the kernel ran"):
            model(ids)
    with kernels.torch_path() as replaced, torch.no_grad():
        assert kernels.torch_forced() and not ssd_scan.HAVE_MAMBA_SSM
        assert {"modeling_mamba.causal_conv1d_fn", "modeling_mamba2.causal_conv1d_fn",
                "mamba2_mixer.causal_conv1d_fn"} <= set(replaced)
        assert "forced" in kernel_path("cuda")
        for model in (original, pruned):
            assert torch.isfinite(model(ids).logits).all()
    assert [modeling_mamba.causal_conv1d_fn, modeling_mamba2.causal_conv1d_fn, mamba2_mixer.causal_conv1d_fn] == fakes
    assert ssd_scan.HAVE_MAMBA_SSM and not kernels.torch_forced()
    assert getattr(modeling_mamba2.mamba2_chunk_scan, "engine_dispatch", False)  # the engine's dispatcher stays


def test_resolved_names_each_scan_and_conv():
    found = kernels.resolved()
    assert {"modeling_mamba.mamba_selective_scan", "modeling_mamba.causal_conv1d_fn",
            "modeling_mamba2.causal_conv1d_fn", "modeling_mamba2.mamba2_chunk_scan"} <= set(found)
    if not any(kernels.kernel_versions().values()):
        assert found["modeling_mamba.mamba_selective_scan"] == "reference"
        assert found["modeling_mamba2.mamba2_chunk_scan"].startswith("engine SSD scan")


def test_dry_run_writes_the_json_and_markdown_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["bench", "gpu-check", "--paper", "--dry-run", "--out", str(out), *FAST]) == 0
    report = json.loads((out / JSON_NAME).read_text())
    assert report["schema"] == paper_speed.SCHEMA and report["dry_run"] and report["complete"]
    assert {"device", "device_name", "dtype", "torch", "transformers", "kernel_packages", "paths", "seq_len",
            "new_tokens", "budget", "cut", "models", "removal"} <= set(report)
    assert report["paths"] == ["kernels", "torch"] and report["budget"]["spent_s"] > 0
    assert [m["name"] for m in report["models"]] == ["Mamba-2.8B", "Mamba2-2.7B"]
    for m, kind, count in zip(report["models"], ("block", "ssm"), (2, 3)):
        assert m["layers"] == paper_speed.DRY_LAYERS
        assert (m["removed"]["kind"], m["removed"]["count"]) == (kind, count)
        assert [r["path"] for r in m["runs"]] == ["kernels", "torch"]
        for r in m["runs"]:
            assert "error" not in r and r["probe_s"] > 0 and r["resolved"]
            for key in ("measured_prefill_speedup", "measured_decode_speedup"):
                assert set(r["bench"][key]) >= SPEEDUP_KEYS and r["bench"][key]["rounds"] >= 6
        assert m["runs"][1]["replaced"] and not m["runs"][0]["replaced"]
        assert m["runs"][0]["resolved"]["modeling_mamba.mamba_selective_scan"] == "reference"  # no kernel on a CPU
        assert m["runs"][1]["resolved"]["modeling_mamba.mamba_selective_scan"] == "reference (forced)"
    md = (out / MARKDOWN_NAME).read_text()
    assert "dry run" in md and md.count("| Mamba") == 4 and "×" in md
    assert capsys.readouterr().out.startswith("# Paper-shape speed check")


def test_a_measurement_that_does_not_fit_is_cut_and_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_speed, "MARGIN", 1e9)  # every estimate exceeds what is left
    report = paper_speed.run_paper(paper_speed.PaperRun(tmp_path / "r", dry_run=True, budget_s=0.3),
                                   log=lambda line: None)
    assert len(report["cut"]) == 4 and all("needs about" in c for c in report["cut"])
    assert all("bench" not in r and "skipped" in r for m in report["models"] for r in m["runs"])
    assert "cut (time budget)" in (tmp_path / "r" / MARKDOWN_NAME).read_text()


def test_a_failed_measurement_is_recorded_the_others_run_and_the_exit_is_1(tmp_path, monkeypatch, capsys):
    speedup = Ratio(1.2, (1.1, 1.3), 6, False, True).to_dict()
    stand_in = {"measured_prefill_speedup": speedup, "measured_decode_speedup": speedup,
                "expected_prefill_speedup": 1.2, "expected_decode_speedup": 1.2}

    def broken(*args, **kwargs):
        if kernels.torch_forced():
            raise RuntimeError("no kernel image is available for execution on the device")
        return stand_in

    monkeypatch.setattr(paper_speed, "bench_models", broken)
    assert main(["bench", "gpu-check", "--paper", "--dry-run", "--out", str(tmp_path / "r"), *FAST]) == 1
    assert "internal error" not in capsys.readouterr().err
    report = json.loads((tmp_path / "r" / JSON_NAME).read_text())
    assert report["complete"]
    assert "failed: RuntimeError: no kernel image" in (tmp_path / "r" / MARKDOWN_NAME).read_text()
    for m in report["models"]:
        kernel_run, torch_run = m["runs"]
        assert kernel_run["bench"] == stand_in and "error" not in kernel_run
        assert torch_run["error"] == "RuntimeError: no kernel image is available for execution on the device"
    assert not kernels.torch_forced()  # the failure left the path as it was


def test_refuses_to_overwrite_a_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "r"
    quick = ["bench", "gpu-check", "--paper", "--dry-run", "--out", str(out), "--total-s", "0.001"]
    assert main(quick) == 0  # nothing fits: every measurement cut, the report still written
    report = json.loads((out / JSON_NAME).read_text())
    assert report["cut"] and not any("bench" in r for m in report["models"] for r in m["runs"])
    capsys.readouterr()
    assert main(quick) == 2  # ours, but no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*quick, "--overwrite"]) == 0
    (out / MARKDOWN_NAME).write_text("my notes\n")
    json_before = (out / JSON_NAME).read_bytes()
    capsys.readouterr()
    assert main([*quick, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing to replace")
    assert (out / MARKDOWN_NAME).read_text() == "my notes\n" and (out / JSON_NAME).read_bytes() == json_before


@pytest.mark.parametrize("argv,says", [
    (["--paper", "--dry-run", "--out", "x", "--budget-s", "0"], "--budget-s"),
    (["--paper", "--dry-run", "--out", "x", "--total-s", "nan"], "--total-s"),
    (["--dry-run"], "--dry-run belongs to --paper"),
    (["--out", "x"], "--out belongs to --paper"),
    (["--paper", "--dry-run"], "needs --out"),
    (["--paper", "--dry-run", "--out", "x", "--layers", "4"], "--layers belongs to the journey"),
    (["--paper", "--dry-run", "--out", "x", "--dtype", "bfloat16"], "--dtype belongs to the journey"),
])
def test_bad_flags_are_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["bench", "gpu-check", *argv])
    except SystemExit as e:  # a parse error
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is for machines without CUDA")
def test_without_cuda_and_without_dry_run_it_skips_in_one_line(tmp_path, capsys):
    assert main(["bench", "gpu-check", "--paper", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: skipped:")
    assert not (tmp_path / "r").exists()


def test_an_older_transformers_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert main(["bench", "gpu-check", "--paper", "--dry-run", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs transformers >= 5.24" in err[0] and not (tmp_path / "r").exists()
