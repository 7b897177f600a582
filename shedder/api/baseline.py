"""The baseline numbers of a model, remembered on disk: perplexity on the evaluation windows and
next-word accuracy on the evaluation text, so that a reopened studio (another tab, a restarted
server) shows them at once instead of measuring again (next-word accuracy is one forward per
passage: a minute on a loaded 2-core machine).

One small JSON file per (model weights, measurement) under ``$SHEDDER_CACHE_DIR/baseline/``, keyed
by what changes the number: the model's fingerprint (config and every weight's bytes) and, for
perplexity, the exact windows; for accuracy, the text source, the number of passages and the
windows of that source (a changed text changes its windows). Written through a temporary file and a
rename; an unreadable file counts as not measured, never as a number.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from shedder.core.cache import default_cache_dir, digest, model_fingerprint, windows_hash
from shedder.core.fileio import atomic_write_text

#: The measurements remembered (the file's ``what``).
WHAT = ("ppl", "accuracy")
SCHEMA_VERSION = 1


def _path(model, what: str, windows, source: str | None, passages: int | None, cache_dir) -> Path:
    if what not in WHAT:
        raise ValueError(f"a baseline number is one of {WHAT}, got {what!r}")
    key = digest({"schema": SCHEMA_VERSION, "what": what, "model": model_fingerprint(model),
                  "windows": windows_hash(windows), "source": source, "passages": passages}, 20)
    return Path(cache_dir or default_cache_dir()) / "baseline" / f"{key}.json"


def known_baseline(model, what: str, windows, source: str | None = None, passages: int | None = None,
                   cache_dir: str | Path | None = None) -> float | None:
    """The unpruned ``model``'s ``what`` measured before with these settings (in any session), or None."""
    try:
        data = json.loads(_path(model, what, windows, source, passages, cache_dir).read_text(encoding="utf-8"))
        value = float(data["value"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return value if math.isfinite(value) else None


def remember_baseline(model, what: str, windows, value: float, source: str | None = None,
                      passages: int | None = None, cache_dir: str | Path | None = None) -> None:
    """Keep ``value`` for ``known_baseline`` with the same arguments."""
    path = _path(model, what, windows, source, passages, cache_dir)
    atomic_write_text(path, json.dumps({"schema_version": SCHEMA_VERSION, "what": what, "source": source,
                                        "passages": passages, "value": float(value)}) + "\n")
