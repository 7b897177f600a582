"""``python -m shedder score``: the importance of every component to CSV; ``--compare`` for the rank
agreement between metrics."""
from __future__ import annotations

import contextlib
import sys

from shedder.cli.options import (calibration_options, common, distributed_options, kinds, model_options,
                                 overwrite_option, positive_int)
from shedder.core.defaults import METRICS
from shedder.core.errors import Cancelled, printable
from shedder.core.fileio import check_cache_dir, check_output_file, write_output_file


def add(sub) -> None:
    p = sub.add_parser("score", help="importance of every component (heatmap numbers) to CSV; --compare for agreement")
    model_options(p)
    p.add_argument("--kinds", type=kinds, default=["block"], help="comma-separated kinds (default block)")
    p.add_argument("--out", required=True, help="CSV file to write (with --compare: the agreement rows); new, "
                                                "or an earlier output of this tool with --overwrite")
    overwrite_option(p, "file")
    p.add_argument("--metric", default="ppl", choices=list(METRICS),
                   help="; ".join(f"{name}: {text}" for name, text in METRICS.items()) + " (default ppl)")
    p.add_argument("--compare", type=kinds, metavar="METRICS",
                   help="comma-separated metrics (or 'all'): Spearman / Kendall rank correlation between them and "
                        "between two halves of the calibration windows, per kind, and top-k overlap")
    p.add_argument("--top-k", type=positive_int, help="k of the top-k overlap (default a quarter of the components)")
    p.add_argument("--no-stability", action="store_true", help="with --compare: skip the calibration-halves rows")
    p.add_argument("--base-plan", help="score on top of this plan")
    p.add_argument("--cache-dir", help="score cache (default $SHEDDER_CACHE_DIR or ~/.cache/shedder)")
    distributed_options(p)
    calibration_options(p)
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import calibration, distributed, emit, load, progress, say, sources, worker_pool  # lazy: start-up (--help imports no torch)

    check_output_file(args.out, args.overwrite, sources(args))  # before the work, so a refusal costs nothing
    if args.cache_dir is not None:
        check_cache_dir(args.cache_dir, sources(args))
    model, tokenizer = load(args)
    adapter, base = api.plan_for(model, args.base_plan)
    windows, protocol = calibration(args, tokenizer)
    if args.compare:
        return _compare(args, model, adapter, windows, protocol)
    one_pass = args.metric != "ppl"  # one forward (and backward) in this process: no workers to start
    ev = None
    if not one_pass and not distributed(args) and not api.cached(model, windows, args.kinds, base, args.cache_dir):
        ev = api.announce("score", model, adapter, windows, args.kinds, base, 1, args.batch_size, say)
    try:
        workers = contextlib.nullcontext() if one_pass else worker_pool(args, model, windows, adapter.group_sizes)
        with progress(args) as bar, workers as pool:
            table = api.score(model, windows, args.kinds, args.metric, base, bar, args.cache_dir, args.batch_size,
                              ev, pool)
    except (Cancelled, KeyboardInterrupt):
        print("scoring stopped: the finished components are kept; the same command resumes them", file=sys.stderr)
        raise
    write_output_file(args.out, table.to_csv(index=False), args.overwrite, sources(args))
    resumed = table.attrs.get("resumed", 0)
    cost = table.attrs.get("seconds")
    payload = {"out": args.out, "metric": args.metric, "protocol": protocol, "resumed": resumed, "seconds": cost,
               "left_out": table.attrs.get("left_out", []), "rows": table.to_dict(orient="records")}
    text = f"{table.to_string(index=False)}\n\nwrote {printable(args.out)} ({len(table)} components; {args.metric}; {printable(protocol)})"
    if cost is not None:
        text += (f"\ncost: {cost:.2f} s, {table.attrs['forwards']} forward(s) and {table.attrs['backwards']} "
                 "backward(s) over the calibration windows")
    if table.attrs.get("left_out"):
        text += f"\n{args.metric} does not score {', '.join(table.attrs['left_out'])}: left out"
    if resumed:
        text += f"\nresumed {resumed} of {len(table)} components from an interrupted run"
    emit(args, payload, text)
    return 0


def _compare(args, model, adapter, windows, protocol: str) -> int:
    """``score --compare``: rank agreement between metrics and across calibration halves."""
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, progress, say, sources  # lazy: start-up (--help imports no torch)
    from shedder.prune.agreement import format_agreement  # lazy: start-up (--help imports no torch)

    say(api.compare_cost(model, adapter, windows, args.kinds, args.compare, stability=not args.no_stability,
                         batch_size=args.batch_size).describe())
    with progress(args) as bar:
        tables, rows = api.compare(model, windows, args.kinds, args.compare, stability=not args.no_stability,
                                   top_k=args.top_k, progress=bar, cache_dir=args.cache_dir,
                                   batch_size=args.batch_size)
    write_output_file(args.out, rows.to_csv(index=False), args.overwrite, sources(args))
    payload = {"out": args.out, "protocol": protocol, "agreement": rows.to_dict(orient="records"),
               "costs": {m: {k: t.attrs.get(k) for k in ("seconds", "forwards", "backwards")} for m, t in tables.items()}}
    emit(args, payload, f"{format_agreement(rows, tables)}\n\nwrote {printable(args.out)} ({printable(protocol)})")
    return 0
