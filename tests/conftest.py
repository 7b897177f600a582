"""Shared fixtures: the bundled tokenizer and tiny random models of each family."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import transformers

from tiny_models import make_tiny_model

from shedder.formats.loading import REPO_ROOT


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
