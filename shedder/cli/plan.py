"""``python -m shedder plan convert``: a plan between our format and the official one."""
from __future__ import annotations

from shedder.cli.options import common, model_options, overwrite_option
from shedder.core.errors import ShedderError, printable


def add(sub) -> None:
    p = sub.add_parser("plan", help="plan files: `plan convert` between our format and the official one")
    plan_sub = p.add_subparsers(dest="plan_command", required=True, metavar="{convert}")
    p = plan_sub.add_parser("convert", help="convert a plan to the official Mamba-Shedder config format or back")
    p.add_argument("plan", help="plan JSON (ours or an official config)")
    p.add_argument("--to", required=True, choices=("official", "shedder"), help="the format to write")
    model_options(p)
    p.set_defaults(model=None)
    p.add_argument("--out", required=True, help="file to write (new, or an earlier output of this tool with --overwrite)")
    overwrite_option(p, "file")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Our plan -> official config, or official config -> our plan, for one model (what an official
    key removes depends on the family, and ordinals and widths on the model's layers)."""
    from shedder.api.search import check_conversion, convert_plan  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load, sources  # lazy: start-up (--help imports no torch)
    from shedder.formats.official import OfficialConfig, read_plan  # lazy: start-up (--help imports no torch)

    plan = read_plan(args.plan)
    if args.model is None:
        if isinstance(plan, OfficialConfig) or plan.model is None or not plan.model.name:
            raise ShedderError("--model is needed: an official config does not say which model it is for")
        args.model = plan.model.name
    check_conversion(plan, args.plan, args.to, args.out, args.overwrite, sources(args))
    model, _ = load(args)
    resolved, data, out = convert_plan(model, plan, args.to, args.out, args.overwrite, sources(args))
    emit(args, {"out": str(out), "to": args.to, "plan": resolved.to_dict(), "written": data},
         f"wrote {printable(out)} ({args.to} format): {resolved.describe()}")
    return 0
