"""``python -m shedder``: the engine's commands for long runs and scripts.

    python -m shedder info    --model mamba2-tiny
    python -m shedder eval    --model mamba2-tiny [--plan plan.json] [--data test] [--samples N --seq-len 256]
                              [--tasks local|paper|lambada_openai,hellaswag,... [--limit N]]   (lm-eval accuracy)
    python -m shedder extract --model mamba2-tiny --plan plan.json --out pruned/
    python -m shedder score   --model mamba2-tiny --kinds block,ssm --out scores.csv
    python -m shedder search  --model mamba2-tiny --kinds ssm --steps 4 --out runs/ssm [--resume]
                              [--protocol official --data hf:tatsu-lab/alpaca:train|rows.jsonl]
                              [--workers N | --ray-address ADDR]   (score too: on Ray workers)
    python -m shedder bench   --model mamba2-tiny --plan plan.json     (speed of the extracted model)
    python -m shedder bench search [--model mamba2-tiny --kinds ssm --steps 4]  (fast vs reference search)
    python -m shedder bench scale [--sizes S,M,130m]   (time and memory as models grow)
    python -m shedder bench gpu-check                  (the whole journey on CUDA; skips without a GPU)
    python -m shedder bench search --workers 1,2                       (speed-up of Ray workers)

Every command takes ``--json`` for machine-readable output. Progress bars go to stderr. A mistake in
the input (bad path, plan for another model, empty text, ...) prints one line ``error: ...`` and exits
with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from .errors import Cancelled, ShedderError
from .loading import DEFAULT_MODEL

DEFAULT_CALIBRATION = "calibration"
DEFAULT_EVAL = "test"
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_BATCH = 16, 256, 8


# ---------------------------------------------------------------------------------------- helpers
def _emit(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _load(args):
    from .loading import load_model

    if not str(args.device).startswith("cuda"):
        # The GPU kernels' "install mamba-ssm / causal-conv1d" advice is no use on a CPU run.
        logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    # With Ray workers the model runs on them (on --device); this process only reads its weights.
    device = "cpu" if _distributed(args) else args.device
    return load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
                      tokenizer=args.tokenizer)


def _text_tokenizer(args, tokenizer):
    """The tokenizer of a command that reads text (one clear error when the model has none)."""
    from .loading import require_tokenizer

    return require_tokenizer(tokenizer, args.model)


def _distributed(args) -> bool:
    return getattr(args, "workers", None) is not None or getattr(args, "ray_address", None) is not None


@contextlib.contextmanager
def _worker_pool(args, model, windows, group_sizes=None):
    """The Ray workers of ``--workers`` / ``--ray-address`` (None without them)."""
    if not _distributed(args):
        yield None
        return
    from .distributed import WorkerPool

    with WorkerPool(model, windows, args.workers, args.ray_address, args.batch_size, group_sizes,
                    device=args.device) as pool:
        if not args.json:
            print(f"evaluating on {len(pool.actors)} Ray workers ({args.device})", file=sys.stderr, flush=True)
        yield pool


def _plan_for(model, path: str | None):
    """(adapter, validated plan or None) for ``--plan``."""
    from .arch import adapter_for
    from .plan import PruningPlan

    plan = PruningPlan.load(path) if path else None
    adapter = adapter_for(model, plan.group_sizes if plan else None)
    return adapter, (adapter.validate(plan) if plan else None)


def _windows(args, tokenizer, source: str):
    from .data import windows_from

    return windows_from(_text_tokenizer(args, tokenizer), source, samples=args.samples, seq_len=args.seq_len)


def _calibration(args, tokenizer):
    """(windows, protocol line) of score/search, by ``--protocol``; the official one fills in the
    official defaults (alpaca, 256 rows, 2048-token windows, batch 2) for what was not given."""
    from .data import OFFICIAL, calibration_windows
    from .metrics import calibration_protocol

    official = args.protocol == "official"
    args.data = args.data or (OFFICIAL.source if official else DEFAULT_CALIBRATION)
    args.samples = args.samples or (OFFICIAL.rows if official else DEFAULT_SAMPLES)
    args.seq_len = args.seq_len or (OFFICIAL.seq_len if official else DEFAULT_SEQ_LEN)
    args.batch_size = args.batch_size or (OFFICIAL.batch_size if official else DEFAULT_BATCH)
    windows = calibration_windows(_text_tokenizer(args, tokenizer), args.data, samples=args.samples,
                                  seq_len=args.seq_len, protocol=args.protocol)
    return windows, calibration_protocol(windows, args.data, args.protocol, rows=args.samples)


def _progress(args):
    from .progress import TqdmProgress

    return TqdmProgress(enabled=not args.no_progress)


def _announce(args, what: str, model, adapter, windows, kinds, base, steps: int | None = 1):
    """Say what a score or search will cost before it runs (on stderr), with an ETA from timing the
    base plan's pass; returns the evaluator, whose cache keeps that pass for the run itself."""
    from .budget import run_cost
    from .evaluator import PlanEvaluator, check_kinds
    from .plan import PruningPlan

    base = base or PruningPlan()
    candidates = len(adapter.candidates(base, check_kinds(adapter, kinds)))
    ev = PlanEvaluator(model, windows, adapter, args.batch_size)
    cost = run_cost(what, model, windows, candidates, steps, args.batch_size, ev.max_cache_bytes)
    print(cost.describe(), file=sys.stderr, flush=True)
    started = time.perf_counter()
    ev.perplexity(base)
    print(f"{what}: {cost.eta_text(time.perf_counter() - started)}", file=sys.stderr, flush=True)
    return ev


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%"


