"""Random-weight models in the exact shapes of public checkpoints (no download).

Everything the bundled tiny models exercise is a few million parameters with a 4,096-token
vocabulary; the bugs real checkpoints hit (index precision on 38M-element embeddings, vocab-sized
logits, 8 groups, 2048-token windows, bf16) need the real shapes. ``REAL_SHAPES`` holds, per family,
the config of its smallest public checkpoint as published in its ``config.json`` (vocabulary, width,
head dim, state size, groups, chunk size, hybrid layout, tied embeddings), written down here so that
tests, ``bench scale`` and ``bench gpu-check`` need no network. ``build`` takes the first layers of
that layout (``layers``), and ``shrink`` narrows only what does not decide a bug class (MLP widths,
expert counts, Mamba heads of families whose config sets them independently), so a CI run stays small.

Weights are drawn cheaply (no ``transformers`` init, which takes half a minute on a 1B-parameter
shape): linear weights N(0, 1/fan_in), embeddings N(0, 1), norms 1, biases 0, and the SSM parameters
(``A_log``, ``D``, ``dt_bias``) in their usual ranges, so perplexities are finite and every removal
changes the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from shedder.arch.hymba_model import HymbaConfig
from shedder.formats.loading import REPO_ROOT

#: Config classes of the families whose model this engine implements (no ``transformers`` class).
_ENGINE_CONFIGS = {"HymbaConfig": HymbaConfig}


@dataclass(frozen=True)
class RealShape:
    """One family's smallest public checkpoint: its config class and published values."""

    family: str
    checkpoint: str
    config_class: str
    values: dict
    #: Keys a CI-sized build may narrow (their published values are in ``values``).
    shrink: dict = field(default_factory=dict)
    #: How the hybrid layout is cut to ``layers`` (None: ``num_hidden_layers`` is enough).
    layout_key: str | None = None

    def config(self, layers: int | None = None, small: bool = False):
        values = dict(self.values)
        if small:
            values.update(self.shrink)
        if layers is not None:
            values = _cut_layout(self, values, layers)
        cls = _ENGINE_CONFIGS.get(self.config_class) or getattr(transformers, self.config_class)
        return cls(**values)


def _cut_layout(shape: RealShape, values: dict, layers: int) -> dict:
    """The first ``layers`` layers of the published layout."""
    key = shape.layout_key
    if key in ("layers_block_type", "layer_types"):
        values[key] = values[key][:layers]
        if "num_hidden_layers" in values:
            values["num_hidden_layers"] = len(values[key])
    elif key == "kv_reuse_group":  # Hymba: global layers and KV groups within the first layers
        values["global_attn_idx"] = [i for i in values["global_attn_idx"] if i < layers]
        values[key] = [g for g in ([i for i in g if i < layers] for g in values[key]) if len(g) > 1]
        values["num_hidden_layers"] = layers
    elif key == "attn_layer_indices":
        values[key] = [i for i in values[key] if i < layers]
        values["num_hidden_layers"] = layers
    else:
        values["num_hidden_layers"] = layers
    return values


# Nemotron-H-8B: "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-" (M mamba, - MLP, * attention).
_NEMOTRON_H_8B = [{"M": "mamba", "-": "mlp", "*": "attention"}[c]
                  for c in "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"]

