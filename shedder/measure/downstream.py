"""Downstream accuracy with lm-evaluation-harness, as the paper reports it.

The paper (and the official ``eval.py`` / ``prune.py --do_eval``) runs lm-eval zero-shot on
LAMBADA-openai, HellaSwag, PIQA, ARC-e, ARC-c, WinoGrande and OpenBookQA, takes ``acc`` for ARC-e and
``acc_norm`` wherever a task reports it, else ``acc`` (so ``acc`` for WinoGrande and LAMBADA too),
averages over the tasks, and calls "relative accuracy" the pruned average over the unpruned one.
This module does the same for any model the engine loads:

* a plan is applied as the live mask (lm-eval's ``HFLM`` calls the model object, whose patched
  ``forward``s it sees), so nothing is extracted; an extracted model is evaluated as it is;
* the bundled offline tasks ``shedder_lastword`` and ``shedder_choice`` (``assets/lm_eval``, cut from
  the test split by ``shedder.measure.local_tasks``) work without the hub;
* results are cached on disk per (model weights, tokenizer, plan, task set, limit, lm-eval version,
  task files), so the app and the CLI never run the same evaluation twice;
* lm-eval is an optional extra: without it every entry point raises one ``DownstreamError`` that
  says how to install it.

``scores`` gives one evaluation, ``summary`` the ``{task: score, "average", "relative"}`` a plot needs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from shedder.arch import adapter_for
from shedder.core.cache import default_cache_dir, digest, model_fingerprint, plan_key
from shedder.core.errors import DownstreamError
from shedder.core.fileio import atomic_write_text
from shedder.core.hub import offline_when_unreachable
from shedder.measure.local_tasks import TASKS_DIR
from shedder.measure.masking import masked
from shedder.core.progress import Progress

#: The paper's seven zero-shot tasks (Mamba and Zamba2 runs; the Hymba run drops LAMBADA and OpenBookQA).
PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
#: The bundled offline tasks.
LOCAL_TASKS = ("shedder_lastword", "shedder_choice")
#: Names that stand for a task list on the command line and in the app.
TASK_SETS = {"paper": PAPER_TASKS, "local": LOCAL_TASKS}
INSTALL_HINT = "pip install 'shedder-studio[eval]'  (or: pip install 'lm-eval[hf]')"
CACHE_VERSION = 1


def official_metric(task: str, reported: dict) -> str:
    """The metric the official code reads from lm-eval's results for ``task``: ``acc`` for
    ``arc_easy``, ``acc_norm`` where the task reports it, ``acc`` otherwise."""
    if task != "arc_easy" and "acc_norm,none" in reported:
        return "acc_norm"
    if "acc,none" in reported:
        return "acc"
    names = sorted(k.split(",")[0] for k in reported if "," in k and "stderr" not in k)
    raise DownstreamError(f"lm-eval task {task!r} reports no accuracy (its metrics: {', '.join(names) or 'none'}); "
                          "only accuracy tasks can be averaged")


@dataclass(frozen=True)
class TaskScores:
    """One lm-eval evaluation: the official metric of every task, their average and how many
    examples each used. ``reported`` keeps every number lm-eval gave (e.g. LAMBADA's perplexity)."""

    tasks: tuple[str, ...]
    metrics: dict[str, str]
    scores: dict[str, float]
    samples: dict[str, int]
    limit: int | None = None
    lm_eval_version: str = ""
    reported: dict[str, dict] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.scores[t] for t in self.tasks) / len(self.tasks)

    def stderr(self, task: str) -> float:
        """Standard error of a 0/1 accuracy over its examples (lm-eval's ``mean_stderr``)."""
        p, n = self.scores[task], self.samples[task]
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    def relative(self, baseline: "TaskScores") -> float:
        """This average over ``baseline``'s (the paper's relative accuracy); both on the same tasks and limit."""
        if (baseline.tasks, baseline.limit) != (self.tasks, self.limit):
            raise DownstreamError("relative accuracy needs the same tasks and --limit for both models")
        return self.average / baseline.average if baseline.average else float("nan")

    def relative_text(self, baseline: "TaskScores") -> str:
        """The relative accuracy as a percentage, or why there is none."""
        r = self.relative(baseline)
        return "n/a (the unpruned average is 0)" if r != r else f"{r:.1%}"

    def summary(self, baseline: "TaskScores | None" = None) -> dict:
        """``{task: score, ..., "average": x, "relative": y}`` (relative None without a baseline)."""
        return {**{t: self.scores[t] for t in self.tasks}, "average": self.average,
                "relative": self.relative(baseline) if baseline is not None else None}

    def rows(self, baseline: "TaskScores | None" = None) -> list[dict]:
        """One row per task plus the average (the table the CLI prints and the app shows)."""
        out = []
        for t in self.tasks:
            row = {"task": t, "metric": self.metrics[t], "value": self.scores[t], "stderr": self.stderr(t),
                   "examples": self.samples[t]}
            if baseline is not None:
                row["unpruned"] = baseline.scores[t]
            out.append(row)
        avg = {"task": "average", "metric": "", "value": self.average, "stderr": float("nan"),
               "examples": sum(self.samples.values())}
        if baseline is not None:
            avg["unpruned"] = baseline.average
        return out + [avg]

    def protocol(self) -> str:
        """What produced these numbers, in one line."""
        n = sorted(set(self.samples.values()))
        per_task = f"{n[0]} examples per task" if len(n) == 1 else f"{n[0]}–{n[-1]} examples per task"
        limit = f" (--limit {self.limit})" if self.limit is not None else ""
        return (f"lm-eval {self.lm_eval_version} zero-shot, {per_task}{limit}; metric as in the official "
                "Mamba-Shedder eval: acc for arc_easy, acc_norm where a task reports it, acc otherwise; "
                "average over tasks; relative = average / unpruned average")

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "tasks": list(self.tasks), "metrics": self.metrics, "scores": self.scores,
                "samples": self.samples, "limit": self.limit, "lm_eval_version": self.lm_eval_version,
                "reported": self.reported}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskScores":
        return cls(tuple(d["tasks"]), d["metrics"], d["scores"], d["samples"], d["limit"], d["lm_eval_version"],
                   d.get("reported", {}))

    @classmethod
    def from_lm_eval(cls, out: dict, tasks: tuple[str, ...], limit: int | None) -> "TaskScores":
        results = out["results"]
        metrics = {t: official_metric(t, results[t]) for t in tasks}
        reported = {t: {k.split(",")[0]: v for k, v in results[t].items()
                        if "," in k and isinstance(v, (int, float))} for t in tasks}
        return cls(tasks, metrics, {t: float(results[t][f"{metrics[t]},none"]) for t in tasks},
                   {t: int(out["n-samples"][t]["effective"]) for t in tasks}, limit,
                   str(out.get("lm_eval_version") or _lm_eval_version()), reported)


