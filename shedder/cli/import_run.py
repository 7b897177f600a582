"""``python -m shedder import-run``: an official Mamba-Shedder run directory as a run of ours."""
from __future__ import annotations

from shedder.cli.options import common, model_options
from shedder.core.errors import printable


def add(sub) -> None:
    p = sub.add_parser("import-run", help="turn an official Mamba-Shedder run directory into a run of ours")
    p.add_argument("run", help="official run directory (log.json, pruned_model_configs/)")
    model_options(p, model_required=True)
    p.add_argument("--out", required=True, help="new run directory (log.jsonl, step_XX/pruning_config.json)")
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder.api.search import import_official_run, step_rows  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load  # lazy: start-up (--help imports no torch)

    model, _ = load(args)
    steps = import_official_run(model, args.run, args.out)
    lines = [f"step {s.step}: removed {s.component}  ppl {s.ppl:.4f}  params {s.params:,}" for s in steps]
    lines.append(f"imported {len(steps)} steps into {printable(args.out)} (log.jsonl, step_XX/pruning_config.json)")
    emit(args, {"run_dir": args.out, "steps": step_rows(steps)}, "\n".join(lines))
    return 0
