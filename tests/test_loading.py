"""Loading by bundled name, directory or hub id, and the one clear message for each way it can fail."""
from __future__ import annotations

import pytest
import transformers

from shedder import loading
from shedder.errors import ModelLoadError, UnsupportedModelError


def test_bundled_name_loads_in_eval_mode_with_its_tokenizer():
    model, tokenizer = loading.load_model("mamba2-tiny")
    assert type(model).__name__ == "Mamba2ForCausalLM" and not model.training
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size
    assert "mamba2-tiny" in loading.bundled_models()


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found: .*nope"):
        loading.load_model(str(tmp_path / "nope"))


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        loading.load_model(str(tmp_path))


def test_other_architecture_names_what_was_found_and_what_is_supported(tmp_path):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=100)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as e:
        loading.load_model(str(tmp_path))
    assert "LlamaForCausalLM is not supported" in str(e.value)
    assert "Mamba2ForCausalLM" in str(e.value) and "NemotronHForCausalLM" in str(e.value)


def test_hub_id_without_network_uses_only_the_local_cache(monkeypatch):
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        raise OSError("not in the local cache")

    monkeypatch.setattr(loading, "hub_unreachable", lambda: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError, match="cannot fetch 'someone/mamba-x' from the model hub"):
        loading.load_model("someone/mamba-x")
    assert calls == [True]  # no network attempt, no retries


def test_unknown_dtype_is_named():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        loading.parse_dtype("float8")
