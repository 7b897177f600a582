"""Hymba: our implementation against a slow reference from the published equations, and the adapter contract.

The tiny fp32 Hymba: 6 layers, global attention in layers 0 and 5, a 4-position sliding window in
the others, KV shared in groups [1, 2] and [3, 4], 3 meta tokens, 4 attention heads over 2
key-value heads, Mamba inner width 64 with state 4, FFN 48 channels = 8 groups of 6. Sequences of
20 tokens, so the window and the meta tokens both matter.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from adapter_checks import tokens
from adapter_contract import AdapterContract, Evaluation, FamilyCase

from shedder.arch import adapter_for
from shedder.arch.hymba_model import HymbaConfig, HymbaForCausalLM
from shedder.core.plan import Component
from shedder.formats.extract import extract
from shedder.formats.official import OfficialConfig

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, mamba_d_state=4, mamba_dt_rank=4, num_memory_tokens=3, sliding_window=4,
            global_attn_idx=[0, 5], kv_reuse_group=[[1, 2], [3, 4]], rope_type="ntk",
            orig_max_position_embeddings=16, max_position_embeddings=64, tie_word_embeddings=True)


def make_hymba(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = HymbaForCausalLM(HymbaConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms away from 1 so a forgotten one shows
            elif name.endswith("A_log.0"):
                p.copy_(torch.log(torch.rand_like(p) * 8 + 1))
            elif name.endswith("dt_proj.0.bias"):
                p.uniform_(-3, -1)
            elif name.endswith("D.0") or name.endswith("conv1d.bias"):
                p.uniform_(-1, 1)
            elif name.endswith("memory_tokens"):
                p.normal_()
    model.config.architectures = ["HymbaForCausalLM"]
    return model.eval()


# ------------------------------------------------------------------------------ slow reference
def _rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, pos, base, dim):
    """x [l, d] at positions pos [l], rotate-half."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    return x * cos + torch.cat([-x[:, dim // 2:], x[:, : dim // 2]], -1) * sin


