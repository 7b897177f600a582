"""Hymba in pure PyTorch: loads the published ``nvidia/Hymba-1.5B-Base`` checkpoint as it is.

``transformers`` has no Hymba class, and the hub's remote code needs the mamba-ssm / causal-conv1d
CUDA kernels. This module is our own implementation, written from the Hymba paper (arXiv 2411.13676)
and matched to the names and semantics of the public ``modeling_hymba.py`` / ``configuration_hymba.py``
(config keys such as ``num_memory_tokens``, ``kv_reuse_group``, ``global_attn_idx``; state-dict names
such as ``model.layers.N.mamba.in_proj.weight``, ``mamba.x_proj.0.weight``, ``moe.experts.0.up_proj.weight``).
Importing it registers ``model_type`` ``"hymba"`` with ``AutoConfig`` / ``AutoModelForCausalLM``, so a
Hymba checkpoint loads without ``trust_remote_code`` (its ``auto_map`` is then ignored).

The model (shapes for Hymba-1.5B: hidden 1600, 25 attention heads of 64 / 5 key-value heads,
Mamba inner width 3200, state 16, rank 100, FFN 5504, 128 meta tokens)::

    h = [memory_tokens; embed_tokens(ids)]                 # meta tokens prepended (first forward only)
    for each layer:  n = input_layernorm(h)
        q | k | v | x | z = mamba.in_proj(n)               # one projection; a KV consumer has no k, v
        attn = softmax(rope(q) rope(k)^T / sqrt(d)) v      # global, or sliding window + meta tokens
        ssm  = selective_scan(silu(conv1d(x)), z)          # Mamba-1 scan with dt/B/C RMS norms, D, gate
        h = h + out_proj((pre_avg_layernorm1(attn) + pre_avg_layernorm2(ssm)) / 2)
        h = h + moe.experts[0](pre_moe_layernorm(h))       # SwiGLU FFN (one expert)
    logits = lm_head(final_layernorm(h)[meta tokens dropped])

Cross-layer KV sharing: a *consumer* layer (``kv_reuse_group`` ``[producer, consumer, ...]``, or
``kv_reuse_every_i_layer``) projects only queries and attends to its producer's keys and values.
Sliding-window layers (all but ``global_attn_idx``) see the last ``sliding_window`` positions and,
as the paper describes, always the meta tokens. Rotary positions count the meta tokens.

One block forward (``HymbaBlock.forward``) takes what the block keeps as arguments (attention,
SSM), so the live mask of ``shedder.arch.hymba`` and the extracted, smaller block run the same code.
Not supported (refused when a config asks): MoE with more than one expert, interspersed meta tokens,
per-head q/k norms, dynamic NTK rope, batches with padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.models.mamba import modeling_mamba as hf_mamba
from transformers.utils import ModelOutput


class HymbaConfig(transformers.PretrainedConfig):
    """The published ``config.json`` fields of Hymba (defaults: Hymba-1.5B-Base)."""

    model_type = "hymba"

    def __init__(self, vocab_size=32001, hidden_size=1600, intermediate_size=5504, num_hidden_layers=32,
                 num_attention_heads=25, num_key_value_heads=5, mamba_expand=2, mamba_d_state=16, mamba_d_conv=4,
                 mamba_dt_rank=100, mamba_conv_bias=True, mamba_proj_bias=False, mamba_inner_layernorms=True,
                 rms_norm_eps=1e-6, num_memory_tokens=128, memory_tokens_interspersed_every=0, sliding_window=1024,
                 global_attn_idx=None, kv_reuse_every_i_layer=-1, kv_reuse_group=None, rope=True,
                 rope_theta=10000.0, rope_type=None, orig_max_position_embeddings=None, max_position_embeddings=8192,
                 kq_norm="none", kq_head_dim=-1, attn_hidden_size=-1, num_experts=1, num_experts_per_tok=1,
                 mlp_hidden_act="silu", hidden_act="silu", tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.mamba_expand, self.mamba_d_state, self.mamba_d_conv = mamba_expand, mamba_d_state, mamba_d_conv
        self.mamba_dt_rank, self.mamba_conv_bias, self.mamba_proj_bias = mamba_dt_rank, mamba_conv_bias, mamba_proj_bias
        self.mamba_inner_layernorms, self.rms_norm_eps = mamba_inner_layernorms, rms_norm_eps
        self.num_memory_tokens, self.memory_tokens_interspersed_every = num_memory_tokens, memory_tokens_interspersed_every
        self.sliding_window = sliding_window
        self.global_attn_idx = list(global_attn_idx) if global_attn_idx is not None else None
        self.kv_reuse_every_i_layer = kv_reuse_every_i_layer
        self.kv_reuse_group = [list(g) for g in kv_reuse_group] if kv_reuse_group is not None else None
        self.rope, self.rope_theta, self.rope_type = rope, rope_theta, rope_type
        self.orig_max_position_embeddings, self.max_position_embeddings = orig_max_position_embeddings, max_position_embeddings
        self.kq_norm, self.kq_head_dim, self.attn_hidden_size = kq_norm, kq_head_dim, attn_hidden_size
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.mlp_hidden_act, self.hidden_act = mlp_hidden_act, hidden_act
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, **kwargs)
        unsupported = {"num_experts": num_experts != 1, "memory_tokens_interspersed_every": memory_tokens_interspersed_every > 0,
                       "kq_norm": kq_norm != "none", "rope_type": rope_type not in (None, "default", "ntk"),
                       "attn_hidden_size": attn_hidden_size not in (-1, hidden_size),
                       "kq_head_dim": kq_head_dim not in (-1, hidden_size // max(num_attention_heads, 1)),
                       "mlp_hidden_act": mlp_hidden_act != "silu", "hidden_act": hidden_act != "silu"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"Hymba config: {bad[0]}={getattr(self, bad[0])!r} is not supported by this implementation")

    def kv_sources(self) -> dict[int, int]:
        """Consumer layer -> the layer whose keys and values it attends to."""
        if self.kv_reuse_group:
            return {c: g[0] for g in self.kv_reuse_group for c in g[1:]}
        every = self.kv_reuse_every_i_layer
        if every and every > 0:
            return {i: i - i % every for i in range(self.num_hidden_layers) if i % every}
        return {}

    def is_global(self, layer: int) -> bool:
        return self.sliding_window is None or layer in (self.global_attn_idx or [])


class HymbaRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the published ``HymbaRMSNorm``)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_base(config: HymbaConfig, dim: int) -> float:
    """The rotary base; ``"ntk"`` scales it as the published ``LlamaRotaryEmbedding`` does."""
    base = config.rope_theta
    if config.rope_type == "ntk":
        factor = 2
        ratio = factor * config.max_position_embeddings / config.orig_max_position_embeddings - (factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    return base


def apply_rope(x, positions, base: float):
    """x: [b, heads, l, d] rotated by absolute ``positions`` [l] (rotate-half convention). The
    frequencies are computed here, not held in a buffer: a non-persistent buffer is left
    uninitialised when ``from_pretrained`` builds the model on the meta device."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=x.device).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]   # [l, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class HymbaCache:
    """Generation state: tokens seen (meta tokens included), and per layer the keys / values
    ([b, kv heads, seen, d]), the conv window ([b, inner, kernel]) and the SSM state ([b, inner, state])."""

    seen: int = 0
    kv: dict = field(default_factory=dict)
    conv: dict = field(default_factory=dict)
    ssm: dict = field(default_factory=dict)


