"""Shared fixtures: the bundled tokenizer and tiny random models of each family."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import transformers

from adapter_checks import spread_around_init

from shedder.formats.loading import REPO_ROOT


_CONFIGS = {
    "mamba2": lambda layers, vocab: transformers.Mamba2Config(
        hidden_size=32, num_heads=4, head_dim=16, expand=2, n_groups=2, state_size=8, chunk_size=8,
        num_hidden_layers=layers, vocab_size=vocab, conv_kernel=4, eos_token_id=None),
    "mamba1": lambda layers, vocab: transformers.MambaConfig(
        hidden_size=32, state_size=8, intermediate_size=64, num_hidden_layers=layers, vocab_size=vocab,
        use_mambapy=False, eos_token_id=None),
    "nemotron_h": lambda layers, vocab: transformers.NemotronHConfig(
        hidden_size=32, vocab_size=vocab, layers_block_type=(["mamba", "attention", "mamba", "mlp"] * layers)[:layers],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8, max_position_embeddings=64, eos_token_id=None),
}


def make_tiny_model(family: str, layers: int = 4, vocab_size: int = 128, seed: int = 0):
    """A tiny random fp32 ``family`` model ('mamba2', 'mamba1', 'nemotron_h') in eval mode."""
    config = _CONFIGS[family](layers, vocab_size)
    torch.manual_seed(seed)
    cls = {"mamba2": transformers.Mamba2ForCausalLM, "mamba1": transformers.MambaForCausalLM,
           "nemotron_h": transformers.NemotronHForCausalLM}[family]
    model = cls(config).eval()
    spread_around_init(model)
    return model


@pytest.fixture(scope="session")
def tiny_model_factory():
    """``make(family, layers=4, vocab_size=128, seed=0)`` -> a tiny random model."""
    return make_tiny_model


@pytest.fixture(scope="session")
def bundled_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(REPO_ROOT / "assets" / "tokenizer")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer):
    """A saved tiny Mamba-2 (bundled tokenizer's vocabulary) that ``load_model`` and the CLI can open."""
    out = tmp_path_factory.mktemp("tiny-mamba2")
    make_tiny_model("mamba2", layers=3, vocab_size=len(bundled_tokenizer)).save_pretrained(out)
    bundled_tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def lock_held_by_another_process(lock_file):
    """Another process holds ``shedder.core.fileio.exclusive`` on ``lock_file`` for the block."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
from shedder.core.fileio import exclusive
with exclusive({str(lock_file)!r}, "run"):
    print("held", flush=True)
    input()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("\n")
