"""``python -m shedder search``: the greedy Mamba-Shedder search, resumable."""
from __future__ import annotations

from shedder.cli.options import (calibration_options, common, distributed_options, kinds, model_options,
                                 positive_float, positive_int, race_options, target)
from shedder.core.errors import ShedderError, printable


def add(sub) -> None:
    p = sub.add_parser("search", help="greedy Mamba-Shedder search, resumable")
    model_options(p)
    p.add_argument("--kinds", type=kinds, default=["block"], help="comma-separated kinds (default block)")
    p.add_argument("--out", required=True, help="run directory (log.jsonl, step_XX/pruning_config.json)")
    p.add_argument("--steps", type=positive_int, help="number of components to remove")
    p.add_argument("--target-params", type=target,
                   help="stop once this many parameters are removed: a count (250000), a fraction (0.2) or a "
                        "percentage (20%%) of the model")
    p.add_argument("--max-ppl", type=positive_float, help="stop before a step would exceed this calibration perplexity")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--base-plan", help="start from this plan")
    p.add_argument("--official-layout", action="store_true",
                   help="also write the official run layout (log.json, pruning_config.json, "
                        "pruned_model_configs/config.TARGET.STEP.json) for the official eval scripts")
    race_options(p)
    distributed_options(p)
    calibration_options(p)
    common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.api.search import check_official_layout, claim_run, step_rows, write_official_layout  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import calibration, distributed, emit, load, progress, say, worker_pool  # lazy: start-up (--help imports no torch)

    race = raced(args)
    model, tokenizer = load(args)
    adapter, base = api.plan_for(model, args.base_plan)
    if args.official_layout:  # refused now, not once the whole search has run
        check_official_layout(adapter, args.kinds, base)
    windows, protocol = calibration(args, tokenizer)
    if not args.json:
        print(f"searching {args.kinds} on {printable(args.model)}; {printable(protocol)}", flush=True)
    if args.out is not None:
        claim_run(args.out, model)
    ev = None if distributed(args) else api.announce("search", model, adapter, windows, args.kinds, base, args.steps,
                                                      args.batch_size, say)
    with progress(args) as bar, worker_pool(args, model, windows, adapter.group_sizes) as pool:
        def on_step(step):
            if not args.json:
                bar.close()
                print(f"{'raced ' if race else ''}step {step.step}: removed {step.component}  ppl {step.ppl:.4f}  params {step.params:,}",
                      flush=True)

        result = api.search(model, windows, args.kinds, api.StopWhen(args.steps, args.target_params, args.max_ppl),
                            run_dir=args.out, resume=args.resume, progress=bar, base=base,
                            batch_size=args.batch_size, on_step=on_step, evaluator=ev, pool=pool, race=race)
    if args.official_layout:
        write_official_layout(adapter, result, args.kinds, {k: v for k, v in vars(args).items() if k != "func"})
    payload = {"run_dir": str(result.run_dir), "protocol": protocol, "base_ppl": result.base_ppl,
               "base_params": result.base_params, "stopped": result.stopped, "steps": step_rows(result.steps), "raced": result.raced}
    final = result.plan.describe() if result.plan else "nothing removed"
    emit(args, payload, ("raced search (not exact): " if result.raced else "") + f"stopped: {result.stopped}\nbase ppl {result.base_ppl:.4f}; final: {final}\n"
                        f"plans in {printable(result.run_dir)}/step_XX/pruning_config.json")
    return 0


def raced(args):
    """The ``Race`` the flags ask for (None without ``--race``), refused before the model loads."""
    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import distributed  # lazy: start-up (--help imports no torch)

    if not args.race:
        if (args.race_windows, args.race_finish) != (4, 2):
            raise ShedderError("--race-windows and --race-finish need --race")
        return None
    if distributed(args):
        raise ShedderError("--race runs in this process: drop --workers/--ray-address or --race")
    return api.Race(windows=args.race_windows, finish=args.race_finish)
