"""Code adapted from ``transformers`` says which function and version it follows
(``# Adapted from transformers.<module>.<Class>.<method>, v5.24``); these tests fail when the
installed ``transformers`` no longer has that function's source, so whoever upgrades re-reads the
upstream change and ports it. (That our forwards compute what the stock mixers compute is checked
on random inputs by ``test_arch_mamba2.test_core_forward_equals_every_family_stock_mixer`` and
``test_arch_mamba1.test_core_forward_reproduces_the_stock_mixer``.)"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path

import pytest
import transformers

HEADER = re.compile(r"# Adapted from (transformers\.[\w.]+), v(\d+\.\d+)")
ARCH = Path(__file__).resolve().parent.parent / "shedder" / "arch"

#: sha256 (first 16 hex digits) of ``inspect.getsource`` of each upstream function, as of v5.24.
RECORDED = {
    "transformers.models.mamba2.modeling_mamba2.Mamba2Mixer.forward": "c215be341ddf22ff",
    "transformers.models.mamba.modeling_mamba.MambaMixer.forward": "e025d5d2ff405a0d",
    "transformers.models.falcon_h1.modeling_falcon_h1.FalconH1Mixer.forward": "d0ddba7970a9ddd1",
    "transformers.models.zamba.modeling_zamba.ZambaMambaMixer.forward": "dc6d39dacee427d1",
}


def _headers() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(ARCH.glob("*.py")):
        for name, version in HEADER.findall(path.read_text()):
            found.setdefault(name, set()).add(version)
    return found


def _source_hash(name: str) -> str:
    module, cls, method = name.rsplit(".", 2)
    source = inspect.getsource(getattr(getattr(importlib.import_module(module), cls), method))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_every_header_is_recorded_and_names_the_installed_version():
    headers = _headers()
    assert set(headers) == set(RECORDED)
    installed = ".".join(transformers.__version__.split(".")[:2])
    assert all(versions == {installed} for versions in headers.values()), (headers, installed)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_upstream_forward_is_the_one_adapted(name):
    assert _source_hash(name) == RECORDED[name], (
        f"{name} changed upstream: port the change into the function whose header names it, then record the new hash")
