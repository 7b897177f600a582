"""The on-disk cache: where it lives and the keys its entries are filed under.

Every measurement that is cached (importance tables, searches, downstream scores, measured plans,
recovery runs) is keyed by what changes its result: the model's identity (``model_fingerprint``:
its config and every weight's bytes), the exact token windows (``windows_hash``) and the plan
(``plan_key``). A changed weight, window or plan gives another key, never a stale entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch

from shedder.core.plan import PruningPlan, config_hash


def default_cache_dir() -> Path:
    """``$SHEDDER_CACHE_DIR``, else ``~/.cache/shedder``."""
    return Path(os.environ.get("SHEDDER_CACHE_DIR") or Path.home() / ".cache" / "shedder")


#: Bytes hashed per step (bounds the host copy of a GPU tensor).
HASH_CHUNK = 64 << 20
#: model -> (the parameters' storage and version counters, fingerprint): in-place updates of a weight
#: bump its version counter, so a changed model is hashed again and an unchanged one is not.
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Config hash plus a BLAKE2 hash of every parameter's name, shape, dtype and raw bytes: weights
    that differ anywhere give another key (no sampling, so no sample index to get wrong on a
    38M-element embedding). One read of the weights (about a second per GB), remembered per model
    until a weight changes in place."""
    state = tuple((name, p.data_ptr(), p._version) for name, p in model.named_parameters())
    known = _FINGERPRINTS.get(model)
    if known is not None and known[0] == state:
        return known[1]
    h = hashlib.blake2b(config_hash(model.config).encode(), digest_size=16)
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        raw = p.detach().contiguous().view(-1).view(torch.uint8)  # [bytes]
        for start in range(0, raw.numel(), HASH_CHUNK):
            h.update(raw[start:start + HASH_CHUNK].cpu().numpy().data)
    _FINGERPRINTS[model] = (state, h.hexdigest()[:16])
    return _FINGERPRINTS[model][1]


def windows_hash(windows: torch.Tensor) -> str:
    """A short hash of the exact token windows (keys caches and search logs)."""
    w = windows.detach().to("cpu", torch.long).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def plan_key(plan: PruningPlan) -> dict:
    """The parts of a plan that change what is measured (for cache keys and search logs)."""
    return {"components": [str(c) for c in plan.sorted()], "group_sizes": dict(sorted(plan.group_sizes.items()))}


def cache_key(model, windows: torch.Tensor, kinds: list[str], base: PruningPlan) -> str:
    """The key of a measurement of ``kinds`` on ``model`` over ``windows``, on top of plan ``base``."""
    return digest({"model": model_fingerprint(model), "data": windows_hash(windows),
                   "kinds": sorted(kinds), "base": plan_key(base)}, 20)


def digest(blob, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``blob`` as canonical JSON (sorted keys;
    values JSON cannot hold are written as ``str``)."""
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
