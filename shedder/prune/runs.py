"""A search run directory: ``log.jsonl`` and one plan per step, one definition for every writer.

``log.jsonl`` holds a header line (``type: "header"``, ``version``, the ``settings`` that decide the
choices, the ``limits`` the run was started with, ``base_ppl``, ``base_params``, ``created``; an
imported run adds ``imported_from``), then one line per finished step (``type: "step"``, ``step``
from 1, ``component``, ``ppl``, ``params``, ``candidates``, ``seconds``). ``step_XX/pruning_config.json``
is the plan after step XX, written before its log line, so a step counts once its plan is on disk.

The search (``shedder.prune.search``) and ``shedder.formats.official.import_run`` both write through
``RunLog``: the header is built by ``RunLog.start``, a step's record and plan by ``search_step`` and
``RunLog.add_step``, and a log is read back (validated, a torn tail moved aside) by ``RunLog.read``.
One writer per run directory: ``RunLog.locked`` holds ``LOCK_FILE``; ``claim_search_dir`` and
``claim_import_dir`` apply the output policy (``fileio.claim_run_dir``).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shedder.core.errors import ShedderError
from shedder.core.fileio import (RUN_LOCK, atomic_write_text, check_output_dir, claim_run_dir, drop_torn_tail,
                                 exclusive, model_dirs)
from shedder.core.plan import Component, PruningPlan
from shedder.measure.evaluator import removing

LOG_FILE = "log.jsonl"
#: Held (``fileio.exclusive``) while a search writes its run directory: one writer per run.
LOCK_FILE = RUN_LOCK
PLAN_FILE = "pruning_config.json"
LOG_VERSION = 1


@dataclass(frozen=True)
class SearchStep:
    step: int  # 1-based
    component: Component  # removed at this step
    plan: PruningPlan  # everything removed after this step
    ppl: float  # calibration perplexity of ``plan``
    params: int  # parameters of the model extracted under ``plan``


def run_settings(adapter, weights: str, data: str, windows: list[int] | None, kinds: list[str],
                 base_plan_key: str, race: dict | None = None) -> dict:
    """The settings that decide a run's choices (a resumed run must match them all); ``race``: the
    racing settings of a raced run (``shedder.prune.race``), None for an exact one."""
    return {"model": adapter.identity().to_dict(), "weights": weights, "data": data, "windows": windows,
            "kinds": kinds, "base_plan": base_plan_key, "race": race}


def search_step(k: int, component: Component, plan: PruningPlan, ppl: float, params: int, settings: dict) -> SearchStep:
    """Step ``k`` of a run, its plan carrying its provenance in ``meta``."""
    meta = {"search_step": k, "calibration_ppl": ppl, "params": params, "search_kinds": settings["kinds"],
            "calibration_data": settings["data"]}
    return SearchStep(k, component, PruningPlan(plan.components, plan.model, dict(plan.group_sizes), meta), ppl, params)


def claim_search_dir(run_dir: str | Path, model) -> Path:
    """The output policy for a search run directory (``fileio.claim_run_dir``): never the working
    directory, the model's directory or a directory of someone else's files."""
    return claim_run_dir(run_dir, model_dirs(model), "search run", legacy=(LOG_FILE,))


def claim_import_dir(out_dir: str | Path, model, source: str | Path) -> Path:
    """The output policy for an imported run: a new (or empty) directory, neither the model's
    directory nor the run imported from."""
    protected = [*model_dirs(model), source]
    check_output_dir(out_dir, protected=protected)
    return claim_run_dir(out_dir, protected, "imported run")


class RunLog:
    """``log.jsonl`` + ``step_XX/pruning_config.json`` in a run directory."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.path = self.dir / LOG_FILE

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    @contextlib.contextmanager
    def locked(self, progress=None) -> Iterator[None]:
        """This run's lock: a second process on the directory is refused (``Busy``), a second app
        session waits."""
        with exclusive(self.dir / LOCK_FILE, f"the search run {self.dir}", progress):
            yield

    def start(self, settings: dict, limits: dict, base_ppl: float | None, base_params: int,
              imported_from: str | None = None) -> dict:
        """Write the header line (a new log); returns it."""
        header = {"type": "header", "version": LOG_VERSION, "settings": settings, "limits": limits,
                  "base_ppl": base_ppl, "base_params": base_params, "created": _now()}
        if imported_from is not None:
            header["imported_from"] = imported_from
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(header) + "\n")
        return header

    def add_step(self, step: SearchStep, candidates: int | None = None, seconds: float | None = None,
                 finished: list | None = None) -> None:
        """Write the step's plan, then its log line; ``finished``: a raced step's candidates that were
        evaluated exactly on all windows."""
        step_dir = self.dir / f"step_{step.step:02d}"
        step_dir.mkdir(exist_ok=True)
        step.plan.save(step_dir / PLAN_FILE)
        rec = {"type": "step", "step": step.step, "component": str(step.component), "ppl": step.ppl,
               "params": step.params, "candidates": candidates, "seconds": seconds}
        if finished is not None:
            rec["raced"], rec["finished_exactly"] = True, [str(c) for c in finished]
        with self.path.open("a") as f:  # the log line goes last: a step counts once its plan is on disk
            f.write(json.dumps(rec) + "\n")

    def read(self) -> tuple[dict, list[dict]]:
        """Header and steps. What follows the last record (a line cut short by an interruption,
        garbage, blank lines) is first moved aside into ``log.jsonl.damaged``
        (``fileio.drop_torn_tail``), so that step is redone and the next append starts on a line
        of its own; a bad line followed by records is refused as damage, naming the line."""
        drop_torn_tail(self.path)
        records = [json.loads(line) for line in self.path.read_bytes().split(b"\n") if line]  # all objects now
        if not records or records[0].get("type") != "header" or records[0].get("version") != LOG_VERSION:
            raise ShedderError(f"{self.path} is not a search log of this version (no header line)")
        steps = [r for r in records[1:] if r.get("type") == "step"]
        for expected, r in enumerate(steps, 1):
            if r.get("step") != expected:
                raise ShedderError(f"{self.path}: step {r.get('step')} found where step {expected} was expected")
            if not (isinstance(r.get("component"), str) and isinstance(r.get("ppl"), float)
                    and _is_count(r.get("params"))):
                raise ShedderError(f"{self.path}: step {expected} lacks its component, ppl or params; the log is damaged")
        return records[0], steps

    def resume(self, settings: dict, base: PruningPlan) -> tuple[dict, list[SearchStep]]:
        """The header and the finished steps of this run, replayed on ``base``; refused when
        ``settings`` differ from the run's."""
        header, records = self.read()
        self.check_settings(header["settings"], settings)
        plan, steps = base, []
        for rec in records:
            comp = Component.parse(rec["component"])
            plan = removing(plan, comp)
            steps.append(search_step(rec["step"], comp, plan, rec["ppl"], rec["params"], settings))
        return header, steps

    def check_settings(self, old: dict, new: dict) -> None:
        if (old.get("race") is None) != (new.get("race") is None):
            was, now = ("raced", "exact") if new.get("race") is None else ("exact", "raced")
            raise ShedderError(f"cannot resume {self.dir}: it holds an {was} search; resume it as {was} "
                               f"({'with' if was == 'raced' else 'without'} --race) or choose another directory"
                               .replace("an raced", "a raced"))
        differ = [k for k in new if old.get(k) != new[k]]
        if differ:
            what = "; ".join(f"{k}: run has {_short(old.get(k))}, now {_short(new[k])}" for k in differ)
            raise ShedderError(f"cannot resume {self.dir}: it was started with different settings ({what})")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
