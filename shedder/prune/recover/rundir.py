"""A recovery run's directory: what it may hold, its log, its place in the cache, and its end.

``RUN_DIR/log.jsonl`` records the recipe, the loss curve and the held-out numbers; a checkpoint
(``shedder.prune.recover.checkpoint``) while the run is unfinished; at the end the recovered model with its card and
``recovery.json``. One process writes a run directory at a time (its lock, ``fileio.exclusive``,
is held for the whole run).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from shedder.core.cache import default_cache_dir, digest
from shedder.core.errors import ShedderError
from shedder.core.fileio import RUN_LOCK, RUN_MARKER, atomic_write_text, drop_torn_tail
from shedder.prune.recover.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, SCHEMA_VERSION
from shedder.prune.recover.config import RecoverConfig, is_int

LOG = "log.jsonl"
CARD_JSON = "recovery.json"


def log_event(run_dir: Path, entry: dict) -> None:
    """Append one JSON line to the run's log."""
    with open(run_dir / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def rewind_log(run_dir: Path, step: int) -> None:
    """Before resuming from ``step``: cut a line a kill left torn, and the step (and held-out) entries after
    ``step`` (a kill came after them but before the next checkpoint; those steps are redone), so the
    log holds each step once."""
    log = run_dir / LOG
    if not log.is_file():
        return
    drop_torn_tail(log)
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not _step_after(line, step)]
    if kept != lines:
        atomic_write_text(log, "".join(kept))


def _step_after(line: str, step: int) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("event") in ("step", "held_out") and is_int(entry.get("step")) \
        and entry["step"] > step


def resumable(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds an interrupted run's checkpoint (``resume=True`` continues it)."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """What the run directory allows, read-only: an old pickle checkpoint is refused (never read),
    resuming needs a checkpoint, and a new run needs a directory holding nothing yet."""
    if (run_dir / LEGACY_CHECKPOINT).is_file():
        raise ShedderError(f"{run_dir} holds a checkpoint in the old pickle format ({LEGACY_CHECKPOINT}), which is "
                           "not read for safety; start a new run in another directory")
    if resume and not resumable(run_dir):
        raise ShedderError(f"nothing to resume in {run_dir}: no {CHECKPOINT} (the run finished or never started)")
    if not resume and resumable(run_dir):
        raise ShedderError(f"{run_dir} holds an interrupted recovery; add --resume to continue it, "
                           "or choose another --out")
    if not resume and run_dir.is_dir() and any(p.name not in (RUN_MARKER, RUN_LOCK) for p in run_dir.iterdir()):
        raise ShedderError(f"{run_dir} is not empty; choose a new directory for the recovered model")


def recovery_run_dir(source: str, plan, config: RecoverConfig, cache_dir: str | Path | None = None) -> Path:
    """A run directory under the cache keyed by model source, plan and recipe: a caller without a
    place of its own (the app) resumes a cancelled run there and finds a finished one."""
    # The checkpoint format is part of the key: a run left in the old pickle format (refused, never
    # read) is not reused, so the app starts that recipe afresh instead of being blocked by it.
    key = digest({"source": str(source), "plan": plan.to_dict() if plan is not None else None,
                  "recipe": asdict(config), "checkpoint_schema": SCHEMA_VERSION})
    return Path(cache_dir or default_cache_dir()) / "recoveries" / key


def finished(run_dir: str | Path) -> dict | None:
    """The summary (``recovery.json``) of a finished run, or None."""
    path = Path(run_dir) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None
