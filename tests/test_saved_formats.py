"""Saved pruned models are a file format: every model a release wrote keeps loading, with the logits
it computed when it was saved. ``tests/fixtures/schema1`` holds tiny models of every family written
by the release that defined schema 1 of ``config.json``'s ``shedder`` section (``generate.py`` there
says how)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from adapter_checks import TOL
from safetensors.torch import load_file

from shedder.core.errors import ModelLoadError
from shedder.formats.extract import saved_plan
from shedder.formats.loading import REPO_ROOT, load_model

SCHEMA1 = Path(__file__).parent / "fixtures" / "schema1"
FIXTURES = sorted(p.name for p in SCHEMA1.iterdir() if (p / "config.json").is_file())


def test_every_family_has_a_schema1_fixture():
    assert len(FIXTURES) >= 7


@pytest.mark.parametrize("name", FIXTURES)
def test_schema1_models_load_with_identical_logits(name, tmp_path):
    model_dir = tmp_path / name
    shutil.copytree(SCHEMA1 / name, model_dir)
    for f in (REPO_ROOT / "assets" / "tokenizer").iterdir():  # load_model also loads a tokenizer
        shutil.copy(f, model_dir / f.name)
    expected = load_file(str(SCHEMA1 / name / "expected.safetensors"))
    model, _ = load_model(str(model_dir))
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    # The same tolerance as masked == extracted: the logits were saved by a process with another
    # thread count, which sums in another order.
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=TOL)
    assert saved_plan(model_dir).components


# ---------------------------------------------------------------------------- edited or broken sections
def _edited(tmp_path, edit):
    """The uneven Mamba-2 fixture (with a tokenizer) whose config.json's shedder section ``edit`` changed."""
    model_dir = tmp_path / "model"
    shutil.copytree(SCHEMA1 / "mamba2-uneven-heads", model_dir)
    for f in (REPO_ROOT / "assets" / "tokenizer").iterdir():
        shutil.copy(f, model_dir / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def _set(value):
    def edit(config):
        config["shedder"] = value
    return edit


def _set_layer(field, value):
    def edit(config):
        config["shedder"]["layers"][0][field] = value
    return edit


BROKEN = {
    "a list": (_set([1, 2]), "shedder must be an object"),
    "a string": (_set("uneven"), "shedder must be an object"),
    "a string flag": (_set_layer("ssm", "yes"), "shedder.layers[0].ssm"),
    "a bool as a count": (_set_layer("heads_per_group", [True, 4]), "shedder.layers[0].heads_per_group"),
    "an unknown field": (_set_layer("colour", 1), "shedder.layers[0].colour"),
    "a huge head count": (_set_layer("heads_per_group", [1000000, 4]), "shedder.layers[0].heads_per_group[0]"),
    "too many layers": (lambda c: c["shedder"]["layers"].append({}), "shedder.layers describes 4 layers"),
    "a future version": (lambda c: c["shedder"].update(schema_version=99), "shedder.schema_version"),
    "deleted": (lambda c: c.pop("shedder"), "model.safetensors: backbone.layers.0.mixer"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_shedder_section_is_one_clear_error(case, tmp_path):
    edit, words = BROKEN[case]
    model_dir = _edited(tmp_path, edit)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(model_dir))
    assert words in str(info.value)
    assert "config.json" in str(info.value)


def test_loading_in_bfloat16_sets_no_process_wide_default(tmp_path):
    model_dir = _edited(tmp_path, lambda config: None)
    model, _ = load_model(str(model_dir), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
