"""``python -m shedder stock``: stock-shaped width pruning, the same number of SSM heads gone from
every group of every layer (and / or MLP channel groups from every MLP), so each extracted plan is a
checkpoint plain ``transformers`` loads."""
from __future__ import annotations

import argparse

from shedder.cli.options import calibration_options, common, model_options, overwrite_option, positive_int
from shedder.core.defaults import STOCK_KINDS, STOCK_STRATEGIES
from shedder.core.errors import printable
from shedder.core.fileio import check_output_dir, publish_dir


def kinds_list(text: str) -> tuple[str, ...]:
    """``head,mlp_channel_group`` → its kinds; an unknown one is refused by argparse (exit 2)."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in STOCK_KINDS] or ([] if kinds else [text])
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a stock-shaped kind: one or more of {', '.join(STOCK_KINDS)}")
    return kinds


def add(sub) -> None:
    p = sub.add_parser("stock", help="stock-shaped width pruning: equal SSM heads / MLP channels removed in every layer")
    model_options(p)
    p.add_argument("--strategy", choices=STOCK_STRATEGIES, default="one-shot",
                   help="one-shot (rank by --metric) or greedy (measure every step); default one-shot")
    p.add_argument("--kinds", type=kinds_list, default=("head",),
                   help="comma-separated: head, mlp_channel_group or both (default head)")
    p.add_argument("--metric", default="ppl", help="importance metric of the one-shot ranking (default ppl)")
    p.add_argument("--steps", type=positive_int,
                   help="at most this many components removed per group / MLP (default: all but one)")
    p.add_argument("--out", required=True, help="new directory for the plans (stock_01.json, ...: one per stock-shaped plan)")
    overwrite_option(p, "export")
    calibration_options(p)
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import calibration, emit, load, progress  # lazy: start-up (--help imports no torch)

    check_output_dir(args.out, args.overwrite)  # before the work, so a refusal costs nothing
    model, tokenizer = load(args)
    adapter, base = api.plan_for(model, None)
    windows, protocol = calibration(args, tokenizer)
    with progress(args) as bar:
        series = api.stock(model, windows, args.strategy, args.steps, args.metric, base,
                           batch_size=args.batch_size, progress=bar, kinds=args.kinds)
    rows = []
    with publish_dir(args.out, overwrite=args.overwrite) as out:
        for i, point in enumerate(series.points, 1):
            name = f"stock_{i:02d}.json"
            point.plan.save(out / name)
            rows.append({"plan": name, "label": point.label, "params": adapter.param_count(point.plan)})
    text = "\n".join(f"{r['plan']}: {r['label']}, parameters {r['params']:,}" for r in rows) or "no stock-shaped plan"
    emit(args, {"out": str(args.out), "protocol": protocol, "series": series.name, "plans": rows},
         f"{series.name} on {printable(args.model)}; {printable(protocol)}\n{text}\nsaved in {printable(args.out)}")
    return 0
