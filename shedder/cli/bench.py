"""``python -m shedder bench``: measured speed of an extracted model against its original, and the
benchmarks of the engine itself (``bench search``, ``bench recover``, ``bench scale``, ``bench announce``,
``bench gpu-check``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shedder.cli.options import (OneLineParser, common, counts, data_options, kinds, model_options, non_negative_int,
                                 positive_float, positive_int, race_options, threads)
from shedder.cli.search import raced
from shedder.core.defaults import (DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_SAMPLES, PAPER_BUDGET_S, PAPER_TOTAL_S,
                                   REAL_SHAPE_FAMILIES, RECOVER_METHODS, SCALE_SIZES)
from shedder.core.errors import ShedderError, printable
from shedder.measure.timing import Protocol, Ratio


def add(sub) -> None:
    p = sub.add_parser("bench", help="speed of an extracted model vs its original; `bench search` for the search",
                       epilog="`bench scale --help`: cost as models grow; `bench gpu-check --help`: the journey on CUDA.")
    speed_options(p)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{search,recover,scan,dtype,announce}")
    s = bench_sub.add_parser("search", help="fast vs reference greedy search",
                             description="Run the reference and the fast greedy search on the same model and "
                                         "data; print both wall times, the speed-up and whether they chose "
                                         "identical components.")
    model_options(s)
    s.add_argument("--kinds", type=kinds, default=["ssm"], help="comma-separated kinds (default ssm)")
    s.add_argument("--steps", type=positive_int, default=4, help="search steps (default 4)")
    s.add_argument("--workers", type=counts, help="instead: the fast search on Ray pools of these sizes "
                                                  "(e.g. 1,2), and the speed-up over the first")
    s.add_argument("--ray-address", help="with --workers: run the pools on this Ray cluster")
    race_options(s)
    data_options(s, DEFAULT_CALIBRATION, DEFAULT_SAMPLES)
    common(s)
    s.set_defaults(func=run_search)
    r = bench_sub.add_parser("recover", help="recovery per method for the same token budget",
                             description="Prune mamba2-tiny (a quarter of its blocks) and hybrid-tiny (a mixed "
                                         "plan), recover each with every method for the same token budget, and "
                                         "print the share of the lost perplexity each method wins back.")
    recover_options(r)
    scan_parser(bench_sub)
    dtype_parser(bench_sub)
    announce_parser(bench_sub)


def speed_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m shedder bench``."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"bundled name, local directory or hub id of the original model (default {DEFAULT_MODEL})")
    which = parser.add_mutually_exclusive_group()  # one of them is required unless `bench search`
    which.add_argument("--plan", help="pruning plan JSON (the model is extracted in memory)")
    which.add_argument("--pruned", help="directory of a saved pruned model")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--seq-len", type=positive_int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated for decode timing (default 32)")
    parser.add_argument("--budget-s", type=positive_float, default=Protocol.budget_s,
                        help=f"seconds of paired rounds at most, once --min-rounds are done (default {Protocol.budget_s:g}); "
                             f"rounds stop earlier when the 95%% interval is within ±{Protocol.target * 100:.0f}%%")
    parser.add_argument("--min-rounds", "--repeats", dest="min_rounds", type=positive_int, default=Protocol.min_rounds,
                        help=f"paired rounds always timed (default {Protocol.min_rounds}; fewer give no 95%% interval; "
                             "--repeats is its earlier name)")
    parser.add_argument("--warmup", type=non_negative_int, default=Protocol.warmup,
                        help=f"untimed rounds first, which also fix the iterations per sample (default {Protocol.warmup})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    parser.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    """Run the benchmark the parsed ``args`` describe and print the report."""
    if not (args.plan or args.pruned):
        raise ShedderError("bench needs --plan or --pruned (or the `search` subcommand: python -m shedder bench search)")
    import torch  # lazy: start-up (--help imports no torch)

    from shedder import api  # lazy: start-up (--help imports no torch)
    from shedder.api.speed import format_report  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import progress  # lazy: start-up (--help imports no torch)
    from shedder.formats.official import read_plan  # lazy: start-up (--help imports no torch)

    plan = read_plan(args.plan) if args.plan else None  # ours or an official config
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = Protocol(budget_s=args.budget_s, min_rounds=args.min_rounds, warmup=args.warmup)
    print(f"bench: {protocol.describe()}; each round a prefill of {args.batch} × {args.seq_len} tokens and a "
          f"{args.new_tokens}-token generation on the original and the extracted model"
          + ("" if args.no_memory else ", then one peak-memory run of each (CPU: in a fresh process)"),
          file=sys.stderr, flush=True)
    with progress(args) as bar:
        result = api.bench_speed(args.model, plan=plan, pruned_dir=args.pruned, batch_size=args.batch,
                                 seq_len=args.seq_len, new_tokens=args.new_tokens, protocol=protocol,
                                 device=args.device, dtype=args.dtype, memory=not args.no_memory,
                                 progress=bar)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def run_search(args) -> int:
    """Reference and fast search on the same model and data, side by side."""
    from shedder.api.search import compare_searches  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, load, progress, text_tokenizer  # lazy: start-up (--help imports no torch)
    from shedder.measure.data import calibration_windows  # lazy: start-up (--help imports no torch)

    race = raced(args)
    model, tokenizer = load(args)
    windows = calibration_windows(text_tokenizer(args, tokenizer), args.data, samples=args.samples, seq_len=args.seq_len)
    if args.workers:
        return _workers(args, model, windows)
    if race is not None:
        return _race(args, model, windows, race)
    with progress(args) as bar:
        runs = compare_searches(model, windows, args.kinds, args.steps, args.batch_size, bar)
    timings, cpu, results = runs["timings"], runs["cpu"], runs["results"]
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
    emit(args, payload, "\n".join(lines))
    return 0 if same else 1


def _race(args, model, windows, race) -> int:
    """``bench search --race``: the exact and the raced search side by side."""
    from shedder.api.search import compare_race  # lazy: start-up (--help imports no torch)
    from shedder.cli.common import emit, progress  # lazy: start-up (--help imports no torch)

    with progress(args) as bar:
        runs = compare_race(model, windows, args.kinds, args.steps, race, args.batch_size, bar)
    exact, fast = runs["results"]["exact"], runs["results"]["raced"]
    payload = {"model": args.model, "kinds": args.kinds, "steps": args.steps, "windows": list(windows.shape),
               "race": race.to_dict(), "exact_s": runs["timings"]["exact"], "raced_s": runs["timings"]["raced"],
               "race_speedup": runs["race_speedup"], "race_cpu_speedup": runs["race_cpu_speedup"],
               "identical_choices": runs["identical_choices"], "race_regret": runs["race_regret"],
               "exact_final_ppl": runs["final_ppl"]["exact"], "raced_final_ppl": runs["final_ppl"]["raced"],
               "exact_choices": [str(c) for c in exact.components], "raced_choices": [str(c) for c in fast.components],
               "raced_stats": fast.stats}
    lines = [f"model {printable(args.model)}, kinds {args.kinds}, {args.steps} steps, {windows.shape[0]} windows × "
             f"{windows.shape[1]} tokens; race on {race.windows} windows, {race.finish} finished exactly per step",
             f"exact search: {runs['timings']['exact']:.2f} s wall  ({', '.join(payload['exact_choices'])})",
             f"raced search: {runs['timings']['raced']:.2f} s wall  ({', '.join(payload['raced_choices'])})",
             f"race speed-up: {runs['race_speedup']:.2f}× wall, {runs['race_cpu_speedup']:.2f}× CPU (one run each)   "
             f"identical choices: {runs['identical_choices']} of {len(exact.steps)}",
             f"raced regret: {100 * runs['race_regret']:+.3f} % final calibration perplexity "
             f"(raced {runs['final_ppl']['raced']:.4f} vs exact {runs['final_ppl']['exact']:.4f})"]
    emit(args, payload, "\n".join(lines))
    return 0


def _workers(args, model, windows) -> int:
    """``bench search --workers 1,2``: the same search on pools of each size, timed."""
    from shedder.cli.common import emit, progress  # lazy: start-up (--help imports no torch)
    from shedder.dev.workers import bench_workers  # lazy: start-up (--help imports no torch)

    with progress(args) as bar:
        report = bench_workers(model, windows, args.kinds, args.steps, args.workers, args.batch_size,
                               args.ray_address, bar)
    first = report["runs"][0]["workers"]
    lines = [f"model {printable(args.model)}, kinds {args.kinds}, {args.steps} steps, "
             f"{windows.shape[0]} windows × {windows.shape[1]} tokens of {args.data!r}, workers on {args.device}"]
    lines += [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}: {r['seconds']:.2f} s  "
              f"speed-up over {first}: {r['speedup']:.2f}×  ({', '.join(r['choices'])})" for r in report["runs"]]
    lines.append(f"identical choices and perplexities: {'yes' if report['identical'] else 'NO'}")
    emit(args, {"model": args.model, "kinds": args.kinds, "steps": args.steps, **report}, "\n".join(lines))
    return 0 if report["identical"] else 1


def recover_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", type=kinds, default=list(RECOVER_METHODS), help="comma-separated (default all)")
    p.add_argument("--steps", type=positive_int, default=12, help="steps per method (default 12)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=64, help="tokens per window (default 64)")
    p.add_argument("--eval-samples", type=positive_int, default=32, help="held-out test windows (default 32)")
    p.add_argument("--threads", type=threads, default=2, help="CPU threads (default 2)")
    common(p)
    p.set_defaults(func=run_recover)


def run_recover(args) -> int:
    from shedder.cli.common import emit, progress  # lazy: start-up (--help imports no torch)
    from shedder.dev.recover_bench import compare_methods, format_comparison  # lazy: start-up (--help imports no torch)

    with progress(args) as bar:
        rows = compare_methods(args.methods, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                               eval_samples=args.eval_samples, threads=args.threads, progress=bar)
    emit(args, {"rows": rows}, format_comparison(rows))
    return 0


def scale_parser(command: str, main) -> argparse.ArgumentParser:
    """The parser of ``bench scale`` or ``bench gpu-check`` (``main``: the CLI gpu-check drives)."""
    if command == "scale":
        p = OneLineParser(prog="python -m shedder bench scale",
                          description="Time per candidate evaluation and peak memory of eval, score and "
                                      "search on random Mamba-2 models of growing size.")
        p.add_argument("--sizes", default=",".join(SCALE_SIZES), help=f"comma-separated, from {', '.join(SCALE_SIZES)} (default all)")
        p.add_argument("--samples", type=positive_int, default=4, help="calibration windows (default 4)")
        p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
        p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward (default 4)")
        p.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
        p.set_defaults(func=run_scale)
    else:
        p = OneLineParser(prog="python -m shedder bench gpu-check",
                          description="The whole CLI journey on CUDA on a real-shape random model; with --paper "
                                      "instead, the paper's speed measurements (Mamba-2.8B minus 14 blocks, "
                                      "Mamba2-2.7B minus 22 SSMs, random weights, float16) written to --out.")
        p.add_argument("--family", choices=REAL_SHAPE_FAMILIES, help="family (default mamba2)")
        p.add_argument("--layers", type=positive_int, help="layers of the published layout (default 4)")
        paper = p.add_argument_group("--paper")
        paper.add_argument("--paper", action="store_true", help="measure the paper's two models (docs/gpu.md)")
        paper.add_argument("--out", help="with --paper: directory for gpu-check-paper.json and .md")
        paper.add_argument("--dry-run", action="store_true",
                           help="with --paper: the same plans and reports on the CPU, with tiny shapes")
        paper.add_argument("--budget-s", type=positive_float,
                           help=f"with --paper: seconds of paired rounds per measurement (default {PAPER_BUDGET_S:g})")
        paper.add_argument("--total-s", type=positive_float,
                           help=f"with --paper: seconds for the whole run, model builds included "
                                f"(default {PAPER_TOTAL_S:g})")
        paper.add_argument("--overwrite", action="store_true",
                           help="with --paper: replace report files an earlier run wrote")
        p.set_defaults(func=lambda args: run_gpu_check(args, main))
    p.add_argument("--device", default="cuda" if command == "gpu-check" else "cpu", help=argparse.SUPPRESS
                   if command == "gpu-check" else "cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None if command == "gpu-check" else "float32",
                   help="float32, float16 or bfloat16" + (" (default bfloat16; --paper measures in float16, float32 with --dry-run)"
                                                          if command == "gpu-check" else ""))
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run_scale(args) -> int:
    """``bench scale``: ``shedder.dev.scale.run_scale``."""
    from shedder.dev import scale  # lazy: start-up (--help imports no torch)

    return scale.run_scale(args)


def run_gpu_check(args, main) -> int:
    """``bench gpu-check``: the journey, or with ``--paper`` the paper's speed measurements. Without a
    CUDA device (and without ``--dry-run``) either says so in one line and exits 0."""
    import torch  # lazy: start-up (--help imports no torch)

    from shedder.dev import scale  # lazy: start-up (--help imports no torch)
    from shedder.dev.paper_speed import JSON_NAME, MARKDOWN_NAME, PaperRun, markdown, run_paper  # lazy: start-up (--help imports no torch)

    paper_only = [flag for flag, value in (("--out", args.out), ("--dry-run", args.dry_run),
                                           ("--budget-s", args.budget_s), ("--total-s", args.total_s),
                                           ("--overwrite", args.overwrite)) if value not in (None, False)]
    if not args.paper:
        if paper_only:
            raise ShedderError(f"{paper_only[0]} belongs to --paper (bench gpu-check --paper --out DIR)")
        args.family, args.layers, args.dtype = args.family or "mamba2", args.layers or 4, args.dtype or "bfloat16"
        return scale.run_gpu_check(args, main)
    journey_only = [flag for flag, value in (("--family", args.family), ("--layers", args.layers),
                                             ("--dtype", args.dtype)) if value is not None]
    if journey_only:
        raise ShedderError(f"{journey_only[0]} belongs to the journey; --paper measures its two models in float16")
    if not args.out:
        raise ShedderError("--paper needs --out DIR for its JSON and Markdown report")
    if not args.dry_run and not torch.cuda.is_available():
        print(scale.SKIPPED)
        return 0
    run = PaperRun(Path(args.out), args.dry_run, args.budget_s or PaperRun.budget_s, args.total_s or PaperRun.total_s,
                   args.overwrite)
    report = run_paper(run, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    print(f"gpu-check --paper: wrote {printable(str(Path(args.out) / JSON_NAME))} and {MARKDOWN_NAME}", file=sys.stderr)
    return 1 if any("error" in r for m in report["models"] for r in m["runs"]) else 0


def scan_parser(bench_sub) -> None:
    """``bench scan``: the engine's SSD scan vs transformers' torch reference."""
    s = bench_sub.add_parser("scan", help="engine SSD scan vs transformers' torch reference (Mamba-2 130M shape)",
                             description="Time the engine's CPU SSD scan against transformers' torch reference "
                                         "at the Mamba-2 130M shape (paired rounds), one scan call and the whole "
                                         "model's prefill, and print the speed-ups and the max differences.")
    s.add_argument("--no-model", action="store_true", help="only the scan call, not the 130M-shape prefill")
    s.add_argument("--step", action="store_true",
                   help="also time one greedy SSM step (fresh search per sample) with each scan")
    s.add_argument("--layers", type=positive_int, default=24, help="with --step: layers of the 130M shape (default 24)")
    s.add_argument("--budget-s", type=positive_float, default=20.0, help="time budget per measurement (default 20)")
    s.add_argument("--json", action="store_true", help="print JSON (keys speedup, max_abs_diff, ...)")
    s.set_defaults(func=run_scan)


def run_scan(args) -> int:
    """The scan benchmark's report."""
    from shedder.cli.common import emit  # lazy: start-up (--help imports no torch)
    from shedder.dev.scan_bench import compare_scan, compare_step  # lazy: start-up (--help imports no torch)

    protocol = Protocol(budget_s=args.budget_s)
    r = compare_scan(protocol, model=not args.no_model)
    if args.step:
        r["greedy_step"] = compare_step(protocol, args.layers)
    ratio = lambda d: Ratio(d["median"], tuple(d["ci95"]), d["rounds"], d["noisy"], d["resolved"]).text()  # noqa: E731
    lines = [f"bench scan: {protocol.describe()}",
             f"scan call (4 × 256 tokens, 24 heads × 64, state 128, engine chunk {r['chunk']}): speed-up "
             f"{ratio(r['scan'])}; {r['scan']['reference_s'] * 1e3:.1f} ms → {r['scan']['engine_s'] * 1e3:.1f} ms",
             f"max abs diff {r['max_abs_diff']:.3g} (relative {r['max_rel_diff']:.2g}); bf16 inputs: relative "
             f"{r['bf16_max_rel_diff_vs_reference']:.2g} vs the bf16 reference, {r['bf16_max_rel_diff_vs_fp32']:.2g} "
             "vs fp32"]
    if "model_prefill" in r:
        p = r["model_prefill"]
        lines.append(f"130M-shape prefill (24 layers, 4 × 256 tokens): speed-up {ratio(p)}; "
                     f"{p['reference_s']:.2f} s → {p['engine_s']:.2f} s")
    if "greedy_step" in r:
        g = r["greedy_step"]
        lines.append(f"one greedy SSM step ({g['layers']} layers, 4 × 256 tokens): speed-up {ratio(g)}; "
                     f"{g['reference_s']:.1f} s → {g['engine_s']:.1f} s; "
                     + ("same choice" if g["same_choice"] else "DIFFERENT choices"))
    emit(args, r, "\n".join(lines))
    return 0