def reference_logits(model, ids):
    """One sequence [l] -> logits [l, vocab], token by token from the Hymba equations (no batching,
    explicit softmax, conv and scan loops)."""
    c, sd = model.config, {k: v.double() for k, v in model.state_dict().items()}
    H, KV, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    inner = c.mamba_expand * c.hidden_size
    dv, N, R, K = inner // H, c.mamba_d_state, c.mamba_dt_rank, c.mamba_d_conv
    base = c.rope_theta * (2 * c.max_position_embeddings / c.orig_max_position_embeddings - 1) ** (d / (d - 2))
    h = torch.cat([sd["model.memory_tokens"], sd["model.embed_tokens.weight"][ids]])
    L, M = h.shape[0], c.num_memory_tokens
    pos = torch.arange(L)
    sources = {cc: g[0] for g in c.kv_reuse_group for cc in g[1:]}
    kv = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        n = _rms(h, sd[p + "input_layernorm.weight"])
        proj = n @ sd[p + "mamba.in_proj.weight"].T
        q, rest = proj[:, :c.hidden_size], proj[:, c.hidden_size:]
        if i in sources:
            k, v = kv[sources[i]]
        else:
            k, rest = rest[:, :KV * d], rest[:, KV * d:]
            v, rest = rest[:, :KV * dv], rest[:, KV * dv:]
            k = torch.stack([_rope(k[:, j * d:(j + 1) * d], pos, base, d) for j in range(KV)])
            v = torch.stack([v[:, j * dv:(j + 1) * dv] for j in range(KV)])
            kv[i] = (k, v)
        x, z = rest[:, :inner], rest[:, inner:]
        attn = torch.zeros(L, H * dv, dtype=h.dtype)
        for head in range(H):
            qh = _rope(q[:, head * d:(head + 1) * d], pos, base, d)
            g = head // (H // KV)
            for t in range(L):
                visible = [s for s in range(t + 1) if i in c.global_attn_idx or t - s < c.sliding_window or s < M]
                scores = torch.stack([qh[t] @ k[g, s] / math.sqrt(d) for s in visible])
                w = torch.softmax(scores, 0)
                attn[t, head * dv:(head + 1) * dv] = sum(w[j] * v[g, s] for j, s in enumerate(visible))
        cw, cb = sd[p + "mamba.conv1d.weight"][:, 0], sd[p + "mamba.conv1d.bias"]
        xc = torch.stack([cb + sum(cw[:, K - 1 - j] * x[t - j] for j in range(K) if t - j >= 0) for t in range(L)])
        xc = F.silu(xc)
        dbc = xc @ sd[p + "mamba.x_proj.0.weight"].T
        dt = _rms(dbc[:, :R], sd[p + "mamba.dt_layernorm.weight"])
        B = _rms(dbc[:, R:R + N], sd[p + "mamba.B_layernorm.weight"])
        C = _rms(dbc[:, R + N:], sd[p + "mamba.C_layernorm.weight"])
        delta = F.softplus(dt @ sd[p + "mamba.dt_proj.0.weight"].T + sd[p + "mamba.dt_proj.0.bias"])
        A = -torch.exp(sd[p + "mamba.A_log.0"])
        state, ys = torch.zeros(inner, N, dtype=h.dtype), []
        for t in range(L):
            state = torch.exp(delta[t][:, None] * A) * state + delta[t][:, None] * B[t][None] * xc[t][:, None]
            ys.append((state @ C[t] + sd[p + "mamba.D.0"] * xc[t]) * F.silu(z[t]))
        ssm = torch.stack(ys)
        mixed = (_rms(attn, sd[p + "mamba.pre_avg_layernorm1.weight"]) + _rms(ssm, sd[p + "mamba.pre_avg_layernorm2.weight"])) / 2
        h = h + mixed @ sd[p + "mamba.out_proj.weight"].T
        n = _rms(h, sd[p + "pre_moe_layernorm.weight"])
        e = p + "moe.experts.0."
        h = h + (F.silu(n @ sd[e + "gate_proj.weight"].T) * (n @ sd[e + "up_proj.weight"].T)) @ sd[e + "down_proj.weight"].T
    h = _rms(h, sd["model.final_layernorm.weight"])[M:]
    return h @ sd["lm_head.weight"].T


def test_model_matches_the_reference_equations():
    model = make_hymba(1)
    ids = torch.randint(0, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids[None]).logits[0].double()
    want = reference_logits(model, ids)
    assert (got - want).abs().max() < 1e-4


def test_state_dict_names_are_the_published_ones():
    names = set(make_hymba().state_dict())
    for name in ("model.memory_tokens", "model.embed_tokens.weight", "model.final_layernorm.weight",
                 "model.layers.0.mamba.in_proj.weight", "model.layers.0.mamba.x_proj.0.weight",
                 "model.layers.0.mamba.dt_proj.0.bias", "model.layers.0.mamba.A_log.0", "model.layers.0.mamba.D.0",
                 "model.layers.0.mamba.B_layernorm.weight", "model.layers.0.mamba.pre_avg_layernorm2.weight",
                 "model.layers.0.moe.experts.0.down_proj.weight", "model.layers.0.pre_moe_layernorm.weight"):
        assert name in names
    # a consumer projects q, x, z only; a producer q, k, v, x, z
    sd = make_hymba().state_dict()
    assert sd["model.layers.2.mamba.in_proj.weight"].shape[0] == 32 + 2 * 64
    assert sd["model.layers.1.mamba.in_proj.weight"].shape[0] == 32 + 2 * 8 + 2 * 16 + 2 * 64