_GRANITE_4_H = dict(
    vocab_size=100352, hidden_size=1536, num_hidden_layers=40,
    layer_types=["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
    num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1,
    mamba_d_state=128, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, position_embedding_type="nope",
    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=6.0,
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=100257, eos_token_id=100257, pad_token_id=100256)

REAL_SHAPES: dict[str, RealShape] = {s.family: s for s in [
    RealShape("mamba", "state-spaces/mamba-130m-hf", "MambaConfig", dict(
        vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4,
        time_step_rank=48, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False)),
    RealShape("falcon_mamba", "tiiuae/falcon-mamba-7b", "FalconMambaConfig", dict(
        vocab_size=65024, hidden_size=4096, num_hidden_layers=64, state_size=16, expand=2, conv_kernel=4,
        time_step_rank=256, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, mixer_rms_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=11, pad_token_id=11, use_mambapy=False)),
    RealShape("mamba2", "state-spaces/mamba2-130m", "Mamba2Config", dict(
        vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64, num_heads=24,
        expand=2, n_groups=1, chunk_size=256, conv_kernel=4, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    RealShape("nemotron_h", "nvidia/Nemotron-H-8B-Base-8K", "NemotronHConfig", dict(
        vocab_size=131072, hidden_size=4096, layers_block_type=_NEMOTRON_H_8B, n_groups=8, ssm_state_size=128,
        mamba_num_heads=128, mamba_head_dim=64, chunk_size=128, conv_kernel=4, expand=2,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=21504,
        mlp_hidden_act="relu2", max_position_embeddings=8192, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # "M*-": layers 6..8 of the published layout (the first attention, and an MLP).
        shrink=dict(mamba_num_heads=16, intermediate_size=1024, layers_block_type=["mamba", "attention", "mlp"]),
        layout_key="layers_block_type"),
    RealShape("bamba", "ibm-ai-platform/Bamba-9B", "BambaConfig", dict(
        vocab_size=128256, hidden_size=4096, num_hidden_layers=32, attn_layer_indices=[9, 18, 27],
        mamba_n_heads=128, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128, mamba_chunk_size=256,
        mamba_d_conv=4, mamba_expand=2, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=128001),
        shrink=dict(intermediate_size=1024, attn_layer_indices=[1]), layout_key="attn_layer_indices"),
    RealShape("zamba2", "Zyphra/Zamba2-1.2B", "Zamba2Config", dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=38,
        layers_block_type=["hybrid" if i in (6, 12, 18, 24, 30, 36) else "mamba" for i in range(38)],
        mamba_d_state=128, n_mamba_heads=64, mamba_ngroups=1, mamba_expand=2, mamba_d_conv=4, chunk_size=256,
        num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192, num_mem_blocks=1,
        use_shared_attention_adapter=True, adapter_rank=128, use_mem_rope=True, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # layers 5 and 6 of the published layout: a Mamba layer, then the first hybrid one.
        shrink=dict(intermediate_size=1024, layers_block_type=["mamba", "hybrid"], num_hidden_layers=2),
        layout_key="layers_block_type"),
    # Zyphra/Zamba2-2.7B(-Instruct-v2) config.json: two shared blocks (ABAB) over nine hybrid layers; the
    # released Mamba-Shedder configs narrow the MLP of each of those nine applications.
    RealShape("zamba2_2.7b", "Zyphra/Zamba2-2.7B", "Zamba2Config", dict(
        vocab_size=32000, hidden_size=2560, num_hidden_layers=54,
        layers_block_type=["hybrid" if i in (6, 12, 18, 24, 30, 36, 42, 47, 51) else "mamba" for i in range(54)],
        mamba_d_state=64, n_mamba_heads=80, mamba_headdim=64, mamba_ngroups=1, mamba_expand=2, mamba_d_conv=4,
        chunk_size=256, num_attention_heads=32, num_key_value_heads=32, intermediate_size=10240, num_mem_blocks=2,
        use_shared_attention_adapter=False, adapter_rank=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # layers 5 and 6 of the published layout: a Mamba layer, then the first hybrid one.
        shrink=dict(intermediate_size=1024, layers_block_type=["mamba", "hybrid"], num_hidden_layers=2),
        layout_key="layers_block_type"),
    RealShape("falcon_h1", "tiiuae/Falcon-H1-0.5B-Base", "FalconH1Config", dict(
        vocab_size=32784, hidden_size=1024, num_hidden_layers=36, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=2048, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_chunk_size=128, mamba_expand=2,
        mamba_rms_norm=True, mamba_norm_before_gate=False, tie_word_embeddings=False,
        lm_head_multiplier=0.0390625, embedding_multiplier=5.656854249492381, mlp_multipliers=[0.8838834764831844, 0.5859375],
        key_multiplier=0.390625, attention_in_multiplier=1.0, attention_out_multiplier=0.9375,
        ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
        max_position_embeddings=16384, bos_token_id=17, eos_token_id=11, pad_token_id=0),
        shrink=dict(intermediate_size=512)),
    RealShape("jamba", "ai21labs/AI21-Jamba-Mini-1.5", "JambaConfig", dict(
        vocab_size=65536, hidden_size=4096, num_hidden_layers=32, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1, num_experts=16, num_experts_per_tok=2,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # The first attention layer is layer 4 of the published layout; a 2-layer build puts it at
        # layer 1 (period 2, offset 1), next to an MoE layer, as the real layer 5 is.
        shrink=dict(intermediate_size=512, num_experts=4, attn_layer_period=2, attn_layer_offset=1)),
    # Granite 4.0-H: published layout and sizes as in the checkpoints' config.json (layers 5, 15, 25, 35
    # attend; no RoPE). The multipliers are Granite 4's muP-style values, not checked against the files.
    RealShape("granite", "ibm-granite/granite-4.0-h-tiny", "GraniteMoeHybridConfig", dict(_GRANITE_4_H,
        intermediate_size=512, shared_intermediate_size=1024, num_local_experts=64, num_experts_per_tok=6),
        # layers 4 and 5 of the published layout: a Mamba layer, then the first attention one.
        shrink=dict(intermediate_size=128, shared_intermediate_size=256, num_local_experts=8,
                    layer_types=["mamba", "attention"]), layout_key="layer_types"),
    RealShape("granite_dense", "ibm-granite/granite-4.0-h-1b", "GraniteMoeHybridConfig", dict(_GRANITE_4_H,
        intermediate_size=4096, shared_intermediate_size=4096, num_local_experts=0, num_experts_per_tok=0),
        shrink=dict(shared_intermediate_size=512, layer_types=["mamba", "attention"]), layout_key="layer_types"),
    # Hymba-1.5B-Base (its config.json; the model is ``shedder.arch.hymba_model``). Layers 0..2 of
    # the layout: the first global layer and the first KV group (producer 1, consumer 2).
    RealShape("hymba", "nvidia/Hymba-1.5B-Base", "HymbaConfig", dict(
        vocab_size=32001, hidden_size=1600, num_hidden_layers=32, intermediate_size=5504, num_attention_heads=25,
        num_key_value_heads=5, mamba_expand=2, mamba_d_state=16, mamba_d_conv=4, mamba_dt_rank=100,
        mamba_conv_bias=True, mamba_proj_bias=False, mamba_inner_layernorms=True, rms_norm_eps=1e-6,
        num_memory_tokens=128, memory_tokens_interspersed_every=0, sliding_window=1024, global_attn_idx=[0, 15, 31],
        kv_reuse_group=[[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18], [19, 20],
                        [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]],
        rope=True, rope_theta=10000.0, rope_type="ntk", orig_max_position_embeddings=2048,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        shrink=dict(intermediate_size=512), layout_key="kv_reuse_group"),
]}

FAMILIES = tuple(REAL_SHAPES)


@torch.no_grad()
def fill(model, seed: int = 0) -> None:
    """Draw every weight cheaply in the ranges described in the module docstring. A matrix of more
    than ``_BLOCK_ROWS`` rows repeats one random block, rolled by a different amount per repeat,
    which is ten times faster than drawing a billion numbers and still gives every row its own values."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.isdigit():  # a ParameterList entry (Hymba's ``A_log.0``, ``D.0``)
            leaf = name.rsplit(".", 2)[-2]
        if leaf == "A_log":
            p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
        elif leaf == "D":
            p.fill_(1.0)
        elif leaf == "dt_bias" or name.endswith(("dt_proj.bias", "dt_proj.0.bias")):
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif p.dim() == 1:
            p.fill_(1.0 if "norm" in name and leaf == "weight" else 0.0)
        else:
            _fill_matrix(p, gen)
    model.tie_weights()


_BLOCK_ROWS = 1024


def _fill_matrix(p: torch.Tensor, gen: torch.Generator) -> None:
    """``p`` [rows, ...] drawn from N(0, 1/fan_in) (embeddings [vocab, hidden] too: logits of O(1))."""
    rows = p.shape[0]
    std = 1.0 / math.sqrt(p[0].numel())
    block = (torch.randn((min(rows, _BLOCK_ROWS), *p.shape[1:]), generator=gen) * std).to(p.dtype)
    for k, start in enumerate(range(0, rows, _BLOCK_ROWS)):
        part = p[start:start + _BLOCK_ROWS]
        part.copy_(block[: len(part)].roll(k, dims=-1) if k else block[: len(part)])


def build(family: str, layers: int | None = None, small: bool = False, dtype=torch.float32, seed: int = 0):
    """A random-weight ``family`` model in its real shape, in eval mode (``small``: CI widths for
    the keys in ``RealShape.shrink``; ``layers``: the first layers of the published layout)."""
    return from_config(REAL_SHAPES[family].config(layers, small), dtype, seed)


def from_config(config, dtype=torch.float32, seed: int = 0):
    """A random-weight model of ``config`` (``fill``'s cheap draw), in eval mode."""
    cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    from transformers.initialization import no_init_weights

    with no_init_weights():  # uninitialised storage: ``fill`` draws every parameter below
        model = cls._from_config(config, dtype=dtype)
    fill(model, seed)
    model.config.architectures = [cls.__name__]
    return model.eval()


def tokenizer_for(vocab_size: int, base_dir: str | Path | None = None):
    """The bundled byte-level BPE tokenizer with its vocabulary filled up to ``vocab_size`` by
    tokens text never produces, so ids and vocabulary size match the model like a real checkpoint's."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = Path(base_dir or REPO_ROOT / "assets" / "tokenizer")
    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    taken = len(vocab) + len(spec.get("added_tokens", []))
    for i in range(max(0, vocab_size - taken)):
        vocab[f"<|unused_{i}|>"] = len(vocab) + len(spec.get("added_tokens", []))
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    base_tok = transformers.AutoTokenizer.from_pretrained(base)
    fast.add_special_tokens({k: v for k, v in base_tok.special_tokens_map.items() if isinstance(v, str)})
    if fast.pad_token is None:
        fast.pad_token = fast.eos_token
    return fast


def save_checkpoint(model, out: str | Path, tokenizer: bool = True) -> Path:
    """Write ``model`` (from ``build``) and a matching tokenizer to ``out`` as a downloaded checkpoint
    would look; ``tokenizer=False`` leaves the tokenizer out."""
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer:
        tokenizer_for(model.config.vocab_size).save_pretrained(out)
    return out
