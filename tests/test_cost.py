"""The analytic cost model: hand-computed FLOPs and state sizes, and its consistency with the
parameter count and with the models extraction really builds (tiny random fp32 models)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from shedder.arch import adapter_for, count_parameters
from shedder.measure.cost import estimate, expected_speedup
from shedder.measure.timing import Protocol
from shedder.core.plan import Component, PruningPlan
from test_generation import available, make_model, plan_named
from tiny_models import GENERATION as TINY

FP32 = 4  # bytes


def plan(*specs: str) -> PruningPlan:
    return PruningPlan(frozenset(Component.parse(s) for s in specs))


def mamba1():
    """hidden 32, 2 layers, inner D = 64, state N = 8, conv kernel 4, dt rank ceil(32/16) = 2, vocab 96."""
    config = transformers.MambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                      conv_kernel=4, tie_word_embeddings=True, use_mambapy=False)
    return transformers.MambaForCausalLM(config).eval()


def mamba2():
    """hidden 32, 2 layers, H = 8 heads of P = 8 channels (inner 64), G = 2 groups, state N = 8, kernel 4, vocab 96."""
    config = transformers.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                                       expand=2, n_groups=2, state_size=8, chunk_size=8, conv_kernel=4,
                                       tie_word_embeddings=True)
    return transformers.Mamba2ForCausalLM(config).eval()


def test_mamba1_by_hand():
    est = estimate(mamba1(), seq_len=32)
    # Linear multiply-adds per token, per layer:
    #   in_proj 32 -> 2*64 = 4096; x_proj 64 -> (2 + 2*8) = 1152; dt_proj 2 -> 64 = 128; out_proj 64 -> 32 = 2048
    #   total 7424 -> 14848 FLOPs
    # conv: 2 * 64 channels * 4 taps = 512;  scan: 9 * 64 * 8 + 2 * 64 (D skip) = 4736
    layer = 14848 + 512 + 4736  # 20096
    lm_head = 2 * 32 * 96       # 6144 (tied to the embedding, still a matmul per token)
    assert [(c.linear, c.conv, c.scan_prefill, c.scan_decode) for c in est.layers] == [(14848, 512, 4736, 4736)] * 2
    assert est.flops_per_token_prefill == est.flops_per_token_decode == 2 * layer + lm_head == 46336
    # state: SSM 64 * 8 = 512 and conv 64 * 4 = 256 elements per layer, fp32
    assert est.state_bytes_per_sequence == 2 * (512 + 256) * FP32 == 6144
    as_json = json.loads(json.dumps(est.to_dict()))  # what the CLI and the app print
    assert as_json["layers"][1]["flops_prefill"] == layer and as_json["other"]["linear"] == lm_head


def test_mamba2_by_hand():
    model = mamba2()
    est = estimate(model, seq_len=32)
    # conv channels = inner 64 + B and C (2 * G * N = 32) = 96
    # in_proj 32 -> z 64 + conv 96 + dt 8 = 168: 5376 MACs; out_proj 64 -> 32: 2048 MACs -> 14848 FLOPs
    # conv 2 * 96 * 4 = 768
    # SSD decode (recurrence): 5 * H*P*N (8*8*8 = 512) + 2 * 64 (D skip) = 2688
    # SSD prefill (chunks of Q = 8): 2 * H * (Q*(N + P) + 2*N*P) = 2 * 8 * (8*16 + 128) = 4096, + 128 = 4224
    decode, prefill = 14848 + 768 + 2688, 14848 + 768 + 4224  # 18304, 19840
    assert [(c.linear, c.conv, c.scan_prefill, c.scan_decode) for c in est.layers] == [(14848, 768, 4224, 2688)] * 2
    assert est.flops_per_token_decode == 2 * decode + 2 * 32 * 96 == 42752
    assert est.flops_per_token_prefill == 2 * prefill + 2 * 32 * 96 == 45824
    # state: SSM 8*8*8 = 512, conv 96 * 4 = 384 elements per layer
    assert est.state_bytes_per_sequence == 2 * (512 + 384) * FP32 == 7168

    # one head out of each group in layer 0: H = 6, inner 48, conv 48 + 32 = 80, in_proj rows 48 + 80 + 6 = 134
    pruned = estimate(model, plan("head:0:0", "head:0:4"), seq_len=32).layers[0]
    assert pruned.linear == 2 * (32 * 134 + 48 * 32) == 11648
    assert pruned.conv == 2 * 80 * 4 == 640
    assert pruned.scan_decode == 5 * 6 * 8 * 8 + 2 * 48 == 2016
    assert pruned.scan_prefill == 2 * 6 * (8 * (8 + 8) + 2 * 8 * 8) + 2 * 48 == 3168
    assert pruned.state_bytes == (6 * 8 * 8 + 80 * 4) * FP32


def test_linear_flops_are_twice_the_linear_weights_of_the_extracted_model():
    model = mamba2()
    adapter = adapter_for(model)
    p = plan("head:0:1", "head:0:5", "ssm:1")
    est = estimate(model, p)
    extracted = adapter.extract(p)
    linear_weights = sum(m.weight.numel() for m in extracted.modules() if isinstance(m, torch.nn.Linear))
    assert sum(c.linear for c in est.layers) + est.other.linear == 2 * linear_weights
    assert est.params == count_parameters(extracted) == adapter.param_count(p)


@pytest.mark.parametrize("make", [mamba1, mamba2], ids=["mamba1", "mamba2"])
def test_removing_a_block_removes_exactly_that_layers_share(make):
    model = make()
    full = estimate(model, seq_len=64)
    for layer in range(len(full.layers)):
        est = estimate(model, plan(f"block:{layer}"), seq_len=64)
        gone = full.layers[layer]
        assert est.flops_per_token_prefill == full.flops_per_token_prefill - gone.flops_prefill
        assert est.flops_per_token_decode == full.flops_per_token_decode - gone.flops_decode
        assert est.state_bytes_per_sequence == full.state_bytes_per_sequence - gone.state_bytes
        assert est.params == full.params - gone.params
        assert est.layers[layer].removed and est.layers[layer].flops_prefill == 0
        others = [i for i in range(len(full.layers)) if i != layer]
        assert [est.layers[i].flops_prefill for i in others] == [full.layers[i].flops_prefill for i in others]


def test_removing_an_ssm_frees_its_state():
    m1 = mamba1()
    full, est = estimate(m1), estimate(m1, plan("ssm:1"))
    # Mamba-1 keeps its conv (and its conv state): exactly the SSM state D * N goes
    assert full.state_bytes_per_sequence - est.state_bytes_per_sequence == 64 * 8 * FP32
    assert est.layers[1].conv_state_bytes == full.layers[1].conv_state_bytes

    m2 = mamba2()
    full, est = estimate(m2), estimate(m2, plan("ssm:0"))
    # Mamba-2 loses the SSM state H*P*N and the conv channels that only fed B and C (2 * G * N)
    assert full.state_bytes_per_sequence - est.state_bytes_per_sequence == (8 * 8 * 8 + 2 * 2 * 8 * 4) * FP32
    assert est.layers[0].ssm_state_bytes == 0 and est.layers[0].scan_prefill == est.layers[0].scan_decode == 0


@pytest.mark.skipif("NemotronHForCausalLM" not in available(), reason="no Nemotron-H adapter yet")
def test_attention_scores_and_kv_cache_grow_with_the_context():
    model = make_model("NemotronHForCausalLM")  # attention: 4 query heads, 2 kv heads, head_dim 8
    attention_layer = next(i for i, kind in enumerate(adapter_for(model).layer_kind(i) for i in range(6))
                           if kind == "attention")
    for seq_len in (16, 100):
        layer = estimate(model, seq_len=seq_len).layers[attention_layer]
        q = 4 * 8
        assert layer.attention_prefill == 2 * q * (seq_len + 1)  # mean over positions t of 4*q*t
        assert layer.attention_decode == 4 * q * seq_len
        assert layer.kv_cache_bytes == seq_len * (2 * 8 + 2 * 8) * FP32
        # q, k, v, o projections: 32 -> 32, 16, 16 and 32 -> 32
        assert layer.linear == 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32)


def test_expected_speedup():
    model = mamba2()
    assert expected_speedup(model, PruningPlan()) == 1.0
    assert expected_speedup(model, None) == 1.0
    full = estimate(model)
    assert expected_speedup(model, plan("block:0")) == pytest.approx(
        full.flops_per_token_prefill / (full.flops_per_token_prefill - full.layers[0].flops_prefill))


def test_state_bytes_follow_the_dtype_and_batch():
    model = mamba1()
    fp32 = estimate(model, batch_size=3)
    bf16 = estimate(model.to(torch.bfloat16), batch_size=3)
    assert bf16.state_bytes_per_sequence * 2 == fp32.state_bytes_per_sequence
    assert fp32.state_bytes == 3 * fp32.state_bytes_per_sequence
    assert bf16.flops_per_token_prefill == fp32.flops_per_token_prefill


@pytest.mark.parametrize("arch", list(TINY))
def test_estimate_of_a_plan_equals_estimate_of_the_extracted_model(arch):
    """The meta-device skeleton the estimate uses is the structure extraction really builds,
    for every family and a plan mixing every kind it offers (uneven shapes included)."""
    if arch not in available():
        pytest.skip(f"no adapter for {arch} yet")
    model = make_model(arch)
    adapter = adapter_for(model)
    p = plan_named(adapter, "mixed")
    planned = estimate(model, p, seq_len=24)
    extracted = adapter.extract(p)
    actual = estimate(extracted, seq_len=24)
    assert planned.params == actual.params == count_parameters(extracted)
    assert planned.flops_per_token_prefill == actual.flops_per_token_prefill
    assert planned.flops_per_token_decode == actual.flops_per_token_decode
    assert planned.state_bytes_per_sequence == actual.state_bytes_per_sequence
    assert planned.flops_per_token_prefill < estimate(model, seq_len=24).flops_per_token_prefill
    assert sum(not c.removed for c in planned.layers) == len(adapter_for(extracted).layers())


def test_bench_reports_measured_next_to_expected(tmp_path):
    """The speed benchmark runs end to end on a saved tiny model (figures not asserted: no timing
    assertions) and reports the cost model's numbers for the same plan."""
    from transformers import AutoTokenizer

    from shedder.formats import bench as named
    from shedder.formats.extract import save
    from shedder.formats.loading import REPO_ROOT
    from shedder.measure import bench

    model = mamba2()
    model.config.use_cache = False  # as training configs often save it: the benchmark must still use the cache
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "assets" / "tokenizer")
    save(model, tokenizer, tmp_path / "m")
    p = plan("block:1", "head:0:0", "head:0:4")
    result = named.bench_speed(str(tmp_path / "m"), plan=p, seq_len=16, new_tokens=3, memory=False,
                               protocol=Protocol(budget_s=0.01, min_rounds=2, warmup=0))
    assert result["expected_prefill_speedup"] == pytest.approx(expected_speedup(model, p, seq_len=16))
    assert result["ratios"]["params"] == pytest.approx(estimate(model, p).params / estimate(model).params)
    assert result["pruned"]["disk_bytes"] < result["original"]["disk_bytes"]
    for name in ("original", "pruned"):
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms"):
            s = result[name][key]
            assert s["n"] == 2 and 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert result["original"]["decode_with_cache"] and result["pruned"]["decode_with_cache"]
    for phase in ("prefill", "decode"):
        m = result[f"measured_{phase}_speedup"]
        assert set(m) == {"median", "ci95", "rounds", "noisy", "resolved"} and m["rounds"] == 2
        assert m["ci95"][0] <= m["median"] <= m["ci95"][1] and m["noisy"] and not m["resolved"]  # 2 rounds: no interval
        assert result[f"expected_{phase}_speedup"] == result["expected"][f"{phase}_flops"]
        assert 0 <= result["expected"]["outside_layers_share"][phase] < 1
    assert result["expected"]["decode_weight_bytes"] == pytest.approx(1 / result["ratios"]["params"])
    report = bench.format_report(result)
    assert "prefill speedup: " + bench.speedup_text(result["measured_prefill_speedup"]) in report
    assert "2 rounds (noisy, not resolved)" in report and "(per model)" in report

    probe = named.memory_probe({"model_dir": str(tmp_path / "m"), "batch_size": 1, "seq_len": 16,
                                 "new_tokens": 3, "use_cache": True, "dtype": "float32", "seed": 0})
    assert probe["peak_bytes"] >= probe["peak_bytes"] - probe["delta_bytes"] > probe["weights_bytes"] > 0


def test_bench_needs_exactly_one_of_plan_or_pruned_model():
    from shedder.formats import bench
    from shedder.core.errors import ShedderError

    with pytest.raises(ShedderError, match="exactly one"):
        bench.bench_speed("mamba2-tiny")
    with pytest.raises(ShedderError, match="exactly one"):
        bench.bench_speed("mamba2-tiny", plan=PruningPlan(), pruned_dir="somewhere")