# ------------------------------------------------------------------------------------ task names
def parse_tasks(text) -> tuple[str, ...]:
    """``"paper"``, ``"local"`` or comma-separated task names (or a list of them), in the order given,
    without repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for t in TASK_SETS.get(name, (name,) if name else ()):
            if t not in out:
                out.append(t)
    if not out:
        raise DownstreamError("no lm-eval task given (e.g. --tasks local, --tasks paper, --tasks hellaswag,piqa)")
    return tuple(out)


def require_lm_eval():
    """The ``lm_eval`` package, or one DownstreamError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (its HF wrapper needs accelerate: lm-eval's [hf] extra)
    except ImportError as e:
        raise DownstreamError(f"downstream accuracy needs lm-eval with its HF wrapper ({e.name} is not installed): "
                              f"{INSTALL_HINT}") from None
    return lm_eval


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def task_manager(tasks: tuple[str, ...]):
    """lm-eval's task registry with the bundled tasks; the built-in ones are indexed (seconds) only
    when a requested task is not bundled. Unknown names are refused here, before any model work."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    builtin = any(t not in LOCAL_TASKS for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DownstreamError(f"unknown lm-eval task(s): {', '.join(unknown)} (bundled offline: {', '.join(LOCAL_TASKS)}; "
                              f"the paper's: {', '.join(PAPER_TASKS)}; `lm_eval ls tasks` lists the rest)")
    return manager


# ------------------------------------------------------------------------------------ the run
def scores(model, tokenizer, tasks, plan=None, *, limit: int | None = None, batch_size: int = 8,
           progress: Progress | None = None, cache_dir: str | Path | None = None, adapter=None) -> TaskScores:
    """lm-eval zero-shot on ``tasks`` for ``model`` (under ``plan``'s live mask when given), cached on disk."""
    tasks = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise DownstreamError(f"--limit must be at least 1, got {limit}")
    if plan is not None:
        adapter = adapter or adapter_for(model, plan.group_sizes)
        plan = adapter.resolve(plan)
    path = _cache_path(model, tokenizer, plan, tasks, limit, cache_dir)
    if path.is_file():
        return TaskScores.from_dict(json.loads(path.read_text(encoding="utf-8")))
    manager = task_manager(tasks)
    out = _run(model, tokenizer, tasks, plan, adapter, manager, limit, batch_size, progress)
    result = TaskScores.from_lm_eval(out, tasks, limit)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1, sort_keys=True))
    return result