@dataclass
class Context:
    """What every layer of one forward shares: absolute positions of the new tokens, the cache,
    and the keys / values each producing layer made in this forward (read by its consumers)."""

    positions: torch.Tensor
    cache: HymbaCache | None
    n_meta: int
    shared_kv: dict = field(default_factory=dict)


def attention_mask(q_pos, k_pos, window: int | None, n_meta: int) -> torch.Tensor:
    """[lq, lk] bool: causal; within a window of ``window`` positions, meta tokens always visible."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :] < window) | (k_pos[None, :] < n_meta)
    return allowed


class HymbaBlock(nn.Module):
    """A layer's token mixer (``layer.mamba``): attention and SSM heads in parallel on one projection.

    ``attention`` / ``ssm`` say which branch the block holds; ``kv_rows`` whether its in_proj holds
    key / value rows (a producer whose attention was removed keeps them for its consumers).
    """

    def __init__(self, config: HymbaConfig, layer_idx: int, attention: bool = True, ssm: bool = True,
                 kv_rows: bool | None = None):
        super().__init__()
        self.layer_idx, self.attention, self.ssm = layer_idx, attention, ssm
        self.kv_source = config.kv_sources().get(layer_idx)
        self.kv_rows = (self.kv_source is None) if kv_rows is None else kv_rows
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.intermediate_size = inner = int(config.mamba_expand * hidden)
        self.num_heads, self.num_kv_heads = heads, kv_heads
        self.head_dim, self.v_head_dim = hidden // heads, inner // heads
        self.ssm_state_size, self.time_step_rank, self.conv_kernel_size = config.mamba_d_state, config.mamba_dt_rank, config.mamba_d_conv
        self.window = None if config.is_global(layer_idx) else config.sliding_window
        sizes = {"q": hidden if attention else 0, "k": kv_heads * self.head_dim if self.kv_rows else 0,
                 "v": kv_heads * self.v_head_dim if self.kv_rows else 0, "x": inner if ssm else 0, "z": inner if ssm else 0}
        self.sections, start = {}, 0
        for name, size in sizes.items():
            self.sections[name] = (start, start + size)
            start += size
        eps, bias = config.rms_norm_eps, config.mamba_proj_bias
        self.in_proj = nn.Linear(hidden, start, bias=bias)
        self.out_proj = nn.Linear(inner, hidden, bias=bias)
        self.rope_base = rope_base(config, self.head_dim) if config.rope else None
        if attention:
            self.pre_avg_layernorm1 = HymbaRMSNorm(inner, eps)
        if ssm:
            self.pre_avg_layernorm2 = HymbaRMSNorm(inner, eps)
            self.conv1d = nn.Conv1d(inner, inner, config.mamba_d_conv, groups=inner, padding=config.mamba_d_conv - 1,
                                    bias=config.mamba_conv_bias)
            self.x_proj = nn.ModuleList([nn.Linear(inner, self.time_step_rank + 2 * self.ssm_state_size, bias=False)])
            self.dt_proj = nn.ModuleList([nn.Linear(self.time_step_rank, inner, bias=True)])
            A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32)[None, :].expand(inner, -1)
            self.A_log = nn.ParameterList([nn.Parameter(torch.log(A).contiguous())])
            self.D = nn.ParameterList([nn.Parameter(torch.ones(inner))])
            if config.mamba_inner_layernorms:
                self.dt_layernorm = HymbaRMSNorm(self.time_step_rank, eps)
                self.B_layernorm = HymbaRMSNorm(self.ssm_state_size, eps)
                self.C_layernorm = HymbaRMSNorm(self.ssm_state_size, eps)

    def section(self, proj, name):
        start, stop = self.sections[name]
        return proj[..., start:stop]

    def rows(self, names) -> list[int]:
        """in_proj row indices of the named sections, in order."""
        return [r for n in names for r in range(*self.sections[n])]

    def forward(self, hidden_states, context: Context, attention: bool | None = None, ssm: bool | None = None):
        """[b, l, hidden] -> ([b, l, hidden]); ``attention`` / ``ssm`` False drop that branch (the
        other alone feeds ``out_proj``, as the official masks do). Keys / values are still made for
        consumers when the block has key / value rows."""
        attention = self.attention if attention is None else attention
        ssm = self.ssm if ssm is None else ssm
        proj = self.in_proj(hidden_states)                       # [b, l, rows]
        branches = []
        kv = self.keys_values(proj, context)
        if attention:
            branches.append(self.pre_avg_layernorm1(self.attend(proj, kv, context)))
        if ssm:
            branches.append(self.pre_avg_layernorm2(self.scan(proj, context)))
        mixed = branches[0] if len(branches) == 1 else (branches[0] + branches[1]) / 2
        return self.out_proj(mixed)

    def keys_values(self, proj, context: Context):
        """(k, v) over every position seen ([b, kv heads, seen, d]): this block's own (written to the
        cache and shared with consumers), or its producer's; None when it has neither."""
        if self.kv_source is not None:
            return context.shared_kv.get(self.kv_source)
        if not self.kv_rows:
            return None
        b, l, _ = proj.shape
        k = self.section(proj, "k").view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.section(proj, "v").view(b, l, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        if self.rope_base is not None:
            k = apply_rope(k, context.positions, self.rope_base)
        cache = context.cache
        if cache is not None:
            if self.layer_idx in cache.kv:
                pk, pv = cache.kv[self.layer_idx]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
            cache.kv[self.layer_idx] = (k, v)
        context.shared_kv[self.layer_idx] = (k, v)
        return k, v

    def attend(self, proj, kv, context: Context):
        """[b, l, heads * v_head_dim]: SDPA of the rotated queries on ``kv`` (GQA repeat)."""
        if kv is None:
            raise RuntimeError(f"Hymba layer {self.layer_idx}: no keys / values from layer {self.kv_source}")
        k, v = kv
        b, l, _ = proj.shape
        q = self.section(proj, "q").view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        if self.rope_base is not None:
            q = apply_rope(q, context.positions, self.rope_base)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        k_pos = torch.arange(k.shape[2], device=q.device)
        mask = attention_mask(context.positions, k_pos, self.window, context.n_meta)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # [b, heads, l, dv]
        return out.transpose(1, 2).reshape(b, l, self.num_heads * self.v_head_dim)

    # Adapted from the published HymbaBlock.cuda_kernels_forward (its Mamba head), with the conv in
    # plain torch and the scan through transformers' Mamba-1 reference (mamba_selective_scan).
    def scan(self, proj, context: Context):
        """[b, l, inner]: ``(selective_scan(silu(conv(x))) + D x) * silu(z)``."""
        x, z = self.section(proj, "x").transpose(1, 2), self.section(proj, "z").transpose(1, 2)   # [b, I, l]
        cache, idx, l = context.cache, self.layer_idx, x.shape[-1]
        weight = self.conv1d.weight.squeeze(1)                      # [I, K]
        decode = cache is not None and idx in cache.conv and l == 1
        if decode:
            window = torch.cat([cache.conv[idx][:, :, 1:], x], dim=-1)
            cache.conv[idx] = window
            x = (window * weight).sum(-1, keepdim=True)
            if self.conv1d.bias is not None:
                x = x + self.conv1d.bias[:, None]
        else:
            if cache is not None:
                cache.conv[idx] = F.pad(x, (self.conv_kernel_size - l, 0))[..., -self.conv_kernel_size:]
            x = F.conv1d(x, self.conv1d.weight, self.conv1d.bias, padding=self.conv_kernel_size - 1,
                         groups=self.intermediate_size)[..., :l]
        x = F.silu(x)
        rank, n = self.time_step_rank, self.ssm_state_size
        dt, B, C = torch.split(self.x_proj[0](x.transpose(1, 2)), [rank, n, n], dim=-1)
        if hasattr(self, "dt_layernorm"):
            dt, B, C = self.dt_layernorm(dt), self.B_layernorm(B), self.C_layernorm(C)
        dt = (self.dt_proj[0].weight @ dt.transpose(1, 2))         # [b, I, l]
        A = -torch.exp(self.A_log[0].float())
        bias = self.dt_proj[0].bias.float()
        if decode:
            y = hf_mamba.mamba_selective_state_update(cache.ssm[idx], x[..., 0], dt[..., 0], A, B[:, 0], C[:, 0],
                                                      self.D[0], z=z[..., 0], dt_bias=bias, dt_softplus=True).unsqueeze(-1)
        else:
            out = hf_mamba.mamba_selective_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), D=self.D[0].float(), z=z,
                                                delta_bias=bias, delta_softplus=True, return_last_state=cache is not None)
            if cache is not None:
                y, cache.ssm[idx] = out
            else:
                y = out
        return y.transpose(1, 2).to(proj.dtype)


