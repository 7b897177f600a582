"""The recovery loop: train the student, measure it before and after, save it into the run directory.

    result = recover(student, tokenizer, RecoverConfig(method="distill", steps=200), "runs/rec",
                     teacher=original, plan=plan, save=shedder.formats.extract.save)

The recovered model is written by ``save``, the caller's (the saved-model format belongs to
``shedder.formats``, a layer above this one): ``save(model, tokenizer, out_dir, plan=, card=)``
writes a loadable model directory, as ``shedder.formats.extract.save`` does.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from shedder.arch import count_parameters
from shedder.arch.spec import is_stock
from shedder.core.errors import Cancelled, ShedderError
from shedder.core.fileio import RUN_LOCK, check_place, claim_run_dir, exclusive, model_dirs
from shedder.core.progress import Progress
from shedder.measure import downstream
from shedder.measure.data import windows_from
from shedder.measure.metrics import describe_protocol, perplexity
from shedder.prune.recover.card import model_card
from shedder.prune.recover.checkpoint import (LEGACY_CHECKPOINT, SCHEMA_VERSION, read_checkpoint, remove_checkpoint,
                                              restore, run_fingerprint, run_state, write_checkpoint)
from shedder.prune.recover.config import RecoverConfig, RecoverResult
from shedder.prune.recover.data import sample_batch, training_ids
from shedder.prune.recover.lora import merge_lora, trainable_parameters
from shedder.prune.recover.reporting import Reporter, held_out_every
from shedder.prune.recover.rundir import CARD_JSON, check_run_dir, log_event, rewind_log

#: Writes a model directory: ``save(model, tokenizer, out_dir, plan=plan, card=readme)``.
SaveModel = Callable[..., object]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits [b, l, v]`` at positions 0..l-2 predict ids 1..l-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token ``T² · KL(p_teacher,T ‖ p_student,T)`` (the T² keeps gradients comparable across T)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def step_loss(student, teacher, batch: torch.Tensor, config: RecoverConfig) -> torch.Tensor:
    logits = student(input_ids=batch, use_cache=False).logits
    if config.method != "distill":
        return lm_loss(logits, batch)
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits
    loss = distill_loss(logits, target, config.temperature)
    return loss + config.lm_weight * lm_loss(logits, batch) if config.lm_weight else loss


def recover(student, tokenizer, config: RecoverConfig, run_dir: str | Path, teacher=None, plan=None,
            source: str = "", progress: Progress | None = None, resume: bool = False, *,
            save: SaveModel, report_to: str = "none") -> RecoverResult:
    """Train ``student`` (see ``student_for``) with ``config``; save the recovered model into ``run_dir``.

    ``teacher`` is the unpruned model: required for ``distill``, and when given its held-out
    perplexity is reported as the unpruned baseline. ``plan`` (the pruning plan the student was made
    with) is saved alongside the model. ``progress(done, total, message)`` may raise ``Cancelled``:
    the step that just finished is checkpointed first, so ``resume=True`` continues exactly.
    The training and held-out losses go to the run's log and, with ``report_to="tensorboard"``, to
    TensorBoard (``shedder.prune.recover.reporting``).

    One writer per run directory: the run holds its lock from before the first read of the
    directory to the saved model. Another process is refused at once (``Busy``), before anything is
    loaded, measured or written; another thread of this process (an app session) waits, shown
    through ``progress``, which may cancel the wait.
    """
    protected = model_dirs(student, teacher)
    run_dir = check_place(run_dir, protected, "recovery run directory")  # never the working or a model's directory
    if config.method == "distill" and teacher is None:
        raise ShedderError("distillation needs the unpruned model as teacher (--teacher, or --model with --plan)")
    _check_teacher(student, teacher)
    check_run_dir(run_dir, resume)  # read-only: a plain mistake creates nothing
    claim_run_dir(run_dir, protected, "recovery run", legacy=(LEGACY_CHECKPOINT,))
    with exclusive(run_dir / RUN_LOCK, f"the recovery run {run_dir}", progress):
        check_run_dir(run_dir, resume)  # again: another writer may have finished or started meanwhile
        return _run(student, tokenizer, config, run_dir, teacher, plan, source, progress, resume, save, report_to)


def _check_teacher(student, teacher) -> None:
    """The teacher must read the student's tokens and predict over the same vocabulary (its
    perplexity is the baseline, and distillation compares the two distributions token by token)."""
    if teacher is None:
        return
    ours, theirs = student.get_input_embeddings().num_embeddings, teacher.get_input_embeddings().num_embeddings
    if ours != theirs:
        raise ShedderError(f"the teacher's vocabulary has {theirs} tokens, the student's {ours}; the teacher must be "
                           "the unpruned model the student was pruned from (same tokenizer and vocabulary)")


def _run(student, tokenizer, config: RecoverConfig, run_dir: Path, teacher, plan, source: str,
         progress: Progress | None, resume: bool, save: SaveModel, report_to: str) -> RecoverResult:
    """The recovery itself, under the run directory's lock."""
    device = next(student.parameters()).device
    train_ids = training_ids(tokenizer, config)
    eval_windows = windows_from(tokenizer, config.eval_data, samples=config.eval_samples, seq_len=config.seq_len)
    fingerprint = run_fingerprint(config, student)
    checkpoint = read_checkpoint(run_dir, fingerprint) if resume else None

    if checkpoint is None:
        ppl = {"pruned": perplexity(student, eval_windows)}
        if teacher is not None:
            ppl = {"unpruned": perplexity(teacher, eval_windows), **ppl}
        tasks = {"before": _downstream(student, tokenizer, config.tasks)} if config.tasks else {}
        log_event(run_dir, {"event": "start", "recipe": asdict(config), "source": source,
                       "protocol": describe_protocol(eval_windows, config.eval_data), "ppl": ppl,
                       "plan": plan.to_dict() if plan is not None else None})
    else:
        ppl, tasks = checkpoint[0]["ppl"], checkpoint[0]["tasks"]

    trainable = trainable_parameters(student, config)
    opt = torch.optim.AdamW(list(trainable.values()), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    start_step, elapsed = 0, 0.0
    if checkpoint is not None:
        meta, tensors = checkpoint
        restore(run_dir, meta, tensors, trainable, opt, gen, config.total_steps)
        start_step, elapsed = meta["step"], meta["seconds"]
        rewind_log(run_dir, start_step)
        log_event(run_dir, {"event": "resume", "step": start_step})
    reporter = Reporter(report_to, run_dir, start_step)
    if start_step == 0:
        reporter.scalar("eval/loss", math.log(ppl["pruned"]), 0)
    every = held_out_every(config.total_steps)

    def held_out(step: int) -> None:
        """The held-out next-token loss now, on the evaluation windows (the curve's second line)."""
        student.eval()
        loss = math.log(perplexity(student, eval_windows))
        student.train()
        log_event(run_dir, {"event": "held_out", "step": step, "loss": round(loss, 4)})
        reporter.scalar("eval/loss", loss, step)

    def save_checkpoint(step: int, seconds: float) -> None:
        tensors, groups = run_state(trainable, opt, gen)
        write_checkpoint(run_dir, tensors, {"schema_version": SCHEMA_VERSION, "fingerprint": fingerprint,
                                             "step": step, "seconds": seconds, "ppl": ppl, "tasks": tasks,
                                             "param_groups": groups})

    if teacher is not None:
        teacher.eval()
    student.train()
    total, tokens_per_step = config.total_steps, config.batch_size * config.seq_len
    started, running, completed, step = time.perf_counter(), None, start_step, start_step
    try:  # the reporter is closed (its curves flushed) however the run ends
        try:
            for step in range(start_step, total):
                position = gen.get_state()  # the data position before this step's batch
                for group in opt.param_groups:
                    group["lr"] = config.lr_at(step)
                batch = sample_batch(train_ids, config, gen).to(device)
                with parametrize.cached():
                    loss = step_loss(student, teacher, batch, config)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
                opt.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise ShedderError(f"the loss diverged at step {step + 1} ({value}); lower the learning rate")
                running = value if running is None else 0.9 * running + 0.1 * value
                completed = step + 1
                seconds = elapsed + time.perf_counter() - started
                if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                    save_checkpoint(step + 1, seconds)
                if (step + 1) % 10 == 0 or step + 1 == total:
                    log_event(run_dir, {"event": "step", "step": step + 1, "loss": round(running, 4),
                                   "lr": config.lr_at(step), "tokens": (step + 1) * tokens_per_step, "s": round(seconds, 1)})
                    reporter.scalar("train/loss", running, step + 1)
                    reporter.scalar("train/learning_rate", config.lr_at(step), step + 1)
                if (step + 1) % every == 0 and step + 1 < total:  # the end is measured below, on the saved weights
                    held_out(step + 1)
                if progress:
                    progress(step + 1, total, f"recover: loss {running:.4f}")
        except (Cancelled, KeyboardInterrupt):
            if completed <= step:
                gen.set_state(position)  # stopped inside a step: it is redone on resume
            save_checkpoint(completed, elapsed + time.perf_counter() - started)
            log_event(run_dir, {"event": "stopped", "step": completed})
            raise
        student.eval()
        seconds = elapsed + time.perf_counter() - started
        if config.method == "lora":
            merge_lora(student)
        student.requires_grad_(False)
        ppl["recovered"] = perplexity(student, eval_windows)
        reporter.scalar("eval/loss", math.log(ppl["recovered"]), total)
    finally:
        reporter.close()
    if config.tasks:
        tasks["after"] = _downstream(student, tokenizer, config.tasks)
    result = RecoverResult(run_dir, config, total, total * tokens_per_step, seconds, ppl,
                           describe_protocol(eval_windows, config.eval_data),
                           sum(p.numel() for p in trainable.values()), start_step, tasks)
    _save(save, student, tokenizer, result, plan, source)
    log_event(run_dir, {"event": "done", **result.to_dict()})
    remove_checkpoint(run_dir)
    return result


def _downstream(model, tokenizer, tasks: tuple[str, ...]) -> dict:
    """lm-eval accuracies (``{task: score, ..., "average": x}``) through ``shedder.measure.downstream``."""
    return downstream.scores(model, tokenizer, downstream.parse_tasks(",".join(tasks))).summary()


def _save(save: SaveModel, student, tokenizer, result: RecoverResult, plan, source: str) -> None:
    """Write the recovered model (through ``save``) and its card into the run directory (each file
    renamed into place)."""
    run_dir = result.run_dir
    tmp = run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(student, tokenizer, tmp, plan=plan, card=model_card(result, source, plan, count_parameters(student), is_stock(student)))
        (tmp / CARD_JSON).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        for path in tmp.iterdir():
            os.replace(path, run_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
