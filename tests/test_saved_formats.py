"""Saved pruned models are a file format: every model a release wrote keeps loading, with the logits
it computed when it was saved. ``tests/fixtures/schema1`` holds tiny models of every family written
by the release that defined schema 1 of ``config.json``'s ``shedder`` section (``generate.py`` there
says how)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shedder.extract import saved_plan
from shedder.loading import REPO_ROOT, load_model

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
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    assert saved_plan(model_dir).components
