"""Every tiny random model the tests build, in one table (``shedder.dev.realshape`` keeps the real
shapes of public checkpoints; these are the few-thousand-parameter models a CPU test runs in
milliseconds).

``TINY`` holds one model per family for the adapter contract (``adapter_contract.py``) and each
``test_arch_<family>.py``: widths that make every kind removable several ways, hybrids with every
layer type, weights spread so that every removal visibly changes the logits. ``SUITE`` holds the
models the conftest fixtures give the rest of the suite (``make_tiny_model``), which take a layer
count and a vocabulary size; ``GENERATION`` those of ``test_generation.py``, one per architecture.
Build with ``TINY[name].build(seed, **config_overrides)``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers


# ---------------------------------------------------------------------------- weight spreading
def spread(model, std: float = 0.3, keep: tuple[str, ...] = ("A_log", "norm.weight")) -> None:
    """Redraw every weight (except names ending in ``keep``) from N(0, std): large enough that every
    removal visibly changes the logits and greedy decoding does not collapse to one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(keep):
                p.normal_(0.0, std)


def spread_around_init(model) -> None:
    """Perturb A, D, dt_bias and norm weights around their init and redraw the other weights from
    N(0, 0.2) (Mamba-2 style mixers, whose SSM parameters have a meaningful init)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith(("weight", "up_proj", "down_proj")) and "gate" not in name:
                p.normal_(0.0, 0.2)


def random_model(model_cls, config, seed: int = 0, init=spread):
    """``model_cls(config)`` in eval mode, with weights drawn after ``torch.manual_seed(seed)`` and
    then spread by ``init`` (``spread`` or ``spread_around_init``)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    init(model)
    return model


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class TinyModel:
    """One tiny configuration: its classes, its values, how its weights are spread and (for models
    built at several depths) how a layer count is written into the config."""

    config_cls: type
    model_cls: type
    values: dict
    init: Callable = spread
    depth: Callable[[int], dict] = field(default=lambda layers: {"num_hidden_layers": layers})

    def config(self, layers: int | None = None, **overrides):
        values = dict(self.values)
        if layers is not None:
            values.update(self.depth(layers))
        return self.config_cls(**{**values, **overrides})

    def build(self, seed: int = 0, layers: int | None = None, **overrides):
        return random_model(self.model_cls, self.config(layers, **overrides), seed, init=self.init)


#: Nemotron-H's contract model: every layer type (one attention, dense MLPs and an MoE).
NEMOTRON_H_PATTERN = ["mamba", "attention", "mamba", "mlp", "moe", "mamba", "mlp"]
#: Zamba2's contract model: three applications of two memory blocks (used in turn: 0, 1, 0).
ZAMBA2_LAYER_TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]
#: Zamba's contract model: three applications of its one shared block.
ZAMBA_LAYER_TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]

TINY: dict[str, TinyModel] = {
    # hidden 32, 64 inner channels = 4 groups of 16, state 8
    "mamba": TinyModel(transformers.MambaConfig, transformers.MambaForCausalLM, dict(
        hidden_size=32, expand=2, state_size=8, num_hidden_layers=4, vocab_size=100),
        init=functools.partial(spread, keep=("A_log", "norm.weight", "norm_f.weight"))),
    "falcon_mamba": TinyModel(transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM, dict(
        hidden_size=32, expand=2, state_size=8, num_hidden_layers=4, vocab_size=100),
        init=functools.partial(spread, keep=("A_log", "norm.weight", "norm_f.weight"))),
    # hidden 64, 8 heads of 16 channels, state 8, chunk 8 (n_groups set per test: 1, 2 or 4)
    "mamba2": TinyModel(transformers.Mamba2Config, transformers.Mamba2ForCausalLM, dict(
        hidden_size=64, num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=8, chunk_size=8,
        num_hidden_layers=4, vocab_size=100, conv_kernel=4,
        eos_token_id=None),  # greedy decoding must not stop (or be kept from stopping) early
        init=spread_around_init),
    # MLP 96 channels (3 groups of 32 in the tests), MoE with 4 experts, top 2
    "nemotron_h": TinyModel(transformers.NemotronHConfig, transformers.NemotronHForCausalLM, dict(
        hidden_size=64, vocab_size=100, layers_block_type=NEMOTRON_H_PATTERN, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16,
        n_groups=2, ssm_state_size=8, chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, max_position_embeddings=64,
        eos_token_id=None), init=spread_around_init),
    # mamba, attention, mamba, attention, mamba; 2 B/C groups of 4 heads; MLP 64 = 8 groups of 8
    "bamba": TinyModel(transformers.BambaConfig, transformers.BambaForCausalLM, dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, tie_word_embeddings=False, eos_token_id=None)),
    # q/k/v adapters and RoPE on, 2 B/C groups of 4 heads, chunk 8
    "zamba2": TinyModel(transformers.Zamba2Config, transformers.Zamba2ForCausalLM, dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        layers_block_type=ZAMBA2_LAYER_TYPES, n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=8, chunk_size=8,
        num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
        eos_token_id=None)),
    # 2 Mamba heads of 32 channels (8 channel groups of 8), MLP 64, attention 4 heads over [h, embeddings]
    "zamba": TinyModel(transformers.ZambaConfig, transformers.ZambaForCausalLM, dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=4, layers_block_type=ZAMBA_LAYER_TYPES, n_mamba_heads=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, eos_token_id=None)),
    # 3 hybrid layers; gated RMSNorm before the gate; every muP multiplier away from 1
    "falcon_h1": TinyModel(transformers.FalconH1Config, transformers.FalconH1ForCausalLM, dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=True,
        tie_word_embeddings=False, eos_token_id=None,
        embedding_multiplier=1.5, lm_head_multiplier=0.7, mlp_multipliers=[0.8, 1.3], key_multiplier=1.2,
        attention_in_multiplier=0.9, attention_out_multiplier=1.4, ssm_multipliers=[0.6, 1.3, 0.8, 1.2, 0.9],
        ssm_in_multiplier=1.1, ssm_out_multiplier=0.75)),
    # mamba, attention, mamba, attention, mamba; MoE (3 experts, top 2) on layers 1 and 4
    "jamba": TinyModel(transformers.JambaConfig, transformers.JambaForCausalLM, dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3,
        expert_layer_offset=1, num_experts=3, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=4, tie_word_embeddings=False, eos_token_id=None)),
}

