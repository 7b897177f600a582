"""``python -m shedder recover``: recover a pruned model by LoRA, full fine-tuning or distillation, resumable."""
from __future__ import annotations

import argparse
import sys

from shedder.cli.options import common, kinds, model_options, positive_int
from shedder.core.defaults import (DEFAULT_EVAL, RECOVER_DEFAULT_LR as DEFAULT_LR, RECOVER_METHODS as METHODS,
                                   RECOVER_SCHEDULES as SCHEDULES, REPORT_TO, TENSORBOARD_DIR)
from shedder.core.errors import Cancelled, printable


def add(sub) -> None:
    p = sub.add_parser("recover", help="recover a pruned model: LoRA, full fine-tuning or distillation, resumable")
    model_options(p)
    p.add_argument("--plan", help="pruning plan for --model (the original); without it --model is a pruned checkpoint")
    p.add_argument("--out", required=True, help="run directory: checkpoint, log.jsonl, then the recovered model")
    recover_options(p)
    p.add_argument("--teacher", help="the unpruned model when --model is a pruned checkpoint (needed by distill)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="also write the training and held-out loss curves for a dashboard: tensorboard writes "
                        "them under OUT/tensorboard (default none: the curves are in OUT/log.jsonl)")
    common(p)
    p.set_defaults(func=run)


def recover_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="lora", help="what to train (default lora)")
    p.add_argument("--data", default="train", help="training text: train (the shipped sample of the training split, "
                                                   "the default), calibration, a .txt/.jsonl file or hf:DATASET[:CONFIG]:SPLIT")
    p.add_argument("--template", choices=["alpaca"], help="format instruction/input/output records with the Alpaca prompt")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, help="optimizer steps (default 100)")
    budget.add_argument("--tokens", type=positive_int, help="token budget, rounded up to whole steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--lr", type=float, help="peak learning rate (default " +
                   ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="after the warm-up (default cosine)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the steps (default 0.05)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", type=kinds, help="comma-separated linear layer names (default per family, "
                                                       "e.g. in_proj,out_proj,up_proj,down_proj)")
    p.add_argument("--temperature", type=float, default=2.0, help="distill: softmax temperature (default 2)")
    p.add_argument("--lm-weight", type=float, default=0.0, help="distill: weight of the next-token loss (default 0)")
    p.add_argument("--eval-data", default=DEFAULT_EVAL, help="held-out text for before/after perplexity (default test)")
    p.add_argument("--eval-samples", type=positive_int, default=64, help="held-out windows (default 64)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--tasks", type=kinds, help="lm-eval tasks to run before and after (needs shedder.measure.downstream)")


def recover_config(args):
    """The recipe (``RecoverConfig``) the parsed flags describe."""
    from shedder.api.recover import RecoverConfig  # lazy: start-up (--help imports no torch)

    return RecoverConfig(
        method=args.method, data=args.data, template=args.template, steps=args.steps, tokens=args.tokens,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
        seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None, temperature=args.temperature,
        lm_weight=args.lm_weight, eval_data=args.eval_data, eval_samples=args.eval_samples,
        checkpoint_every=args.checkpoint_every, tasks=tuple(args.tasks or ()))


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.api.recover import student_and_teacher  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load, progress  # lazy: start-up (--help imports no torch)

    config = recover_config(args)
    model, tokenizer = load(args)
    adapter, plan = api.plan_for(model, args.plan)
    student, teacher, plan = student_and_teacher(model, adapter, plan, args.model, args.teacher, args.dtype,
                                                 args.device, args.trust_remote_code)
    if not args.json:
        print(f"recovering {printable(args.model)}{f' ({plan.describe()})' if plan else ''}: {config.describe()}",
              flush=True)
    try:
        with progress(args) as bar:
            result = api.recover(student, tokenizer, config, args.out, teacher=teacher, plan=plan, source=args.model,
                                 progress=bar, resume=args.resume, report_to=args.report_to)
    except (Cancelled, KeyboardInterrupt):
        print(f"recovery stopped: checkpoint kept in {printable(args.out)}; add --resume to continue",
              file=sys.stderr)
        raise
    ppl = result.ppl
    fraction = result.recovered_fraction
    lines = [f"saved {printable(result.run_dir)} ({result.steps} steps, {result.tokens:,} tokens, {result.seconds / 60:.1f} min)"]
    lines += [f"{name:>9} perplexity {ppl[name]:.4f}" for name in ("unpruned", "pruned", "recovered") if name in ppl]
    if fraction is not None:
        lines.append(f"recovered {100 * fraction:.1f}% of the log-perplexity lost to pruning")
    if args.report_to == "tensorboard":
        lines.append(f"curves: tensorboard --logdir {printable(str(result.run_dir / TENSORBOARD_DIR))}")
    lines.append(f"[{printable(result.protocol)}]")
    emit(args, result.to_dict(), "\n".join(lines))
    return 0
