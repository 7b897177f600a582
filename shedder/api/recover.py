"""Recovery: train a pruned model (LoRA, full fine-tuning or distillation) and measure it."""
from __future__ import annotations

from dataclasses import dataclass

from shedder.arch import count_parameters
from shedder.core.errors import ShedderError
from shedder.core.plan import PruningPlan
from shedder.formats.loading import load_model
from shedder.measure.masking import holding
from shedder.measure.metrics import perplexity
from shedder.formats.extract import save
from shedder.prune.recover import (DEFAULT_LR, METHODS, REPORT_TO, SCHEDULES, TENSORBOARD_DIR, RecoverConfig, curve, finished,
                                   recover as train, recovery_run_dir, resumable, student_for)
from shedder.api.export import public_plan
from shedder.api.models import pruned_with


def student_and_teacher(model, adapter, plan: PruningPlan | None, name: str, teacher: str | None, dtype: str,
                        device: str, trust_remote_code: bool):
    """(student, teacher, plan): with a plan, ``model`` is the original (the student is extracted from
    it, it teaches); without, ``model`` is a pruned checkpoint taught by ``teacher`` when given."""
    if plan is not None:
        return student_for(model, plan, adapter), model, plan
    taught = None
    if teacher:
        taught, _ = load_model(teacher, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return model, taught, pruned_with(name)


def recover(student, tokenizer, config: RecoverConfig, out, teacher=None, plan=None, source: str = "",
            progress=None, resume: bool = False, report_to: str = "none"):
    """Train ``student`` by ``config`` in the run directory ``out`` (``shedder.prune.recover.recover``)."""
    return train(student, tokenizer, config, out, teacher=teacher, plan=plan, source=source, progress=progress,
                 resume=resume, save=save, report_to=report_to)


@dataclass(frozen=True)
class Recovered:
    """A recovered model: the pruned plan it came from, its recipe, its run and its numbers (measured
    on the session's evaluation windows, like every other frontier point)."""

    plan: PruningPlan
    config: RecoverConfig
    run_dir: str
    summary: dict          # recovery.json: recipe, steps, tokens, wall time, held-out perplexities
    metrics: dict          # ppl, params, flops

    @property
    def name(self) -> str:
        return f"recovered ({self.config.method}, {self.summary['tokens']:,} tokens)"

    @property
    def fraction(self) -> float | None:
        """Share of the log-perplexity lost to pruning that recovery won back (negative: it lost more),
        on the recipe's held-out windows; None where pruning lost nothing."""
        return self.summary.get("recovered_fraction")

    @property
    def worse(self) -> bool:
        """The recovered model's held-out perplexity is above the pruned model's: recovery hurt."""
        ppl = self.summary.get("ppl", {})
        return "pruned" in ppl and "recovered" in ppl and ppl["recovered"] > ppl["pruned"]

    def curve(self) -> list[dict]:
        """The run's training and held-out loss by step (``shedder.prune.recover.curve``)."""
        return curve(self.run_dir)


def recover_plan(model, tokenizer, adapter, plan: PruningPlan, config: RecoverConfig, source: str, windows,
                 dtype: str, device: str, progress=None, name: str | None = None) -> Recovered:
    """The studio's recovery of ``plan``'s extracted model: a run under the cache (a cancelled one
    resumes, a finished one is reopened), its perplexity measured on ``windows`` and its parameters
    counted (``metrics``; the studio adds the plan's analytic FLOPs). The saved plan, card and log name
    the model ``name`` (its public name; default ``source``), so an export of the run names no server path."""
    if not plan.components:
        raise ShedderError("the current plan removes nothing; prune something before recovering")
    run_dir = recovery_run_dir(source, plan, config)
    with holding(model, progress):  # shared weights: another session recovering is waited for, shown
        if finished(run_dir) is None:  # decided under the lock: another session may just have run it
            student = student_for(model, plan, adapter)
            teacher = model if config.method == "distill" else None
            shown = name or source
            train(student, tokenizer, config, run_dir, teacher=teacher, plan=public_plan(plan, shown), source=shown,
                  progress=progress, resume=resumable(run_dir), save=save)
    recovered, _ = load_model(str(run_dir), dtype=dtype, device=device)
    return Recovered(plan, config, str(run_dir), finished(run_dir),
                     {"ppl": float(perplexity(recovered, windows)), "params": int(count_parameters(recovered))})


def plan_run_dir(source: str, plan: PruningPlan, config: RecoverConfig):
    """Where the studio's recovery of ``plan`` by ``config`` runs (its curve is read from there while it runs)."""
    return recovery_run_dir(source, plan, config)


__all__ = ["DEFAULT_LR", "METHODS", "REPORT_TO", "SCHEDULES", "TENSORBOARD_DIR", "RecoverConfig", "Recovered", "curve", "plan_run_dir",
           "recover", "recover_plan", "student_and_teacher"]
