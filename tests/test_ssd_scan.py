"""The engine's SSD scan equals transformers' torch reference (fp32, 1e-4 relative): shapes, groups,
chunk boundaries, lengths not divisible by the chunk, initial/final states, and whole real-shape
models of every Mamba-2-style family (prefill and cached decode) under ``ssd_scan.reference()``."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from shedder.arch import ssd_scan
from shedder.cli import main
from shedder.dev import realshape
from shedder.dev.scan_bench import scan_inputs

TOL = 1e-4


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 128, 200])
@pytest.mark.parametrize("heads,groups", [(8, 1), (8, 2), (16, 8)])
def test_scan_equals_reference_across_chunk_boundaries_and_groups(seq_len, heads, groups):
    inputs = scan_inputs(seed=seq_len, batch=2, seq_len=seq_len, heads=heads, head_dim=8, groups=groups, state=16)
    inputs["A"] = inputs["A"] / 30  # slow decay, so earlier chunks and the initial state matter
    init = torch.randn(2, heads, 8, 16)
    for initial in (None, init):
        ref, ref_final = mamba2_chunk_scan(**inputs, initial_states=initial, return_final_states=True)
        out, final = ssd_scan.chunk_scan(**inputs, initial_states=initial, return_final_states=True)
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
        assert rel(out, ref) < TOL and rel(final, ref_final) < TOL


def test_scan_at_the_130m_shape_and_dt_limit():
    inputs = scan_inputs(seq_len=300)
    for limit in ((0.0, float("inf")), (0.001, 0.1)):
        ref = mamba2_chunk_scan(**inputs, dt_limit=limit)
        assert rel(ssd_scan.chunk_scan(**inputs, dt_limit=limit), ref) < TOL


def test_gradients_equal_the_reference():
    """Recovery trains through the scan: its backward must work (no in-place edit of a tensor autograd
    keeps) and give the reference's gradients."""
    inputs = scan_inputs(seed=3, batch=1, seq_len=70, heads=4, head_dim=4, groups=2, state=8)
    grads = []
    for reference in (True, False):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if torch.is_tensor(v)}
        with ssd_scan.reference() if reference else contextlib.nullcontext():
            ssd_scan.chunk_scan(**{**inputs, **leaves}).square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name, ref in grads[0].items():
        assert rel(grads[1][name], ref) < TOL, name


def test_reference_switch_routes_to_transformers():
    inputs = scan_inputs(seq_len=70, batch=1, heads=4, head_dim=4, state=8)
    with ssd_scan.reference():
        assert not ssd_scan.uses_engine_scan(inputs["hidden_states"])
        assert torch.equal(ssd_scan.chunk_scan(**inputs), mamba2_chunk_scan(**inputs))
    assert ssd_scan.uses_engine_scan(inputs["hidden_states"])


@pytest.mark.parametrize("family", ["mamba2", "nemotron_h", "bamba", "zamba2", "falcon_h1"])
def test_real_shape_models_equal_reference_prefill_and_decode(family):
    """Stock (unmasked) layers use the engine scan too; Nemotron-H's real shape has 8 groups."""
    model = realshape.build(family, layers=2, small=True)
    ids = torch.randint(0, 1000, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
        gen = model.generate(ids[:1, :40], max_new_tokens=4, do_sample=False)
        with ssd_scan.reference():
            ref = model(ids).logits
            ref_gen = model.generate(ids[:1, :40], max_new_tokens=4, do_sample=False)
    assert rel(out, ref) < TOL
    assert torch.equal(gen, ref_gen)


def test_bench_scan_reports_speedup_and_difference(capsys):
    assert main(["bench", "scan", "--no-model", "--budget-s", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_rel_diff"] < TOL and report["speedup"] > 0 and report["scan"]["rounds"] >= 6
    assert "model_prefill" not in report


def test_bench_scan_times_a_greedy_step_with_each_scan(capsys):
    assert main(["bench", "scan", "--no-model", "--step", "--layers", "2", "--budget-s", "0.1", "--json"]) == 0
    step = json.loads(capsys.readouterr().out)["greedy_step"]
    assert step["layers"] == 2 and step["rounds"] >= 6 and step["same_choice"]
    assert step["ci95"][0] <= step["median"] <= step["ci95"][1]
