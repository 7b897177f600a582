"""``python -m shedder extract``: save the physically pruned model of a plan, with its card."""
from __future__ import annotations

from shedder.cli.options import common, model_options, overwrite_option
from shedder.core.errors import printable
from shedder.core.fileio import check_output_dir


def add(sub) -> None:
    p = sub.add_parser("extract", help="save the physically pruned model for a plan")
    model_options(p)
    p.add_argument("--plan", required=True, help="pruning plan JSON")
    p.add_argument("--out", required=True, help="output directory (new, or a previous export with --overwrite)")
    overwrite_option(p, "export")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load, pct, sources  # lazy: start-up (--help imports no torch)

    protected = sources(args)
    check_output_dir(args.out, args.overwrite, protected)  # before the work, so a refusal costs nothing
    model, tokenizer = load(args)
    adapter, plan = api.plan_for(model, args.plan)
    done = api.export(model, tokenizer, adapter, plan, args.out, args.model, overwrite=args.overwrite,
                      protected=protected)
    before, after = done.params_before, done.params_after
    change = f"{pct(before - after, before)} removed" if after <= before else f"{pct(after - before, before)} added"
    lines = [f"saved {printable(done.out)}: {plan.describe()}; parameters {after:,} (from {before:,}, {change})",
             *done.notes, done.load_line]
    emit(args, done.payload(), "\n".join(lines))
    return 0
