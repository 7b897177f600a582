"""``python -m shedder``: the engine's commands for long runs and scripts.

    python -m shedder info    --model mamba2-tiny
    python -m shedder eval    --model mamba2-tiny [--plan plan.json] [--data test] [--samples N --seq-len 256]
                              [--tasks local|paper|lambada_openai,hellaswag,... [--limit N]]   (lm-eval accuracy)
    python -m shedder extract --model mamba2-tiny --plan plan.json --out pruned/ [--overwrite]
    python -m shedder score   --model mamba2-tiny --kinds block,ssm --out scores.csv [--metric taylor]
    python -m shedder score   --model mamba2-tiny --kinds block,head --compare all --out agreement.csv
    python -m shedder search  --model mamba2-tiny --kinds ssm --steps 4 --out runs/ssm [--resume]
                              [--protocol official --data hf:tatsu-lab/alpaca:train|rows.jsonl]
                              [--workers N | --ray-address ADDR]   (score too: on Ray workers)
    python -m shedder bench   --model mamba2-tiny --plan plan.json     (speed of the extracted model)
    python -m shedder bench search [--model mamba2-tiny --kinds ssm --steps 4]  (fast vs reference search)
    python -m shedder bench scale [--sizes S,M,130m]   (time and memory as models grow)
    python -m shedder bench gpu-check                  (the whole journey on CUDA; skips without a GPU)
    python -m shedder bench search --workers 1,2                       (speed-up of Ray workers)
    python -m shedder recover --model mamba2-tiny --plan plan.json --method lora --out recovered/ [--resume]
    python -m shedder bench recover [--steps 12]   (recovery per method for the same token budget)
    python -m shedder plan convert plan.json --to official|shedder [--model M] --out FILE
    python -m shedder import-run OFFICIAL_RUN_DIR --model M --out RUN_DIR

Every command takes ``--json`` for machine-readable output. Progress bars go to stderr. A mistake in
the input (bad path, plan for another model, empty text, ...) prints one line ``error: ...`` and exits
with status 2; an internal error prints one line and exits with status 1 (``--debug`` shows its
traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from shedder.core.errors import Cancelled, ShedderError, printable
from shedder.core.fileio import full_disk_reason
from shedder.dev.recover_bench import compare_methods, format_comparison
from shedder.formats.bench import bench_speed
from shedder.measure.bench import format_report
from shedder.formats.loading import DEFAULT_MODEL
from shedder.cli.options import OneLineParser, non_negative_int, positive_float, positive_int, threads

DEFAULT_CALIBRATION = "calibration"
DEFAULT_EVAL = "test"
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_BATCH = 16, 256, 8


# ---------------------------------------------------------------------------------------- helpers
def _emit(args, payload: dict, text: str) -> None:
    """Print the result: JSON with ``--json`` (which escapes control characters), else ``text``,
    in which every path or name echoed from the command line went through ``printable``
    (``--out $'a\\nb'`` must neither split a line nor drive the terminal)."""
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _load(args):
    from shedder.formats.loading import load_model

    if not str(args.device).startswith("cuda"):
        # The GPU kernels' "install mamba-ssm / causal-conv1d" advice is no use on a CPU run.
        logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    # With Ray workers the model runs on them (on --device); this process only reads its weights.
    device = "cpu" if _distributed(args) else args.device
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code,
                      tokenizer=args.tokenizer)


def _sources(args) -> list[str]:
    """The local directories a command reads models from: no output may go into (or over) them."""
    from shedder.formats.loading import resolve

    names = [getattr(args, k, None) for k in ("model", "teacher", "baseline")]
    return [resolve(n) for n in names if n and Path(resolve(n)).is_dir()]


def _text_tokenizer(args, tokenizer):
    """The tokenizer of a command that reads text (one clear error when the model has none)."""
    from shedder.formats.loading import require_tokenizer

    return require_tokenizer(tokenizer, args.model)


def _distributed(args) -> bool:
    return getattr(args, "workers", None) is not None or getattr(args, "ray_address", None) is not None


@contextlib.contextmanager
def _worker_pool(args, model, windows, group_sizes=None):
    """The Ray workers of ``--workers`` / ``--ray-address`` (None without them)."""
    if not _distributed(args):
        yield None
        return
    from shedder.prune.distributed import WorkerPool

    with WorkerPool(model, windows, args.workers, args.ray_address, args.batch_size, group_sizes,
                    device=args.device) as pool:
        if not args.json:
            print(f"evaluating on {len(pool.actors)} Ray workers ({args.device})", file=sys.stderr, flush=True)
        yield pool


def _plan_for(model, path: str | None):
    """(adapter, resolved plan or None) for ``--plan`` (ours or an official config)."""
    from shedder.arch import adapter_for
    from shedder.core.plan import PruningPlan
    from shedder.formats.official import read_plan

    plan = read_plan(path) if path else None
    adapter = adapter_for(model, plan.group_sizes if isinstance(plan, PruningPlan) else None)
    return adapter, (adapter.resolve(plan) if plan is not None else None)


def _windows(args, tokenizer, source: str):
    from shedder.measure.data import windows_from

    return windows_from(_text_tokenizer(args, tokenizer), source, samples=args.samples, seq_len=args.seq_len)


def _calibration(args, tokenizer):
    """(windows, protocol line) of score/search, by ``--protocol``; the official one fills in the
    official defaults (alpaca, 256 rows, 2048-token windows, batch 2) for what was not given."""
    from shedder.measure.data import OFFICIAL, calibration_windows
    from shedder.measure.metrics import calibration_protocol

    official = args.protocol == "official"
    args.data = args.data or (OFFICIAL.source if official else DEFAULT_CALIBRATION)
    args.samples = args.samples or (OFFICIAL.rows if official else DEFAULT_SAMPLES)
    args.seq_len = args.seq_len or (OFFICIAL.seq_len if official else DEFAULT_SEQ_LEN)
    args.batch_size = args.batch_size or (OFFICIAL.batch_size if official else DEFAULT_BATCH)
    windows = calibration_windows(_text_tokenizer(args, tokenizer), args.data, samples=args.samples,
                                  seq_len=args.seq_len, protocol=args.protocol)
    return windows, calibration_protocol(windows, args.data, args.protocol, rows=args.samples)


def _progress(args):
    from shedder.core.progress import TqdmProgress

    return TqdmProgress(enabled=not args.no_progress)


def _announce(args, what: str, model, adapter, windows, kinds, base, steps: int | None = 1):
    """Say what a score or search will cost before it runs (on stderr), with an ETA from timing the
    base plan's pass; returns the evaluator, whose cache keeps that pass for the run itself."""
    from shedder.measure.budget import run_cost
    from shedder.measure.evaluator import PlanEvaluator, check_kinds
    from shedder.core.plan import PruningPlan

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
    from shedder.arch import adapter_for
    from shedder.formats.extract import saved_plan
    from shedder.formats.loading import resolve

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
    lines = [f"model: {printable(args.model)} ({type(model).__name__}, model_type {model.config.model_type})",
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
    from shedder.measure.masking import masked
    from shedder.measure.metrics import MAX_CONTEXT_TOKENS, describe_protocol, next_word_accuracy, next_word_protocol, perplexity

    if args.cache_dir is not None:
        from shedder.core.fileio import check_cache_dir

        check_cache_dir(args.cache_dir, _sources(args))
    if args.tasks:  # refuse a missing lm-eval or an unknown task before any model work
        from shedder.measure import downstream

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
    lines = [f"model: {printable(args.model)} ({type(model).__name__})",
             f"plan: {plan.describe() if plan else 'none'}",
             f"perplexity: {payload['perplexity']:.4f}   [{printable(payload['perplexity_protocol'])}]"]
    if args.accuracy:
        payload["accuracy_protocol"] = next_word_protocol(args.data, args.accuracy_n)
        lines.append(f"next-word accuracy: {payload['accuracy']:.4f}   [{printable(payload['accuracy_protocol'])}]")
    lines.append(f"parameters: {params:,} ({_pct(params, full)} of {full:,})")
    if args.tasks:
        payload["lm_eval"], text = _lm_eval(args, model, tokenizer, plan, adapter)
        lines.append(text)
    _emit(args, payload, "\n".join(lines))
    return 0


def _lm_eval(args, model, tokenizer, plan, adapter) -> tuple[dict, str]:
    """lm-eval scores of the model (masked by ``plan``) and of its unpruned baseline: the same model
    unmasked, ``--baseline``, or the source a pruned directory records."""
    from shedder.measure import downstream

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
    from shedder.formats.extract import saved_plan
    from shedder.formats.loading import resolve

    return saved_plan(resolve(model)) if Path(resolve(model)).is_dir() else None


def _baseline(args):
    """(model, tokenizer) of ``--baseline``, or of the source model a pruned directory's plan names
    when that directory exists here; None when neither applies."""
    from shedder.formats.loading import load_model

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
    from shedder.arch import count_parameters
    from shedder.formats.extract import model_card, save
    from shedder.core.fileio import check_output_dir

    protected = _sources(args)
    check_output_dir(args.out, args.overwrite, protected)  # before the work, so a refusal costs nothing
    model, tokenizer = _load(args)
    adapter, plan = _plan_for(model, args.plan)
    before = adapter.param_count()
    small = adapter.extract(plan)
    after = count_parameters(small)
    card = model_card(args.model, type(model).__name__, plan, before, after)
    out = save(small, tokenizer, args.out, plan=plan, card=card, overwrite=args.overwrite, protected=protected)
    payload = {"out": str(out), "plan": plan.to_dict(), "params_before": before, "params_after": after}
    _emit(args, payload, f"saved {printable(out)}: {plan.describe()}; parameters {after:,} (from {before:,}, "
                         f"{_pct(before - after, before)} removed)")
    return 0


# ---------------------------------------------------------------------------------------- score
def cmd_score(args) -> int:
    from shedder.prune.importance import cache_status

    from shedder.core.fileio import check_cache_dir, check_output_file

    check_output_file(args.out, args.overwrite, _sources(args))  # before the work, so a refusal costs nothing
    if args.cache_dir is not None:
        check_cache_dir(args.cache_dir, _sources(args))
    model, tokenizer = _load(args)
    adapter, base = _plan_for(model, args.base_plan)
    windows, protocol = _calibration(args, tokenizer)
    if args.compare:
        return _compare(args, model, windows, protocol)
    one_pass = args.metric != "ppl"  # one forward (and backward) in this process: no workers to start
    ev = None
    if not one_pass and not _distributed(args) and not cache_status(model, windows, args.kinds, base, args.cache_dir):
        ev = _announce(args, "score", model, adapter, windows, args.kinds, base)
    try:
        workers = contextlib.nullcontext() if one_pass else _worker_pool(args, model, windows, adapter.group_sizes)
        with _progress(args) as progress, workers as pool:
            table = _score_table(args, model, windows, base, progress, pool, ev)
    except (Cancelled, KeyboardInterrupt):
        print("scoring stopped: the finished components are kept; the same command resumes them", file=sys.stderr)
        raise
    from shedder.core.fileio import write_output_file

    write_output_file(args.out, table.to_csv(index=False), args.overwrite, _sources(args))
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
    _emit(args, payload, text)
    return 0


def _score_table(args, model, windows, base, progress, pool, evaluator=None):
    """``--metric ppl``: the single-removal table (``importance.score``, on Ray workers with a
    ``pool``); other metrics (one pass in this process): their ``[layer, kind, index, score,
    params_removed]`` table."""
    if args.metric == "ppl":
        from shedder.prune.importance import score

        return score(model, windows, args.kinds, base_plan=base, progress=progress, cache_dir=args.cache_dir,
                     batch_size=args.batch_size, evaluator=evaluator, pool=pool)
    from shedder.prune.importance_metrics import metric_scores

    return metric_scores(model, windows, args.kinds, args.metric, base_plan=base, progress=progress,
                         cache_dir=args.cache_dir, batch_size=args.batch_size)


def _compare(args, model, windows, protocol: str) -> int:
    """``score --compare``: rank agreement between metrics and across calibration halves."""
    from shedder.prune.agreement import compare, format_agreement
    from shedder.prune.importance_metrics import metric_names

    metrics = metric_names() if args.compare == ["all"] else args.compare
    with _progress(args) as progress:
        tables, rows = compare(model, windows, args.kinds, metrics, stability=not args.no_stability,
                               top_k=args.top_k, progress=progress, cache_dir=args.cache_dir,
                               batch_size=args.batch_size)
    from shedder.core.fileio import write_output_file

    write_output_file(args.out, rows.to_csv(index=False), args.overwrite, _sources(args))
    payload = {"out": args.out, "protocol": protocol, "agreement": rows.to_dict(orient="records"),
               "costs": {m: {k: t.attrs.get(k) for k in ("seconds", "forwards", "backwards")} for m, t in tables.items()}}
    _emit(args, payload, f"{format_agreement(rows, tables)}\n\nwrote {printable(args.out)} ({printable(protocol)})")
    return 0


# ---------------------------------------------------------------------------------------- search
def cmd_search(args) -> int:
    from shedder.core.plan import PruningPlan
    from shedder.prune.distributed import Workers
    from shedder.prune.search import RunDir, StopWhen, greedy_search

    model, tokenizer = _load(args)
    adapter, base = _plan_for(model, args.base_plan)
    if args.official_layout:  # refused now, not once the whole search has run
        from shedder.formats.official import check_official_kinds, to_official

        check_official_kinds(adapter, args.kinds)
        to_official(adapter, base or PruningPlan())
    windows, protocol = _calibration(args, tokenizer)
    if not args.json:
        print(f"searching {args.kinds} on {printable(args.model)}; {printable(protocol)}", flush=True)
    if args.out is not None:
        from shedder.core.fileio import exclusive
        from shedder.prune.runs import LOCK_FILE, claim_search_dir  # lazy: start-up cost (the engine loads only for the command run)

        claim_search_dir(args.out, model)
        with exclusive(Path(args.out) / LOCK_FILE, f"the search run {args.out}"):
            pass  # another process on this run: refused now, before the cost is measured and announced
    ev = None if _distributed(args) else _announce(args, "search", model, adapter, windows, args.kinds, base, args.steps)

    with _progress(args) as progress, _worker_pool(args, model, windows, adapter.group_sizes) as pool:
        def on_step(step):
            if not args.json:
                progress.close()
                print(f"step {step.step}: removed {step.component}  ppl {step.ppl:.4f}  params {step.params:,}",
                      flush=True)

        result = greedy_search(model, windows, args.kinds, StopWhen(args.steps, args.target_params, args.max_ppl),
                               run=None if args.out is None else RunDir(args.out, args.resume), progress=progress,
                               base_plan=base, batch_size=args.batch_size, on_step=on_step, evaluator=ev,
                               workers=None if pool is None else Workers(pool=pool))
    if args.official_layout:
        from shedder.formats.official import write_official_run

        write_official_run(adapter, result.run_dir, result.steps, args.kinds,
                           {k: v for k, v in vars(args).items() if k != "func"})
    payload = {"run_dir": str(result.run_dir), "protocol": protocol, "base_ppl": result.base_ppl,
               "base_params": result.base_params, "stopped": result.stopped,
               "steps": [{"step": s.step, "component": str(s.component), "ppl": s.ppl, "params": s.params}
                         for s in result.steps]}
    final = result.plan.describe() if result.plan else "nothing removed"
    _emit(args, payload, f"stopped: {result.stopped}\nbase ppl {result.base_ppl:.4f}; final: {final}\n"
                         f"plans in {printable(result.run_dir)}/step_XX/pruning_config.json")
    return 0


# ---------------------------------------------------------------------------------------- official files
def cmd_plan_convert(args) -> int:
    """Our plan -> official config, or official config -> our plan, for one model (what an official
    key removes depends on the family, and ordinals and widths on the model's layers)."""
    from shedder.arch import adapter_for
    from shedder.formats.official import OfficialConfig, to_official
    from shedder.formats.official import read_plan

    plan = read_plan(args.plan)
    official_in = isinstance(plan, OfficialConfig)
    if args.model is None:
        if official_in or plan.model is None or not plan.model.name:
            raise ShedderError("--model is needed: an official config does not say which model it is for")
        args.model = plan.model.name
    from shedder.core.fileio import check_output_file, write_output_file

    check_output_file(args.out, args.overwrite, _sources(args))
    if args.to == "official" and official_in:
        raise ShedderError(f"{args.plan} is already an official config")
    if args.to == "shedder" and not official_in:
        raise ShedderError(f"{args.plan} is already a plan of ours")
    model, _ = _load(args)
    adapter = adapter_for(model, None if official_in else plan.group_sizes)
    resolved = adapter.resolve(plan)
    data = to_official(adapter, resolved) if args.to == "official" else resolved.to_dict()
    out = write_output_file(args.out, json.dumps(data, indent=4, default=str), args.overwrite, _sources(args))
    _emit(args, {"out": str(out), "to": args.to, "plan": resolved.to_dict(), "written": data},
          f"wrote {printable(out)} ({args.to} format): {resolved.describe()}")
    return 0


def cmd_import_run(args) -> int:
    from shedder.formats.official import import_run

    model, _ = _load(args)
    steps = import_run(model, args.run, args.out)
    payload = {"run_dir": args.out, "steps": [{"step": s.step, "component": str(s.component), "ppl": s.ppl,
                                               "params": s.params} for s in steps]}
    lines = [f"step {s.step}: removed {s.component}  ppl {s.ppl:.4f}  params {s.params:,}" for s in steps]
    lines.append(f"imported {len(steps)} steps into {printable(args.out)} (log.jsonl, step_XX/pruning_config.json)")
    _emit(args, payload, "\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------- bench search
def cmd_bench_search(args) -> int:
    """Reference and fast search on the same model and data, side by side."""
    import torch

    from shedder.measure.data import calibration_windows
    from shedder.measure.metrics import nll_sum
    from shedder.prune.search import StopWhen, greedy_search, reference_search

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
            results[name] = fn(model, windows, args.kinds, StopWhen(steps=args.steps), progress=progress,
                               batch_size=args.batch_size)
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
    lines = [f"model {printable(args.model)}, kinds {args.kinds}, {len(ref.steps)} steps, "
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
    from shedder.dev.workers import bench_workers  # lazy: start-up cost (the engine loads only for the command run)

    with _progress(args) as progress:
        report = bench_workers(model, windows, args.kinds, args.steps, args.workers, args.batch_size,
                               args.ray_address, progress)
    first = report["runs"][0]["workers"]
    lines = [f"model {printable(args.model)}, kinds {args.kinds}, {args.steps} steps, "
             f"{windows.shape[0]} windows × {windows.shape[1]} tokens of {args.data!r}, workers on {args.device}"]
    lines += [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}: {r['seconds']:.2f} s  "
              f"speed-up over {first}: {r['speedup']:.2f}×  ({', '.join(r['choices'])})" for r in report["runs"]]
    lines.append(f"identical choices and perplexities: {'yes' if report['identical'] else 'NO'}")
    _emit(args, {"model": args.model, "kinds": args.kinds, "steps": args.steps, **report}, "\n".join(lines))
    return 0 if report["identical"] else 1


# ---------------------------------------------------------------------------------------- recover
def cmd_recover(args) -> int:
    from shedder.formats.extract import save, saved_plan
    from shedder.formats.loading import resolve
    from shedder.formats.loading import load_model
    from shedder.prune.recover import recover, student_for

    config = _recover_config(args)
    model, tokenizer = _load(args)
    adapter, plan = _plan_for(model, args.plan)
    if plan is not None:  # --model is the original: the student is extracted, the original teaches
        student, teacher = student_for(model, plan, adapter), model
    else:  # --model is a pruned checkpoint (or nothing is removed); the teacher comes from --teacher
        student, teacher = model, None
        plan = saved_plan(resolve(args.model)) if Path(resolve(args.model)).is_dir() else None
        if args.teacher:
            teacher, _ = load_model(args.teacher, dtype=args.dtype, device=args.device,
                                    trust_remote_code=args.trust_remote_code)
    if not args.json:
        print(f"recovering {printable(args.model)}{f' ({plan.describe()})' if plan else ''}: {config.describe()}",
              flush=True)
    try:
        with _progress(args) as progress:
            result = recover(student, tokenizer, config, args.out, teacher=teacher, plan=plan, source=args.model,
                             progress=progress, resume=args.resume, save=save)
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
    lines.append(f"[{printable(result.protocol)}]")
    _emit(args, result.to_dict(), "\n".join(lines))
    return 0


def _recover_config(args):
    from shedder.prune.recover import RecoverConfig

    return RecoverConfig(
        method=args.method, data=args.data, template=args.template, steps=args.steps, tokens=args.tokens,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
        seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None, temperature=args.temperature,
        lm_weight=args.lm_weight, eval_data=args.eval_data, eval_samples=args.eval_samples,
        checkpoint_every=args.checkpoint_every, tasks=tuple(args.tasks or ()))


def cmd_bench_recover(args) -> int:
    with _progress(args) as progress:
        rows = compare_methods(args.methods, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               eval_samples=args.eval_samples, threads=args.threads, progress=progress)
    _emit(args, {"rows": rows}, format_comparison(rows))
    return 0


def cmd_bench(args) -> int:
    """Run the benchmark the parsed ``args`` describe and print the report."""
    import torch

    from shedder.core.progress import TqdmProgress
    from shedder.formats.official import read_plan

    if not (args.plan or args.pruned):
        raise ShedderError("bench needs --plan or --pruned (or the `search` subcommand: python -m shedder bench search)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plan:
        args.plan = read_plan(args.plan)  # ours or an official config
    print(f"bench: {args.warmup} warm-up + {args.repeats} timed rounds, each a prefill of {args.batch} × "
          f"{args.seq_len} tokens and a {args.new_tokens}-token generation on the original and the extracted "
          f"model" + ("" if args.no_memory else ", then one peak-memory run of each (CPU: in a fresh process)"),
          file=sys.stderr, flush=True)
    with TqdmProgress(enabled=not getattr(args, "no_progress", False)) as progress:
        result = bench_speed(args.model, plan=args.plan, pruned_dir=args.pruned, batch_size=args.batch,
                             seq_len=args.seq_len, new_tokens=args.new_tokens, repeats=args.repeats,
                             warmup=args.warmup, device=args.device, dtype=args.dtype, memory=not args.no_memory,
                             progress=progress)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _bench_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m shedder bench``."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"bundled name, local directory or hub id of the original model (default {DEFAULT_MODEL})")
    which = parser.add_mutually_exclusive_group()  # one of them is required unless `bench search`
    which.add_argument("--plan", help="pruning plan JSON (the model is extracted in memory)")
    which.add_argument("--pruned", help="directory of a saved pruned model")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated for decode timing (default 32)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per model (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    parser.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


# ---------------------------------------------------------------------------------------- parser
def _model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", default=None if model_required else DEFAULT_MODEL, required=model_required,
                   help=f"bundled name, local directory or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--tokenizer", help="tokenizer name, directory or hub id (default: the model's own; needed "
                                       "only to read text when the model directory has none)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print the traceback of an internal error")


def _data_options(p: argparse.ArgumentParser, data: str, samples: int | None, seq_len: int = DEFAULT_SEQ_LEN) -> None:
    p.add_argument("--data", default=data, help=f"text source: calibration, test, a .txt/.jsonl file or "
                                                f"hf:DATASET[:CONFIG]:SPLIT (default {data})")
    p.add_argument("--samples", type=positive_int, default=samples,
                   help=f"number of windows (default {samples if samples else 'all'})")
    p.add_argument("--seq-len", type=positive_int, default=seq_len, help=f"tokens per window (default {seq_len})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help=f"windows per forward (default {DEFAULT_BATCH})")


def _calibration_options(p: argparse.ArgumentParser) -> None:
    """Data options of score/search: defaults depend on --protocol, so they are filled in later."""
    p.add_argument("--protocol", choices=["shedder", "official"], default="shedder",
                   help="calibration sampling: shedder (the first --samples windows of --data) or official "
                        "(the Mamba-Shedder code's: --samples rows of the 10%% part of an 80/10/10 split, seed 42, "
                        "of a datasets id or a local .json/.jsonl with a 'text' field; defaults alpaca, 256 rows, "
                        "2048-token windows, batch 2)")
    p.add_argument("--data", help=f"text source (default {DEFAULT_CALIBRATION}; official: hf:tatsu-lab/alpaca:train)")
    p.add_argument("--samples", type=positive_int, help=f"windows (default {DEFAULT_SAMPLES}); official: rows (default 256)")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per window (default {DEFAULT_SEQ_LEN}; official 2048)")
    p.add_argument("--batch-size", type=positive_int, help=f"windows per forward (default {DEFAULT_BATCH}; official 2)")


def _distributed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=positive_int, help="evaluate candidates on N Ray workers, each with its own model "
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


TARGET_RULE = "an integer count ≥ 1, a fraction in (0, 1), or a percentage in (0, 100%)"


def _target(text: str) -> float:
    """A parameter count (``250000``, ``2.5e5``), a fraction of the model (``0.2``) or a
    percentage (``20%``); anything else (``1.0``, ``150%``, ``0``) is refused, never guessed."""
    raw = text.strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        value = math.nan
    if raw.endswith("%"):
        if 0 < value < 100:
            return value / 100
    elif 0 < value < 1:
        return value
    elif value >= 1 and value.is_integer() and ("e" in raw.lower() or "." not in raw):  # 2.5e5 yes, 1.0 no
        return int(value)
    raise argparse.ArgumentTypeError(f"--target-params takes {TARGET_RULE}; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from shedder.prune.importance_metrics import REGISTRY as METRIC_REGISTRY  # lazy: start-up cost (pandas, torch) of importing the CLI module

    parser = OneLineParser(prog="python -m shedder", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{info,eval,extract,score,search,recover,bench,plan,import-run}")

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
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extract", help="save the physically pruned model for a plan")
    _model_options(p)
    p.add_argument("--plan", required=True, help="pruning plan JSON")
    p.add_argument("--out", required=True, help="output directory (new, or a previous export with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a previous export of this tool (never any other directory)")
    _common(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("score", help="importance of every component (heatmap numbers) to CSV; --compare for agreement")
    _model_options(p)
    p.add_argument("--kinds", type=_kinds, default=["block"], help="comma-separated kinds (default block)")
    p.add_argument("--out", required=True, help="CSV file to write (with --compare: the agreement rows); new, "
                                                "or an earlier output of this tool with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if this tool wrote it and it is unchanged since (never any other file)")
    p.add_argument("--metric", default="ppl", choices=list(METRIC_REGISTRY),
                   help="; ".join(f"{m.name}: {m.description}" + (" (default)" if m.name == "ppl" else "")
                                  for m in METRIC_REGISTRY.values()))
    p.add_argument("--compare", type=_kinds, metavar="METRICS",
                   help="comma-separated metrics (or 'all'): Spearman / Kendall rank correlation between them and "
                        "between two halves of the calibration windows, per kind, and top-k overlap")
    p.add_argument("--top-k", type=positive_int, help="k of the top-k overlap (default a quarter of the components)")
    p.add_argument("--no-stability", action="store_true", help="with --compare: skip the calibration-halves rows")
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
    p.add_argument("--steps", type=positive_int, help="number of components to remove")
    p.add_argument("--target-params", type=_target,
                   help="stop once this many parameters are removed: a count (250000), a fraction (0.2) or a "
                        "percentage (20%%) of the model")
    p.add_argument("--max-ppl", type=positive_float, help="stop before a step would exceed this calibration perplexity")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--base-plan", help="start from this plan")
    p.add_argument("--official-layout", action="store_true",
                   help="also write the official run layout (log.json, pruning_config.json, "
                        "pruned_model_configs/config.TARGET.STEP.json) for the official eval scripts")
    _distributed_options(p)
    _calibration_options(p)
    _common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("recover", help="recover a pruned model: LoRA, full fine-tuning or distillation, resumable")
    _model_options(p)
    p.add_argument("--plan", help="pruning plan for --model (the original); without it --model is a pruned checkpoint")
    p.add_argument("--out", required=True, help="run directory: checkpoint, log.jsonl, then the recovered model")
    _recover_options(p)
    p.add_argument("--teacher", help="the unpruned model when --model is a pruned checkpoint (needed by distill)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _common(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("plan", help="plan files: `plan convert` between our format and the official one")
    plan_sub = p.add_subparsers(dest="plan_command", required=True, metavar="{convert}")
    p = plan_sub.add_parser("convert", help="convert a plan to the official Mamba-Shedder config format or back")
    p.add_argument("plan", help="plan JSON (ours or an official config)")
    p.add_argument("--to", required=True, choices=("official", "shedder"), help="the format to write")
    _model_options(p)
    p.set_defaults(model=None)
    p.add_argument("--out", required=True, help="file to write (new, or an earlier output of this tool with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if this tool wrote it and it is unchanged since (never any other file)")
    _common(p)
    p.set_defaults(func=cmd_plan_convert)

    p = sub.add_parser("import-run", help="turn an official Mamba-Shedder run directory into a run of ours")
    p.add_argument("run", help="official run directory (log.json, pruned_model_configs/)")
    _model_options(p, model_required=True)
    p.add_argument("--out", required=True, help="new run directory (log.jsonl, step_XX/pruning_config.json)")
    _common(p)
    p.set_defaults(func=cmd_import_run)

    p = sub.add_parser("bench", help="speed of an extracted model vs its original; `bench search` for the search",
                       epilog="`bench scale --help`: cost as models grow; `bench gpu-check --help`: the journey on CUDA.")
    _bench_options(p)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{search,recover}")
    s = bench_sub.add_parser("search", help="fast vs reference greedy search",
                             description="Run the reference and the fast greedy search on the same model and "
                                         "data; print both wall times, the speed-up and whether they chose "
                                         "identical components.")
    _model_options(s)
    s.add_argument("--kinds", type=_kinds, default=["ssm"], help="comma-separated kinds (default ssm)")
    s.add_argument("--steps", type=positive_int, default=4, help="search steps (default 4)")
    s.add_argument("--workers", type=_counts, help="instead: the fast search on Ray pools of these sizes "
                                                   "(e.g. 1,2), and the speed-up over the first")
    s.add_argument("--ray-address", help="with --workers: run the pools on this Ray cluster")
    _data_options(s, DEFAULT_CALIBRATION, DEFAULT_SAMPLES)
    _common(s)
    s.set_defaults(func=cmd_bench_search)
    r = bench_sub.add_parser("recover", help="recovery per method for the same token budget",
                             description="Prune mamba2-tiny (a quarter of its blocks) and hybrid-tiny (a mixed "
                                         "plan), recover each with every method for the same token budget, and "
                                         "print the share of the lost perplexity each method wins back.")
    _bench_recover_options(r)
    return parser


def _recover_options(p: argparse.ArgumentParser) -> None:
    from shedder.prune.recover import DEFAULT_LR, METHODS, SCHEDULES

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
    p.add_argument("--lora-targets", type=_kinds, help="comma-separated linear layer names (default per family, "
                                                       "e.g. in_proj,out_proj,up_proj,down_proj)")
    p.add_argument("--temperature", type=float, default=2.0, help="distill: softmax temperature (default 2)")
    p.add_argument("--lm-weight", type=float, default=0.0, help="distill: weight of the next-token loss (default 0)")
    p.add_argument("--eval-data", default=DEFAULT_EVAL, help="held-out text for before/after perplexity (default test)")
    p.add_argument("--eval-samples", type=positive_int, default=64, help="held-out windows (default 64)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--tasks", type=_kinds, help="lm-eval tasks to run before and after (needs shedder.measure.downstream)")


def _bench_recover_options(p: argparse.ArgumentParser) -> None:
    from shedder.prune.recover import METHODS

    p.add_argument("--methods", type=_kinds, default=list(METHODS), help="comma-separated (default all)")
    p.add_argument("--steps", type=positive_int, default=12, help="steps per method (default 12)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=64, help="tokens per window (default 64)")
    p.add_argument("--eval-samples", type=positive_int, default=32, help="held-out test windows (default 32)")
    p.add_argument("--threads", type=threads, default=2, help="CPU threads (default 2)")
    _common(p)
    p.set_defaults(func=cmd_bench_recover)


def _os_error_text(error: Exception) -> str:
    """One line for an error of the machine rather than of the input: a full disk says so and that
    runs keep their finished work; any other ``OSError`` as the system gives it."""
    reason = full_disk_reason(error)
    if reason is None:
        return printable(error)
    return (f"{reason} ({printable(error)}); free space and run the same command again (search and recover: "
            "with --resume; their finished steps are kept)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show the work; weight loading is quick
    if argv[:2] in (["bench", "scale"], ["bench", "gpu-check"]):
        from shedder.dev import scale

        args = scale.build_parser(argv[1]).parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Cancelled:
        print("error: cancelled", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `info --json | head`: the reader has gone; nothing to report
        with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ShedderError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (score, search and recover keep their finished work: rerun the same command, "
              "with --resume for search and recover)", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, OSError) or full_disk_reason(e) is not None:  # a path that cannot be written, a full disk
            print(f"error: {_os_error_text(e)}", file=sys.stderr)
            return 2
        # a bug, not the user's input: one line unless asked for the traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {printable(e)}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