def dtype_parser(bench_sub) -> None:
    """``bench dtype``: float32 vs bfloat16 for eval, score and search."""
    d = bench_sub.add_parser("dtype", help="what --dtype bfloat16 buys, and its agreement with float32",
                             description="Load the model in float32 and in bfloat16; time a calibration pass of "
                                         "each in paired rounds; compare their perplexity, single-removal scores "
                                         "(top-K overlap, rank correlation) and greedy-search choices.")
    model_options(d)
    d.add_argument("--kinds", type=kinds, default=["ssm"], help="comma-separated kinds scored and searched (default ssm)")
    d.add_argument("--steps", type=positive_int, default=2, help="greedy steps in each dtype (default 2)")
    d.add_argument("--top", type=positive_int, default=5, help="least important components compared (default 5)")
    d.add_argument("--budget-s", type=positive_float, default=20.0, help="time budget of the paired rounds (default 20)")
    data_options(d, DEFAULT_CALIBRATION, DEFAULT_SAMPLES)
    common(d)
    d.set_defaults(func=run_dtype)


def run_dtype(args) -> int:
    """The dtype benchmark's report."""
    from shedder.cli.common import emit, load, text_tokenizer  # lazy: start-up (--help imports no torch)
    from shedder.dev.dtype_bench import compare_dtypes  # lazy: start-up (--help imports no torch)
    from shedder.measure.data import calibration_windows  # lazy: start-up (--help imports no torch)

    models, tokenizer = {}, None
    for dtype in ("float32", "bfloat16"):
        args.dtype = dtype
        models[dtype], tokenizer = load(args)
    windows = calibration_windows(text_tokenizer(args, tokenizer), args.data, samples=args.samples, seq_len=args.seq_len)
    protocol = Protocol(budget_s=args.budget_s)
    r = compare_dtypes(models, windows, args.kinds, steps=args.steps, top=args.top, protocol=protocol,
                       batch_size=args.batch_size)
    e, sc, se = r["eval_speedup"], r["score"], r["search"]
    ratio = Ratio(e["median"], tuple(e["ci95"]), e["rounds"], e["noisy"], e["resolved"]).text()
    lines = [f"bench dtype: {printable(args.model)}, {windows.shape[0]} × {windows.shape[1]} calibration tokens, "
             f"kinds {','.join(args.kinds)}",
             f"calibration pass: bfloat16 speed-up {ratio} ({protocol.describe()}); "
             f"{e['seconds']['float32'] * 1e3:.0f} ms → {e['seconds']['bfloat16'] * 1e3:.0f} ms",
             f"perplexity: float32 {r['ppl']['float32']:.4f}, bfloat16 {r['ppl']['bfloat16']:.4f} "
             f"({r['ppl_rel_diff']:.2%} apart)",
             f"score ({sc['components']} components): {sc['top_overlap']} of the {args.top} least important agree, "
             f"rank correlation {sc['spearman']:.3f}; one run each: {sc['seconds']['float32']:.1f} s → "
             f"{sc['seconds']['bfloat16']:.1f} s ({sc['speedup_single_run']:.2f}×, single run)",
             f"search ({args.steps} steps): {se['identical_steps']} of {args.steps} choices identical; final perplexity "
             f"float32 {se['final_ppl']['float32']:.4f}, bfloat16 {se['final_ppl']['bfloat16']:.4f}; one run each: "
             f"{se['seconds']['float32']:.1f} s → {se['seconds']['bfloat16']:.1f} s "
             f"({se['speedup_single_run']:.2f}×, single run)"]
    emit(args, r, "\n".join(lines))
    return 0