def cached(model, tokenizer, tasks, plan=None, *, limit: int | None = None,
           cache_dir: str | Path | None = None) -> TaskScores | None:
    """The cached result of ``scores`` with these arguments, or None (never runs lm-eval)."""
    path = _cache_path(model, tokenizer, plan, parse_tasks(tasks), limit, cache_dir)
    return TaskScores.from_dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def summary(model, tokenizer, tasks, plan=None, *, limit: int | None = None, batch_size: int = 8,
            progress: Progress | None = None, cache_dir: str | Path | None = None) -> dict:
    """``{task: score, ..., "average": x, "relative": y}`` of ``plan`` against the unpruned model
    (both cached; the y-axis of an accuracy–efficiency plot)."""
    kw = dict(limit=limit, batch_size=batch_size, progress=progress, cache_dir=cache_dir)
    base = scores(model, tokenizer, tasks, None, **kw)
    return scores(model, tokenizer, tasks, plan, **kw).summary(base)


def _run(model, tokenizer, tasks, plan, adapter, manager, limit, batch_size, progress) -> dict:
    from lm_eval import simple_evaluate


    lm = _progress_lm(model, tokenizer, batch_size, progress)
    mask = masked(model, plan, adapter) if plan is not None else contextlib.nullcontext()
    with mask, offline_when_unreachable(), _quiet_lm_eval(), _random_state_kept():
        try:
            # Seeds None: lm-eval would otherwise reseed random, numpy and torch.
            return simple_evaluate(lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                   bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None)
        except (ConnectionError, FileNotFoundError) as e:
            raise DownstreamError(f"cannot load the data of lm-eval task(s) {', '.join(tasks)} (the hub is "
                                  f"unreachable and they are not cached? the bundled {', '.join(LOCAL_TASKS)} "
                                  f"work offline): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        except Exception as e:  # datasets' DatasetNotFoundError and friends, without importing datasets here
            if type(e).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "OfflineModeIsEnabled"):
                raise DownstreamError(f"cannot load the data of lm-eval task(s) {', '.join(tasks)}: "
                                      f"{str(e).splitlines()[0]}") from None
            raise


def _progress_lm(model, tokenizer, batch_size: int, progress: Progress | None):
    """lm-eval's HF wrapper on the model object, reporting ``progress(done, total, "lm-eval")`` per
    batch of requests instead of lm-eval's own bars."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        def _report(self, done: int) -> None:
            done = min(done, self._total)
            if progress and done != self._done:
                progress(done, self._total, "lm-eval")
            self._done = done

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._total, self._done = len(requests), 0
            out = super().loglikelihood(requests, disable_tqdm=True)
            self._report(self._total)
            return out

        def _model_call(self, inps, *args, **kwargs):
            logits = super()._model_call(inps, *args, **kwargs)
            self._report(self._done + int(inps.shape[0]))
            return logits

    device = str(next(model.parameters()).device)
    return ProgressLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)


@contextlib.contextmanager
def _random_state_kept():
    """Give back the caller's Python, numpy and torch random states (lm-eval draws from the global
    ``random`` to name things), so an evaluation in the middle of other work changes nothing."""
    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every step at INFO/WARNING (e.g. that a model object was passed); keep errors only."""
    import logging

    log = logging.getLogger("lm_eval")
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


# ------------------------------------------------------------------------------------ the cache
def _cache_path(model, tokenizer, plan, tasks, limit, cache_dir) -> Path:
    key = digest({"version": CACHE_VERSION, "model": model_fingerprint(model), "tokenizer": _tokenizer_hash(tokenizer),
                  "plan": plan_key(plan) if plan is not None and plan.components else None,
                  "tasks": list(tasks), "limit": limit, "lm_eval": _lm_eval_version(),
                  "task_files": _task_files_hash(tasks)}, 20)
    return Path(cache_dir or default_cache_dir()) / "downstream" / f"{key}.json"


def _tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


def _task_files_hash(tasks) -> str | None:
    """The bundled tasks' files, so editing them invalidates their cached scores."""
    if not any(t in LOCAL_TASKS for t in tasks):
        return None
    h = hashlib.sha256()
    for p in sorted(TASKS_DIR.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
