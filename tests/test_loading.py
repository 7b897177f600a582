"""Loading by bundled name, directory or hub id, and the one clear message for each way it can fail."""
from __future__ import annotations

import re
import shutil

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from shedder.formats import loading
from shedder.core.errors import ModelLoadError, UnsupportedModelError


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


# ---------------------------------------------------------------------------- weights that match their config
def test_sharded_weights_are_checked_across_all_shards(tiny_model_factory, tmp_path):
    model_dir = tmp_path / "sharded"
    tiny_model_factory("mamba2", layers=2).save_pretrained(model_dir, max_shard_size="20KB")
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (model_dir / "model.safetensors.index.json").is_file()
    model, _ = loading.load_model(str(model_dir))
    assert model.config.num_hidden_layers == 2
    tensors = load_file(shards[-1])
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shards[-1], metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"1 tensor\\(s\\) the config builds are missing \\({re.escape(dropped)}\\)"):
        loading.load_model(str(model_dir))
    shards[0].unlink()
    with pytest.raises(ModelLoadError, match=f"names shard '{shards[0].name}', which is not a file"):
        loading.load_model(str(model_dir))


def test_a_hub_model_is_checked_on_its_downloaded_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_model_dir, snapshot)
    config = transformers.AutoConfig.from_pretrained(snapshot)
    monkeypatch.setattr(loading, "hub_unreachable", lambda: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda source, **kwargs: config)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda source, **kwargs: str(snapshot))
    model, _ = loading.load_model("someone/mamba-x", tokenizer=str(tiny_model_dir))
    assert model.config.num_hidden_layers == 3
    tensors = load_file(snapshot / "model.safetensors")
    tensors["backbone.layers.0.mixer.D"] = tensors["backbone.layers.0.mixer.D"].to(torch.int32)
    save_file(tensors, snapshot / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="backbone.layers.0.mixer.D is stored as I32"):
        loading.load_model("someone/mamba-x", tokenizer=str(tiny_model_dir))


def test_every_bundled_model_passes_the_checks_and_loads():
    for name in loading.bundled_models():
        model, _ = loading.load_model(name)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name