PLANS = {
    "block": ("block:5",),
    "attention_producer": ("attention:1",),          # its keys / values still feed layer 2
    "attention_consumer": ("attention:2",),
    "attention_group": ("attention:3", "attention:4"),  # producer 3 then loses its key / value rows
    "ssm": ("ssm:3",),
    "mixer": ("mixer:2",),
    "producer_after_consumer": ("attention:2", "mixer:1"),
    "block_producer": ("attention:4", "block:3"),
    "mlp": ("mlp:0",),
    "mlp_groups": ("mlp_channel_group:1:0", "mlp_channel_group:1:5"),
    "mixed": ("block:5", "attention:1", "ssm:4", "mixer:2", "mlp:3", "mlp_channel_group:0:2"),
}

HYMBA = FamilyCase(
    name="hymba", build_tiny_model=make_hymba,
    kinds={"block": 6, "mixer": 6, "attention": 6, "ssm": 6, "mlp": 6, "mlp_channel_group": 48},
    layer_kinds=("hybrid",) * 6, plans=PLANS, saved=("mixed", "attention_group", "block"),
    restores=(PLANS["mixed"], PLANS["block_producer"]),
    generation=tuple((p, 7) for p in (PLANS["mixed"], PLANS["attention_producer"], PLANS["block_producer"],
                                      PLANS["ssm"])),
    stock=(PLANS["block"], ("mixer:2", "mlp:2")),
    refused=(
        (("mixer:1",), ("layer 1 produces the keys and values layer(s) 2",)),
        (("block:3",), ("layer(s) 4 attend to",)),
        (("attention:3", "ssm:3"), ("remove the Hymba block instead (mixer:3)",)),
        (("mixer:0", "ssm:0"), ("the mixer of layer 0 is removed as a whole",)),
        (tuple(f"mlp_channel_group:2:{g}" for g in range(8)), ("remove the layer's MLP instead (mlp:2)",)),
        (("head:0:0",), ("has no component kind 'head'",)),
    ),
    official=(({"pruned_hymba_block_idx": [2, 4], "pruned_self_attn_idx": [5], "pruned_ssm_idx": [0],
                "pruned_moe_idx": [3]}, ("mixer:2", "mixer:4", "attention:5", "ssm:0", "mlp:3")),
              ({"pruned_mlp_channels": {"1": 36}}, ("mlp_channel_group:1:6", "mlp_channel_group:1:7"))),
    component_params={"mlp:0": 3 * 32 * 48 + 32},                   # gate, up, down + pre_moe_layernorm
    evaluation=Evaluation(plans=((), PLANS["mixed"], PLANS["attention_producer"], ("ssm:2", "block:4"),
                                 PLANS["producer_after_consumer"]), seed=5, length=20, batch=3, batch_size=2, rel=1e-5),
)


class TestHymba(AdapterContract):
    case = HYMBA


def test_extracted_config_renumbers_groups_and_global_layers():
    model = make_hymba()
    small = extract(model, adapter_for(model).resolve(_plan("block:0", "attention:4", "mixer:2", "mlp:2")))
    c = small.config
    assert c.num_hidden_layers == 4            # layers 1, 3, 4, 5 stay
    assert c.kv_reuse_group is None            # 2 deleted, 4 no longer attends
    assert c.global_attn_idx == [3]


def _plan(*specs):
    from shedder.core.plan import PruningPlan
    return PruningPlan(frozenset(Component.parse(s) for s in specs))


def test_released_official_config_on_the_hymba_1_5b_layout():
    """The released ``{"pruned_hymba_block_idx": [2, 22, 15, 28, 10, 24, 26]}`` on the 32 layers of the
    published Hymba-1.5B layout (its global layers, KV groups and meta tokens; narrow widths so it
    runs in CI): it resolves, masks and extracts exactly."""
    from shedder.dev.realshape import REAL_SHAPES
    layout = {k: REAL_SHAPES["hymba"].values[k] for k in ("num_hidden_layers", "global_attn_idx", "kv_reuse_group",
                                                            "sliding_window", "num_memory_tokens")}
    model = make_hymba(2, **{**layout, "sliding_window": 8, "num_memory_tokens": 4})
    adapter = adapter_for(model)
    config = OfficialConfig.of(json.loads('{"pruned_hymba_block_idx": [2, 22, 15, 28, 10, 24, 26]}'))
    plan = adapter.resolve(config)
    assert sorted(c.layer for c in plan.components) == [2, 10, 15, 22, 24, 26, 28]
    assert {c.kind for c in plan.components} == {"mixer"}
    ids = tokens(3, 24, 2, TINY["vocab_size"])
    small = extract(model, plan)
    with torch.no_grad():
        full = model(ids).logits
        with adapter.apply(plan):
            masked = model(ids).logits
        assert (small(ids).logits - masked).abs().max() < 1e-4
        assert (full - masked).abs().max() > 1e-3
    assert adapter.param_count(plan) < adapter.param_count()


