"""Evaluate a model (masked by a plan, or extracted): perplexity, next-word accuracy, lm-eval."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

from shedder.core.plan import PruningPlan
from shedder.measure import downstream
from shedder.measure.data import windows_from
from shedder.measure.masking import masked
from shedder.measure.metrics import (MAX_CONTEXT_TOKENS, describe_protocol, next_word_accuracy, next_word_protocol,
                                     perplexity)


@dataclass
class Evaluation:
    """Perplexity (and next-word accuracy) of a model under a plan, with the protocols they carry."""

    perplexity: float
    perplexity_protocol: str
    params: int
    params_original: int
    accuracy: float | None = None
    accuracy_protocol: str | None = None
    extra: dict = field(default_factory=dict)


def eval_windows(tokenizer, source: str, samples: int | None, seq_len: int):
    """The first ``samples`` windows of ``source`` (all of them without ``samples``)."""
    return windows_from(tokenizer, source, samples=samples, seq_len=seq_len)


def evaluate(model, tokenizer, adapter, plan: PruningPlan | None, windows, source: str, batch_size: int = 8,
             accuracy_n: int | None = None, progress=None, say: Callable[[str], None] | None = None) -> Evaluation:
    """Perplexity over ``windows`` and, with ``accuracy_n``, next-word accuracy over that many
    passages of ``source``, the model masked by ``plan``; ``say`` hears what runs next."""
    n, seq = windows.shape
    if say:
        say(f"eval: perplexity over {n:,} windows × {seq:,} tokens in batches of {batch_size}"
            + (f"; next-word accuracy over up to {accuracy_n} passages (≤ {MAX_CONTEXT_TOKENS} context tokens each), "
               f"batches of {batch_size}" if accuracy_n else ""))
    result = Evaluation(perplexity=float("nan"), perplexity_protocol=describe_protocol(windows, source),
                        params=adapter.param_count(plan), params_original=adapter.param_count())
    with masked(model, plan, adapter) if plan else contextlib.nullcontext():
        started = time.perf_counter()
        result.perplexity = perplexity(model, windows, batch_size, progress)
        if accuracy_n:
            if say:  # the same forwards over about as many tokens: the perplexity's time is the ETA
                say(f"eval: perplexity took {time.perf_counter() - started:.1f} s; next-word accuracy runs "
                    f"~{accuracy_n * MAX_CONTEXT_TOKENS:,} tokens at most")
            result.accuracy = next_word_accuracy(model, tokenizer, source, accuracy_n, progress, batch_size)
            result.accuracy_protocol = next_word_protocol(source, accuracy_n)
    return result


def check_tasks(tasks) -> tuple[str, ...]:
    """The lm-eval task names of ``tasks`` (refuses a missing lm-eval or an unknown task before any work)."""
    names = downstream.parse_tasks(tasks)
    downstream.task_manager(names)
    return names


@dataclass
class LmEval:
    """lm-eval scores of a model and of its unpruned baseline (None when unknown)."""

    result: object
    base: object

    def payload(self) -> dict:
        r, b = self.result, self.base
        return {"protocol": r.protocol(), "tasks": r.rows(b), "average": r.average,
                "relative": r.relative(b) if b else None, "unpruned_average": b.average if b else None}

    def text(self) -> str:
        r, b = self.result, self.base
        table = [f"{'task':<18} {'metric':<9} {'value':>8} {'± stderr':>9}" + (f" {'unpruned':>9}" if b else "")]
        for row in r.rows(b):
            err = "" if row["stderr"] != row["stderr"] else f"{row['stderr']:.4f}"  # NaN for the average
            table.append(f"{row['task']:<18} {row['metric']:<9} {row['value']:>8.4f} {err:>9}"
                         + (f" {row['unpruned']:>9.4f}" if b else ""))
        relative = (f"relative accuracy: {r.relative_text(b)} (average / unpruned average)" if b else
                    "relative accuracy: unknown (pass --baseline with the unpruned model)")
        return "\n".join([f"lm-eval accuracy   [{r.protocol()}]", *table, relative])


def lm_eval(model, tokenizer, tasks, plan: PruningPlan | None, adapter, baseline=None, pruned: bool = False,
            limit: int | None = None, batch_size: int = 8, cache_dir=None, progress=None) -> LmEval:
    """lm-eval scores of the model (masked by ``plan``) and of its unpruned baseline: ``baseline``
    (model, tokenizer), else the same model unmasked under a plan, else none for a ``pruned`` model."""
    kw = dict(limit=limit, batch_size=batch_size, cache_dir=cache_dir)
    result = downstream.scores(model, tokenizer, tasks, plan, progress=progress, adapter=adapter, **kw)
    if baseline is not None:
        if progress is not None:
            progress.close()
        base = downstream.scores(*baseline, tasks, progress=progress, **kw)
    elif plan is not None and plan.components:
        base = downstream.scores(model, tokenizer, tasks, progress=progress, **kw)
    else:
        base = None if pruned else result
    return LmEval(result, base)


def lm_eval_scores(model, tokenizer, tasks, plan=None, limit=None, progress=None, adapter=None, run: bool = True):
    """lm-eval scores of ``plan`` for the studio: computed with ``run``, else only from the disk cache."""
    mask = plan if plan is not None and plan.components else None
    if run:
        return downstream.scores(model, tokenizer, tasks, mask, limit=limit, progress=progress, adapter=adapter)
    return downstream.cached(model, tokenizer, tasks, mask, limit=limit)