class HymbaMLP(nn.Module):
    """SwiGLU FFN: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: HymbaConfig, width: int | None = None):
        super().__init__()
        width = config.intermediate_size if width is None else width
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.intermediate_size = width

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HymbaMoE(nn.Module):
    """The published ``HymbaSparseMoeBlock`` with one expert (Hymba-1.5B): the expert alone."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.experts = nn.ModuleList([HymbaMLP(config)])

    def forward(self, x):
        return self.experts[0](x)


class HymbaDecoderLayer(nn.Module):
    """``h + mamba(input_layernorm(h))``, then ``h + moe(pre_moe_layernorm(h))``."""

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = HymbaBlock(config, layer_idx)
        self.pre_moe_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = HymbaMoE(config)

    def forward(self, hidden_states, context: Context):
        hidden_states = hidden_states + self.mamba(self.input_layernorm(hidden_states), context)
        return hidden_states + self.moe(self.pre_moe_layernorm(hidden_states))


@dataclass
class HymbaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HymbaCache | None = None


class HymbaPreTrainedModel(transformers.PreTrainedModel):
    config_class = HymbaConfig
    base_model_prefix = "model"
    _no_split_modules = ["HymbaDecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class HymbaModel(HymbaPreTrainedModel):
    def __init__(self, config: HymbaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.num_memory_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(config.num_memory_tokens, config.hidden_size))
        self.layers = nn.ModuleList([HymbaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, cache: HymbaCache | None = None):
        """[b, l] -> [b, l, hidden] (meta tokens prepended on the first forward, dropped after)."""
        h = self.embed_tokens(input_ids)
        n_meta = self.config.num_memory_tokens
        prepend = n_meta > 0 and (cache is None or cache.seen == 0)
        if prepend:
            h = torch.cat([self.memory_tokens.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)
        start = cache.seen if cache is not None else 0
        context = Context(torch.arange(start, start + h.shape[1], device=h.device), cache, n_meta)
        for layer in self.layers:
            h = layer(h, context=context)
        if cache is not None:
            cache.seen += h.shape[1]
        h = self.final_layernorm(h)
        return h[:, n_meta:] if prepend else h


class HymbaForCausalLM(HymbaPreTrainedModel, transformers.GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HymbaConfig):
        super().__init__(config)
        self.model = HymbaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own ``HymbaCache``

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, cache: HymbaCache | None = None, use_cache=None, labels=None,
                **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("this Hymba implementation does not support padded batches")
        if use_cache and cache is None:
            cache = HymbaCache()
        logits = self.lm_head(self.model(input_ids, cache)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return HymbaOutput(loss=loss, logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=None, **kwargs):
        if cache is not None and cache.seen:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}


transformers.AutoConfig.register("hymba", HymbaConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(HymbaConfig, HymbaForCausalLM, exist_ok=True)