def test_a_hub_config_loads_without_remote_code(tmp_path):
    """A config.json as the hub has it (``auto_map`` to the remote code, the fields that code adds)
    loads into this implementation with ``trust_remote_code`` off: same logits."""
    from shedder.formats.loading import load_model

    model = make_hymba(3)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.update({"auto_map": {"AutoConfig": "configuration_hymba.HymbaConfig",
                                "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"},
                   "conv_dim": {str(i): 64 for i in range(6)}, "layer_type": ["h"] * 6, "num_mamba": 1,
                   "attn_implementation_new": "sdpa", "kv_weight_reuse": False, "use_mamba_kernels": True,
                   "calc_logits_for_entire_prompt": False, "v_head_dim": 16, "seq_length": 64})
    path.write_text(json.dumps(config))
    loaded, _ = load_model(str(tmp_path))
    assert type(loaded) is HymbaForCausalLM
    ids = tokens(2, 12, 2, TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="num_experts=4 is not supported"):
        HymbaConfig(**{**TINY, "num_experts": 4})


def test_weight_reorder_keeps_the_function_and_sorts_channels_by_l1_norm():
    model = make_hymba(4)
    ids = tokens(4, 12, 2, TINY["vocab_size"])
    with torch.no_grad():
        before = model(ids).logits
        assert adapter_for(model).reorder_mlp_channels() == 6
        assert (model(ids).logits - before).abs().max() < 1e-5
    ffn = model.model.layers[0].moe.experts[0]
    norms = ffn.gate_proj.weight.abs().sum(1) + ffn.up_proj.weight.abs().sum(1)
    assert torch.all(norms[:-1] >= norms[1:])


def test_cli_weight_reorder_with_official_widths(tmp_path, capsys, bundled_tokenizer):
    """``--weight-reorder`` with an official ``pruned_mlp_channels``: eval masks the reordered model,
    extract writes the same function (its perplexity equals the masked one)."""
    from shedder.cli import main

    model = make_hymba(5, vocab_size=len(bundled_tokenizer))
    model.save_pretrained(tmp_path / "m")
    bundled_tokenizer.save_pretrained(tmp_path / "m")
    plan = tmp_path / "official.json"
    plan.write_text(json.dumps({"pruned_mlp_channels": {"0": 12, "3": 24}}))
    opts = ["--model", str(tmp_path / "m"), "--plan", str(plan), "--samples", "2", "--seq-len", "16",
            "--no-accuracy", "--no-progress", "--json"]

    def ppl(*argv):
        assert main(list(argv)) == 0
        return json.loads(capsys.readouterr().out)["perplexity"]

    plain, reordered = ppl("eval", *opts), ppl("eval", *opts, "--weight-reorder")
    assert plain != reordered
    assert main(["extract", "--model", str(tmp_path / "m"), "--plan", str(plan), "--weight-reorder",
                 "--out", str(tmp_path / "x"), "--json"]) == 0
    capsys.readouterr()
    extracted = ppl("eval", "--model", str(tmp_path / "x"), "--samples", "2", "--seq-len", "16", "--no-accuracy",
                    "--no-progress", "--json")
    assert extracted == pytest.approx(reordered, rel=1e-5)
