"""``python -m shedder eval``: perplexity, next-word accuracy and parameters, optionally under a plan,
and lm-eval zero-shot accuracy with ``--tasks``."""
from __future__ import annotations

import argparse

from shedder.cli.options import common, data_options, model_options, positive_int
from shedder.core.defaults import DEFAULT_EVAL
from shedder.core.errors import printable
from shedder.core.fileio import check_cache_dir


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, next-word accuracy and parameters (optionally under a plan)")
    model_options(p)
    p.add_argument("--plan", help="pruning plan JSON (ours or an official Mamba-Shedder config)")
    data_options(p, DEFAULT_EVAL, None)  # the whole test split, as the model cards report
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure next-word accuracy (default on)")
    p.add_argument("--accuracy-n", type=positive_int, default=100,
                   help="passages for next-word accuracy, batched by --batch-size (default 100: about a third of "
                        "the tokens of the test split's perplexity)")
    p.add_argument("--tasks", help="lm-eval zero-shot accuracy on these tasks: comma-separated names, 'paper' "
                                   "(the paper's seven) or 'local' (the bundled offline shedder_lastword,"
                                   "shedder_choice); needs lm-eval")
    p.add_argument("--limit", type=positive_int, help="lm-eval examples per task (default all)")
    p.add_argument("--baseline", help="the unpruned model, for relative accuracy of an extracted model (default: "
                                      "the source recorded in a pruned directory; with --plan, the model unmasked)")
    p.add_argument("--cache-dir", help="lm-eval result cache (default $SHEDDER_CACHE_DIR or ~/.cache/shedder)")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load, pct, progress, say, sources, text_tokenizer  # lazy: start-up (--help imports no torch)

    if args.cache_dir is not None:
        check_cache_dir(args.cache_dir, sources(args))
    if args.tasks:  # refuse a missing lm-eval or an unknown task before any model work
        args.tasks = api.check_tasks(args.tasks)
    model, tokenizer = load(args)
    adapter, plan = api.plan_for(model, args.plan)
    windows = api.eval_windows(text_tokenizer(args, tokenizer), args.data, args.samples, args.seq_len)
    with progress(args) as bar:
        result = api.evaluate(model, text_tokenizer(args, tokenizer) if args.accuracy else tokenizer, adapter, plan,
                              windows, args.data, args.batch_size, args.accuracy_n if args.accuracy else None,
                              bar, say)
    payload = {"model": args.model, "plan": plan.to_dict() if plan else None,
               "perplexity_protocol": result.perplexity_protocol, "perplexity": result.perplexity}
    if args.accuracy:
        payload["accuracy"] = result.accuracy
    payload.update(params=result.params, params_original=result.params_original)
    lines = [f"model: {printable(args.model)} ({type(model).__name__})",
             f"plan: {plan.describe() if plan else 'none'}",
             f"perplexity: {result.perplexity:.4f}   [{printable(result.perplexity_protocol)}]"]
    if args.accuracy:
        payload["accuracy_protocol"] = result.accuracy_protocol
        lines.append(f"next-word accuracy: {result.accuracy:.4f}   [{printable(result.accuracy_protocol)}]")
    lines.append(f"parameters: {result.params:,} ({pct(result.params, result.params_original)} of {result.params_original:,})")
    if args.tasks:
        with progress(args) as bar:
            scores = api.lm_eval(model, tokenizer, args.tasks, plan, adapter,
                                 baseline=api.baseline(args.model, args.baseline, args.dtype, args.device,
                                                       args.trust_remote_code),
                                 pruned=api.pruned_with(args.model) is not None, limit=args.limit,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir, progress=bar)
        payload["lm_eval"] = scores.payload()
        lines.append(scores.text())
    emit(args, payload, "\n".join(lines))
    return 0