#: Granite 4.0-H's contract models: mamba, attention, mamba, attention, mamba; every multiplier away from 1.
GRANITE_LAYER_TYPES = ["mamba", "attention", "mamba", "attention", "mamba"]
_GRANITE = dict(
    vocab_size=100, hidden_size=32, num_hidden_layers=5, layer_types=GRANITE_LAYER_TYPES, num_attention_heads=4,
    num_key_value_heads=2, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8,
    shared_intermediate_size=64, intermediate_size=16, embedding_multiplier=1.5, residual_multiplier=0.7,
    attention_multiplier=0.3, logits_scaling=1.3, tie_word_embeddings=False, eos_token_id=None)
#: MoE (4 experts of 16 channels, top 2) beside a 64-channel shared MLP, no RoPE (as published);
#: dense: the shared MLP alone, with RoPE.
TINY["granite_moe"] = TinyModel(transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM, dict(
    _GRANITE, num_local_experts=4, num_experts_per_tok=2))
TINY["granite_dense"] = TinyModel(transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM, dict(
    _GRANITE, num_local_experts=0, num_experts_per_tok=0, position_embedding_type="rope"))

#: The conftest fixtures' models (``make_tiny_model(family, layers, vocab_size)``).
SUITE: dict[str, TinyModel] = {
    "mamba2": TinyModel(transformers.Mamba2Config, transformers.Mamba2ForCausalLM, dict(
        hidden_size=32, num_heads=4, head_dim=16, expand=2, n_groups=2, state_size=8, chunk_size=8,
        conv_kernel=4, eos_token_id=None), init=spread_around_init),
    "mamba1": TinyModel(transformers.MambaConfig, transformers.MambaForCausalLM, dict(
        hidden_size=32, state_size=8, intermediate_size=64, use_mambapy=False, eos_token_id=None),
        init=spread_around_init),
    "nemotron_h": TinyModel(transformers.NemotronHConfig, transformers.NemotronHForCausalLM, dict(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8,
        max_position_embeddings=64, eos_token_id=None), init=spread_around_init,
        depth=lambda layers: {"layers_block_type": (["mamba", "attention", "mamba", "mlp"] * layers)[:layers]}),
}


#: ``test_generation.py``'s models, one per architecture: (config class, keyword arguments; the
#: test adds the vocabulary, special tokens and untied embeddings). Hybrids get every
#: layer type at least twice so that each kind has a choice of layers.
GENERATION = {
    "MambaForCausalLM": (transformers.MambaConfig, dict(
        hidden_size=32, num_hidden_layers=4, state_size=8, expand=2, conv_kernel=4, use_mambapy=False)),
    "FalconMambaForCausalLM": (transformers.FalconMambaConfig, dict(
        hidden_size=32, num_hidden_layers=4, state_size=8, expand=2, conv_kernel=4, use_mambapy=False)),
    "Mamba2ForCausalLM": (transformers.Mamba2Config, dict(
        hidden_size=32, num_hidden_layers=4, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=8,
        chunk_size=8, conv_kernel=4)),
    "NemotronHForCausalLM": (transformers.NemotronHConfig, dict(
        hidden_size=32, layers_block_type=["mamba", "mlp", "attention", "mamba", "attention", "mlp"],
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, expand=2, chunk_size=8, conv_kernel=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=128, mlp_hidden_act="relu2")),
    "BambaForCausalLM": (transformers.BambaConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
        mamba_chunk_size=8)),
    "Zamba2ForCausalLM": (transformers.Zamba2Config, dict(
        hidden_size=32, num_hidden_layers=5, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"],
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, chunk_size=8,
        num_attention_heads=4, intermediate_size=64, adapter_rank=4, num_mem_blocks=1)),
    "ZambaForCausalLM": (transformers.ZambaConfig, dict(
        hidden_size=32, num_hidden_layers=5, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"],
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=2, mamba_dt_rank=4, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64)),
    "FalconH1ForCausalLM": (transformers.FalconH1Config, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_chunk_size=8)),
    "JambaForCausalLM": (transformers.JambaConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, num_experts=2,
        num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2)),
}


def make_tiny_model(family: str, layers: int = 4, vocab_size: int = 128, seed: int = 0):
    """A tiny random fp32 ``family`` model ('mamba2', 'mamba1', 'nemotron_h') in eval mode."""
    return SUITE[family].build(seed, layers, vocab_size=vocab_size)