def announce_parser(bench_sub) -> None:
    """``bench announce``: a search's announced memory and ETA against what happens."""
    a = bench_sub.add_parser("announce", help="announced vs actual memory and time of a search step (130M shape)",
                             description="Announce one greedy SSM step on a random-weight model in the Mamba-2 "
                                         "130M shape, run it, and print the announced activation cache and ETA "
                                         "next to the bytes the evaluator held, the RSS growth and the wall time.")
    a.add_argument("--layers", type=positive_int, default=24, help="first layers of the 130M shape (default 24)")
    a.add_argument("--samples", type=positive_int, default=4, help="calibration windows (default 4)")
    a.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default 256)")
    a.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward (default 4)")
    a.add_argument("--threads", type=threads, help="CPU threads for PyTorch (default: PyTorch's choice)")
    a.add_argument("--json", action="store_true", help="print JSON (announced_*, held_cache_bytes, rss_growth_bytes, "
                                                        "actual_s, ratios)")
    a.set_defaults(func=run_announce)


def run_announce(args) -> int:
    """The announcement benchmark's report."""
    import torch  # lazy: start-up (--help imports no torch)

    from shedder.cli.common import emit  # lazy: start-up (--help imports no torch)
    from shedder.dev import announce_bench  # lazy: start-up (--help imports no torch)

    if args.threads:
        torch.set_num_threads(args.threads)
    r = announce_bench.measure(args.layers, args.samples, args.seq_len, args.batch_size)
    emit(args, {**r, "ratios": announce_bench.ratios(r)}, announce_bench.format_report(r))
    return 0
