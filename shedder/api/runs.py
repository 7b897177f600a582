"""The studio's runs list, per model and calibration text: what was done, so that it can be restored
after a browser reload, in another session, or after switching models and back.

Each entry says how to bring a result back from what the engine already keeps on disk: a greedy
search (its log under the cache: replayed, not recomputed), a one-shot series (its metric's scores),
a stock-shaped series (its plans, held in the entry: a greedy one is logged nowhere else), a saved plan (the plan itself), a recovery (its finished run under the cache). Measured speeds need
no entry: they are cached per plan and found again whenever the plan is on the frontier.

One JSON file per (model weights, calibration windows) under ``$SHEDDER_CACHE_DIR/studio-runs/``,
rewritten atomically under a lock, so two sessions adding runs at once both keep theirs. An entry
with the ``id`` of an existing one replaces it (a longer search of the same kinds, a plan saved again
under the same name).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from shedder.core.cache import default_cache_dir, digest, model_fingerprint, windows_hash
from shedder.core.fileio import atomic_write_text, exclusive

#: Entry types, in the order the list shows them.
TYPES = ("search", "one-shot", "stock", "saved", "recovery")
#: A runs file larger than this is not read (it is ours, but something went wrong).
MAX_BYTES = 4 * 2**20


def runs_file(model, windows, cache_dir: str | Path | None = None) -> Path:
    key = digest({"model": model_fingerprint(model), "windows": windows_hash(windows)})
    return Path(cache_dir or default_cache_dir()) / "studio-runs" / f"{key}.json"


def recorded_runs(model, windows, cache_dir: str | Path | None = None) -> list[dict]:
    """The entries recorded for this model and calibration text, oldest first ([] when none or unreadable)."""
    return _read(runs_file(model, windows, cache_dir))


def record_run(model, windows, entry: dict, cache_dir: str | Path | None = None) -> None:
    """Add ``entry`` (``{"type", "id", ...}``, JSON-serialisable), replacing one with the same ``id``."""
    if entry.get("type") not in TYPES or not entry.get("id"):
        raise ValueError(f"a run entry needs a type in {TYPES} and an id, got {entry!r}")
    path = runs_file(model, windows, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_suffix(".lock"), f"the studio's runs list {path}"):
        kept = [e for e in _read(path) if e.get("id") != entry["id"]]
        atomic_write_text(path, json.dumps([*kept, {**entry, "at": round(time.time())}], indent=1) + "\n")


def _read(path: Path) -> list[dict]:
    """The entries of ``path``; anything but a list of objects (torn by hand, too large) counts as none."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return []
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [e for e in data if isinstance(e, dict) and e.get("type") in TYPES] if isinstance(data, list) else []
