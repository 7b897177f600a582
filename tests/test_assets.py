"""The bundled models, tokenizer and text load offline and still score what their cards say.

Perplexity is recomputed here with a standalone helper (not ``shedder.dev.train``), on the first
``check_windows`` non-overlapping 256-token windows of ``assets/data/test.txt``, and must match the
``check_ppl`` recorded in each model's ``shedder_card.json`` to within 1%. A wrong tokenizer,
corrupted or re-initialised weights, or an edited test file moves it far outside that range.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODELS = ("mamba2-tiny", "mamba1-tiny", "hybrid-tiny")
EXPECTED_CLASS = {
    "mamba2-tiny": "Mamba2ForCausalLM",
    "mamba1-tiny": "MambaForCausalLM",
    "hybrid-tiny": "NemotronHForCausalLM",
}
REL_TOL = 0.01


def window_perplexity(model, ids: list[int], seq_len: int, n_windows: int) -> float:
    """exp(mean next-token NLL) over the first n non-overlapping windows of seq_len tokens."""
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(input_ids=batch).logits[:, :-1]
            targets = batch[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def test_text() -> str:
    return (ASSETS / "data" / "test.txt").read_text(encoding="utf-8")


def load(name: str):
    path = ASSETS / "models" / name
    card = json.loads((path / "shedder_card.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer, card


@pytest.mark.parametrize("name", MODELS)
def test_model_loads_offline_and_matches_its_card(name, test_text):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer, card = load(name)
    assert type(model).__name__ == EXPECTED_CLASS[name]
    assert model.config.num_hidden_layers >= 8
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tied == (name != "hybrid-tiny"), "Mamba families tie the LM head; Nemotron-H cannot"
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert (ASSETS / "models" / name / "model.safetensors").stat().st_size < 12.5e6

    ids = tokenizer(test_text, add_special_tokens=False)["input_ids"]
    assert len(ids) == card["test_tokens"], "tokenizer differs from the one the model was evaluated with"
    ppl = window_perplexity(model, ids, card["seq_len"], card["check_windows"])
    assert ppl == pytest.approx(card["check_ppl"], rel=REL_TOL)
    # The recorded full-split result is a trained model, well below the unigram baseline.
    assert card["test_ppl"] < card["unigram_ppl"] / 3


def test_check_fails_for_damaged_weights(test_text):
    """The range above is tight enough to catch a damaged model (here: two swapped layers)."""
    model, tokenizer, card = load("mamba2-tiny")
    layers = model.backbone.layers
    layers[0], layers[1] = layers[1], layers[0]
    ids = tokenizer(test_text, add_special_tokens=False)["input_ids"]
    ppl = window_perplexity(model, ids, card["seq_len"], card["check_windows"])
    assert ppl > card["check_ppl"] * (1 + 10 * REL_TOL)


def test_saved_mamba1_config_needs_no_training_scan():
    config = json.loads((ASSETS / "models" / "mamba1-tiny" / "config.json").read_text())
    assert config["use_mambapy"] is False


def test_hybrid_layers_are_single_sub_blocks():
    config = json.loads((ASSETS / "models" / "hybrid-tiny" / "config.json").read_text())
    kinds = config["layers_block_type"]
    assert len(kinds) >= 10
    assert set(kinds) == {"linear_attention", "full_attention", "mlp"}
    assert config["n_groups"] > 1


def test_shared_tokenizer_matches_every_model():
    shared = (ASSETS / "tokenizer" / "tokenizer.json").read_text()
    for name in MODELS:
        assert (ASSETS / "models" / name / "tokenizer.json").read_text() == shared
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer", local_files_only=True)
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "It is a truth universally acknowledged, that a single man..."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_bundled_text_is_small_and_large_enough():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer", local_files_only=True)
    for split in ("calibration", "test"):
        path = ASSETS / "data" / f"{split}.txt"
        assert path.stat().st_size <= 300_000
        n_tokens = len(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
        assert n_tokens >= 64 * 256, f"{split}.txt holds fewer than 64 windows of 256 tokens"


def test_training_scan_matches_stock_mamba1_forward_and_gradients():
    """Mamba-1 was trained with ``shedder.dev.train_scan``; it must compute what the saved model computes."""
    from shedder.dev.train_scan import SelectiveScan, training_scan

    model, _, _ = load("mamba1-tiny")
    ids = torch.arange(2 * 48).view(2, 48) % model.config.vocab_size
    with torch.no_grad():
        stock = model(input_ids=ids, use_cache=False).logits
        with training_scan():
            trained = model(input_ids=ids, use_cache=False).logits
    assert (stock - trained).abs().max().item() < 1e-4

    torch.manual_seed(0)
    L, b, d, n = 5, 2, 3, 4
    args = (torch.randn(L, b, d), torch.rand(L, b, d), -torch.rand(d, n), torch.randn(L, b, n), torch.randn(L, b, n))
    args = tuple(a.double().requires_grad_() for a in args)
    assert torch.autograd.gradcheck(SelectiveScan.apply, args)