# ---------------------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from .arch import adapter_for
    from .extract import saved_plan
    from .loading import resolve

    model, _ = _load(args)
    adapter = adapter_for(model)
    layers = []
    for i in range(adapter.num_layers):
        counts: dict[str, int] = {}
        for c in adapter.layer_components(i):
            counts[c.kind] = counts.get(c.kind, 0) + 1
        layers.append({"layer": i, "type": adapter.layer_kind(i), "components": counts})
    params = adapter.param_count()
    plan = saved_plan(resolve(args.model)) if Path(resolve(args.model)).is_dir() else None
    payload = {"model": args.model, "architecture": type(model).__name__, "model_type": model.config.model_type,
               "num_layers": adapter.num_layers, "layers": layers, "components": adapter.kind_counts(),
               "parameters": params, "pruned_with": plan.to_dict() if plan else None}
    lines = [f"model: {args.model} ({type(model).__name__}, model_type {model.config.model_type})",
             f"parameters: {params:,}",
             f"layers: {adapter.num_layers}"]
    for row in layers:
        comps = ", ".join(k if n == 1 else f"{k} ×{n}" for k, n in row["components"].items())
        lines.append(f"  {row['layer']:>3}  {row['type']:<10} {comps}")
    lines.append("components: " + ", ".join(f"{k} {n}" for k, n in adapter.kind_counts().items()))
    if plan:
        lines.append(f"pruned with: {plan.describe()}")
    _emit(args, payload, "\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .masking import masked
    from .metrics import MAX_CONTEXT_TOKENS, describe_protocol, next_word_accuracy, next_word_protocol, perplexity

    if args.tasks:  # refuse a missing lm-eval or an unknown task before any model work
        from . import downstream

        args.tasks = downstream.parse_tasks(args.tasks)
        downstream.task_manager(args.tasks)
    model, tokenizer = _load(args)
    adapter, plan = _plan_for(model, args.plan)
    windows = _windows(args, tokenizer, args.data)
    full = adapter.param_count()
    params = adapter.param_count(plan)
    payload = {"model": args.model, "plan": plan.to_dict() if plan else None,
               "perplexity_protocol": describe_protocol(windows, args.data)}
    n, seq = windows.shape
    print(f"eval: perplexity over {n:,} windows × {seq:,} tokens in batches of {args.batch_size}"
          + (f"; next-word accuracy over up to {args.accuracy_n} passages (≤ {MAX_CONTEXT_TOKENS} context tokens each), "
             f"batches of {args.batch_size}" if args.accuracy else ""), file=sys.stderr, flush=True)
    with _progress(args) as progress, (masked(model, plan, adapter) if plan else contextlib.nullcontext()):
        started = time.perf_counter()
        payload["perplexity"] = perplexity(model, windows, args.batch_size, progress)
        if args.accuracy:
            # The same forwards over about as many tokens: the perplexity's time is the ETA.
            print(f"eval: perplexity took {time.perf_counter() - started:.1f} s; next-word accuracy runs "
                  f"~{args.accuracy_n * MAX_CONTEXT_TOKENS:,} tokens at most", file=sys.stderr, flush=True)
            payload["accuracy"] = next_word_accuracy(model, _text_tokenizer(args, tokenizer), args.data,
                                                     args.accuracy_n, progress, args.batch_size)
    payload.update(params=params, params_original=full)
    lines = [f"model: {args.model} ({type(model).__name__})",
             f"plan: {plan.describe() if plan else 'none'}",
             f"perplexity: {payload['perplexity']:.4f}   [{payload['perplexity_protocol']}]"]
    if args.accuracy:
        payload["accuracy_protocol"] = next_word_protocol(args.data, args.accuracy_n)
        lines.append(f"next-word accuracy: {payload['accuracy']:.4f}   [{payload['accuracy_protocol']}]")
    lines.append(f"parameters: {params:,} ({_pct(params, full)} of {full:,})")
    if args.tasks:
        payload["lm_eval"], text = _lm_eval(args, model, tokenizer, plan, adapter)
        lines.append(text)
    _emit(args, payload, "\n".join(lines))
    return 0


def _lm_eval(args, model, tokenizer, plan, adapter) -> tuple[dict, str]:
    """lm-eval scores of the model (masked by ``plan``) and of its unpruned baseline: the same model
    unmasked, ``--baseline``, or the source a pruned directory records."""
    from . import downstream

    kw = dict(limit=args.limit, batch_size=args.batch_size, cache_dir=args.cache_dir)
    with _progress(args) as progress:
        result = downstream.scores(model, tokenizer, args.tasks, plan, progress=progress, adapter=adapter, **kw)
        baseline_model = _baseline(args)
        if baseline_model is not None:
            progress.close()
            base = downstream.scores(*baseline_model, args.tasks, progress=progress, **kw)
        elif plan is not None and plan.components:
            base = downstream.scores(model, tokenizer, args.tasks, progress=progress, **kw)
        else:
            base = None if _pruned_dir(args.model) else result
    rows = result.rows(base)
    payload = {"protocol": result.protocol(), "tasks": rows, "average": result.average,
               "relative": result.relative(base) if base else None, "unpruned_average": base.average if base else None}
    table = [f"{'task':<18} {'metric':<9} {'value':>8} {'± stderr':>9}" + (f" {'unpruned':>9}" if base else "")]
    for r in rows:
        err = "" if r["stderr"] != r["stderr"] else f"{r['stderr']:.4f}"  # NaN for the average
        table.append(f"{r['task']:<18} {r['metric']:<9} {r['value']:>8.4f} {err:>9}"
                     + (f" {r['unpruned']:>9.4f}" if base else ""))
    relative = (f"relative accuracy: {result.relative_text(base)} (average / unpruned average)" if base else
                "relative accuracy: unknown (pass --baseline with the unpruned model)")
    return payload, "\n".join([f"lm-eval accuracy   [{result.protocol()}]", *table, relative])


def _pruned_dir(model: str):
    from .extract import saved_plan
    from .loading import resolve

    return saved_plan(resolve(model)) if Path(resolve(model)).is_dir() else None


def _baseline(args):
    """(model, tokenizer) of ``--baseline``, or of the source model a pruned directory's plan names
    when that directory exists here; None when neither applies."""
    from .loading import load_model

    source = args.baseline
    if source is None:
        plan = _pruned_dir(args.model)
        name = plan.model.name if plan is not None else ""
        source = name if name and Path(name).is_dir() else None
    if source is None:
        return None
    return load_model(source, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


# ---------------------------------------------------------------------------------------- extract
def cmd_extract(args) -> int:
    from .arch import count_parameters
    from .extract import model_card, save

    model, tokenizer = _load(args)
    adapter, plan = _plan_for(model, args.plan)
    before = adapter.param_count()
    small = adapter.extract(plan)
    after = count_parameters(small)
    card = model_card(args.model, type(model).__name__, plan, before, after)
    out = save(small, tokenizer, args.out, plan=plan, card=card)
    payload = {"out": str(out), "plan": plan.to_dict(), "params_before": before, "params_after": after}
    _emit(args, payload, f"saved {out}: {plan.describe()}; parameters {after:,} (from {before:,}, "
                         f"{_pct(before - after, before)} removed)")
    return 0


# ---------------------------------------------------------------------------------------- score
def cmd_score(args) -> int:
    from .importance import cache_status, score

    model, tokenizer = _load(args)
    adapter, base = _plan_for(model, args.base_plan)
    windows, protocol = _calibration(args, tokenizer)
    ev = None
    if not _distributed(args) and not cache_status(model, windows, args.kinds, base, args.cache_dir):
        ev = _announce(args, "score", model, adapter, windows, args.kinds, base)
    try:
        with _progress(args) as progress, _worker_pool(args, model, windows, adapter.group_sizes) as pool:
            table = score(model, windows, args.kinds, base_plan=base, progress=progress,
                          cache_dir=args.cache_dir, batch_size=args.batch_size, evaluator=ev, pool=pool)
    except (Cancelled, KeyboardInterrupt):
        print("scoring stopped: the finished components are kept; the same command resumes them", file=sys.stderr)
        raise
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    resumed = table.attrs.get("resumed", 0)
    payload = {"out": args.out, "protocol": protocol, "resumed": resumed, "rows": table.to_dict(orient="records")}
    text = f"{table.to_string(index=False)}\n\nwrote {args.out} ({len(table)} components; {protocol})"
    if resumed:
        text += f"\nresumed {resumed} of {len(table)} components from an interrupted run"
    _emit(args, payload, text)
    return 0


# ---------------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    from .search import greedy_search

    model, tokenizer = _load(args)
    adapter, base = _plan_for(model, args.base_plan)
    windows, protocol = _calibration(args, tokenizer)
    if not args.json:
        print(f"searching {args.kinds} on {args.model}; {protocol}", flush=True)
    ev = None if _distributed(args) else _announce(args, "search", model, adapter, windows, args.kinds, base, args.steps)

    with _progress(args) as progress, _worker_pool(args, model, windows, adapter.group_sizes) as pool:
        def on_step(step):
            if not args.json:
                progress.close()
                print(f"step {step.step}: removed {step.component}  ppl {step.ppl:.4f}  params {step.params:,}",
                      flush=True)

        result = greedy_search(model, windows, args.kinds, steps=args.steps, target_params=args.target_params,
                               max_ppl=args.max_ppl, run_dir=args.out, resume=args.resume, progress=progress,
                               base_plan=base, batch_size=args.batch_size, on_step=on_step, evaluator=ev,
                               pool=pool)
    payload = {"run_dir": str(result.run_dir), "protocol": protocol, "base_ppl": result.base_ppl,
               "base_params": result.base_params, "stopped": result.stopped,
               "steps": [{"step": s.step, "component": str(s.component), "ppl": s.ppl, "params": s.params}
                         for s in result.steps]}
    final = result.plan.describe() if result.plan else "nothing removed"
    _emit(args, payload, f"stopped: {result.stopped}\nbase ppl {result.base_ppl:.4f}; final: {final}\n"
                         f"plans in {result.run_dir}/step_XX/pruning_config.json")
    return 0


# ---------------------------------------------------------------------------------------- bench search
def cmd_bench_search(args) -> int:
    """Reference and fast search on the same model and data, side by side."""
    import torch

    from .data import calibration_windows
    from .metrics import nll_sum
    from .search import greedy_search, reference_search

    model, tokenizer = _load(args)
    windows = calibration_windows(_text_tokenizer(args, tokenizer), args.data, samples=args.samples, seq_len=args.seq_len)
    if args.workers:
        return _bench_workers(args, model, windows)
    with torch.inference_mode():
        nll_sum(model, windows[: args.batch_size], args.batch_size)  # warm-up, untimed
    timings, cpu, results = {}, {}, {}
    with _progress(args) as progress:
        for name, fn in (("reference", reference_search), ("fast", greedy_search)):
            started, started_cpu = time.perf_counter(), time.process_time()
            results[name] = fn(model, windows, args.kinds, steps=args.steps, progress=progress, batch_size=args.batch_size)
            timings[name] = time.perf_counter() - started
            cpu[name] = time.process_time() - started_cpu  # less sensitive to other processes' load
            progress.close()
    ref, fast = results["reference"], results["fast"]
    same = ref.components == fast.components
    payload = {"model": args.model, "kinds": args.kinds, "steps": args.steps,
               "windows": list(windows.shape), "reference_s": timings["reference"], "fast_s": timings["fast"],
               "speedup": timings["reference"] / timings["fast"], "reference_cpu_s": cpu["reference"],
               "fast_cpu_s": cpu["fast"], "cpu_speedup": cpu["reference"] / cpu["fast"], "identical": same,
               "reference_choices": [str(c) for c in ref.components], "fast_choices": [str(c) for c in fast.components],
               "fast_stats": fast.stats,
               # layer forwards (batches × layers, removed blocks not counted): the work, whatever the load
               "reference_layer_runs": ref.stats["layers_run"], "fast_layer_runs": fast.stats["layers_run"]}
    lines = [f"model {args.model}, kinds {args.kinds}, {len(ref.steps)} steps, "
             f"{windows.shape[0]} windows × {windows.shape[1]} tokens of {args.data!r}",
             f"reference search: {timings['reference']:.2f} s wall, {cpu['reference']:.2f} s CPU  "
             f"({', '.join(payload['reference_choices'])})",
             f"fast search:      {timings['fast']:.2f} s wall, {cpu['fast']:.2f} s CPU  "
             f"({', '.join(payload['fast_choices'])})",
             f"layer forwards (batches × layers): reference {payload['reference_layer_runs']}, "
             f"fast {payload['fast_layer_runs']}; windows scored by the loss head: reference "
             f"{ref.stats['windows_scored']}, fast {fast.stats['windows_scored']} "
             f"({fast.stats['abandoned']} of {fast.stats['evaluated']} candidates abandoned early)",
             f"speed-up: {payload['speedup']:.2f}× wall, {payload['cpu_speedup']:.2f}× CPU   "
             f"identical choices: {'yes' if same else 'NO'}"]
    _emit(args, payload, "\n".join(lines))
    return 0 if same else 1


def _bench_workers(args, model, windows) -> int:
    """``bench search --workers 1,2``: the same search on pools of each size, timed."""
    from .distributed import bench_workers

    with _progress(args) as progress:
        report = bench_workers(model, windows, args.kinds, args.steps, args.workers, args.batch_size,
                               args.ray_address, progress)
    first = report["runs"][0]["workers"]
    lines = [f"model {args.model}, kinds {args.kinds}, {args.steps} steps, "
             f"{windows.shape[0]} windows × {windows.shape[1]} tokens of {args.data!r}, workers on {args.device}"]
    lines += [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}: {r['seconds']:.2f} s  "
              f"speed-up over {first}: {r['speedup']:.2f}×  ({', '.join(r['choices'])})" for r in report["runs"]]
    lines.append(f"identical choices and perplexities: {'yes' if report['identical'] else 'NO'}")
    _emit(args, {"model": args.model, "kinds": args.kinds, "steps": args.steps, **report}, "\n".join(lines))
    return 0 if report["identical"] else 1


def cmd_bench(args) -> int:
    from . import bench

    if not (args.plan or args.pruned):
        raise ShedderError("bench needs --plan or --pruned (or the `search` subcommand: python -m shedder bench search)")
    return bench.run(args)


# ---------------------------------------------------------------------------------------- parser
def _model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", default=None if model_required else DEFAULT_MODEL, required=model_required,
                   help=f"bundled name, local directory or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--tokenizer", help="tokenizer name, directory or hub id (default: the model's own; needed "
                                       "only to read text when the model directory has none)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data_options(p: argparse.ArgumentParser, data: str, samples: int | None, seq_len: int = DEFAULT_SEQ_LEN) -> None:
    p.add_argument("--data", default=data, help=f"text source: calibration, test, a .txt/.jsonl file or "
                                                f"hf:DATASET[:CONFIG]:SPLIT (default {data})")
    p.add_argument("--samples", type=int, default=samples,
                   help=f"number of windows (default {samples if samples else 'all'})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"windows per forward (default {DEFAULT_BATCH})")


def _calibration_options(p: argparse.ArgumentParser) -> None:
    """Data options of score/search: defaults depend on --protocol, so they are filled in later."""
    p.add_argument("--protocol", choices=["shedder", "official"], default="shedder",
                   help="calibration sampling: shedder (the first --samples windows of --data) or official "
                        "(the Mamba-Shedder code's: --samples rows of the 10%% part of an 80/10/10 split, seed 42, "
                        "of a datasets id or a local .json/.jsonl with a 'text' field; defaults alpaca, 256 rows, "
                        "2048-token windows, batch 2)")
    p.add_argument("--data", help=f"text source (default {DEFAULT_CALIBRATION}; official: hf:tatsu-lab/alpaca:train)")
    p.add_argument("--samples", type=int, help=f"windows (default {DEFAULT_SAMPLES}); official: rows (default 256)")
    p.add_argument("--seq-len", type=int, help=f"tokens per window (default {DEFAULT_SEQ_LEN}; official 2048)")
    p.add_argument("--batch-size", type=int, help=f"windows per forward (default {DEFAULT_BATCH}; official 2)")


def _distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="evaluate candidates on N Ray workers, each with its own model "
                                               "replica (one GPU each with --device cuda); starts a local Ray "
                                               "unless --ray-address is given")
    p.add_argument("--ray-address", help="run the workers on this Ray cluster (e.g. auto, or ray://HEAD:10001); "
                                         "without --workers: one per GPU (--device cuda) or per node")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a list of worker counts like 1,2: {text!r}")
    return counts


def _kinds(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _target(text: str) -> float:
    """A parameter count (``250000``, ``2.5e5``) or a fraction of the model (``0.2``, ``20%``)."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a parameter count or fraction: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shedder", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,eval,extract,score,search,bench}")

    p = sub.add_parser("info", help="architecture, layers, components and parameters of a model")
    _model_options(p)
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity, next-word accuracy and parameters (optionally under a plan)")
    _model_options(p)
    p.add_argument("--plan", help="pruning plan JSON (ours or an official Mamba-Shedder config)")
    _data_options(p, DEFAULT_EVAL, None)  # the whole test split, as the model cards report
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure next-word accuracy (default on)")
    p.add_argument("--accuracy-n", type=int, default=100,
                   help="passages for next-word accuracy, batched by --batch-size (default 100: about a third of "
                        "the tokens of the test split's perplexity)")
    p.add_argument("--tasks", help="lm-eval zero-shot accuracy on these tasks: comma-separated names, 'paper' "
                                   "(the paper's seven) or 'local' (the bundled offline shedder_lastword,"
                                   "shedder_choice); needs lm-eval")
    p.add_argument("--limit", type=int, help="lm-eval examples per task (default all)")
    p.add_argument("--baseline", help="the unpruned model, for relative accuracy of an extracted model (default: "
                                      "the source recorded in a pruned directory; with --plan, the model unmasked)")
    p.add_argument("--cache-dir", help="lm-eval result cache (default $SHEDDER_CACHE_DIR or ~/.cache/shedder)")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extract", help="save the physically pruned model for a plan")
    _model_options(p)
    p.add_argument("--plan", required=True, help="pruning plan JSON")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("score", help="single-removal importance of every component (heatmap numbers) to CSV")
    _model_options(p)
    p.add_argument("--kinds", type=_kinds, default=["block"], help="comma-separated kinds (default block)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--base-plan", help="score on top of this plan")
    p.add_argument("--cache-dir", help="score cache (default $SHEDDER_CACHE_DIR or ~/.cache/shedder)")
    _distributed_options(p)
    _calibration_options(p)
    _common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("search", help="greedy Mamba-Shedder search, resumable")
    _model_options(p)
    p.add_argument("--kinds", type=_kinds, default=["block"], help="comma-separated kinds (default block)")
    p.add_argument("--out", required=True, help="run directory (log.jsonl, step_XX/pruning_config.json)")
    p.add_argument("--steps", type=int, help="number of components to remove")
    p.add_argument("--target-params", type=_target,
                   help="stop once this many parameters are removed (a count, or a fraction like 0.2 or 20%%)")
    p.add_argument("--max-ppl", type=float, help="stop before a step would exceed this calibration perplexity")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--base-plan", help="start from this plan")
    _distributed_options(p)
    _calibration_options(p)
    _common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("bench", help="speed of an extracted model vs its original; `bench search` for the search",
                       epilog="`bench scale --help`: cost as models grow; `bench gpu-check --help`: the journey on CUDA.")
    from . import bench

    bench.add_arguments(p)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{search}")
    s = bench_sub.add_parser("search", help="fast vs reference greedy search",
                             description="Run the reference and the fast greedy search on the same model and "
                                         "data; print both wall times, the speed-up and whether they chose "
                                         "identical components.")
    _model_options(s)
    s.add_argument("--kinds", type=_kinds, default=["ssm"], help="comma-separated kinds (default ssm)")
    s.add_argument("--steps", type=int, default=4, help="search steps (default 4)")
    s.add_argument("--workers", type=_counts, help="instead: the fast search on Ray pools of these sizes "
                                                   "(e.g. 1,2), and the speed-up over the first")
    s.add_argument("--ray-address", help="with --workers: run the pools on this Ray cluster")
    _data_options(s, DEFAULT_CALIBRATION, DEFAULT_SAMPLES)
    _common(s)
    s.set_defaults(func=cmd_bench_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the work; weight loading is quick
    if argv[:2] in (["bench", "scale"], ["bench", "gpu-check"]):
        from . import scale

        args = scale.build_parser(argv[1]).parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 2
    except (ShedderError, OSError) as e:  # OSError: an output path that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (score and search keep their finished work: rerun the same command, "
              "with --resume for search)", file=sys.stderr)
        return 130
